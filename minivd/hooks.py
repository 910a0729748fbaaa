"""Looking inside a generation: attention maps, step-by-step state and previews of the predicted image.

Legend: B batch, nh heads, N query tokens (latent pixels h*w), M context tokens (77 text / 257 image).

None of these change what is computed: attention capture recomputes the probabilities beside PyTorch's fused
attention, the callback only reads, and previews decode a copy. Outputs stay bit-identical, and when nothing is
attached no extra work is done.

    with capture_attention(model) as maps:          # cross-attention probabilities, per layer and step
        images = minivd.generate("text-to-image", model=model, prompt="a red fox", seed=0)
    maps.mean_map("context.text.blocks.15", step=-1) # (B, h, w, M): where each context token looks

    state = []
    minivd.generate(..., callback=lambda step, t, latents, **s: state.append(s))   # eps_cond, eps_uncond, x0_pred
"""

import math
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image

from .attention import Attention


class AttentionMaps:
    """Cross-attention probabilities recorded during a generation.

    `records[layer]` is a list, one entry per UNet call (one per denoising step), of probabilities averaged over
    heads: (B, N, M) float32 on the CPU. With classifier-free guidance the batch holds [uncond; cond] rows.
    """

    def __init__(self):
        self.records = {}

    def layers(self):
        return list(self.records)

    def mean_map(self, layer, step=-1, conditional_only=True):
        """(B, h, w, M) attention of each latent pixel to each context token at one step, for a square-ish layer."""
        probs = self.records[layer][step]
        if conditional_only and probs.shape[0] % 2 == 0:
            probs = probs[probs.shape[0] // 2:]  # rows [uncond; cond]: keep cond
        return as_grid(probs)

    def token_heatmaps(self, step=-1, size=None):
        """Average over every recorded layer, resized to one grid: (B, M, H, W) with H, W the finest grid."""
        grids = [self.mean_map(layer, step).permute(0, 3, 1, 2) for layer in self.records]  # (B, M, h, w)
        size = size or max((g.shape[-2:] for g in grids), key=lambda s: s[0] * s[1])
        resized = [torch.nn.functional.interpolate(g, size=size, mode="bilinear", align_corners=False) for g in grids]
        return torch.stack(resized).mean(0)


def as_grid(probs):
    """(B, N, M) -> (B, h, w, M) with h*w = N (h = the largest divisor of N not above sqrt(N))."""
    B, N, M = probs.shape
    h = max(d for d in range(1, int(math.isqrt(N)) + 1) if N % d == 0)
    return probs.reshape(B, h, N // h, M)


@contextmanager
def capture_attention(model, kinds=("text", "image"), cross=True, self_attention=False):
    """Record attention probabilities of the UNet's context blocks while the block runs.

    kinds: which context-layer sets to watch. cross: the attention to the CLIP context (attn2); self_attention:
    the pixels' attention to each other (attn1, large: N x N). Yields an AttentionMaps.
    """
    maps, hooked = AttentionMaps(), []
    unet = model.unet if hasattr(model, "unet") else model
    if unet is None:
        raise ValueError("the model has no UNet loaded yet: call model.prepare(flow) first")
    for kind in kinds:
        if kind not in unet.context:
            continue
        for i, block in enumerate(unet.context[kind].blocks):
            for name, attn in (("attn2", block.block.attn2), ("attn1", block.block.attn1)):
                if (name == "attn2" and cross) or (name == "attn1" and self_attention):
                    layer = f"context.{kind}.blocks.{i}" + ("" if name == "attn2" else ".self")
                    attn.probs_hook = recorder(maps, layer)
                    hooked.append(attn)
    try:
        yield maps
    finally:
        for attn in hooked:
            attn.probs_hook = None


def recorder(maps, layer):
    def record(module: Attention, probs):  # probs: (B, nh, N, M)
        maps.records.setdefault(layer, []).append(probs.mean(dim=1).float().cpu())

    return record


def word_attention(maps, tokenizer, prompt, step=-1):
    """Per-token heatmaps of a text prompt, averaged over layers, first image: list of (token, (H, W) array).

    Token positions 1 .. first EOS - 1 hold the prompt's BPE pieces (position 0 is BOS)."""
    ids = tokenizer([prompt])[0].tolist()
    end = ids.index(tokenizer.eos_id, 1)
    heat = maps.token_heatmaps(step)[0]  # (M, H, W)
    return [(tokenizer.decode([ids[p]]).strip(), heat[p].numpy()) for p in range(1, end)]


@torch.no_grad()
def preview(model, x0_pred):
    """Decode the sampler's predicted x0 at any step into PIL images (image flows): a look at where it is heading."""
    from .vae import latents_to_images

    pixels = latents_to_images(model.vae, x0_pred.to(next(model.vae.parameters()).dtype))
    array = pixels.float().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in array]
