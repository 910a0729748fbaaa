"""`generate`: every Versatile Diffusion flow through one function.

Legend: B = number of outputs (conditions x num_images), M context tokens, Cc context width (768).

A generation is four steps, the same for every flow:
    1. contexts   encode the condition(s) with CLIP: text -> (B, 77, Cc), image -> (B, 257, Cc), plus the
                  unconditional ones ("" / a mid-gray picture) for classifier-free guidance
    2. latents    start from Gaussian noise x_T (seeded on the CPU, like diffusers), or, with fidelity, from the
                  input image's own latents noised part of the way
    3. denoise    DDIM over the UNet with the flow's data layers and context layers (minivd.ddim)
    4. decode     the VAE turns image latents into pixels; Optimus turns text latents (B, 768) into sentences

Flows: text-to-image, image-variation, dual-guided, image-to-text, text-variation (minivd.unet.FLOWS), and
multi-context: several images (each weighted, focused and optionally masked) and an optional prompt, mixed by ratio.
"""

import ctypes
import inspect
import os
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image

from . import extensions
from .clip import preprocess
from .model import VersatileDiffusion, demo_model, flow_parts, load
from .vae import images_to_latents, latents_to_images

MODES = ("text-to-image", "image-variation", "dual-guided", "image-to-text", "text-variation", "multi-context")
OUTPUTS = ("pil", "np", "latent")  # image flows; the text flows return strings ("pil"/"text") or "latent"


def resolve_model(model, device="cpu", dtype=torch.float32):
    """A loaded model, a path, or None: $MINIVD_WEIGHTS if set, else the built-in tiny demo model."""
    if isinstance(model, VersatileDiffusion):
        return model
    if model is None:
        model = os.environ.get("MINIVD_WEIGHTS")
        if not model:
            return demo_model(device, dtype)
    if isinstance(model, (str, os.PathLike)):
        return load(model, device=device, dtype=dtype)
    raise TypeError(f"model must be a VersatileDiffusion, a checkpoint path or None, got {type(model).__name__}")


def as_list(value, name, kind):
    """str -> [str]; list of str stays; anything else is an error naming `name`."""
    items = [value] if isinstance(value, kind) else value
    if not isinstance(items, (list, tuple)) or not items or not all(isinstance(v, kind) for v in items):
        want = "a string" if kind is str else "a PIL.Image.Image"
        got = type(value).__name__ if not isinstance(value, (list, tuple)) else f"a list of {[type(v).__name__ for v in value]}"
        hint = " (convert arrays with PIL.Image.fromarray)" if kind is not str else ""
        raise TypeError(f"{name} must be {want} or a non-empty list of them, got {got}{hint}")
    return list(items)


@torch.no_grad()
def encode_text(model, prompts):
    """CLIP text context, VD-normalised: list of B strings -> (B, 77, Cc)."""
    with model.running("text_encoder"):
        return model.text_encoder(model.tokenizer(prompts).to(model.device))


@torch.no_grad()
def encode_image(model, images, token_weights=None):
    """CLIP image context, VD-normalised: list of B PIL images -> (B, 257, Cc)."""
    pixels = preprocess(images, model.image_preprocess).to(model.device, model.dtype)
    with model.running("image_encoder"):
        return model.image_encoder(pixels, token_weights)


def gray_image():
    """The unconditional image: a uniform mid-gray picture (uint8 127), as in diffusers and the original code."""
    return Image.new("RGB", (512, 512), (127, 127, 127))


def check_inputs(mode, prompt, image, mix_ratio, steps, num_images, height, width, output, eta, factor, fidelity,
                 focus=0.5, weights=None, focus_levels=None, masks=None):
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    _, contexts, _ = flow_parts("dual-guided" if mode == "multi-context" else mode)
    if "text" in contexts and prompt is None and mode != "multi-context":
        raise ValueError(f"mode {mode!r} needs a prompt (text condition)")
    if "image" in contexts and image is None:
        raise ValueError(f"mode {mode!r} needs an image (PIL.Image.Image)" + (" or a list of them" if mode == "multi-context" else ""))
    if not 0.0 <= mix_ratio <= 1.0:
        raise ValueError(f"mix_ratio must be in [0, 1], got {mix_ratio}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images must be an integer >= 1, got {num_images!r}")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if fidelity and mode != "image-variation":
        raise ValueError(f"fidelity applies to image-variation only, not {mode!r}")
    if focus != 0.5 and mode not in ("image-variation", "dual-guided", "image-to-text"):
        hint = " (use focus_levels, one per image)" if mode == "multi-context" else ""
        raise ValueError(f"focus applies to a single image condition, not {mode!r}{hint}")
    for name, value in (("weights", weights), ("focus_levels", focus_levels), ("masks", masks)):
        if value is not None and mode != "multi-context":
            raise ValueError(f"{name} applies to multi-context only, not {mode!r}")
    image_out = mode not in ("image-to-text", "text-variation")
    allowed = OUTPUTS if image_out else ("text", "pil", "latent")
    if output not in allowed:
        raise ValueError(f"output must be one of {allowed} for {mode!r}, got {output!r}")
    if image_out and (height % factor or width % factor or height <= 0 or width <= 0):
        raise ValueError(f"height and width must be positive multiples of {factor}, got {height}x{width}")


def initial_latents(shape, latents, seed, device, dtype):
    """x_T: the given latents (checked), else N(0, I) drawn on the CPU from `seed` (the same image on any device).
    Returns (x_T, the CPU generator or None)."""
    if latents is not None:
        if not isinstance(latents, torch.Tensor):
            raise TypeError(f"latents must be a torch.Tensor, got {type(latents).__name__}")
        if tuple(latents.shape) != tuple(shape):
            raise ValueError(f"latents have shape {tuple(latents.shape)}, but this call needs {tuple(shape)} "
                             "(check height, width, num_images and the number of prompts/images)")
        generator = torch.Generator("cpu").manual_seed(seed) if seed is not None else None
        return latents.to(device, dtype), generator
    generator = torch.Generator("cpu")
    generator.manual_seed(seed) if seed is not None else generator.seed()
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device, dtype), generator


# ---------------------------------------------------------------------------------------------------------------------
# 1. contexts


def text_context(model, prompt, negative_prompt, num_images, guided):
    """(B or 2B, 77, Cc) rows [uncond; cond] when guided, and the number of conditions."""
    cond = as_list(prompt, "prompt", str)
    uncond = as_list(negative_prompt, "negative_prompt", str) if negative_prompt is not None else [""]
    return with_uncond(encode_text(model, cond), lambda: encode_text(model, broadcast(uncond, cond, "prompt")),
                       num_images, guided), len(cond)


def image_context(model, image, negative_image, num_images, guided, focus=0.5):
    """(B or 2B, 257, Cc) rows [uncond; cond] when guided; `focus` moves the condition to semantics/style."""
    cond = as_list(image, "image", Image.Image)
    uncond = as_list(negative_image, "negative_image", Image.Image) if negative_image is not None else [gray_image()]
    tokens = extensions.focus(encode_image(model, cond), focus)
    return with_uncond(tokens, lambda: encode_image(model, broadcast(uncond, cond, "image")), num_images, guided), len(cond)


def blend_context(model, images, weights, focus_levels, masks, negative_image, num_images, guided):
    """Multi-context blending: the n images as one image context (1, n * 257, Cc), repeated for the batch.

    Each image is encoded with its mask on CLIP's input embeddings, then masked, focused and weighted on the output
    tokens and concatenated (minivd.extensions.blend_image_tokens). The unconditional context is the gray picture's
    tokens repeated n times (attention over n identical copies equals attention over one), so one image with weight 1
    is exactly image-variation."""
    images = as_list(images, "image", Image.Image)
    n = len(images)
    weights = [1.0] * n if weights is None else weights
    masks = [None] * n if masks is None else masks
    if not isinstance(masks, (list, tuple)) or len(masks) != n:
        raise ValueError(f"masks must be a list with one entry per image ({n})")
    patch, grid = model.vision_config.patch_size, model.vision_config.image_size // model.vision_config.patch_size
    token_sets, cropped = [], []
    for i, (picture, mask) in enumerate(zip(images, masks)):
        token_weights = None
        if mask is not None:
            mask = centre_crop_mask(mask, picture, f"masks[{i}]")  # the part of the mask CLIP's crop keeps
            try:
                token_weights = extensions.mask_token_weights(mask, grid**2, patch)
            except (TypeError, ValueError) as error:
                raise type(error)(f"masks[{i}]: {error}") from None
        cropped.append(mask)
        token_sets.append(encode_image(model, [picture], token_weights))
    levels = [focus_levels] * n if isinstance(focus_levels, (int, float)) else focus_levels
    tokens = extensions.blend_image_tokens(token_sets, weights, levels, cropped, patch)  # (1, n * 257, Cc)
    uncond = as_list(negative_image, "negative_image", Image.Image)[:1] if negative_image is not None else [gray_image()]
    return with_uncond(tokens, lambda: encode_image(model, uncond).repeat(1, n, 1), num_images, guided), 1


def centre_crop_mask(mask, picture, name):
    """A mask drawn over the whole picture -> its part over the centre square that CLIP's preprocessing keeps
    (the crop is taken in the mask's own pixels, so its values are not resampled here)."""
    mask = np.asarray(mask, dtype=np.float32)
    if mask.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (h, w) mask, got shape {mask.shape}")
    (W, H), (h, w) = picture.size, mask.shape
    keep_h, keep_w = min(H, W) / H, min(H, W) / W  # the kept share of each side
    rows, cols = max(1, round(h * keep_h)), max(1, round(w * keep_w))
    top, left = (h - rows) // 2, (w - cols) // 2
    return mask[top : top + rows, left : left + cols]


def broadcast(uncond, cond, name):
    if len(uncond) == 1:
        return uncond * len(cond)
    if len(uncond) != len(cond):
        raise ValueError(f"{len(uncond)} negative {name}s for {len(cond)} {name}s")
    return uncond


def with_uncond(tokens, encode_uncond, num_images, guided):
    tokens = tokens.repeat_interleave(num_images, dim=0)  # (B, M, Cc)
    if guided:
        tokens = torch.cat([encode_uncond().repeat_interleave(num_images, dim=0), tokens])  # (2B, M, Cc)
    return tokens


def contexts_for(model, mode, prompt, negative_prompt, image, negative_image, mix_ratio, num_images, guided, focus,
                 weights, focus_levels, masks):
    """The flow's contexts as DualContextUNet takes them: [(kind, tokens, ratio)], and the number of conditions."""
    if mode in ("text-to-image", "text-variation"):
        tokens, n = text_context(model, prompt, negative_prompt, num_images, guided)
        return [("text", tokens, 1.0)], n
    if mode in ("image-variation", "image-to-text"):
        tokens, n = image_context(model, image, negative_image, num_images, guided, focus)
        return [("image", tokens, 1.0)], n
    if mode == "dual-guided":
        image_tokens, n = image_context(model, image, negative_image, num_images, guided, focus)
    else:  # multi-context
        image_tokens, n = blend_context(model, image, weights, focus_levels, masks, negative_image, num_images, guided)
        if prompt is None:
            return extensions.mixed_contexts(image_tokens), n
    text_tokens, n_text = text_context(model, prompt, negative_prompt, num_images, guided)
    if n_text != n:
        raise ValueError(f"{mode} needs as many prompts as images, got {n_text} and {n}")
    return extensions.mixed_contexts(image_tokens, text_tokens, mix_ratio), n


# ---------------------------------------------------------------------------------------------------------------------


def state_for(callback, state):
    """The part of a step's state the callback takes: all of it with **kwargs, else the keywords it names."""
    params = inspect.signature(callback).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return state
    return {k: v for k, v in state.items() if k in params}


def to_pixels(images, height, width):
    """PIL images -> (B, 3, height, width) in [0, 1] (bicubic resize; for fidelity and colour adjust)."""
    arrays = [np.asarray(im.convert("RGB").resize((width, height), Image.BICUBIC)) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def glibc():
    """The C library, if it is glibc (its malloc tuning calls exist); None on other systems."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


@contextmanager
def reusing_freed_memory(device, limit=128 * 2**20):
    """CPU speed: let glibc's malloc keep and reuse large freed blocks while the UNet runs step after step.

    By default glibc hands each freed block above 128 KiB back to the OS, so every step page-faults its large
    temporaries (activations, oneDNN's reordered conv weights) in again; on a 2-core CPU that is up to a quarter of
    the step time. Inside this block, blocks up to `limit` bytes come from and return to the heap; on exit glibc's
    default thresholds come back and malloc_trim gives the freed memory to the OS, so the VAE decode that follows
    starts from a lean heap. It changes no number. Skipped on a GPU, off glibc, and when the MALLOC_*_THRESHOLD_
    environment variables show the allocator is tuned already.
    """
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, DEFAULT = -1, -3, 128 * 1024  # mallopt parameters (malloc.h), glibc's default
    tuned = any(name in os.environ for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"))
    libc = glibc() if device.type == "cpu" and not tuned else None
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


def generate(mode, model=None, prompt=None, negative_prompt=None, image=None, negative_image=None, mix_ratio=0.5,
             steps=50, guidance_scale=7.5, eta=0.0, height=512, width=512, seed=None, latents=None, num_images=1,
             output="pil", callback=None, device=None, dtype=None,
             focus=0.5, fidelity=0.0, colour_adjust=False, weights=None, focus_levels=None, masks=None,
             max_length=30, temperature=1.0, top_k=0, top_p=1.0, greedy=False, return_intermediates=False):
    """Run one VD flow.

    Image flows: "text-to-image" (prompt), "image-variation" (image), "dual-guided" (prompt and image, mixed by
    mix_ratio = the share of the text context), "multi-context" (image = a list of images to blend, each with
    `weights`, `focus_levels` and `masks`, plus an optional prompt with share mix_ratio). They return a list of PIL
    images, a float32 array (B, H, W, 3) in [0, 1] (output="np") or the final latents (B, 4, H/8, W/8)
    (output="latent"). With the same `latents` the result equals diffusers' pipeline on the same weights; the same
    `seed` gives the same result on the same machine.
    Extensions (paper Sec. 5): focus in [0, 1] (0.5 unchanged, lower = semantics, higher = style) on the image
    context; fidelity in [0, 1] (image-variation: 0 = from noise, 1 = the input itself); colour_adjust matches the
    output's channel statistics to the input image.

    Text flows: "image-to-text" (image), "text-variation" (prompt). They return a list of B strings, decoded by
    Optimus (max_length tokens, sampling with temperature / top_k / top_p from the seed, or greedy), or the final
    768-d latents (B, 768) (output="latent") to decode or edit by hand with model.optimus.

    callback(step, t, latents) is called after every step; one that also takes **state receives eps_cond,
    eps_uncond, eps and x0_pred. return_intermediates=True returns (result, [state of each step]).
    """
    if model is None or isinstance(model, (str, os.PathLike)):
        model = resolve_model(model, device or "cpu", dtype or torch.float32)
    elif not isinstance(model, VersatileDiffusion):
        resolve_model(model)  # raises the TypeError
    factor = 2 ** (len(model.vae_config.block_out_channels) - 1)
    check_inputs(mode, prompt, image, mix_ratio, steps, num_images, height, width, output, eta, factor, fidelity,
                 focus, weights, focus_levels, masks)
    load_flow = mode if mode != "multi-context" else ("dual-guided" if prompt is not None else "image-variation")
    model.prepare(load_flow, vae_encoder=bool(fidelity))
    data = flow_parts(load_flow)[0]

    # 1. contexts: (kind, tokens (2B or B, M, Cc), ratio) per condition, rows [uncond; cond]
    guided = guidance_scale > 1.0
    contexts, n = contexts_for(model, mode, prompt, negative_prompt, image, negative_image, mix_ratio, num_images,
                               guided, focus, weights, focus_levels, masks)
    contexts = [(kind, tokens.to(model.device, model.dtype), ratio) for kind, tokens, ratio in contexts]
    B = n * num_images

    # 2. latents
    if data == "image":
        shape = (B, model.unet_config.image_channels, height // factor, width // factor)
    else:
        shape = (B, model.unet_config.text_channels, 1, 1)  # the Optimus latent as a 1 x 1 "image"
        if latents is not None and latents.dim() == 2:
            latents = latents[:, :, None, None]
    x_T, generator = initial_latents(shape, latents, seed, model.device, model.dtype)
    start_step = 0
    if fidelity:
        pictures = to_pixels(as_list(image, "image", Image.Image), height, width).repeat_interleave(num_images, 0)
        with torch.no_grad(), model.running("vae"):
            x0 = images_to_latents(model.vae, pictures.to(model.device, model.dtype))
        x_T, start_step = extensions.noised_start(model.ddim, x0, x_T, steps, fidelity)

    # 3. denoise
    def denoiser(x, t, cond):
        t_batch = torch.full((x.shape[0] * (2 if cond is None else 1),), int(t), device=x.device)
        if cond is None:  # batched guidance: rows [uncond; cond]
            return model.unet(torch.cat([x, x]), t_batch, contexts, data).chunk(2)
        rows = slice(B, 2 * B) if guided else slice(0, B)
        return model.unet(x, t_batch, [(k, c[rows], r) for k, c, r in contexts], data)

    intermediates = []

    def step_callback(i, t, x, **state):
        if return_intermediates:
            intermediates.append(dict(step=i, t=int(t), latents=x, **state))
        if callback is not None:
            callback(i, t, x, **state_for(callback, state))

    with torch.no_grad():
        with model.running("unet"), reusing_freed_memory(model.device):
            x_0 = model.ddim.sample(denoiser, x_T, steps, guidance_scale, eta, generator, step_callback, start_step)
        result = decode(model, data, x_0, output, image, colour_adjust, seed, generator,
                        dict(max_length=max_length, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy))
    return (result, intermediates) if return_intermediates else result


def decode(model, data, x_0, output, image, colour_adjust, seed, generator, text_options):
    """Step 4: latents -> sentences (Optimus) or pixels (VAE), in the requested output form."""
    if data == "text":
        z = x_0.flatten(1)  # (B, 768): VD's text latents are not rescaled
        if output == "latent":
            return z
        if seed is not None:  # a fresh generator: the same seed gives the same sentences with or without latents=
            generator = torch.Generator("cpu").manual_seed(seed)
        with model.running("optimus"):
            return model.optimus.decode(z, generator=generator, **text_options)
    if output == "latent":
        return x_0
    with model.running("vae"):
        pixels = latents_to_images(model.vae, x_0.to(model.dtype), model.vae_tile_size).float()  # (B, 3, H, W), [0, 1]
    if colour_adjust:
        if image is None:
            raise ValueError("colour_adjust needs an input image to match")
        reference = to_pixels(as_list(image, "image", Image.Image)[:1], *pixels.shape[-2:])
        pixels = extensions.colour_adjust(pixels, reference.to(pixels.device))
    array = pixels.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
    if output == "np":
        return array
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in array]


@torch.no_grad()
def edit_image(image, model=None, remove=None, add=None, image_ratio=0.33, rank=10, steps=50, guidance_scale=7.5,
               seed=None, height=512, width=512, output="pil"):
    """Image -> text -> image editing (paper Fig. 10): caption the image with image-to-text, move the caption's
    Optimus latent away from `remove` and towards `add` (minivd.extensions.edit_text_latent), decode it to a sentence,
    then generate dual-guided from [CLIP(edited sentence); CLIP(add)] and a rank-`rank` image context, image share
    `image_ratio`. Returns (images, edited sentence)."""
    model = resolve_model(model)
    pictures = as_list(image, "image", Image.Image)[:1]
    if remove is None and add is None:
        raise ValueError("edit_image needs a prompt to remove, to add, or both")
    if guidance_scale <= 1.0:
        raise ValueError(f"edit_image uses classifier-free guidance: guidance_scale must be > 1, got {guidance_scale}")
    z = generate("image-to-text", model=model, image=pictures, steps=steps, guidance_scale=guidance_scale, seed=seed,
                 output="latent")
    model.prepare("text-variation")
    encode = lambda text: model.optimus.encode([text]) if text is not None else None
    generator = torch.Generator("cpu").manual_seed(seed) if seed is not None else None
    with model.running("optimus"):
        z_edit = extensions.edit_text_latent(z, encode(remove), encode(add))
        sentence = model.optimus.decode(z_edit, generator=generator)[0]

    model.prepare("dual-guided")
    texts = [sentence] + ([add] if add is not None else [])
    text_tokens = torch.cat([encode_text(model, [t]) for t in texts], dim=1)  # (1, 77 * k, Cc)
    text_uncond = torch.cat([encode_text(model, [""]) for _ in texts], dim=1)
    image_tokens = extensions.low_rank_tokens(encode_image(model, pictures), rank)  # (1, 256, Cc)
    image_uncond = encode_image(model, [gray_image()])[:, 1:]  # (1, 256, Cc): the original does not reduce it
    contexts = extensions.mixed_contexts(torch.cat([image_uncond, image_tokens]), torch.cat([text_uncond, text_tokens]),
                                         1.0 - image_ratio)
    factor = 2 ** (len(model.vae_config.block_out_channels) - 1)
    shape = (1, model.unet_config.image_channels, height // factor, width // factor)
    x_T, generator = initial_latents(shape, None, seed, model.device, model.dtype)

    def denoiser(x, t, cond):
        t_batch = torch.full((2,), int(t), device=x.device)
        return model.unet(torch.cat([x, x]), t_batch, contexts, "image").chunk(2)

    with model.running("unet"):
        x_0 = model.ddim.sample(denoiser, x_T, steps, guidance_scale, 0.0, generator)
    return decode(model, "image", x_0, output, None, False, seed, generator, {}), sentence
