"""Speed and memory tricks, kept apart from the computation they speed up. Skip this file on a first read.

Nothing here changes a float32 number, and nothing here changes process-wide state unless a function says so.

On by default (they change no number and touch nothing outside the model):
    LeanTensorFile       reads a tensor that must be cast or moved to a GPU through a private memory map of its
                         file and drops those pages right after (safetensors and memory-mapped pickles alike), so no
                         second copy of the weights stays behind
    decode_images        for float16 VAEs: a result that overflowed (inf/NaN) is decoded again in float32
Opt-in:
    model.enable_low_memory(...)   LowMemory: attention in slices of query rows, tiled VAE decoding, and on a GPU
                                   networks kept on the CPU and moved to the GPU only while they run
    model.compile()                torch.compile of the UNet (minivd.model)
    reuse_freed_memory()           CPU: lets glibc's malloc keep large freed blocks while the UNet runs step after
                                   step (changes the C library's settings for the process while it is active)
"""

import ctypes
import mmap
import os
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F

import weights_loader

from .attention import Attention, attend
from .vae import latents_to_images, to_unit_range

# ---------------------------------------------------------------------------------------------------------------------
# Reading weights with one copy


class LeanTensorFile(weights_loader.TensorFile):
    """A TensorFile whose cast or device copies keep no second copy of the weights in memory: only the result stays.

    safetensors: the copy reads through this object's own private memory map of the file, whose pages are dropped
    (madvise) after each copy. Zero-copy tensors (CPU, stored dtype) still come from safetensors' own map: if both
    came from one map, dropping the pages of a cast tensor could also drop a shared page of a zero-copy neighbour.
    Pickles (.bin, .pth) that torch.load memory-mapped: after the copy, the pages that lie wholly inside the stored
    tensor's bytes are dropped from torch's map (pages it shares with a neighbour are left alone). Without that, every stored
    tensor read stays resident next to its cast copy until the file is closed (fp16 files read into fp32: half as
    much again). Where madvise is missing, the pages go when this object is dropped.
    """

    _map = None

    def get(self, key, device="cpu", dtype=None):
        device = torch.device(device)
        stored_dtype = self.dtype(key)
        copied = device.type != "cpu" or (dtype is not None and stored_dtype.is_floating_point and stored_dtype != dtype)
        if isinstance(self._file, dict):
            t = super().get(key, device, dtype)
            if copied and self.mapped:
                drop_pages(self._file[key])
            return t
        if not copied:
            return super().get(key, device, dtype)
        try:
            t = self._mapped(key)
        except Exception as e:
            raise ValueError(f"{self.path}: tensor {key!r} could not be read (truncated or corrupt file?): {e}") from e
        t = t.to(device)
        t = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        self._release(key)
        return t

    def _mapped(self, key):
        """One tensor as a view of this object's private map (copy-on-write: torch may write, the file never changes)."""
        dtype, shape, (begin, end) = self._entries[key]
        if begin == end:
            return torch.empty(shape, dtype=dtype)
        if self._map is None:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        data = torch.frombuffer(self._map, dtype=torch.uint8, offset=self._data_start + begin, count=end - begin)
        return data.view(dtype).reshape(shape)

    def _release(self, key):
        """Drop `key`'s pages from this process's memory (the OS may keep them cached)."""
        _, _, (begin, end) = self._entries[key]
        if end > begin and hasattr(mmap, "MADV_DONTNEED"):
            start = (self._data_start + begin) // mmap.PAGESIZE * mmap.PAGESIZE
            self._map.madvise(mmap.MADV_DONTNEED, start, self._data_start + end - start)


def drop_pages(tensor):
    """Drop the memory pages that lie wholly inside `tensor`'s bytes, a view of a private file map (torch.load's
    mmap): they are read from the file again if touched. Only for clean pages of a file map: on other memory,
    MADV_DONTNEED would discard data."""
    libc = glibc()
    if libc is None or not hasattr(mmap, "MADV_DONTNEED") or tensor.numel() == 0:
        return
    extent = 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))  # elements spanned
    begin = -(-tensor.data_ptr() // mmap.PAGESIZE) * mmap.PAGESIZE  # rounded in: pages shared with neighbours stay
    end = (tensor.data_ptr() + extent * tensor.element_size()) // mmap.PAGESIZE * mmap.PAGESIZE
    if end > begin:
        libc.madvise(ctypes.c_void_p(begin), ctypes.c_size_t(end - begin), mmap.MADV_DONTNEED)


# ---------------------------------------------------------------------------------------------------------------------
# Low memory: attention slicing, tiled decoding, offload


def sliced_attend(q, k, v, causal=False, slice_size=1024):
    """`attention.attend` for `slice_size` query rows at a time: the scores never hold more than (B, nh, slice, M)
    numbers. The same result up to float rounding. q: (B, nh, N, hd), k, v: (B, nh, M, hd) -> (B, nh, N, hd)."""
    if slice_size >= q.shape[2]:
        return attend(q, k, v, causal)
    rows = []
    for start in range(0, q.shape[2], slice_size):
        q_rows = q[:, :, start : start + slice_size]  # (B, nh, n, hd)
        mask = None
        if causal:  # row start+i sees keys 0 .. start+i
            mask = torch.ones(q_rows.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril(start)  # (n, M)
        rows.append(F.scaled_dot_product_attention(q_rows, k, v, attn_mask=mask))
    return torch.cat(rows, dim=2)


def set_attention_slicing(module, slice_size):
    """Attend `slice_size` query rows at a time in every `Attention` inside `module` (None: all rows at once).
    Returns the number of attention layers changed."""
    if slice_size is not None and (isinstance(slice_size, bool) or not isinstance(slice_size, int) or slice_size < 1):
        raise ValueError(f"slice_size must be a positive integer or None, got {slice_size!r}")
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    layers = [m for m in module.modules() if isinstance(m, Attention)]
    for layer in layers:
        layer.attend = attend if slice_size is None else partial(sliced_attend, slice_size=slice_size)
    return len(layers)


class LowMemory:
    """The settings of `VersatileDiffusion.enable_low_memory`, applied again to whatever the model reads later."""

    def __init__(self, attention_slice=1024, vae_tile_size=512, offload=None):
        if vae_tile_size is not None and (isinstance(vae_tile_size, bool) or not isinstance(vae_tile_size, int)
                                          or vae_tile_size < 8 or vae_tile_size % 8):
            raise ValueError(f"vae_tile_size must be a positive multiple of 8 pixels or None, got {vae_tile_size!r}")
        set_attention_slicing(torch.nn.Module(), attention_slice)  # checks the value
        self.attention_slice, self.vae_tile_size, self.offload = attention_slice, vae_tile_size, offload
        self.active = None  # offload: the network now on the compute device

    def apply(self, model):
        if self.offload is None:
            self.offload = model.device.type != "cpu"
        if model.unet is not None:
            set_attention_slicing(model.unet, self.attention_slice)
        if self.offload:
            for name in ("unet", "text_encoder", "image_encoder", "vae", "optimus"):
                self.offload_network(model, getattr(model, name))

    def offload_network(self, model, network):
        """Keep `network` on the CPU and move it to `model.device` only while it runs: the first of its submodules to
        run moves it there and the previous network back (at most one network on the GPU at a time)."""
        if network is None or getattr(network, "offloaded", False):
            return
        network.to("cpu")
        for module in network.modules():
            module.register_forward_pre_hook(lambda module, args: self.bring(model, network))
        network.offloaded = True

    def bring(self, model, network):
        if self.active is not network:
            if self.active is not None:
                self.active.to("cpu")
            network.to(model.device)
            self.active = network


def decode_images(model, latents):
    """`VersatileDiffusion.decode_images` with the tricks: tiles of `vae_tile_size` pixels when low memory is on, and
    for float16 weights (with the VAE config's force_upcast) a float32 retry when the result overflowed."""
    vae = model.vae
    dtype = next(vae.parameters()).dtype
    tile = model.low_memory.vae_tile_size if model.low_memory is not None else None
    scale = vae.cfg.scaling_factor

    def run(z):
        if tile is None or (z.shape[2] * model.vae_factor <= tile and z.shape[3] * model.vae_factor <= tile):
            return latents_to_images(vae, z)
        return to_unit_range(decode_tiled(vae, z / scale, tile // model.vae_factor))

    return float16_guarded(run, latents, [vae.post_quant_conv, vae.decoder], dtype == torch.float16 and vae.cfg.force_upcast).float()


def float16_guarded(run, x, modules, guard=True):
    """run(x) in the dtype of the `modules`' weights, and the result in that dtype; with `guard` (float16 weights),
    run once more in float32 if that result holds inf or NaN. The VAE's activations can exceed float16's range (65504)
    at large images while its output does not; checking the result instead of always upcasting keeps the usual case
    at float16's memory."""
    modules = [m for m in modules if m is not None]
    dtype = next(modules[0].parameters()).dtype
    out = run(x.to(dtype))
    if not guard or torch.isfinite(out).all():
        return out
    del out  # overflowed: free it before the float32 run
    for m in modules:
        m.float()
    try:
        return run(x.float()).to(dtype)
    finally:
        for m in modules:
            m.to(dtype)


def decode_tiled(vae, z, tile, overlap=0.25):
    """Decode UNSCALED (B, L, h, w) latents as tiles of tile x tile latent pixels that overlap by `overlap` of a tile.

    Each tile's pixels get a weight that ramps up linearly over the overlap from its edges; the image is the
    weighted mean of the tiles covering each pixel. Like diffusers' tiled decode this is an approximation: GroupNorm
    statistics and the mid-block attention see one tile, not the whole image, so colours can shift slightly between
    tiles. Peak memory is that of one tile. Returns (B, 3, 8h, 8w), roughly in [-1, 1].
    """
    if not 0 <= overlap < 1:
        raise ValueError(f"tile_overlap must be in [0, 1), got {overlap}")
    f, (B, _, h, w) = vae.downscale, z.shape
    if h <= tile and w <= tile:  # one tile covers the image: decode it whole, exactly
        return vae.decode(z)
    stride = max(1, round(tile * (1 - overlap)))
    ramp = max(1, (tile - stride) * f)  # pixels over which a tile fades in

    def starts(size):  # tile origins covering 0..size, the last one flush with the end
        if size <= tile:
            return [0]
        return list(range(0, size - tile, stride)) + [size - tile]

    def fade(n):  # (n,) weights in (0, 1]: small at both ends, 1 in the middle
        i = torch.arange(n, dtype=torch.float32, device=z.device)
        return torch.minimum((i + 1) / (ramp + 1), (n - i) / (ramp + 1)).clamp(max=1.0)

    images = weights = None
    for y in starts(h):
        for x in starts(w):
            part = vae.decode(z[:, :, y : y + tile, x : x + tile]).float()  # (B, 3, th*f, tw*f)
            if images is None:
                images = torch.zeros(B, part.shape[1], h * f, w * f, device=z.device)
                weights = torch.zeros(1, 1, h * f, w * f, device=z.device)
            weight = fade(part.shape[2])[:, None] * fade(part.shape[3])[None, :]  # (th*f, tw*f)
            rows, cols = slice(y * f, y * f + part.shape[2]), slice(x * f, x * f + part.shape[3])
            images[:, :, rows, cols] += part * weight
            weights[:, :, rows, cols] += weight
    return (images / weights).to(z.dtype)


# ---------------------------------------------------------------------------------------------------------------------
# CPU: reuse freed heap blocks while the UNet runs (opt-in: it changes the C library's settings while active)


def glibc():
    """The C library, if it is glibc (its malloc tuning calls exist); None on other systems."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


@contextmanager
def reuse_freed_memory(device="cpu", limit=128 * 2**20):
    """Let glibc's malloc keep and reuse freed blocks up to `limit` bytes inside the block, instead of handing each one
    above 128 KiB back to the OS and page-faulting it in again at the next step (activations, oneDNN's reordered conv
    weights). On exit glibc's default thresholds come back and malloc_trim returns the freed memory to the OS.

    This changes process-wide state (malloc's settings) while the block runs, for every thread: use it where this
    process is yours, e.g. `with minivd.speed.reuse_freed_memory(): minivd.generate(...)`. It changes no number.
    Skipped on a GPU, off glibc, and when the MALLOC_*_THRESHOLD_ environment variables show a tuned allocator.
    """
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, DEFAULT = -1, -3, 128 * 1024  # mallopt parameters (malloc.h), glibc's default
    tuned = any(name in os.environ for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"))
    libc = glibc() if torch.device(device).type == "cpu" and not tuned else None
    if libc is None:
        yield
        return
    libc.mallopt(M_MMAP_THRESHOLD, limit)
    libc.mallopt(M_TRIM_THRESHOLD, 2 * limit)
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, DEFAULT)
        libc.mallopt(M_TRIM_THRESHOLD, DEFAULT)
        libc.malloc_trim(0)
