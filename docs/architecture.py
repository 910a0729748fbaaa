"""Draws docs/architecture.png: VD's dual-context UNet as layer sets, and the flows as choices of them.
Run: python docs/architecture.py"""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import FancyBboxPatch


def box(ax, x, y, w, h, text, color):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02", fc=color, ec="#333", lw=1.2))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=10)


def main():
    fig, ax = plt.subplots(figsize=(12, 4.6))
    ax.set_xlim(0, 12), ax.set_ylim(0, 4.6), ax.axis("off")
    ax.text(0.1, 4.3, "Versatile Diffusion = one UNet split into layer sets (minivd/unet.py)", fontsize=13, weight="bold")
    box(ax, 0.2, 3.2, 2.7, 0.7, "global layers\ntime embedding", "#f2e6c9")
    box(ax, 0.2, 2.0, 2.7, 0.8, "data layers: image\nconv ResBlocks, 4×H/8×W/8", "#cfe3f7")
    box(ax, 0.2, 0.9, 2.7, 0.8, "data layers: text\nflat ResBlocks, 768-d latent", "#d9f0d3")
    box(ax, 3.2, 2.0, 2.7, 0.8, "context layers: text\n16 blocks ← CLIP text", "#f7d9d9")
    box(ax, 3.2, 0.9, 2.7, 0.8, "context layers: image\n16 blocks ← CLIP image", "#e6d9f7")
    flows = [
        ("text-to-image", "image data + text context"),
        ("image-variation", "image data + image context"),
        ("image-to-text", "text data + image context"),
        ("text-variation", "text data + text context"),
        ("dual-guided", "image data + text & image context,\nresiduals mixed by ratio at each block"),
        ("multi-context", "image data + several images (+ text),\nconcatenated tokens, mixed by ratio"),
    ]
    for i, (name, what) in enumerate(flows):
        y = 3.55 - i * 0.6
        ax.text(6.4, y, name, fontsize=10.5, weight="bold", va="center")
        ax.text(8.35, y, what, fontsize=9.5, va="center")
    ax.text(0.2, 0.25, "mixing at context block i:  h ← h + Σ_k r_k · (T_i^k(h, c_k) − h),  Σ r_k = 1", fontsize=10)
    fig.savefig(os.path.join(os.path.dirname(os.path.abspath(__file__)), "architecture.png"), dpi=110,
                bbox_inches="tight")


if __name__ == "__main__":
    main()
