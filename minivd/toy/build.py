"""Reproduce the built-in toy VD from scratch:  python -m minivd.toy.build --out toy_build [--ship]

Stages, in order; each is skipped when its output exists, so a stopped build carries on where it was:
    components  the tokenizers, the judge, the image VAE, the CLIP towers and Optimus (minivd.toy.components)
    assemble    a VersatileDiffusion of those components and a freshly initialised toy UNet, written in the official
                diffusers layout (init/)
    unet        the UNet trained on the toy world's four flows by minivd.train (unet/; resumable)
    image-context  more steps for the image context layers alone, on their two flows (image-variation and
                image-to-text; image_context/, resumable). After the four-flow stage, image variation kept the colour of
                small shapes in only about 80% of renders while image-to-text named it for 119 of 120: the colour is
                in CLIP's image tokens, and these layers had not yet learnt to read it. The stage leaves every other
                layer set as it is, so text-to-image and text-variation do not change. (A build folder made before
                this stage existed gets it, and its guidance and evaluation are measured again.)
    defaults    the guidance scale that measures best, written into the model's minivd.json
    evaluate    minivd.evaluate's table, the trained toy beside a random-weights model (evaluation.md)
    ship        with --ship: the model in float16 (about 11 MB) and the judge written into minivd/toy/weights/, what
                minivd.load() reads
The time of every stage is printed and kept in times.json.
"""

import argparse
import json
import os
import shutil
import time

import torch

from .. import export
from ..checkpoint import load
from ..clip import ImagePreprocessConfig
from ..model import Defaults, VDConfig, VersatileDiffusion
from ..train import TrainConfig, train
from ..unet import FLOWS, UNetConfig
from . import components

WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")  # the shipped toy (minivd.load())
DESCRIPTION = ("the built-in TOY model: a small VD trained by minivd on pictures of coloured shapes "
               "(minivd.toy.world), not Versatile Diffusion's weights")
TOY_UNET = UNetConfig(block_out_channels=(32, 64, 64), layers_per_block=1, attention_levels=(True, True, False),
                      heads=4, context_dim=64, norm_groups=8, text_channels=32)
UNET_STEPS, BATCH, LR, EMA = 3000, 64, 1e-3, 0.998
IMAGE_CONTEXT_STEPS, IMAGE_CONTEXT_LR, IMAGE_CONTEXT_EMA = 3000, 5e-4, 0.995
SAMPLING_STEPS, GUIDANCE_CANDIDATES = 25, (1.5, 2.0, 3.0, 4.0)


def assemble(parts, folder, seed=0):
    """The components and a new UNet, as one model written to `folder` (official layout)."""
    config = VDConfig(unet=TOY_UNET, vae=parts["vae"].cfg, text=parts["clip_text"].config,
                      vision=parts["clip_vision"].config, image_preprocess=ImagePreprocessConfig(size=64),
                      optimus=parts["optimus"].config, defaults=Defaults(64, 64, SAMPLING_STEPS, 3.0),
                      description=DESCRIPTION)
    model = VersatileDiffusion(config, parts["clip_tokenizer"], (parts["bert_tokenizer"], parts["gpt2_tokenizer"]))
    model.vae, model.text_encoder, model.image_encoder = parts["vae"], parts["clip_text"], parts["clip_vision"]
    model.optimus = parts["optimus"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.unet = model.new_module("unet")
    return export.save(model, folder)


def choose_guidance(folder, judge):
    """Measure text-to-image at each candidate guidance scale (one seed of the 24 colour x shape prompts) and write
    the best into the folder's minivd.json. Returns {guidance: % all attributes right}."""
    from ..evaluate import text_to_image

    model = load(folder)
    scores = {}
    for g in GUIDANCE_CANDIDATES:
        model.config.defaults.guidance_scale = g
        scores[g] = text_to_image(model, judge, seeds=2)["all"]
    best = max(scores, key=lambda g: (scores[g], -g))
    path = os.path.join(folder, "minivd.json")
    with open(path) as f:
        info = json.load(f)
    info["defaults"]["guidance_scale"] = best
    with open(path, "w") as f:
        json.dump(info, f, indent=2)
    return scores


def ship(folder, parts_dir, target=WEIGHTS):
    """Write the trained model into `target` with float16 weights (it fits in 20 MB; minivd reads them into float32),
    and the judge beside it (judge.safetensors, judge.json)."""
    model = load(folder)
    for flow in FLOWS:
        model.prepare(flow, vae_encoder=True)
    if os.path.isdir(target):
        shutil.rmtree(target)
    export.save(model, target, dtype=torch.float16)
    for name in ("judge.safetensors", "judge.json"):
        shutil.copy(os.path.join(parts_dir, name), os.path.join(target, name))
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(target) for f in files)
    print(f"shipped {target}: {size / 2**20:.1f} MiB")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m minivd.toy.build", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="toy_build", help="the build folder")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--unet-steps", type=int, default=UNET_STEPS)
    p.add_argument("--ship", action="store_true", help="copy the result into minivd/toy/weights/")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    times_path = os.path.join(out, "times.json")
    times = json.load(open(times_path)) if os.path.isfile(times_path) else {}

    def stage(name, done, run):
        if done():
            print(f"[{name}] done already ({times.get(name, '?')} s)")
            return
        print(f"[{name}] ...", flush=True)
        start = time.time()
        run()
        times[name] = round(time.time() - start, 1)
        with open(times_path, "w") as f:
            json.dump(times, f, indent=2)
        print(f"[{name}] {times[name]} s", flush=True)

    parts_dir, init, run_dir = os.path.join(out, "components"), os.path.join(out, "init"), os.path.join(out, "unet")
    four_flows, final = os.path.join(run_dir, "checkpoint"), os.path.join(out, "image_context", "checkpoint")
    stage("components", lambda: os.path.isfile(os.path.join(parts_dir, "optimus.safetensors")),
          lambda: components.main(["--out", parts_dir, "--stage", "all"]))
    stage("assemble", lambda: os.path.isfile(os.path.join(init, "model_index.json")),
          lambda: assemble(components.load(parts_dir), init))
    runs = dict(data="toy", batch_size=BATCH, save_every=250, description=DESCRIPTION, resume=True)  # both UNet stages
    stage("unet", lambda: os.path.isfile(os.path.join(four_flows, "model_index.json")),
          lambda: train(TrainConfig(init=init, out=run_dir, steps=args.unet_steps, lr=LR, warmup=100, ema=EMA, **runs)))
    stage("image-context", lambda: os.path.isfile(os.path.join(final, "model_index.json")),
          lambda: train(TrainConfig(init=four_flows, out=os.path.dirname(final), flows=("image-variation",
                                    "image-to-text"), train=("context.image",), steps=IMAGE_CONTEXT_STEPS,
                                    lr=IMAGE_CONTEXT_LR, warmup=50, ema=IMAGE_CONTEXT_EMA, **runs)))
    judge = components.load(parts_dir)["judge"]

    def newer(path, than):  # a measurement is done when it was made after the model it measures
        return os.path.isfile(path) and os.path.getmtime(path) >= os.path.getmtime(than)

    guidance, evaluation = os.path.join(out, "guidance.json"), os.path.join(out, "evaluation.md")
    stage("defaults", lambda: newer(guidance, os.path.join(final, "model_index.json")),
          lambda: json.dump(choose_guidance(final, judge), open(guidance, "w"), indent=2))

    def evaluate():
        from ..evaluate import evaluate as measure, table
        from ..tools.random_checkpoint import random_model

        results = {"toy": measure(load(final), judge), "random weights": measure(random_model(), judge)}
        with open(evaluation, "w") as f:
            f.write(table(results, list(results)) + "\n")
        print(table(results, list(results)))

    stage("evaluate", lambda: newer(evaluation, guidance), evaluate)
    if args.ship:
        ship(final, parts_dir)
    print("stage times (s):", json.dumps(times))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
