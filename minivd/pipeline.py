"""`generate`: every Versatile Diffusion flow through one function.

Legend: B = number of outputs (prompts x num_images), M context tokens, Cc context width (768).

A generation is four steps, the same for every flow:
    1. contexts   encode the condition(s) with CLIP: text -> (B, 77, Cc), image -> (B, 257, Cc), plus the
                  unconditional ones ("" / a mid-gray picture) for classifier-free guidance
    2. latents    start from Gaussian noise x_T (seeded on the CPU, like diffusers)
    3. denoise    DDIM over the UNet with the flow's data layers and context layers (minivd.ddim)
    4. decode     the VAE turns image latents into pixels; Optimus turns text latents (B, 768) into sentences
"""

import inspect
import os

import numpy as np
import torch
from PIL import Image

from .clip import preprocess
from .model import VersatileDiffusion, demo_model, flow_parts, load
from .unet import FLOWS
from .vae import latents_to_images

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
    ids = model.tokenizer(prompts).to(model.device)
    return model.text_encoder(ids)


@torch.no_grad()
def encode_image(model, images):
    """CLIP image context, VD-normalised: list of B PIL images -> (B, 257, Cc)."""
    pixels = preprocess(images, model.image_preprocess)
    return model.image_encoder(pixels.to(model.device, model.dtype))


def gray_image():
    """The unconditional image: a uniform mid-gray picture (uint8 127), as in diffusers and the original code."""
    return Image.new("RGB", (512, 512), (127, 127, 127))


def check_inputs(mode, prompt, image, mix_ratio, steps, num_images, height, width, output, eta, factor):
    data, contexts, _ = flow_parts(mode)  # raises on an unknown mode
    if "text" in contexts and prompt is None:
        raise ValueError(f"mode {mode!r} needs a prompt (text condition)")
    if "image" in contexts and image is None:
        raise ValueError(f"mode {mode!r} needs an image (PIL.Image.Image)")
    if not 0.0 <= mix_ratio <= 1.0:
        raise ValueError(f"mix_ratio must be in [0, 1], got {mix_ratio}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images must be an integer >= 1, got {num_images!r}")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    allowed = OUTPUTS if data == "image" else ("text", "pil", "latent")
    if output not in allowed:
        raise ValueError(f"output must be one of {allowed} for {mode!r}, got {output!r}")
    if data == "image" and (height % factor or width % factor or height <= 0 or width <= 0):
        raise ValueError(f"height and width must be positive multiples of {factor}, got {height}x{width}")


def initial_latents(shape, latents, seed, device, dtype):
    """x_T: the given latents (checked), else N(0, I) drawn on the CPU from `seed` (the same image on any device)."""
    if latents is not None:
        if not isinstance(latents, torch.Tensor):
            raise TypeError(f"latents must be a torch.Tensor, got {type(latents).__name__}")
        if tuple(latents.shape) != tuple(shape):
            raise ValueError(f"latents have shape {tuple(latents.shape)}, but this call needs {tuple(shape)} "
                             "(check height, width, num_images and the number of prompts/images)")
        return latents.to(device, dtype), None
    generator = torch.Generator("cpu")
    generator.manual_seed(seed) if seed is not None else generator.seed()
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device, dtype), generator


def wants_state(callback):
    """True if callback takes keyword state (eps_cond, x0_pred, ...) besides (step, t, latents)."""
    params = inspect.signature(callback).parameters.values()
    return any(p.kind == p.VAR_KEYWORD for p in params) or len(params) > 3


def generate(mode, model=None, prompt=None, negative_prompt=None, image=None, negative_image=None, mix_ratio=0.5,
             steps=50, guidance_scale=7.5, eta=0.0, height=512, width=512, seed=None, latents=None, num_images=1,
             output="pil", callback=None, device=None, dtype=None,
             max_length=30, temperature=1.0, top_k=0, top_p=1.0, greedy=False):
    """Run one VD flow.

    Image flows: "text-to-image" (prompt), "image-variation" (image), "dual-guided" (prompt and image, mixed by
    mix_ratio = the share of the text context). They return a list of PIL images, a float32 array (B, H, W, 3) in
    [0, 1] (output="np") or the final latents (B, 4, H/8, W/8) (output="latent"). With the same `latents` the result
    equals diffusers' pipeline on the same weights; the same `seed` gives the same result on the same machine.

    Text flows: "image-to-text" (image), "text-variation" (prompt). They return a list of B strings, decoded by
    Optimus (max_length tokens, sampling with temperature / top_k / top_p from the seed, or greedy), or the final
    768-d latents (B, 768) (output="latent") to decode or edit by hand with model.optimus.
    """
    if model is None or isinstance(model, (str, os.PathLike)):
        model = resolve_model(model, device or "cpu", dtype or torch.float32)
    elif not isinstance(model, VersatileDiffusion):
        resolve_model(model)  # raises the TypeError
    factor = 2 ** (len(model.vae_config.block_out_channels) - 1)
    check_inputs(mode, prompt, image, mix_ratio, steps, num_images, height, width, output, eta, factor)
    model.prepare(mode)
    data, kinds, _ = flow_parts(mode)

    # 1. contexts: one (kind, tokens (2B or B, M, Cc), ratio) per condition, rows [uncond; cond]
    guided = guidance_scale > 1.0
    contexts, batch = [], None
    for kind in kinds:
        if kind == "text":
            cond = as_list(prompt, "prompt", str)
            uncond = as_list(negative_prompt, "negative_prompt", str) if negative_prompt is not None else [""]
            encode, ratio = encode_text, mix_ratio if len(kinds) > 1 else 1.0
        else:
            cond = as_list(image, "image", Image.Image)
            uncond = as_list(negative_image, "negative_image", Image.Image) if negative_image is not None else [gray_image()]
            encode, ratio = encode_image, 1.0 - mix_ratio if len(kinds) > 1 else 1.0
        if len(uncond) == 1:
            uncond = uncond * len(cond)
        if len(uncond) != len(cond):
            raise ValueError(f"{len(uncond)} negative {kind} inputs for {len(cond)} {kind} inputs")
        if batch is not None and len(cond) != batch:
            raise ValueError(f"dual-guided needs as many prompts as images, got {batch} and {len(cond)}")
        batch = len(cond)
        tokens = encode(model, cond).repeat_interleave(num_images, dim=0)  # (B, M, Cc)
        if guided:
            tokens = torch.cat([encode(model, uncond).repeat_interleave(num_images, dim=0), tokens])  # (2B, M, Cc)
        if ratio > 0:  # a context with no share is not run at all (ratio 1 then equals the single-context flow)
            contexts.append((kind, tokens.to(model.device, model.dtype), ratio))
    B = batch * num_images

    # 2. latents
    if data == "image":
        shape = (B, model.unet_config.image_channels, height // factor, width // factor)
    else:
        shape = (B, model.unet_config.text_channels, 1, 1)  # the Optimus latent as a 1 x 1 "image"
        if latents is not None and latents.dim() == 2:
            latents = latents[:, :, None, None]
    x_T, generator = initial_latents(shape, latents, seed, model.device, model.dtype)
    if generator is None and eta > 0:
        generator = torch.Generator("cpu").manual_seed(seed) if seed is not None else None

    # 3. denoise
    def denoiser(x, t, cond):
        t_batch = torch.full((x.shape[0] * (2 if cond is None else 1),), int(t), device=x.device)
        if cond is None:  # batched guidance: rows [uncond; cond]
            return model.unet(torch.cat([x, x]), t_batch, contexts, data).chunk(2)
        rows = slice(B, 2 * B) if guided else slice(0, B)
        return model.unet(x, t_batch, [(k, c[rows], r) for k, c, r in contexts], data)

    step_callback = callback
    if callback is not None and not wants_state(callback):
        step_callback = lambda i, t, x, **state: callback(i, t, x)
    x_0 = model.ddim.sample(denoiser, x_T, steps, guidance_scale, eta, generator, step_callback)

    # 4. decode
    if data == "text":
        z = x_0.flatten(1)  # (B, 768): VD's text latents are not rescaled
        if output == "latent":
            return z
        if generator is None:
            generator = torch.Generator("cpu").manual_seed(seed) if seed is not None else None
        with torch.no_grad():
            return model.optimus.decode(z, max_length, temperature, top_k, top_p, greedy, generator)
    if output == "latent":
        return x_0
    with torch.no_grad():
        pixels = latents_to_images(model.vae, x_0.to(model.dtype))  # (B, 3, H, W) in [0, 1]
    array = pixels.float().permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
    if output == "np":
        return array
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in array]
