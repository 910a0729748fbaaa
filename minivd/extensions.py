"""The paper's extensions of Versatile Diffusion (Sec. 4.2 and 5), as small functions on contexts, latents and pixels.

Legend for shape comments:
    B batch, P patch tokens of an image context (256 = g*g), g patches per image side (16), C context width (768),
    q principal components kept by `focus`, H/W image height/width, D Optimus text-latent size (768).

Each function follows the original code's math (GitHub SHI-Labs/Versatile-Diffusion); file and function names are
cited where the math comes from:
    app.py                the 2023 demo (commit cf0f4a2): `decompose`, `adjust_rank`, `vd_inference.inference_i2i`,
                          `vd_inference.inference_mcg`
    lib/model_zoo/clip.py `CLIPImageContextEncoder._encode_wmask` (masks), lib/model_zoo/ddim.py
                          `DDIMSampler.ddim_sampling` (fidelity), inference.py of the 2022 code (commit 51dcd3b):
                          `application_i2t2i` (text-latent editing)

    ImagePrompt           an image condition with its per-image settings: focus, fidelity, weight, mask
    focus                 style <-> semantics: rescale the principal components of the image context's patch tokens
    blend_image_tokens    several images -> one image context (weights, masks, focus per image)
    mixed_contexts        that image context plus a text context, mixed by ratio in the UNet's context layers
    colour_adjust         match each output channel's mean/std to the input image
    noised_start          fidelity: start DDIM from the input's own latents, noised part of the way
    edit_text_latent      image -> text -> image editing: move an Optimus latent away from one prompt, towards another
"""

import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

SEMANTIC_DROP = 1  # level < 0.5 shrinks components 0..SEMANTIC_DROP (the original's max_drop_rank[0])
STYLE_KEEP = 5  # level > 0.5 shrinks components STYLE_KEEP..q-1 and drops the rest (max_drop_rank[1])


def _check_level(level, name="level"):
    if isinstance(level, bool) or not isinstance(level, numbers.Real) or not 0.0 <= level <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1] (0 semantics, 0.5 unchanged, 1 style), got {level!r}")
    return float(level)


def _check_tokens(tokens, name="tokens"):
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"{name} must be a tensor (B, 1+P, C), got {type(tokens).__name__}")
    if tokens.ndim != 3 or tokens.shape[1] < 2:
        raise ValueError(f"{name} must be (B, 1+P, C) with a class token and P >= 1 patch tokens, "
                         f"got shape {tuple(tokens.shape)}")


@dataclass
class ImagePrompt:
    """An image condition for `minivd.generate`, with the paper's per-image settings.

        image     a PIL image
        focus     style <-> semantics (Sec. 5): 0 semantics ... 0.5 unchanged ... 1 style (`focus`); image conditions
        fidelity  image-variation: 0 starts from noise ... 1 returns the input itself (`noised_start`)
        weight    multi-context: how strongly this image's tokens count (`blend_image_tokens`)
        mask      multi-context: an (h, w) array in [0, 1] over the picture, 1 = keep (`mask_token_weights`)
    """

    image: Image.Image
    focus: float = 0.5
    fidelity: float = 0.0
    weight: float = 1.0
    mask: object = None

    def __post_init__(self):
        if not isinstance(self.image, Image.Image):
            raise TypeError(f"ImagePrompt.image must be a PIL.Image.Image, got {type(self.image).__name__} "
                            "(convert arrays with PIL.Image.fromarray)")
        self.focus = _check_level(self.focus, "focus")
        fidelity_start_step(1, self.fidelity)  # checks it
        if isinstance(self.weight, bool) or not isinstance(self.weight, numbers.Real) or not math.isfinite(self.weight) \
                or self.weight < 0:
            raise ValueError(f"weight must be a finite number >= 0, got {self.weight!r}")


# --- Focus: style <-> semantics disentanglement (paper Sec. 5, "disentanglement of style and semantics") -----------


def focus_scales(level, q=20):
    """The factor each of the q principal components is multiplied by, and whether the rest (the residual beyond
    rank q) is kept. Returns (scales (q,) float64, keep_residual).

    The original (app.py, `adjust_rank.__init__`) draws straight lines through two points; written out:
      level < 0.5 (semantics): r = (e^(2 level - 1) - e^-1) / (1 - e^-1)        goes 0 -> 1 as level 0 -> 0.5
          y0 = -1 + 2 r;  component i = 0, 1 is scaled by max(0, y0 + i/2 (1 - y0))
          (level 0: both top components removed; the residual is kept)
      level > 0.5 (style):     r = (e^(2 level - 1) - e) / (1 - e)               goes 1 -> 0 as level 0.5 -> 1
          y0 = -(q - 5) + (q - 4) r;  component i = 5..q-1 is scaled by max(0, y0 + (q-1-i)/(q-5) (1 - y0))
          and the residual is dropped, for ANY level above 0.5 (the original jumps there: 0.5 keeps everything)
          (level 1: only the top-5 components remain)
    """
    level = _check_level(level)
    scales = torch.ones(q, dtype=torch.float64)
    if level < 0.5:
        r = (math.exp(2 * level - 1) - math.exp(-1)) / (1 - math.exp(-1))
        y0 = -SEMANTIC_DROP + r * (1 + SEMANTIC_DROP)
        for i in range(min(SEMANTIC_DROP + 1, q)):
            scales[i] = max(0.0, y0 + i / (SEMANTIC_DROP + 1) * (1 - y0))
        return scales, True
    if level > 0.5:
        r = (math.exp(2 * level - 1) - math.e) / (1 - math.e)
        y0 = -(q - STYLE_KEEP) + r * (q - STYLE_KEEP + 1)
        for i in range(STYLE_KEEP, q):
            scales[i] = max(0.0, y0 + (q - 1 - i) / (q - STYLE_KEEP) * (1 - y0))
        return scales, False
    return scales, True


def focus(tokens, level, q=20):
    """Shift an image context between semantics (level 0) and style (level 1); level 0.5 leaves it as it is.

    tokens: (B, 1+P, C) image context (class token first). level: in [0, 1]. q: principal components considered.
    Returns (B, 1+P, C): the class token unchanged, the P patch tokens of each batch element rebuilt as
        x = mean + sum_i scale_i s_i u_i v_i^T + residual          (see `focus_scales` for scale_i and the residual)
    where mean is each token's mean over its C features (app.py, `decompose`) and u_i s_i v_i^T the top-q singular
    triplets of the demeaned (P, C) matrix; then x is rescaled so that its standard deviation equals the input's.
    "Standard deviation" is the original's `x.std(axis=[-2, -1])`: one number per batch element, over all P*C
    entries of the patch tokens (mean included, Bessel-corrected); the rescaling is a pure multiplication.
    At level 0.5 the input tensor itself is returned (as app.py, `adjust_rank.__call__`, does).

    The original calls torch.pca_lowrank(q=20, niter=100), a randomized SVD that draws from the global RNG. Here the
    exact SVD (torch.linalg.svd of the small (P, C) matrix, in float32 or float64) gives what that approximation
    converges to, deterministically and without touching any RNG; it costs a few milliseconds for 256 x 768.
    If q exceeds min(P, C) (tiny test models), all min(P, C) components are used and the residual is zero.
    """
    _check_tokens(tokens)
    level = _check_level(level)
    if not isinstance(q, int) or isinstance(q, bool) or q < 1:
        raise ValueError(f"q must be an integer >= 1, got {q!r}")
    if level == 0.5:
        return tokens

    dtype = tokens.dtype
    work = torch.float64 if dtype == torch.float64 else torch.float32  # the original upcasts fp16 to float32
    cls_token, x = tokens[:, :1], tokens[:, 1:].to(work)  # (B, 1, C), (B, P, C)
    std_before = x.std(dim=(1, 2), keepdim=True)  # (B, 1, 1)

    mean = x.mean(dim=-1, keepdim=True)  # (B, P, 1): each token's mean over features
    centred = x - mean
    U, S, Vh = torch.linalg.svd(centred, full_matrices=False)  # (B, P, K), (B, K), (B, K, C), K = min(P, C)
    k = min(q, S.shape[-1])
    U, S, Vh = U[..., :k], S[..., :k], Vh[..., :k, :]  # top-k triplets
    scales, keep_residual = focus_scales(level, q)
    low_rank = (U * S[:, None, :]) @ Vh  # (B, P, C)
    rescaled = (U * (S * scales[:k].to(S))[:, None, :]) @ Vh  # (B, P, C)
    x_new = rescaled + mean + (centred - low_rank if keep_residual else 0)

    std_after = x_new.std(dim=(1, 2), keepdim=True)  # (B, 1, 1)
    ratio = torch.where(std_after > 0, std_before / std_after, torch.ones_like(std_after))  # all-zero: leave as is
    return torch.cat([cls_token, (x_new * ratio).to(dtype)], dim=1)


# --- Multi-context blending ---------------------------------------------------------------------------------------


def mask_token_weights(mask, num_patches, patch_size=14):
    """The weight of each token of one image context under an image mask (1 = keep, 0 = remove).

    mask: (h, w) array or tensor in [0, 1], any size (the mask of the picture given to CLIP). num_patches: P = g*g.
    Returns (1+P,) float32: patch j gets the mean of the mask over its patch, the class token the mean of the whole
    mask. As lib/model_zoo/clip.py, `CLIPImageContextEncoder._encode_wmask`: the mask is resized (bilinear) to the
    CLIP input size g*patch_size and averaged over each patch_size x patch_size patch; an all-ones mask means no mask.
    (The 2023 demo passes 1 - the drawn mask, so drawn regions are removed.)
    """
    if isinstance(mask, np.ndarray):
        mask = torch.from_numpy(mask)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"a mask must be a numpy array or a tensor (h, w), got {type(mask).__name__}")
    if mask.ndim != 2 or mask.numel() == 0:
        raise ValueError(f"a mask must be 2-D (h, w) and non-empty, got shape {tuple(mask.shape)}")
    mask = mask.detach().to("cpu", torch.float32)
    if not torch.isfinite(mask).all() or mask.min() < 0 or mask.max() > 1:
        raise ValueError(f"mask values must lie in [0, 1] (1 = keep), got [{mask.min().item()}, {mask.max().item()}]")
    g = math.isqrt(num_patches)
    if g * g != num_patches:
        raise ValueError(f"{num_patches} patch tokens do not form a square g x g grid a mask can be mapped to")
    if bool((mask == 1).all()):
        return torch.ones(1 + num_patches)
    size = g * patch_size
    resized = F.interpolate(mask[None, None], size=(size, size), mode="bilinear", align_corners=False)  # (1, 1, S, S)
    per_patch = F.avg_pool2d(resized, patch_size).flatten()  # (1, 1, g, g) -> (P,), row-major like the patch tokens
    return torch.cat([resized.mean().view(1), per_patch])


def blend_image_tokens(token_sets, weights, levels=None, masks=None, patch_size=14, q=20):
    """Several images -> one image context: each image's tokens masked, focused and weighted, then concatenated.

    token_sets: list of n image contexts, each (B, 1+P_k, C) (same B and C). weights: n numbers >= 0, not all 0.
    levels: n focus levels in [0, 1] (None: all 0.5). masks: n entries, each None or an (h, w) mask in [0, 1]
    (None: no masks; see `mask_token_weights`). Returns (B, sum_k (1+P_k), C), for the image context layers.

    As app.py, `vd_inference.inference_mcg`: per image, tokens * mask weights (class token too), then `focus` on
    the patch tokens, then tokens * weight; the n contexts are concatenated along the token axis. The weights are
    NOT normalised (the demo's sliders are in [0, 1], default 1): a weight scales its image's tokens, and attention
    then sees larger or smaller keys and values. The demo's unconditional context for this is torch.zeros_like.
    Note: the original also multiplies CLIP's input embeddings by the same weights inside the encoder; this
    function works on encoded tokens and applies the output-side multiplication only.
    """
    if not isinstance(token_sets, (list, tuple)) or not token_sets:
        raise ValueError("token_sets must be a non-empty list of image contexts (B, 1+P, C)")
    n = len(token_sets)
    levels = [0.5] * n if levels is None else levels
    masks = [None] * n if masks is None else masks
    for name, values in (("weights", weights), ("levels", levels), ("masks", masks)):
        if not isinstance(values, (list, tuple)) or len(values) != n:
            got = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
            raise ValueError(f"{name} must be a list with one entry per image ({n}), got {got}")
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w) or w < 0:
            raise ValueError(f"weights[{i}] must be a finite number >= 0, got {w!r}")
    if sum(weights) <= 0:
        raise ValueError(f"weights must not all be 0 (that is the unconditional context), got {list(weights)}")
    for i, tokens in enumerate(token_sets):
        _check_tokens(tokens, f"token_sets[{i}]")
        first = token_sets[0]
        if tokens.shape[0] != first.shape[0] or tokens.shape[2] != first.shape[2]:
            raise ValueError(f"token_sets[{i}] has shape {tuple(tokens.shape)}, token_sets[0] {tuple(first.shape)}: "
                             "batch size and context width must match")
        _check_level(levels[i], f"levels[{i}]")

    blended = []
    for i, (tokens, weight, level, mask) in enumerate(zip(token_sets, weights, levels, masks)):
        if mask is not None:
            try:
                token_weights = mask_token_weights(mask, tokens.shape[1] - 1, patch_size)  # (1+P,)
            except (TypeError, ValueError) as error:
                raise type(error)(f"masks[{i}]: {error}") from None
            tokens = tokens * token_weights.to(tokens.device, tokens.dtype)[:, None]  # (1+P, 1) broadcasts over C
        tokens = focus(tokens, level, q)
        blended.append(tokens * weight)
    return torch.cat(blended, dim=1)  # (B, sum_k (1+P_k), C)


def mixed_contexts(image_tokens, text_tokens=None, text_ratio=0.0):
    """The contexts list for `DualContextUNet.forward`: [(kind, tokens, ratio), ...], ratios summing to 1.

    image_tokens: (B, M, C) (e.g. from `blend_image_tokens`); text_tokens: (B, 77, C) or None; text_ratio in [0, 1]:
    the text's share, the image gets 1 - text_ratio (app.py, `inference_mcg`: "Text Domination"; the text is used
    only when given and text_ratio > 0). A context with ratio 0 is left out, as minivd's pipeline does. The demo
    sets the guidance scale to 7.5 (1 - text_ratio) + 7.5 text_ratio, i.e. 7.5 throughout.
    """
    if isinstance(text_ratio, bool) or not isinstance(text_ratio, numbers.Real) or not 0.0 <= text_ratio <= 1.0:
        raise ValueError(f"text_ratio must be a number in [0, 1], got {text_ratio!r}")
    if text_tokens is None:
        if text_ratio > 0:
            raise ValueError(f"text_ratio is {text_ratio} but no text_tokens were given")
        return [("image", image_tokens, 1.0)]
    contexts = [("text", text_tokens, float(text_ratio))] if text_ratio > 0 else []
    if text_ratio < 1:
        contexts.append(("image", image_tokens, 1.0 - text_ratio))
    return contexts


# --- Colour adjustment --------------------------------------------------------------------------------------------


def colour_adjust(images, reference):
    """Give each output image, per channel, the mean and standard deviation of the reference, clamped to [0, 1].

    images: (B, 3, H, W) in [0, 1], or a list of PIL images (e.g. what generate returned); reference: (1 or B, 3, h, w)
    in [0, 1] (any size), or a PIL image. Returns the images in the form they came: (B, 3, H, W) or PIL images.
    As app.py, `vd_inference.inference_i2i` ("Simple"): y = (x - mean_x) / std_x * std_ref + mean_ref, then clamp.
    std is torch's default (Bessel-corrected), so before clamping the output's std(unbiased) equals the
    reference's exactly, whatever the two sizes. Clamping can change the stats when values leave [0, 1].
    A constant channel (std 0) becomes the reference mean.
    """
    if isinstance(images, (list, tuple)) and images and all(isinstance(i, Image.Image) for i in images):
        pixels = torch.stack([_pil_to_tensor(i) for i in images])
        if isinstance(reference, Image.Image):
            reference = _pil_to_tensor(reference)[None]
        adjusted = colour_adjust(pixels, reference).permute(0, 2, 3, 1).numpy()  # (B, H, W, 3)
        return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in adjusted]
    for name, x in (("images", images), ("reference", reference)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a tensor (B, 3, H, W), got {type(x).__name__}")
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] * x.shape[3] < 2:
            raise ValueError(f"{name} must be (B, 3, H, W) with at least 2 pixels, got shape {tuple(x.shape)}")
        if x.min() < 0 or x.max() > 1:
            raise ValueError(f"{name} must be in [0, 1], got values in [{x.min().item():.3g}, {x.max().item():.3g}]")
    if reference.shape[0] not in (1, images.shape[0]):
        raise ValueError(f"reference must have batch 1 or {images.shape[0]} (as images), got {reference.shape[0]}")

    work = torch.float64 if images.dtype == torch.float64 else torch.float32
    x, ref = images.to(work), reference.to(images.device, work)
    mean, std = x.mean(dim=(2, 3), keepdim=True), x.std(dim=(2, 3), keepdim=True)  # (B, 3, 1, 1)
    ref_mean, ref_std = ref.mean(dim=(2, 3), keepdim=True), ref.std(dim=(2, 3), keepdim=True)  # (1 or B, 3, 1, 1)
    normalised = (x - mean) / torch.where(std > 0, std, torch.ones_like(std))
    return (normalised * ref_std + ref_mean).clamp(0, 1).to(images.dtype)


def _pil_to_tensor(image):
    """PIL image -> (3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)


# --- Fidelity (image variation that stays close to the input) -----------------------------------------------------


def fidelity_start_step(steps, fidelity):
    """How many of the `steps` DDIM steps to skip: 0 = start from pure noise, steps = keep the input as it is.

    The original (app.py, `inference_i2i`) denoises int(steps * (1 - fidelity)) steps; the rest are skipped:
        start_step = steps - int(steps * (1 - fidelity))
    float rounding is the original's too: fidelity 0.9 with 50 steps denoises int(4.999...) = 4 steps, not 5.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if isinstance(fidelity, bool) or not isinstance(fidelity, numbers.Real) or not 0.0 <= fidelity <= 1.0:
        raise ValueError(f"fidelity must be a number in [0, 1] (0 pure noise, 1 the input itself), got {fidelity!r}")
    return steps - int(steps * (1 - fidelity))


def noised_start(ddim, x0_latents, noise, steps, fidelity):
    """The latents DDIM starts from for image variation with fidelity, and the step it starts at.

    x0_latents: (B, 4, h, w) the input image's VAE latents (scaled); noise: the same shape, N(0, I).
    Returns (x_t, start_step), to be passed on as `ddim.sample(denoiser, x_t, steps, ..., start_step=start_step)`,
    which runs timesteps[start_step:]. So x_t is the input noised to the level of the first timestep it will see:
        x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise,   t = ddim.timesteps(steps)[start_step]
    (the forward process q(x_t | x0), `DDIM.add_noise`; diffusers' img2img does the same with strength = 1 - fidelity).
    start_step 0 (fidelity 0): x_t = noise itself, as the original's pure-noise branch. start_step = steps
    (fidelity 1): no step is left and x_t is x0_latents itself (the demo returns the input picture unchanged).
    Differences from the original (lib/model_zoo/ddim.py, `DDIMSampler.ddim_sampling`): it noises to
    t + 1000 // steps, one DDIM stride above the first timestep it then denoises, and its VAE encoding draws a sample
    of the posterior (autokl.py, `encode`) where minivd's `images_to_latents` takes its mean.
    """
    start_step = fidelity_start_step(steps, fidelity)
    if tuple(noise.shape) != tuple(x0_latents.shape):
        raise ValueError(f"noise has shape {tuple(noise.shape)}, x0_latents {tuple(x0_latents.shape)}: they must match")
    if start_step == steps:
        return x0_latents, start_step
    if start_step == 0:
        return noise, start_step
    t = ddim.timesteps(steps)[start_step]
    return ddim.add_noise(x0_latents, noise, t), start_step


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


# --- Image -> text -> image editing (paper Fig. 10, "latent image-to-text-to-image editing") -----------------------


def edit_text_latent(z, negative=None, positive=None, negative_strength=1.0, positive_strength=1.0):
    """Edit Optimus text latents: remove their component along a negative prompt's latent, add a positive one's.

    z: (B, D) latents (e.g. from the image-to-text flow); negative, positive: (B or 1, D) Optimus latents (the
    encoder's mean) of the prompts, or None. Returns (B, D):
        n_hat = negative / |negative|
        z_new = z - negative_strength (z . n_hat) n_hat + positive_strength positive
    With both strengths 1 this is the original (inference.py, `application_i2t2i`): the projection on the
    negative direction is removed completely (z_new . n_hat = 0 when there is no positive) and the positive latent
    is added unnormalised, at its own length. The edited latent is then decoded to a sentence; the original
    generates the final image dual-guided (image ratio 0.33) from [CLIP(edited sentence); CLIP(positive prompt)]
    as the text context and the rank-10 approximation of the image's patch tokens (class token dropped) as the
    image context.
    """
    if not isinstance(z, torch.Tensor) or z.ndim != 2:
        raise ValueError(f"z must be a tensor (B, D), got {tuple(z.shape) if isinstance(z, torch.Tensor) else type(z)}")
    out = z
    for name, latent in (("negative", negative), ("positive", positive)):
        if latent is None:
            continue
        if not isinstance(latent, torch.Tensor) or latent.ndim != 2 or latent.shape[0] not in (1, z.shape[0]) \
                or latent.shape[1] != z.shape[1]:
            got = tuple(latent.shape) if isinstance(latent, torch.Tensor) else type(latent).__name__
            raise ValueError(f"{name} must be a tensor (1 or {z.shape[0]}, {z.shape[1]}), got {got}")
    if negative is not None:
        length = negative.norm(dim=-1, keepdim=True)  # (B or 1, 1)
        if (length == 0).any():
            raise ValueError("negative latent has length 0: there is no direction to remove")
        n_hat = (negative / length).to(z)
        out = out - negative_strength * (out * n_hat).sum(dim=-1, keepdim=True) * n_hat  # (B, 1) * (B or 1, D)
    if positive is not None:
        out = out + positive_strength * positive.to(z)
    return out


def low_rank_tokens(tokens, rank=10):
    """The image context the editing flow uses: the patch tokens (class token dropped), each demeaned over its
    features, reduced to their best rank-`rank` approximation, then given their means back, as the original's
    `find_low_rank(..., demean=True, q=10)` in `application_i2t2i`. (B, 1+P, C) -> (B, P, C)."""
    _check_tokens(tokens)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
    patches = tokens[:, 1:].float()  # (B, P, C)
    mean = patches.mean(dim=-1, keepdim=True)  # (B, P, 1)
    U, S, Vh = torch.linalg.svd(patches - mean, full_matrices=False)  # (B, P, k), (B, k), (B, k, C)
    r = min(rank, S.shape[-1])
    return ((U[..., :r] * S[:, None, :r]) @ Vh[:, :r] + mean).to(tokens.dtype)  # (B, P, C)
