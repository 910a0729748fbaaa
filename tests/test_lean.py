"""Lean loading and the memory/speed options: what is loaded per flow, and that the options keep the numbers."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import minivd
from minivd import ImagePrompt, speed
from minivd.resnet import ResBlock
from minivd.tools.memory import LiveBytes

H = W = 64
RUN = dict(prompt="a fox", steps=3, height=H, width=W, output="np")


def latents(seed=0):
    return torch.randn(1, 4, H // 8, W // 8, generator=torch.Generator().manual_seed(seed))


def test_text_to_image_reads_the_vae_decoder_only(tiny_vd):
    model = minivd.load(tiny_vd).prepare("text-to-image")
    assert model.vae.encoder is None and model.vae.decoder is not None
    assert model.image_encoder is None and set(model.unet.data) == {"image"}
    picture = Image.new("RGB", (W, H), (90, 140, 200))
    minivd.generate("image-variation", model=model, image=ImagePrompt(picture, fidelity=0.5), steps=2, height=H, width=W,
                    seed=0)
    assert model.vae.encoder is not None  # fidelity encodes the input: the VAE was read again with its encoder


def test_low_memory_options_keep_the_result(tiny_vd):
    plain = minivd.generate("text-to-image", model=minivd.load(tiny_vd), latents=latents(), **RUN)
    lean = minivd.load(tiny_vd).enable_low_memory(attention_slice=7, vae_tile_size=H, offload=True)
    got = minivd.generate("text-to-image", model=lean, latents=latents(), **RUN)
    assert lean.unet.context["text"].blocks[0].block.attn1.attend.keywords == {"slice_size": 7}
    assert np.abs(got - plain).max() < 1e-5  # slicing changes float rounding only; one tile = the whole image
    assert all(p.device.type == "cpu" for p in lean.unet.parameters())


def test_bfloat16_on_cpu_runs_close_to_float32(tiny_vd):
    fp32 = minivd.generate("text-to-image", model=minivd.load(tiny_vd), latents=latents(1), **RUN)
    bf16 = minivd.generate("text-to-image", model=minivd.load(tiny_vd, dtype=torch.bfloat16), latents=latents(1), **RUN)
    assert bf16.dtype == np.float32 and np.isfinite(bf16).all()
    assert np.abs(bf16 - fp32).max() < 0.1  # bf16 keeps 8 bits of mantissa


def test_compile_needs_a_loaded_unet(tiny_vd):
    with pytest.raises(ValueError, match="prepare"):
        minivd.load(tiny_vd).compile()


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="torch.compile needs a C++ compiler on the CPU")
def test_compile_keeps_the_result(tiny_vd):
    model = minivd.load(tiny_vd)
    eager = minivd.generate("text-to-image", model=model, latents=latents(2), **RUN)
    model.prepare("text-to-image").compile()
    compiled = minivd.generate("text-to-image", model=model, latents=latents(2), **RUN)
    assert model.unet._compiled_call_impl is not None  # the calls that ran went through torch.compile's graph
    assert np.abs(compiled - eager).max() < 1e-4  # fused kernels reorder float sums; nothing else may change


HEAP_PROBE = """
import ctypes, sys, torch, minivd

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2

def mapped_for(mib):  # bytes glibc memory-maps (instead of taking from the heap) for a fresh tensor of `mib` MiB
    before = libc.mallinfo2().hblkhd
    block = torch.ones(mib * 2**18)
    return libc.mallinfo2().hblkhd - before

inside = []
model = minivd.load(sys.argv[1])
run = lambda: minivd.generate("text-to-image", model=model, prompt="a fox", steps=2, height=64, width=64,
                              output="latent", callback=lambda step, t, x, **state: inside.append(mapped_for(int(sys.argv[2]))))
if sys.argv[3] == "opt-in":
    with minivd.speed.reuse_freed_memory():
        run()
else:
    run()
print(inside, mapped_for(100))  # 100 MiB: larger than any block this run freed, below the 128 MiB limit
"""


def heap_probe(folder, inside_mib, how="opt-in", **env):
    """Run HEAP_PROBE in a fresh process: ([mapped bytes for a block allocated at each step], the same for a 100 MiB
    block after generate returned)."""
    env = dict({k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}, **env)
    done = subprocess.run([sys.executable, "-c", HEAP_PROBE, str(folder), str(inside_mib), how], capture_output=True,
                          text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    inside, after = done.stdout.strip().rsplit("] ", 1)
    return [int(v) for v in inside.strip("[").split(",")], int(after)


@pytest.mark.skipif(speed.glibc() is None or not hasattr(speed.glibc(), "mallinfo2"), reason="needs glibc >= 2.33")
def test_reuse_freed_memory_is_opt_in_and_restores_malloc(tiny_vd):
    """Inside speed.reuse_freed_memory a 4 MiB block comes from the heap; after it, glibc's defaults map big blocks
    again. A plain generate leaves malloc's settings alone (process-wide state): a 100 MiB block is mapped at every
    step."""
    inside, after = heap_probe(tiny_vd, 4)
    assert inside == [0, 0] and after >= 100 * 2**20
    inside, after = heap_probe(tiny_vd, 100, how="default")
    assert min(inside) >= 100 * 2**20 and after >= 100 * 2**20
    inside, after = heap_probe(tiny_vd, 100, MALLOC_TRIM_THRESHOLD_="131072")  # a tuned allocator is left alone
    assert min(inside) >= 100 * 2**20 and after >= 100 * 2**20


def test_loading_builds_shapes_without_random_fills_or_the_compiler(tiny_vd):
    """load/prepare build modules on the meta device with the random fills skipped (meta-device fills would import
    torch._dynamo, about a second of every load), without touching torch.nn.init or any other process-wide state."""
    probe = ("import sys, torch, minivd\n"
             "fill = torch.nn.init.normal_\n"
             "model = minivd.load(sys.argv[1])\n"
             "for flow in ('text-to-image', 'image-variation', 'dual-guided', 'image-to-text', 'text-variation'):\n"
             "    model.prepare(flow)\n"
             "print('torch._dynamo' in sys.modules, torch.nn.init.normal_ is fill)\n")
    done = subprocess.run([sys.executable, "-c", probe, str(tiny_vd)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "True"]
    with minivd.checkpoint.ShapesOnly(), torch.device("meta"):
        skipped = torch.nn.Linear(4, 4)
    assert skipped.weight.is_meta
    assert torch.nn.init.normal_(torch.zeros(1000)).std() > 0.5  # outside the block, fills work


def test_loading_in_one_thread_leaves_module_init_in_another_alone(tiny_vd):
    """Shape-only building is scoped to the loading thread: modules built at the same time elsewhere get their random
    initialisation (a process-wide switch would leave them uninitialised)."""
    import threading

    done = threading.Event()

    def load_repeatedly():
        for _ in range(3):
            minivd.load(tiny_vd).prepare("dual-guided")
        done.set()

    loader = threading.Thread(target=load_repeatedly)
    loader.start()
    stds = []
    while not done.is_set():
        stds.append(torch.nn.Linear(64, 64).weight.std().item())
    loader.join()
    assert stds and min(stds) > 0.01


def peak_bytes(run, *args):
    """The most memory that tensors created by run(*args) held at once (what peak CUDA memory counts on a GPU)."""
    with torch.no_grad(), LiveBytes() as live:
        run(*args)
    return live.peak


def test_resblock_keeps_at_most_two_new_feature_maps_alive():
    """SiLU in place on the norm's output and h rebound before the second conv: besides its input, a ResBlock holds
    h and the conv's output, never the pre-norm h, the norm's output and the SiLU's output together."""
    block = ResBlock(64, 64, groups=8).eval()
    x = torch.randn(1, 64, 32, 32)
    assert peak_bytes(block, x) <= 2 * x.nbytes + 4096  # 4 KiB: GroupNorm's per-group statistics


def test_vae_decode_peak_memory_is_below_diffusers(tiny_vd):
    """Tensors alive at once while decoding a 256 x 256 image, against diffusers' AutoencoderKL on the same file."""
    from diffusers import AutoencoderKL as ReferenceVAE

    vae = minivd.load(tiny_vd).prepare("text-to-image").vae
    reference = ReferenceVAE.from_pretrained(os.path.join(tiny_vd, "vae")).eval()
    z = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    assert peak_bytes(vae.decode, z) < peak_bytes(reference.decode, z)  # 16 vs 20 MiB when written
