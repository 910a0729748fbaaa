"""Measure what a VD model does on the toy world, graded by an independent judge.

    python -m minivd.evaluate                        # the built-in toy, beside a model with random weights
    python -m minivd.evaluate --weights PATH --n 2   # another toy-world checkpoint; a smaller sample

The judge (minivd.toy.judge) is a small CNN trained only on clean renders of the toy world, never on generated images
and never with the toy's own CLIP: it reads a picture's size, colour, shape and place. Captions are read by the caption
grammar (minivd.toy.world.parse_caption), which also says whether a sentence is in the caption language at all.

    text-to-image     prompts for every colour x shape, sizes and places varied, several seeds: is each attribute drawn?
    image-variation   renders in, variations out: are the input's colour and shape kept?
    image-to-text     renders in, captions out: in the language? the right colour, shape, place?
    text-variation    captions in, captions out: in the language? every attribute kept? a different wording?
    dual-guided, multi-context   an image of one colour and a prompt of another, mixed at ratios 0 ... 1: the share of
                      outputs in the prompt's colour
    focus             image-variation at focus 0 (semantics), 0.5 and 1 (style): which attributes survive
"""

import argparse
import os
import time

import numpy as np
import torch

from . import extensions
from .checkpoint import load
from .pipeline import generate
from .toy import world
from .toy.common import load_component
from .toy.judge import HEADS, Judge, JudgeConfig

TOY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy", "weights")  # the built-in toy and its judge

RATIOS = (0.0, 0.25, 0.5, 0.75, 1.0)
FOCUS_LEVELS = (0.0, 0.5, 1.0)


def load_judge(folder=TOY):
    """The judge shipped with the toy (folder/judge.safetensors and judge.json)."""
    if not os.path.isfile(os.path.join(folder, "judge.safetensors")):
        raise FileNotFoundError(f"no judge in {folder}: python -m minivd.toy.build --ship writes it")
    return load_component(folder, "judge", JudgeConfig, Judge)


def scenes_for(n, seed):
    """n random scenes and a random template for each (a fixed draw for each seed)."""
    rng = np.random.default_rng(seed)
    scenes = [world.Scene.from_labels([rng.integers(len(v)) for v in world.ATTRIBUTES.values()]) for _ in range(n)]
    return scenes, [int(t) for t in rng.integers(len(world.TEMPLATES), size=n)]


def renders(scenes, seed):
    rng = np.random.default_rng(seed)
    return [world.render(scene, 64, rng) for scene in scenes]


def judged(judge, images):
    """PIL images -> the judge's labels (B, 4): size, colour, shape, place indices."""
    pixels = torch.from_numpy(np.stack([np.asarray(im.convert("RGB").resize((64, 64)), np.float32) / 255
                                        for im in images])).permute(0, 3, 1, 2)
    return judge.predict(pixels)


def percent(flags):
    return 100.0 * float(np.mean(flags)) if len(flags) else float("nan")


def text_to_image(model, judge, seeds):
    """Every colour x shape; size and place go round all 10 combinations as the seeds change."""
    pairs = [(s, p) for s in world.SIZES for p in world.PLACES]
    scenes, prompts = [], []
    for k in range(seeds):
        for i, (colour, shape) in enumerate((c, h) for c in world.COLOURS for h in world.SHAPES):
            size, place = pairs[(i + 7 * k) % len(pairs)]
            scenes.append(world.Scene(size, colour, shape, place))
            prompts.append(world.caption(scenes[-1], (i + k) % len(world.TEMPLATES)))
    images = generate("text-to-image", model=model, prompt=prompts, seed=0)
    got, want = judged(judge, images), torch.tensor([s.labels() for s in scenes])
    right = (got == want).numpy()
    return {**{name: percent(right[:, i]) for i, name in enumerate(HEADS)}, "all": percent(right.all(1))}


def image_variation(model, judge, n, focus=0.5):
    scenes, _ = scenes_for(n, seed=1)
    inputs = [extensions.ImagePrompt(im, focus=focus) for im in renders(scenes, seed=1)]
    got, want = judged(judge, generate("image-variation", model=model, image=inputs, seed=0)), torch.tensor([s.labels() for s in scenes])
    right = (got == want).numpy()
    return {name: percent(right[:, i]) for i, name in enumerate(HEADS)}


def image_to_text(model, n):
    scenes, _ = scenes_for(n, seed=2)
    captions = generate("image-to-text", model=model, image=renders(scenes, seed=2), seed=0)
    parsed = [world.parse_caption(c) for c in captions]
    result = {"in language": percent([p is not None for p in parsed])}
    for name in HEADS:
        result[name] = percent([p is not None and getattr(p, name) == getattr(s, name) for p, s in zip(parsed, scenes)])
    return result, captions


def text_variation(model, n):
    scenes, templates = scenes_for(n, seed=3)
    prompts = [world.caption(s, t) for s, t in zip(scenes, templates)]
    outputs = generate("text-variation", model=model, prompt=prompts, seed=0)
    parsed = [world.parse_caption_template(c) for c in outputs]
    return {"in language": percent([p is not None for p in parsed]),
            "attributes kept": percent([p is not None and p[0] == s for p, s in zip(parsed, scenes)]),
            "other wording": percent([p is not None and world.normalise_text(c) != world.normalise_text(q)
                                      for p, c, q in zip(parsed, outputs, prompts)])}, list(zip(prompts, outputs))


def mix_sweep(model, judge, n, mode="dual-guided"):
    """Image of scene A, prompt of scene B with another colour: {ratio: % of outputs judged in B's colour}."""
    rng = np.random.default_rng(4)
    image_scenes, _ = scenes_for(n, seed=4)
    text_scenes = [world.Scene(s.size, world.COLOURS[(world.COLOURS.index(s.colour) + 1 + rng.integers(5)) % 6],
                               s.shape, s.place) for s in image_scenes]
    pictures = renders(image_scenes, seed=4)
    prompts = [world.caption(s, 0) for s in text_scenes]
    colours = torch.tensor([world.COLOURS.index(s.colour) for s in text_scenes])
    shares = {}
    for ratio in RATIOS:
        if mode == "dual-guided":
            images = generate(mode, model=model, prompt=prompts, image=pictures, mix_ratio=ratio, seed=0)
        else:  # multi-context: one image and one prompt per call
            images = [generate(mode, model=model, prompt=p, image=[im], mix_ratio=ratio, seed=0)[0]
                      for p, im in zip(prompts, pictures)]
        shares[ratio] = percent((judged(judge, images)[:, 1] == colours).numpy())
    return shares


def evaluate(model, judge, n=4, log=print):
    """Every measurement on one model. n scales the sample: n seeds of the 24 text-to-image prompts, 30 n renders for
    image variation, 15 n renders or captions for the text flows, 5 n pairs for the mixing sweeps."""
    results, start = {}, time.time()
    results["text-to-image"] = text_to_image(model, judge, n)
    log(f"  text-to-image      {time.time() - start:6.1f}s")
    results["image-variation"] = image_variation(model, judge, 30 * n)
    results["image-to-text"], results["captions"] = image_to_text(model, 15 * n)
    results["text-variation"], results["variations"] = text_variation(model, 15 * n)
    log(f"  + image/text flows {time.time() - start:6.1f}s")
    results["dual-guided"] = mix_sweep(model, judge, 5 * n, "dual-guided")
    results["multi-context"] = mix_sweep(model, judge, 2 * n, "multi-context")
    results["focus"] = {level: image_variation(model, judge, 5 * n, focus=level) for level in FOCUS_LEVELS}
    log(f"  + mixing and focus {time.time() - start:6.1f}s")
    return results


def table(results, names):
    """One markdown table: a row per measurement, a column per model."""
    rows = []
    def row(label, get):
        rows.append(f"| {label} | " + " | ".join(f"{get(results[name]):.0f}" for name in names) + " |")
    for name in ("colour", "shape", "place", "size", "all"):
        row(f"text-to-image: {name} right %", lambda r, k=name: r["text-to-image"][k])
    for name in ("colour", "shape"):
        row(f"image-variation: {name} kept %", lambda r, k=name: r["image-variation"][k])
    for name in ("in language", "colour", "shape", "place", "size"):
        row(f"image-to-text: {name} %", lambda r, k=name: r["image-to-text"][k])
    for name in ("in language", "attributes kept", "other wording"):
        row(f"text-variation: {name} %", lambda r, k=name: r["text-variation"][k])
    for mode in ("dual-guided", "multi-context"):
        for ratio in RATIOS:
            row(f"{mode}: prompt's colour % at mix_ratio {ratio}", lambda r, m=mode, x=ratio: r[m][x])
    for level in FOCUS_LEVELS:
        for name in HEADS:
            row(f"focus {level}: {name} kept %", lambda r, x=level, k=name: r["focus"][x][k])
    header = "| measurement | " + " | ".join(names) + " |\n|---|" + "---|" * len(names)
    return header + "\n" + "\n".join(rows)


def main(argv=None):
    from .tools.random_checkpoint import random_model

    p = argparse.ArgumentParser(prog="python -m minivd.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default=None, help="a toy-world checkpoint (default: the built-in toy)")
    p.add_argument("--n", type=int, default=4, help="sample size: n seeds per text-to-image prompt, 30 n renders ...")
    p.add_argument("--no-random", action="store_true", help="skip the random-weights model's column")
    args = p.parse_args(argv)
    judge = load_judge()
    models = {"toy" if args.weights is None else args.weights: load(args.weights)}
    if not args.no_random:
        models["random weights"] = random_model()
    results = {}
    for name, model in models.items():
        print(f"{name}: {model.config.description}")
        results[name] = evaluate(model, judge, args.n)
    print(table(results, list(models)))
    first = next(iter(results.values()))
    print("\nimage-to-text, first captions:", "; ".join(first["captions"][:5]))
    print("text-variation, first pairs:", "; ".join(f"{a} -> {b}" for a, b in first["variations"][:5]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
