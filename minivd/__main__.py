"""Command line: every flow of `minivd.generate`.

    python -m minivd text-to-image "a red fox in the snow" --out fox.png
    python -m minivd image-variation --image fox.png --out variation.png
    python -m minivd dual-guided "a watercolor painting" --image fox.png --mix-ratio 0.7 --out dual.png
    python -m minivd multi-context --image a.png --image b.png --image-weights 1 0.5 --focus 0.7 --out blend.png
    python -m minivd image-to-text --image fox.png --num-images 3
    python -m minivd text-variation "a red fox in the snow" --num-images 3
    python -m minivd edit --image fox.png --remove "a fox" --add "a cat" --out edit.png

Without --weights (or $MINIVD_WEIGHTS) it runs the built-in tiny demo model: random weights, no download.
"""

import argparse
import os
import sys
import time

import torch
from PIL import Image

from . import edit_image, generate, load
from .model import demo_model
from .pipeline import MODES

DEMO_WARNING = """\
****************************************************************************************************
 minivd demo: running the built-in TINY model with RANDOM weights. The whole pipeline runs, but the
 output is noise, not a picture of your prompt. For real images, download the official weights
 (Hugging Face: shi-labs/versatile-diffusion) and pass --weights PATH or set MINIVD_WEIGHTS=PATH.
****************************************************************************************************"""


def progress(total):
    start = time.time()

    def callback(step, t, latents):
        done = step + 1
        bar = "#" * (30 * done // total)
        print(f"\r  denoising [{bar:<30}] {done}/{total} t={int(t):4d} {time.time() - start:6.1f}s", end="", file=sys.stderr)
        if done == total:
            print(file=sys.stderr)

    return callback


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minivd", description="Versatile Diffusion in plain PyTorch.")
    parser.add_argument("mode", choices=[*MODES, "edit"], help="the flow to run (edit: image -> text -> image editing)")
    parser.add_argument("prompt", nargs="?", default=None, help="text condition")
    parser.add_argument("--image", action="append", help="image condition (a file); multi-context: repeat it")
    parser.add_argument("--image-weights", type=float, nargs="+", help="multi-context: one weight per --image")
    parser.add_argument("--focus", type=float, default=0.5, help="0 semantics ... 0.5 unchanged ... 1 style")
    parser.add_argument("--fidelity", type=float, default=0.0, help="image-variation: 0 from noise ... 1 the input")
    parser.add_argument("--colour-adjust", action="store_true", help="match the output's colours to the input image")
    parser.add_argument("--remove", help="edit: what to remove from the image's caption")
    parser.add_argument("--add", help="edit: what to add to it")
    parser.add_argument("--greedy", action="store_true", help="text flows: greedy decoding instead of sampling")
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--negative-image", default=None, help="file of the image to steer away from")
    parser.add_argument("--mix-ratio", type=float, default=0.5, help="dual-guided: share of the text context")
    parser.add_argument("--weights", default=os.environ.get("MINIVD_WEIGHTS"), help="checkpoint folder")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--eta", type=float, default=0.0)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-images", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--out", default="minivd.png", help="output file; with several outputs, name-N.png")
    args = parser.parse_args(argv)

    open_image = lambda path: Image.open(path).convert("RGB") if path else None
    images = [open_image(p) for p in args.image or []]
    dtype = getattr(torch, args.dtype)
    start = time.time()
    if args.weights:
        model = load(args.weights, device=args.device, dtype=dtype)
    else:
        print(DEMO_WARNING, file=sys.stderr)
        model = demo_model(args.device, dtype)
    if args.mode == "edit":
        if not images:
            raise ValueError("edit needs --image")
        result, sentence = edit_image(images[0], model=model, remove=args.remove, add=args.add, steps=args.steps,
                                      guidance_scale=args.guidance_scale, seed=args.seed, height=args.height,
                                      width=args.width)
        print(f"edited caption: {sentence}")
    else:
        image = images if args.mode == "multi-context" else (images[0] if len(images) == 1 else images or None)
        result = generate(
            args.mode, model=model, prompt=args.prompt, negative_prompt=args.negative_prompt, image=image,
            negative_image=open_image(args.negative_image), mix_ratio=args.mix_ratio, steps=args.steps,
            guidance_scale=args.guidance_scale, eta=args.eta, height=args.height, width=args.width, seed=args.seed,
            num_images=args.num_images, callback=progress(args.steps), focus=args.focus, fidelity=args.fidelity,
            colour_adjust=args.colour_adjust, weights=args.image_weights, greedy=args.greedy,
        )
    if result and isinstance(result[0], str):  # the text flows
        for text in result:
            print(text)
        print(f"done in {time.time() - start:.1f}s", file=sys.stderr)
        return 0
    stem, ext = os.path.splitext(args.out)
    for i, item in enumerate(result):
        path = args.out if len(result) == 1 else f"{stem}-{i}{ext or '.png'}"
        item.save(path)
        print(f"saved {path}")
    print(f"done in {time.time() - start:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
