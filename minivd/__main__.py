"""Command line: every mode of `minivd.generate`, and image -> text -> image editing.

    python -m minivd text-to-image "a red fox in the snow" --out fox.png
    python -m minivd image-variation --image fox.png --focus 0.3 --out variation.png
    python -m minivd dual-guided "a watercolor painting" --image fox.png --mix-ratio 0.7 --out dual.png
    python -m minivd multi-context --image a.png --image b.png --image-weights 1 0.5 --focus-levels 0.5 0.8 --out blend.png
    python -m minivd image-to-text --image fox.png --num-images 3 --greedy
    python -m minivd text-variation "a red fox in the snow" --num-images 3
    python -m minivd edit --image fox.png --remove "a fox" --add "a cat" --out edit.png

Without --weights (or $MINIVD_WEIGHTS) it runs the built-in model (no download).
"""

import argparse
import bdb
import math
import os
import sys
import time
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

MODES = ("text-to-image", "image-variation", "dual-guided", "image-to-text", "text-variation", "multi-context")
TEXT_MODES = ("image-to-text", "text-variation")


def number(low=None, high=None, integer=False):
    """An argparse type: a finite number (an integer if asked) in [low, high]."""
    def parse(text):
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if integer else 'a number'}") from None
        if not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high):
            span = f"in [{low}, {high}]" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"{text} is not {span}")
        return value
    return parse


def parser():
    p = argparse.ArgumentParser(
        prog="python -m minivd", description="Versatile Diffusion in plain PyTorch: one model, every flow.",
        epilog="examples:\n  " + "\n  ".join(line.strip() for line in __doc__.split("\n\n")[1].splitlines()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=[*MODES, "edit"], help="the flow to run (edit: image -> text -> image editing)")
    p.add_argument("prompt", nargs="?", default=None, help="the text condition")
    d = "(default: the model's)"
    g = p.add_argument_group("conditions")
    g.add_argument("--image", action="append", metavar="FILE", help="image condition; multi-context: repeat it")
    g.add_argument("--negative-prompt", metavar="TEXT", help="text to steer away from (default: the empty prompt)")
    g.add_argument("--negative-image", metavar="FILE", help="image to steer away from (default: a gray picture)")
    g.add_argument("--mix-ratio", type=number(0, 1), metavar="R", help="dual-guided, multi-context: the text's share (0.5)")
    g.add_argument("--focus", type=number(0, 1), default=None, metavar="F",
                   help="image conditions: 0 semantics ... 0.5 unchanged ... 1 style (0.5)")
    g.add_argument("--focus-levels", type=number(0, 1), nargs="+", metavar="F", help="multi-context: one focus per --image")
    g.add_argument("--image-weights", type=number(0), nargs="+", metavar="W", help="multi-context: one weight per --image")
    g.add_argument("--mask", action="append", metavar="FILE",
                   help="multi-context: a grayscale mask per --image (white keeps, black removes; 'none' for no mask)")
    g.add_argument("--fidelity", type=number(0, 1), default=0.0, metavar="F",
                   help="image-variation: 0 from noise ... 1 the input itself (0)")
    g.add_argument("--colour-adjust", action="store_true", help="image flows: match the output's colours to the first --image")
    g = p.add_argument_group("edit")
    g.add_argument("--remove", metavar="TEXT", help="what to remove from the image's caption")
    g.add_argument("--add", metavar="TEXT", help="what to add to it")
    g.add_argument("--image-ratio", type=number(0, 1), default=0.33, metavar="R", help="the image context's share (0.33)")
    g.add_argument("--rank", type=number(1, integer=True), default=10, help="rank of the image context (10)")
    g = p.add_argument_group("text output (image-to-text, text-variation)")
    g.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    g.add_argument("--temperature", type=number(1e-6), default=1.0, help="sampling temperature (1.0)")
    g.add_argument("--top-k", type=number(0, integer=True), default=0, help="sample among the k likeliest tokens (0: all)")
    g.add_argument("--top-p", type=number(1e-6, 1), default=1.0, help="nucleus sampling threshold (1.0: off)")
    g.add_argument("--max-length", type=number(2, integer=True), default=30, help="tokens, with <BOS> and <EOS> (30)")
    g = p.add_argument_group("sampling")
    g.add_argument("--steps", type=number(1, integer=True), help=f"DDIM steps {d}")
    g.add_argument("--guidance-scale", type=number(0), metavar="G", help=f"classifier-free guidance {d}")
    g.add_argument("--eta", type=number(0), default=0.0, help="DDIM noise: 0 deterministic (0)")
    g.add_argument("--height", type=number(8, integer=True), help=f"image height in pixels {d}")
    g.add_argument("--width", type=number(8, integer=True), help=f"image width in pixels {d}")
    g.add_argument("--seed", type=number(0, 2**64 - 1, integer=True), default=0, help="random seed (0)")
    g.add_argument("--num-images", type=number(1, integer=True), default=1, metavar="N", help="outputs per condition (1)")
    g = p.add_argument_group("model and output")
    g.add_argument("--weights", default=os.environ.get("MINIVD_WEIGHTS"), metavar="PATH",
                   help="checkpoint folder (default: $MINIVD_WEIGHTS, else the built-in model)")
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (cpu)")
    g.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32", help="(float32)")
    g.add_argument("--low-memory", action="store_true", help="attention slicing, tiled VAE decoding, GPU offload")
    g.add_argument("--out", default="minivd.png", metavar="FILE", help="output image; several: FILE-N.png (minivd.png)")
    return p


def open_image(path, flag):
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path}: is a folder, not an image file")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise ValueError(f"{flag} {path}: no such file") from None
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"{flag} {path}: not an image Pillow can read ({e})") from None


def output_paths(out, count):
    """The files the outputs go to, checked before anything runs: their folder must exist and be a folder."""
    stem, ext = os.path.splitext(out)
    paths = [out] if count == 1 else [f"{stem}-{i}{ext or '.png'}" for i in range(count)]
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise ValueError(f"--out {out}: {folder} is not a folder" + (" (it is a file)" if os.path.exists(folder) else ""))
    if os.path.isdir(out):
        raise ValueError(f"--out {out}: is a folder; give a file name such as {os.path.join(out, 'minivd.png')}")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"--out {out}: cannot write into {folder}")
    Image.registered_extensions()
    if ext and ext.lower() not in Image.registered_extensions():
        raise ValueError(f"--out {out}: Pillow cannot write {ext} files")
    return paths


def progress(total):
    start = time.time()

    def callback(step, t, latents, **state):
        done = step + 1
        bar = "#" * (30 * done // total)
        print(f"\r  denoising [{bar:<30}] {done}/{total} t={int(t):4d} {time.time() - start:6.1f}s", end="", file=sys.stderr)
        if done == total:
            print(file=sys.stderr)

    return callback


def run(args, p):
    import torch

    import minivd
    from minivd import extensions

    images = [open_image(path, "--image") for path in args.image or []]
    negative_image = open_image(args.negative_image, "--negative-image") if args.negative_image else None
    n = len(images)
    per_image = {"--image-weights": args.image_weights, "--focus-levels": args.focus_levels, "--mask": args.mask}
    for flag, values in per_image.items():
        if values is not None and args.mode != "multi-context":
            p.error(f"{flag} applies to multi-context only")
        if values is not None and len(values) != n:
            p.error(f"{flag}: give one value per --image ({n}), got {len(values)}")
    if args.mode in TEXT_MODES and (args.height or args.width):
        p.error(f"--height and --width apply to the image modes, not {args.mode}")
    if args.mode == "edit" and not images:
        p.error("edit needs --image")
    text_options = dict(greedy=args.greedy, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                        max_length=args.max_length)
    count = (max(n, 1) if args.mode != "multi-context" else 1) * args.num_images
    paths = [] if args.mode in TEXT_MODES else output_paths(args.out, 1 if args.mode == "edit" else count)
    model = minivd.load(args.weights, device=args.device, dtype=getattr(torch, args.dtype))
    if args.low_memory:
        model.enable_low_memory()
    steps = args.steps or model.config.defaults.steps
    start = time.time()
    if args.mode == "edit":
        result, sentence = minivd.edit_image(images[0], model=model, remove=args.remove, add=args.add,
                                             image_ratio=args.image_ratio, rank=args.rank, steps=args.steps,
                                             guidance_scale=args.guidance_scale, seed=args.seed, height=args.height,
                                             width=args.width)
        print(f"edited caption: {sentence}")
    else:
        masks = [None if m.lower() == "none" else np.asarray(open_image(m, "--mask").convert("L"), np.float32) / 255
                 for m in args.mask] if args.mask else [None] * n
        prompts = [minivd.ImagePrompt(
            im, focus=(args.focus_levels[i] if args.focus_levels else 0.5 if args.focus is None else args.focus),
            fidelity=args.fidelity, weight=args.image_weights[i] if args.image_weights else 1.0, mask=masks[i])
            for i, im in enumerate(images)]
        image = prompts if args.mode == "multi-context" else (prompts[0] if n == 1 else prompts or None)
        result = minivd.generate(
            args.mode, model=model, prompt=args.prompt, negative_prompt=args.negative_prompt, image=image,
            negative_image=negative_image, mix_ratio=args.mix_ratio, steps=args.steps,
            guidance_scale=args.guidance_scale, eta=args.eta, height=args.height, width=args.width, seed=args.seed,
            num_images=args.num_images, callback=progress(steps),
            output="latent" if args.mode in TEXT_MODES else "pil")
        if args.mode in TEXT_MODES:
            z = result
            result = model.decode_texts(z, torch.Generator().manual_seed(args.seed), **text_options)
        elif args.colour_adjust:
            if not images:
                p.error("--colour-adjust needs an --image to match")
            result = extensions.colour_adjust(result, images[0])
    if args.mode in TEXT_MODES:
        for text in result:
            print(text)
    else:
        for path, item in zip(paths, result):
            item.save(path)
            print(f"saved {path}")
    print(f"done in {time.time() - start:.1f}s", file=sys.stderr)
    return 0


def main(argv=None):
    """The command (also the installed `minivd`): a mistake in the arguments, the files or the settings is one line on
    stderr and exit status 2; any other error is one line too, exit status 1 (MINIVD_TRACEBACK=1 shows its traceback)."""
    p = parser()
    args = p.parse_args(argv)
    show_warning = warnings.formatwarning  # a warning is one line too, without the source line that looks like a traceback
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"
    try:
        return run(args, p)
    except (ValueError, TypeError, FileNotFoundError, FloatingPointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a failure minivd did not foresee (out of memory, a torch error): still one line
        if os.environ.get("MINIVD_TRACEBACK") or isinstance(e, bdb.BdbQuit):  # quitting pdb is not an error
            raise
        print(f"error: {type(e).__name__}: {e} (MINIVD_TRACEBACK=1 shows where)", file=sys.stderr)
        return 1
    finally:
        warnings.formatwarning = show_warning


if __name__ == "__main__":
    sys.exit(main())
