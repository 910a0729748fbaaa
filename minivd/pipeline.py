"""`generate`: every Versatile Diffusion flow through one function.

Legend: B = number of outputs (conditions x num_images), M context tokens, Cc context width (768).

A generation is four steps, the same for every flow:
    1. contexts   encode the condition(s) with CLIP: text -> (B, 77, Cc), image -> (B, 257, Cc), plus the
                  unconditional ones ("" / a mid-gray picture) for classifier-free guidance
    2. latents    start from Gaussian noise x_T (seeded on the CPU, like diffusers), or, with fidelity, from the
                  input image's own latents noised part of the way
    3. denoise    DDIM over the UNet with the flow's data layers and context layers (`denoise`, minivd.ddim)
    4. decode     the VAE turns image latents into pixels; Optimus turns text latents (B, 768) into sentences

Modes: the five flows of minivd.unet.FLOWS (text-to-image, image-variation, dual-guided, image-to-text,
text-variation), and multi-context: several images (each weighted, focused and optionally masked, see
`extensions.ImagePrompt`) and an optional prompt, mixed by ratio.
"""

import numbers
import os

import numpy as np
import torch
from PIL import Image

from . import checks, extensions
from .checkpoint import load
from .extensions import ImagePrompt
from .model import VersatileDiffusion
from .unet import FLOWS

MODES = (*FLOWS, "multi-context")
OUTPUTS = {"image": ("pil", "np", "latent"), "text": ("text", "latent")}  # what each kind of flow can return


def generate(mode, model=None, prompt=None, negative_prompt=None, image=None, negative_image=None, mix_ratio=None,
             steps=None, guidance_scale=None, eta=0.0, height=None, width=None, seed=None, latents=None, num_images=1,
             output=None, callback=None):
    """Run one VD mode (see the module docstring); steps, guidance_scale, height and width default to the model's
    (`model.config.defaults`: the official weights' 50, 7.5, 512, 512).

    prompt: a string or a list (one output group per prompt); image: a PIL image, an `ImagePrompt` (an image with
    focus, fidelity, and for multi-context weight and mask) or a list of them (multi-context: the images to blend);
    negative_prompt / negative_image replace the unconditional "" / gray picture; mix_ratio: the text context's
    share (dual-guided, and multi-context with a prompt; 0.5 when not given); eta: DDIM noise (0 deterministic);
    seed or latents (x_T); num_images per condition; callback(step, t, latents, **state) after every step, with
    state = eps_cond, eps_uncond, eps, x0_pred.
    output: image flows "pil" (default, a list of PIL images), "np" (float32 (B, H, W, 3) in [0, 1]) or "latent"
    ((B, 4, H/8, W/8)); text flows "text" (default, a list of B sentences, sampled by Optimus from the seed) or
    "latent" ((B, 768) text latents: decode them your way with `model.optimus.decode`).
    With the same `latents` the images equal diffusers' pipelines on the same weights.
    """
    model = resolve_model(model)
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    flow = mode if mode != "multi-context" else ("dual-guided" if prompt is not None else "image-variation")
    data, kinds = FLOWS[flow]
    if mix_ratio is not None and flow != "dual-guided":
        raise ValueError(f"mix_ratio applies to dual-guided and to multi-context with a prompt, not {mode!r}")
    if data == "text" and (height is not None or width is not None):
        raise ValueError(f"height and width apply to the image flows, not {mode!r} (its output is text)")
    d = model.config.defaults
    steps, guidance_scale = (d.steps if steps is None else steps), (d.guidance_scale if guidance_scale is None else guidance_scale)
    height, width = (d.height if height is None else height), (d.width if width is None else width)
    mix_ratio, output = (0.5 if mix_ratio is None else mix_ratio), (output or ("pil" if data == "image" else "text"))
    check_numbers(mix_ratio, steps, guidance_scale, eta, num_images, seed)
    if output not in OUTPUTS[data]:
        raise ValueError(f"output must be one of {OUTPUTS[data]} for {mode!r}, got {output!r}")
    text = text_condition(mode, kinds, prompt, negative_prompt)
    images = image_condition(mode, kinds, image, negative_image)
    n = 1 if mode == "multi-context" else len((images or text)[0])  # conditions; B = n * num_images outputs
    if text is not None and images is not None and mode != "multi-context" and len(text[0]) != n:
        raise ValueError(f"{mode} needs as many prompts as images, got {len(text[0])} and {n}")
    if data == "image":
        f = model.vae_factor
        if checks.integer(height, "height") % f or checks.integer(width, "width") % f:
            raise ValueError(f"height and width must be positive multiples of {f}, got {height}x{width}")
        shape = (n * num_images, model.config.unet.image_channels, height // f, width // f)
    else:
        shape = (n * num_images, model.config.unet.text_channels, 1, 1)  # the Optimus latent as a 1 x 1 "image"
        if isinstance(latents, torch.Tensor) and latents.dim() == 2:
            latents = latents[:, :, None, None]
    fidelity = images[0][0].fidelity if images else 0.0

    with model.lock, torch.no_grad():
        model.prepare(flow, vae_encoder=fidelity > 0)
        # 1. contexts: (kind, tokens (2B or B, M, Cc), ratio) per condition, rows [uncond; cond] when guided
        contexts = condition_contexts(model, mode, text, images, mix_ratio, num_images, guidance_scale > 1)

        # 2. latents: x_T, or with fidelity the input's latents noised to the step the sampler starts at
        x_T, generator = initial_latents(shape, latents, seed, model.device, model.dtype)
        start_step = 0
        if fidelity:
            pictures = to_pixels([p.image for p in images[0]], height, width).repeat_interleave(num_images, 0)
            x0 = model.encode_images(pictures).to(model.dtype)
            x_T, start_step = extensions.noised_start(model.sampler, x0, x_T, steps, fidelity)

        # 3. denoise
        x_0 = denoise(model, data, contexts, x_T, steps, guidance_scale, eta, generator, callback, start_step)
        check_finite(x_0, "the denoised latents (is a weight, the input latents or a setting not finite?)")

        # 4. decode; the text flows sample from a fresh generator: the same seed gives the same sentences with or
        # without latents=
        if data == "text" and seed is not None:
            generator = torch.Generator("cpu").manual_seed(int(seed))
        return decode(model, data, x_0, output, generator)


def resolve_model(model):
    """A loaded model; a checkpoint path; or None: $MINIVD_WEIGHTS if set, else the built-in model."""
    if isinstance(model, VersatileDiffusion):
        return model
    if model is None or isinstance(model, (str, os.PathLike)):
        return load(model)
    raise TypeError(f"model must be a VersatileDiffusion, a checkpoint path or None, got {type(model).__name__}")


# ---------------------------------------------------------------------------------------------------------------------
# Checking what a call asks for


def as_list(value, name, kind):
    """A value of `kind` -> [value]; a non-empty list of them stays; anything else is an error naming `name`."""
    items = [value] if isinstance(value, kind) else value
    if not isinstance(items, (list, tuple)) or not items or not all(isinstance(v, kind) for v in items):
        want = "a string" if kind is str else "a PIL.Image.Image"
        got = type(value).__name__ if not isinstance(value, (list, tuple)) else f"a list of {[type(v).__name__ for v in value]}"
        hint = " (convert arrays with PIL.Image.fromarray)" if kind is not str else ""
        raise TypeError(f"{name} must be {want} or a non-empty list of them, got {got}{hint}")
    return list(items)


def check_numbers(mix_ratio, steps, guidance_scale, eta, num_images, seed):
    real = lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool) and np.isfinite(v)
    integer = lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool)
    if not real(mix_ratio) or not 0.0 <= mix_ratio <= 1.0:
        raise ValueError(f"mix_ratio must be a number in [0, 1], got {mix_ratio!r}")
    if not integer(steps) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not real(guidance_scale) or guidance_scale < 0:
        raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}")
    if not real(eta) or eta < 0:
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
    if not integer(num_images) or num_images < 1:
        raise ValueError(f"num_images must be an integer >= 1, got {num_images!r}")
    if seed is not None and (not integer(seed) or not 0 <= seed < 2**64):
        raise ValueError(f"seed must be an integer in [0, 2**64) or None, got {seed!r}")


def text_condition(mode, kinds, prompt, negative_prompt):
    """(prompts, negative prompts or None), or None when the mode takes no text."""
    if "text" not in kinds:
        if prompt is not None or negative_prompt is not None:
            raise ValueError(f"mode {mode!r} takes no prompt (it is conditioned on an image)")
        return None
    if prompt is None:
        raise ValueError(f"mode {mode!r} needs a prompt (text condition)")
    prompts = as_list(prompt, "prompt", str)
    negatives = as_list(negative_prompt, "negative_prompt", str) if negative_prompt is not None else None
    for name, texts in (("prompt", prompts), ("negative_prompt", negatives or [])):
        for i, text in enumerate(texts):
            check_text(text, f"{name}[{i}]")
    return prompts, negatives


def check_text(text, name):
    """A prompt must be text a tokenizer can encode: UTF-8, so no lone surrogates (e.g. from a bad decode)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{name} is not valid text: {e.reason} at position {e.start} "
                         f"({text[max(0, e.start - 10):e.start + 10]!r})") from None


def image_condition(mode, kinds, image, negative_image):
    """(list of ImagePrompt, negative images or None), or None when the mode takes no image. Says which of an
    ImagePrompt's settings the mode does not use."""
    if "image" not in kinds:
        if image is not None or negative_image is not None:
            raise ValueError(f"mode {mode!r} takes no image (it is conditioned on a prompt)")
        return None
    if image is None:
        raise ValueError(f"mode {mode!r} needs an image (PIL.Image.Image)" + (" or a list of them" if mode == "multi-context" else ""))
    items = [image] if isinstance(image, (Image.Image, ImagePrompt)) else image
    if not isinstance(items, (list, tuple)) or not items or not all(isinstance(i, (Image.Image, ImagePrompt)) for i in items):
        got = type(image).__name__ if not isinstance(image, (list, tuple)) else f"a list of {[type(i).__name__ for i in image]}"
        raise TypeError(f"image must be a PIL.Image.Image, a minivd.ImagePrompt or a non-empty list of them, got {got} "
                        "(convert arrays with PIL.Image.fromarray)")
    prompts = [i if isinstance(i, ImagePrompt) else ImagePrompt(i) for i in items]
    for i, p in enumerate(prompts):
        if (p.weight != 1.0 or p.mask is not None) and mode != "multi-context":
            raise ValueError(f"image[{i}]: weight and mask apply to multi-context only, not {mode!r}")
        if p.fidelity and mode != "image-variation":
            raise ValueError(f"image[{i}]: fidelity applies to image-variation only, not {mode!r}")
        if p.focus != 0.5 and mode == "text-variation":
            raise ValueError(f"image[{i}]: focus applies to image conditions")
    if len({p.fidelity for p in prompts}) > 1:
        raise ValueError(f"every image needs the same fidelity, got {[p.fidelity for p in prompts]}")
    negatives = as_list(negative_image, "negative_image", Image.Image) if negative_image is not None else None
    return prompts, negatives


def check_finite(x, where):
    if not torch.isfinite(x).all():
        raise FloatingPointError(f"non-finite values (NaN or inf) in {where}")


def initial_latents(shape, latents, seed, device, dtype):
    """x_T: the given latents (checked), else N(0, I) drawn on the CPU from `seed` (the same image on any device).
    Returns (x_T, the CPU generator that also drives eta's noise)."""
    generator = torch.Generator("cpu")
    generator.manual_seed(int(seed)) if seed is not None else generator.seed()
    if latents is None:
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(device, dtype), generator
    if not isinstance(latents, torch.Tensor):
        raise TypeError(f"latents must be a torch.Tensor, got {type(latents).__name__}")
    if tuple(latents.shape) != tuple(shape):
        raise ValueError(f"latents have shape {tuple(latents.shape)}, but this call needs {tuple(shape)} "
                         "(check height, width, num_images and the number of prompts/images)")
    check_finite(latents, "the latents given")
    return latents.to(device, dtype), generator


# ---------------------------------------------------------------------------------------------------------------------
# 1. contexts


def condition_contexts(model, mode, text, images, mix_ratio, num_images, guided):
    """The mode's contexts as DualContextUNet takes them: [(kind, tokens, ratio)], ratios summing to 1.
    text: (prompts, negatives) or None; images: (ImagePrompts, negative images) or None."""
    contexts = {}
    if images is not None:
        contexts["image"] = (blend_context if mode == "multi-context" else image_context)(model, *images)
    if text is not None:
        contexts["text"] = text_context(model, *text)
    contexts = {kind: with_uncond(pair, num_images, guided).to(model.device, model.dtype) for kind, pair in contexts.items()}
    for kind, tokens in contexts.items():
        check_finite(tokens, f"the {kind} context (is a weight of the CLIP {kind} encoder not finite?)")
    if len(contexts) == 1:
        return [(kind, tokens, 1.0) for kind, tokens in contexts.items()]
    return extensions.mixed_contexts(contexts["image"], contexts["text"], mix_ratio)


def text_context(model, prompts, negatives):
    """(encode the unconditional contexts, the conditional ones (B, 77, Cc))."""
    uncond = broadcast(negatives or [""], prompts, "prompt")
    return lambda: model.encode_text(uncond), model.encode_text(prompts)


def image_context(model, prompts, negatives):
    """(encode the unconditional contexts, the conditional ones (B, 257, Cc)); focus moves each condition towards
    semantics or style."""
    tokens = model.encode_image([p.image for p in prompts])
    levels = [p.focus for p in prompts]
    if len(set(levels)) == 1:
        tokens = extensions.focus(tokens, levels[0])
    else:
        tokens = torch.cat([extensions.focus(tokens[i : i + 1], level) for i, level in enumerate(levels)])
    uncond = broadcast(negatives or [model.unconditional_image()], prompts, "image")
    return lambda: model.encode_image(uncond), tokens


def blend_context(model, prompts, negatives):
    """Multi-context blending: the n images as one image context (1, n * 257, Cc).

    Each image is encoded with its mask on CLIP's input embeddings, then masked, focused and weighted on the output
    tokens and concatenated (minivd.extensions.blend_image_tokens). The unconditional context is the gray picture's
    tokens repeated n times (attention over n identical copies equals attention over one), so one image with weight 1
    is exactly image-variation."""
    vision = model.config.vision
    patch, grid = vision.patch_size, vision.image_size // vision.patch_size
    token_sets, masks = [], []
    for i, p in enumerate(prompts):
        token_weights, mask = None, None
        if p.mask is not None:
            mask = extensions.centre_crop_mask(p.mask, p.image, f"image[{i}].mask")  # the part CLIP's crop keeps
            try:
                token_weights = extensions.mask_token_weights(mask, grid**2, patch)
            except (TypeError, ValueError) as error:
                raise type(error)(f"image[{i}].mask: {error}") from None
        masks.append(mask)
        token_sets.append(model.encode_image([p.image], token_weights))
    tokens = extensions.blend_image_tokens(token_sets, [p.weight for p in prompts], [p.focus for p in prompts], masks,
                                           patch)  # (1, n * 257, Cc)
    uncond = (negatives or [model.unconditional_image()])[:1]
    return lambda: model.encode_image(uncond).repeat(1, len(prompts), 1), tokens


def broadcast(uncond, cond, name):
    if len(uncond) == 1:
        return uncond * len(cond)
    if len(uncond) != len(cond):
        raise ValueError(f"{len(uncond)} negative {name}s for {len(cond)} {name}s")
    return uncond


def with_uncond(pair, num_images, guided):
    """(encode_uncond, cond tokens) -> tokens (B, M, Cc), or (2B, M, Cc) rows [uncond; cond] when guided."""
    encode_uncond, tokens = pair
    tokens = tokens.repeat_interleave(num_images, dim=0)  # (B, M, Cc)
    if guided:
        tokens = torch.cat([encode_uncond().repeat_interleave(num_images, dim=0), tokens])  # (2B, M, Cc)
    return tokens


# ---------------------------------------------------------------------------------------------------------------------
# 3. denoise and 4. decode, shared by generate and edit_image


def denoise(model, data, contexts, x_T, steps, guidance_scale=7.5, eta=0.0, generator=None, callback=None, start_step=0):
    """DDIM from x_T over the UNet's `data` layers ("image" or "text") and `contexts` ([(kind, tokens, ratio)], rows
    [uncond; cond] when guidance_scale > 1). Returns x_0 with the shape of x_T."""
    guided = guidance_scale > 1.0

    def denoiser(x, t):  # -> (eps_uncond or None, eps_cond)
        if guided:  # one batch [x; x] against the contexts' rows [uncond; cond]
            t_batch = torch.full((2 * x.shape[0],), int(t), device=x.device)
            eps_uncond, eps_cond = model.unet(torch.cat([x, x]), t_batch, contexts, data).chunk(2)
            return eps_uncond, eps_cond
        t_batch = torch.full((x.shape[0],), int(t), device=x.device)
        return None, model.unet(x, t_batch, contexts, data)

    return model.sampler.sample(denoiser, x_T, steps, guidance_scale, eta, generator, callback, start_step)


def decode(model, data, x_0, output, generator=None):
    """Step 4: latents -> sentences (Optimus) or pixels (VAE), in the requested output form."""
    if data == "text":
        z = x_0.flatten(1)  # (B, 768): VD's text latents are not rescaled
        return z if output == "latent" else model.decode_texts(z, generator)
    if output == "latent":
        return x_0
    pixels = model.decode_images(x_0)  # (B, 3, H, W) in [0, 1]
    check_finite(pixels, "the decoded images (is a VAE weight not finite?)")
    array = pixels.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
    if output == "np":
        return array
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in array]


def to_pixels(images, height, width):
    """PIL images -> (B, 3, height, width) in [0, 1] (bicubic resize; for fidelity)."""
    arrays = [np.asarray(im.convert("RGB").resize((width, height), Image.BICUBIC)) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def edit_image(image, model=None, remove=None, add=None, image_ratio=0.33, rank=10, steps=None, guidance_scale=None,
               seed=None, height=None, width=None, output="pil"):
    """Image -> text -> image editing (paper Fig. 10): caption the image with image-to-text, move the caption's
    Optimus latent away from `remove` and towards `add` (minivd.extensions.edit_text_latent), decode it to a sentence,
    then generate dual-guided from [CLIP(edited sentence); CLIP(add)] and a rank-`rank` image context, image share
    `image_ratio`. Returns (images, edited sentence)."""
    model = resolve_model(model)
    d = model.config.defaults
    steps, guidance_scale = (d.steps if steps is None else steps), (d.guidance_scale if guidance_scale is None else guidance_scale)
    height, width = (d.height if height is None else height), (d.width if width is None else width)
    pictures = as_list(image, "image", Image.Image)[:1]
    if remove is None and add is None:
        raise ValueError("edit_image needs a prompt to remove, to add, or both")
    for name, text in (("remove", remove), ("add", add)):
        if text is not None and not isinstance(text, str):
            raise TypeError(f"{name} must be a string, got {type(text).__name__}")
        if text is not None:
            check_text(text, name)
    checks.real(image_ratio, "image_ratio", low=0, high=1)
    check_numbers(0.5, steps, guidance_scale, 0.0, 1, seed)  # before anything runs
    for key, value in (("height", height), ("width", width)):
        if checks.integer(value, key) % model.vae_factor:
            raise ValueError(f"height and width must be positive multiples of {model.vae_factor}, got {height}x{width}")
    if guidance_scale <= 1.0:
        raise ValueError(f"edit_image uses classifier-free guidance: guidance_scale must be > 1, got {guidance_scale}")
    if output not in OUTPUTS["image"]:
        raise ValueError(f"output must be one of {OUTPUTS['image']}, got {output!r}")
    with model.lock, torch.no_grad():
        z = generate("image-to-text", model=model, image=pictures, steps=steps, guidance_scale=guidance_scale,
                     seed=seed, output="latent")
        model.prepare("text-variation")  # the Optimus encoder, for the prompts' latents
        encode = lambda text: model.optimus.encode([text]).to(z) if text is not None else None
        z_edit = extensions.edit_text_latent(z, encode(remove), encode(add))
        generator = torch.Generator("cpu").manual_seed(int(seed)) if seed is not None else None
        sentence = model.decode_texts(z_edit, generator)[0]

        model.prepare("dual-guided")
        texts = [sentence] + ([add] if add is not None else [])
        text_tokens = torch.cat([model.encode_text([t]) for t in texts], dim=1)  # (1, 77 * k, Cc)
        text_uncond = torch.cat([model.encode_text([""]) for _ in texts], dim=1)
        image_tokens = extensions.low_rank_tokens(model.encode_image(pictures), rank)  # (1, 256, Cc)
        image_uncond = model.encode_image([model.unconditional_image()])[:, 1:]  # (1, 256, Cc): the original does not reduce it
        contexts = extensions.mixed_contexts(torch.cat([image_uncond, image_tokens]),
                                             torch.cat([text_uncond, text_tokens]), 1.0 - image_ratio)
        shape = (1, model.config.unet.image_channels, height // model.vae_factor, width // model.vae_factor)
        x_T, generator = initial_latents(shape, None, seed, model.device, model.dtype)
        x_0 = denoise(model, "image", contexts, x_T, steps, guidance_scale, 0.0, generator)
        return decode(model, "image", x_0, output), sentence
