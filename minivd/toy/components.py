"""Train the toy VD's frozen components, stage by stage, and write them to one folder.

    python -m minivd.toy.components --out toy_run                 # every stage, ~30 min on 2 CPU cores
    python -m minivd.toy.components --out toy_run --stage vae     # one stage (needs the judge for its measurement)

Stages, in order (each seeded; a stage reads what the earlier ones wrote):
    tokenizers  clip_tokenizer/ (vocab.json, merges.txt, ...), optimus_tokenizer/ (vocab.txt, vocab.json, merges.txt)
    judge       judge.safetensors/.json       attribute classifier that grades images (trained on renders only)
    vae         vae.safetensors/.json         AutoencoderKL, 64 px -> 4 x 8 x 8; the .json holds scaling_factor
    clip        clip_text.*, clip_vision.*    CLIPTextEncoder, CLIPVisionEncoder (context width 64)
    optimus     optimus.safetensors/.json     Optimus text VAE (latent_dim in the .json)
Each stage also writes logs/<stage>.json (the loss log) and adds its time, steps, parameter count, final losses
and quality measurements to measurements.json. The .safetensors files hold minivd's state-dict names; the .json
files the fields of the component's config dataclass.
"""

import argparse
import json
import os
import time

import torch

from minivd.clip import CLIPTextConfig, CLIPTextEncoder, CLIPVisionConfig, CLIPVisionEncoder
from minivd.optimus import Optimus, OptimusConfig, load_tokenizers
from minivd.tokenizer import CLIPTokenizer
from minivd.toy import judge as judge_stage
from minivd.toy import train_clip, train_optimus, train_vae, vocab
from minivd.toy.common import load_component, parameter_count, save_component, write_json
from minivd.vae import AutoencoderKL, VAEConfig

STAGES = ("tokenizers", "judge", "vae", "clip", "optimus")
STEPS = {"judge": 400, "vae": 1400, "clip": 1500, "optimus": 3000}  # planned from 20-step timings on 2 cores

# What each stage must reach before the UNet is trained on top of it: (path in the measurements, minimum %).
# The UNet's own targets (e.g. text-to-image shape >= 90%) cannot beat what the components allow.
ATTRIBUTE_NAMES = ("size", "colour", "shape", "place")
GATES = {
    "judge": [(("held_out", "clean", a), 99.0) for a in ATTRIBUTE_NAMES]
             + [(("held_out", "degraded", a), 99.0) for a in ATTRIBUTE_NAMES],
    "vae": [(("judge_on_reconstructions", a), 98.0) for a in ATTRIBUTE_NAMES],
    "clip": [(("zero_shot_image_to_canonical_caption", a), 98.0) for a in ATTRIBUTE_NAMES]
            + [(("every_caption_to_its_canonical_caption",), 98.0)],
    "optimus": [(("held_out", "exact"), train_optimus.RECONSTRUCTION_GATE),
                (("latent_noise_0.2", "in_language"), 95.0), (("latent_noise_0.2", "attributes_kept"), 95.0)],
}


def failed_gates(stage, result):
    """-> list of "path: value < minimum" for every gate of `stage` that `result` misses."""
    failures = []
    for path, minimum in GATES.get(stage, []):
        value = result
        for key in path:
            value = value[key]
        if value < minimum:
            failures.append(f"{stage} {'/'.join(path)}: {value:.2f} < {minimum}")
    return failures


def load(out_dir):
    """The components in `out_dir` that exist: a dict with any of clip_tokenizer, bert_tokenizer, gpt2_tokenizer,
    judge, vae, clip_text, clip_vision, optimus (modules in eval mode)."""
    found = {}
    if os.path.exists(os.path.join(out_dir, "clip_tokenizer")):
        found["clip_tokenizer"] = CLIPTokenizer.from_folder(os.path.join(out_dir, "clip_tokenizer"))
    if os.path.exists(os.path.join(out_dir, "optimus_tokenizer")):
        found["bert_tokenizer"], found["gpt2_tokenizer"] = load_tokenizers(os.path.join(out_dir, "optimus_tokenizer"))
    builders = {
        "judge": (judge_stage.JudgeConfig, judge_stage.Judge),
        "vae": (VAEConfig, AutoencoderKL),
        "clip_text": (CLIPTextConfig, CLIPTextEncoder),
        "clip_vision": (CLIPVisionConfig, CLIPVisionEncoder),
        "optimus": (OptimusConfig, lambda cfg: Optimus(cfg, found["bert_tokenizer"], found["gpt2_tokenizer"])),
    }
    for name, (config_class, build) in builders.items():
        if os.path.exists(os.path.join(out_dir, f"{name}.safetensors")):
            found[name] = load_component(out_dir, name, config_class, build)
    return found


def _final(log):
    """The last logged losses of a loss log."""
    return {k: v for k, v in log[-1].items() if k not in ("step", "time_s")} if log else {}


NEEDS = {"vae": ("judge",), "clip": ("clip_tokenizer",), "optimus": ("bert_tokenizer", "gpt2_tokenizer")}


def run_stage(stage, out_dir, steps=None, seed=0, quiet=False):
    """Train and measure one stage; write its files. -> its measurements (dict)."""
    steps = steps or STEPS.get(stage)
    have = load(out_dir)
    missing = [name for name in NEEDS.get(stage, ()) if name not in have]
    if missing:
        raise FileNotFoundError(f"stage {stage} needs {', '.join(missing)} in {out_dir}: run the earlier stages")
    start = time.perf_counter()
    if stage == "tokenizers":
        result = vocab.write_tokenizers(out_dir)
        log = []
    elif stage == "judge":
        judge, log = judge_stage.train_judge(steps=steps, seed=seed, quiet=quiet)
        train_s = time.perf_counter() - start
        save_component(out_dir, "judge", judge, judge.config)
        result = {"parameters": parameter_count(judge), "held_out": judge_stage.measure_judge(judge)}
    elif stage == "vae":
        vae, log = train_vae.train_vae(steps=steps, seed=seed, quiet=quiet)
        train_s = time.perf_counter() - start
        save_component(out_dir, "vae", vae, vae.cfg)
        result = {"parameters": parameter_count(vae), "config": vars(vae.cfg),
                  **train_vae.measure_vae(vae, have["judge"])}
    elif stage == "clip":
        tokenizer = have["clip_tokenizer"]
        text, vision, logit_scale, log = train_clip.train_clip(tokenizer, steps=steps, seed=seed, quiet=quiet)
        train_s = time.perf_counter() - start
        save_component(out_dir, "clip_text", text, text.config)
        save_component(out_dir, "clip_vision", vision, vision.config)
        result = {"parameters": {"text": parameter_count(text), "vision": parameter_count(vision)},
                  "logit_scale": logit_scale, **train_clip.measure_clip(tokenizer, text, vision)}
    elif stage == "optimus":
        model, log = train_optimus.train_optimus(have["bert_tokenizer"], have["gpt2_tokenizer"], steps=steps,
                                                 seed=seed, quiet=quiet)
        train_s = time.perf_counter() - start
        save_component(out_dir, "optimus", model, model.config)
        result = {"parameters": parameter_count(model), **train_optimus.measure_optimus(model, seed=seed)}
    else:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    total_s = time.perf_counter() - start
    timing = {"time_s": round(total_s, 1), "threads": torch.get_num_threads()}
    if stage != "tokenizers":
        timing.update(steps=steps, train_s=round(train_s, 1), final_losses=_final(log))
    result = {**timing, **result}
    result["failed_gates"] = failed_gates(stage, result)

    os.makedirs(os.path.join(out_dir, "logs"), exist_ok=True)
    write_json(os.path.join(out_dir, "logs", f"{stage}.json"), log)
    path = os.path.join(out_dir, "measurements.json")
    measurements = {}
    if os.path.exists(path):
        with open(path) as f:
            measurements = json.load(f)
    measurements[stage] = result
    write_json(path, measurements)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description="Train the toy VD's tokenizers, VAE, CLIP, Optimus and judge.")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--stage", default="all", help=f"all, or a comma-separated list of: {', '.join(STAGES)}")
    parser.add_argument("--steps", type=int, default=None, help="training steps (one stage only; default: STEPS)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    stages = STAGES if args.stage == "all" else tuple(args.stage.split(","))
    if args.steps is not None and len(stages) != 1:
        parser.error("--steps applies to a single --stage")
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    times, failures = {}, []
    for stage in stages:
        result = run_stage(stage, args.out, args.steps, args.seed, args.quiet)
        times[stage] = result["time_s"]
        failures += result["failed_gates"]
        print(f"== {stage}: {result['time_s']:.1f} s", flush=True)
        print(json.dumps({k: v for k, v in result.items() if k not in ("config",)}, indent=1), flush=True)
    print("time per stage: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
          + f"; total {sum(times.values()) / 60:.1f} min")
    if failures:
        raise SystemExit("gates failed:\n  " + "\n  ".join(failures))
    print("every gate passed")


if __name__ == "__main__":
    main()
