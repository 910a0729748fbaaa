"""Looking inside a generation: attention maps, step-by-step state and previews of the predicted image.

Legend: B batch, nh heads, N query tokens (latent pixels h*w), M context tokens (77 text / 257 image).

None of these change what is computed: attention capture recomputes the probabilities beside PyTorch's fused
attention, the callback only reads, and previews decode a copy. Outputs stay bit-identical, and when nothing is
attached no extra work is done.

    with capture_attention(model) as maps:          # cross-attention probabilities, per layer and step
        images = minivd.generate("text-to-image", model=model, prompt="a red fox", seed=0)
    maps.mean_map("context.text.blocks.15", step=-1)  # (h, w, M): where each latent pixel looks, last row

    steps = StepRecorder()                         # every step's state: eps_cond, eps_uncond, eps, x0_pred
    minivd.generate(..., callback=steps)
"""

from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image

from .attention import Attention


class AttentionMaps:
    """Cross-attention probabilities recorded during a generation.

    `records[layer]` is a list, one entry per UNet call (one per denoising step), of probabilities averaged over
    heads: (rows, N, M) float32 on the CPU, N = h*w latent pixels of that layer (`grid[layer]` = (h, w)). With
    classifier-free guidance the rows are [uncond; cond], so the last row is the last conditional image.
    """

    def __init__(self):
        self.records, self.grid = {}, {}

    def layers(self):
        return list(self.records)

    def mean_map(self, layer, step=-1, row=-1):
        """(h, w, M): where each latent pixel of one row looks among the context tokens, at one step."""
        probs = self.records[layer][step][row]  # (N, M)
        h, w = self.grid[layer]
        return probs.reshape(h, w, -1)

    def token_heatmaps(self, step=-1, row=-1, size=None):
        """Average over every recorded layer, resized to the finest grid: (M, H, W)."""
        maps = [self.mean_map(layer, step, row).permute(2, 0, 1)[None] for layer in self.records]  # (1, M, h, w)
        size = size or max((m.shape[-2:] for m in maps), key=lambda s: s[0] * s[1])
        resized = [torch.nn.functional.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps]
        return torch.cat(resized).mean(0)


@contextmanager
def capture_attention(model, kinds=("text", "image"), cross=True, self_attention=False):
    """Record attention probabilities of the UNet's context blocks while the block runs.

    kinds: which context-layer sets to watch. cross: the attention to the CLIP context (attn2); self_attention:
    the pixels' attention to each other (attn1, large: N x N). Yields an AttentionMaps.
    """
    maps, hooked, handles = AttentionMaps(), [], []
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
                    handles.append(block.register_forward_pre_hook(grid_recorder(maps, layer)))
    try:
        yield maps
    finally:
        for attn in hooked:
            attn.probs_hook = None
        for handle in handles:
            handle.remove()


def grid_recorder(maps, layer):
    def record(block, args):  # args[0]: the block's input (B, C, h, w)
        maps.grid[layer] = tuple(args[0].shape[-2:])

    return record


def recorder(maps, layer):
    def record(module: Attention, probs):  # probs: (B, nh, N, M)
        maps.records.setdefault(layer, []).append(probs.mean(dim=1).float().cpu())

    return record


def word_attention(maps, tokenizer, prompt, step=-1, row=-1):
    """Per-token heatmaps of a text prompt for one row, averaged over layers: list of (token, (H, W) array).

    Token positions 1 .. first EOS - 1 hold the prompt's BPE pieces (position 0 is BOS)."""
    ids = tokenizer([prompt])[0].tolist()
    end = ids.index(tokenizer.eos_id, 1)
    heat = maps.token_heatmaps(step, row)  # (M, H, W)
    return [(tokenizer.decode([ids[p]]).strip(), heat[p].numpy()) for p in range(1, end)]


def preview(model, x0_pred):
    """Decode the sampler's predicted x0 at any step into PIL images (image flows): a look at where it is heading.
    x0_pred may live on any device; it is decoded where the VAE is."""
    with torch.no_grad():
        pixels = model.decode_images(x0_pred.to(model.device))  # (B, 3, H, W) in [0, 1]
    array = pixels.permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in array]


class StepRecorder(list):
    """A callback for `generate` that keeps every step's state: a list of dicts with step, t, latents, eps_cond,
    eps_uncond, eps, x0_pred (tensors as the sampler made them; nothing is copied or changed).

        steps = StepRecorder()
        minivd.generate("text-to-image", prompt="a red circle", callback=steps)
        steps[-1]["x0_pred"]
    """

    def __call__(self, step, t, latents, **state):
        self.append(dict(step=step, t=int(t), latents=latents, **state))
