"""The README's first figure: every flow of the built-in toy on a few inputs, as one picture.

    python -m minivd.tools.figure docs/toy_flows.png

Row by row: text-to-image from four prompts; image-variation, image-to-text and dual-guided from four pictures of the
toy world (minivd.toy.world.render), each under its input; text-variation of the four prompts. Needs matplotlib.
"""

import argparse
import textwrap

import numpy as np

from .. import generate, load
from ..toy import world

PROMPTS = ("a small red circle on the left", "there is a large blue square at the top",
           "the triangle in the centre is large and yellow", "a green cross that is small, on the right")
SCENES = (world.Scene("large", "purple", "circle", "centre"), world.Scene("small", "white", "triangle", "top"),
          world.Scene("large", "green", "square", "right"), world.Scene("small", "yellow", "cross", "bottom"))
DUAL_PROMPT = "a large red circle in the centre"


def draw(out, seed=0):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model = load()
    rng = np.random.default_rng(seed)
    pictures = [world.render(scene, 64, rng) for scene in SCENES]
    rows = [
        ("text-to-image", [(generate("text-to-image", model=model, prompt=p, seed=seed)[0], p) for p in PROMPTS]),
        ("input picture", [(im, "") for im in pictures]),
        ("image-variation", [(generate("image-variation", model=model, image=im, seed=seed)[0], "") for im in pictures]),
        ("image-to-text", [(None, generate("image-to-text", model=model, image=im, seed=seed)[0]) for im in pictures]),
        (f"dual-guided with\n\"{DUAL_PROMPT}\"", [(generate("dual-guided", model=model, prompt=DUAL_PROMPT, image=im,
                                                           seed=seed)[0], "") for im in pictures]),
        ("text-variation", [(None, f"{p}\n->\n" + generate("text-variation", model=model, prompt=p, seed=seed)[0])
                            for p in PROMPTS]),
    ]
    fig, axes = plt.subplots(len(rows), 4, figsize=(10, 2.3 * len(rows)))
    for (name, cells), row in zip(rows, axes):
        for (image, text), ax in zip(cells, row):
            ax.set_xticks([])
            ax.set_yticks([])
            if image is not None:
                ax.imshow(image)
                ax.set_xlabel(textwrap.fill(text, 30), fontsize=7)
            else:
                ax.text(0.5, 0.5, textwrap.fill(text, 30), ha="center", va="center", fontsize=8, wrap=True)
                for side in ax.spines.values():
                    side.set_visible(False)
        row[0].set_ylabel(name, fontsize=9)
    fig.suptitle("the built-in toy VD (trained by minivd on pictures of coloured shapes), every flow", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m minivd.tools.figure", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="the PNG to write")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    draw(args.out, args.seed)


if __name__ == "__main__":
    main()
