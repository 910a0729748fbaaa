"""Benchmark minivd against diffusers' Versatile Diffusion pipelines: load time, seconds per step, peak memory.

    python -m minivd.tools.bench                                        # full-size random weights, CPU, float32, 256 and 512 px
    python -m minivd.tools.bench --device cuda --dtype float16 --sizes 512 --steps 4 --out results.md
    python -m minivd.tools.bench --folder path/to/versatile-diffusion   # the real weights: nothing is built
    python -m minivd.tools.bench --tiny --sizes 64 --steps 1 --flows text-to-image   # seconds; what the tests run
    python -m minivd.tools.bench --format bin-fp16 --sizes 256          # pickled fp16 .bin files, as the Hub ships

Unless --folder holds a checkpoint already, a checkpoint with RANDOM weights (std 0.02) is written there first, in the
official diffusers layout and at VD's full size, plus a random Optimus for the text flows (about 13 GB in float32, 6.5
GB in float16; see minivd/tools/random_checkpoint.py): timings and memory are real, the images are noise. --format bin
(or bin-fp16) measures a copy of it written once next to it (FOLDER-bin, FOLDER-bin-fp16) with every weights file
pickled under the Hub's names (diffusion_pytorch_model.bin, pytorch_model.bin; optimus-vae.pth), the format the Hub
folder ships: fp32, or fp16 read into --dtype. Every measurement
(one implementation, one flow, one size) runs in a fresh Python process, so its peak memory is its own, under a timeout;
a failed one shows as "error [n]" in the table, with its message below. On a busy machine, --repeat N reports the
fastest of N runs.

diffusers and transformers are needed to build the checkpoint and for the reference column. They are imported here and
in minivd/tools/random_checkpoint.py only, inside the functions that use them; the rest of minivd never imports them.
"""

import argparse
import importlib.metadata
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn as nn

from minivd.tools.memory import LiveBytes
from minivd.tools.random_checkpoint import MARKER, build_checkpoint, reference_libraries

IMAGE_FLOWS = ("text-to-image", "image-variation", "dual-guided")
TEXT_FLOWS = ("image-to-text", "text-variation")  # minivd only: diffusers has no pipeline for them
RESULT = "BENCH_RESULT "  # a worker's last line: this prefix, then JSON

# ---------------------------------------------------------------------------------------------------------------------
# One measurement (runs in its own process)


def inputs(flow):
    """The conditions of a flow: a prompt and/or a 512x512 picture with some structure."""
    from PIL import Image

    y, x = np.mgrid[0:512, 0:512] / 511.0
    picture = Image.fromarray((np.stack([x, y, (x * y) ** 0.5], axis=-1) * 255).astype(np.uint8))
    prompt = "a red fox in the snow, watercolor"
    return {"text-to-image": dict(prompt=prompt), "image-variation": dict(image=picture),
            "dual-guided": dict(prompt=prompt, image=picture), "text-variation": dict(prompt=prompt),
            "image-to-text": dict(image=picture)}.get(flow, {})


def load_minivd(folder, flow, device, dtype, reuse_heap=False):
    """minivd for `flow`; reuse_heap: run generate inside minivd.speed.reuse_freed_memory (opt-in, glibc CPUs)."""
    import contextlib

    import minivd

    model = minivd.load(folder, device=device, dtype=dtype)
    model.prepare(flow)  # what generate would do first: read the weights this flow needs
    size_of = (lambda size: dict(height=size, width=size, output="np")) if flow in IMAGE_FLOWS else (lambda size: {})
    modules = [model.unet, model.vae, model.text_encoder, model.image_encoder, model.optimus]

    def run(steps, size, callback):
        with minivd.speed.reuse_freed_memory(device) if reuse_heap else contextlib.nullcontext():
            return minivd.generate(flow, model=model, steps=steps, seed=0, callback=callback, **size_of(size),
                                   **inputs(flow))

    return held_gib(modules), run


def load_diffusers(folder, flow, device, dtype):
    """diffusers' pipeline for `flow`, built component by component (diffusers >= 0.25 cannot load the VD folder
    with a pipeline's from_pretrained), used as its documentation shows."""
    if flow not in IMAGE_FLOWS:
        raise ValueError("n/a: diffusers has no pipeline for this flow")
    reference_libraries()
    import diffusers
    from diffusers.pipelines.deprecated.versatile_diffusion.modeling_text_unet import UNetFlatConditionModel
    from transformers import CLIPImageProcessor, CLIPTextModelWithProjection, CLIPTokenizer, CLIPVisionModelWithProjection

    classes = dict(image_unet=diffusers.UNet2DConditionModel, text_unet=UNetFlatConditionModel,
                   vae=diffusers.AutoencoderKL, text_encoder=CLIPTextModelWithProjection,
                   image_encoder=CLIPVisionModelWithProjection, tokenizer=CLIPTokenizer,
                   image_feature_extractor=CLIPImageProcessor, scheduler=diffusers.DDIMScheduler)
    pipeline, names = {
        "text-to-image": (diffusers.VersatileDiffusionTextToImagePipeline,
                          ("tokenizer", "text_encoder", "image_unet", "text_unet", "vae", "scheduler")),
        "image-variation": (diffusers.VersatileDiffusionImageVariationPipeline,
                            ("image_feature_extractor", "image_encoder", "image_unet", "vae", "scheduler")),
        "dual-guided": (diffusers.VersatileDiffusionDualGuidedPipeline,
                        ("tokenizer", "image_feature_extractor", "text_encoder", "image_encoder", "image_unet",
                         "text_unet", "vae", "scheduler")),
    }[flow]
    parts = {}
    for name in names:
        weights = isinstance(classes[name], type) and issubclass(classes[name], nn.Module)
        kwargs = {"torch_dtype": dtype} if weights else {}
        parts[name] = classes[name].from_pretrained(os.path.join(folder, name), **kwargs)
    pipe = pipeline(**parts)
    if flow == "dual-guided":  # diffusers >= 0.17 passes an argument its DualTransformer2DModel does not take
        for module in pipe.image_unet.modules():
            if isinstance(module, diffusers.models.DualTransformer2DModel):
                forward = module.forward
                module.forward = lambda *a, encoder_attention_mask=None, _f=forward, **k: _f(*a, **k)
    if hasattr(pipe, "remove_unused_weights"):
        pipe.remove_unused_weights()  # drops the text UNet's data layers, as diffusers' docs do
    pipe = pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    generator = lambda: torch.Generator().manual_seed(0)
    kwargs = dict(inputs(flow), **({"text_to_image_strength": 0.5} if flow == "dual-guided" else {}))
    return held_gib(pipe.components.values()), lambda steps, size, callback: pipe(
        num_inference_steps=steps, guidance_scale=7.5, height=size, width=size, generator=generator(),
        output_type="np", callback=callback, callback_steps=1, **kwargs)


def held_gib(modules):
    """GiB of the distinct parameters and buffers that `modules` hold (skipping None, non-modules and meta tensors):
    the weights a flow keeps loaded, whether or not their pages are resident yet."""
    sizes = {}
    for module in modules:
        if isinstance(module, nn.Module):
            for t in [*module.parameters(), *module.buffers()]:
                if t.device.type != "meta":
                    sizes[t.data_ptr()] = t.numel() * t.element_size()
    return sum(sizes.values()) / 2**30


def measure(impl, folder, flow, size, device, dtype, steps, tensor_peak=False, reuse_heap=False):
    """Load, then generate with steps + 1 DDIM steps (the first one is the warm-up) at guidance 7.5.
    tensor_peak: then generate once more (one step) counting the tensors alive at once (`LiveBytes`)."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    start = time.perf_counter()
    if impl == "minivd":
        weights_gib, run = load_minivd(folder, flow, device, dtype, reuse_heap)
    else:
        weights_gib, run = load_diffusers(folder, flow, device, dtype)
    sync()
    load_s = time.perf_counter() - start
    stamps = []

    def callback(step, t, latents, **state):
        sync()
        stamps.append(time.perf_counter())

    start = time.perf_counter()
    run(steps + 1, size, callback)
    sync()
    result = dict(load_s=load_s, generate_s=time.perf_counter() - start, weights_gib=weights_gib)
    if len(stamps) == steps + 1:
        result["step_s"] = (stamps[-1] - stamps[0]) / steps
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    result["rss_gib"] = peak / (2**30 if sys.platform == "darwin" else 2**20)
    if device.startswith("cuda"):
        result["cuda_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if tensor_peak:  # the weights, plus the most that the call's own tensors took at once
        with torch.no_grad(), LiveBytes() as live:
            run(1, size, lambda *args, **state: None)
        result["tensor_gib"] = weights_gib + live.peak / 2**30
    if hasattr(os, "getloadavg"):
        result["load_1min"] = os.getloadavg()[0]  # other processes on the machine skew the timings
    return result


PICKLED_NAMES = {"diffusion_pytorch_model.safetensors": "diffusion_pytorch_model.bin",
                 "model.safetensors": "pytorch_model.bin", "optimus-vae.safetensors": "optimus-vae.pth"}
FORMATS = {"safetensors": None, "bin": torch.float32, "bin-fp16": torch.float16}  # and the pickles' dtype


def write_pickled(folder, target, dtype):
    """Copy the checkpoint in `folder` to `target` with each safetensors weights file written as a pickle
    (torch.save, one storage per tensor) under the Hub's name, floating tensors in `dtype`; model_index.json last."""
    import shutil

    from weights_loader import TensorFile

    for root, _, names in os.walk(folder):
        out = os.path.join(target, os.path.relpath(root, folder))
        os.makedirs(out, exist_ok=True)
        for name in sorted(set(names) - {"model_index.json", MARKER}):  # the marker describes the source
            source = os.path.join(root, name)
            if name not in PICKLED_NAMES:
                shutil.copy2(source, os.path.join(out, name))
                continue
            tf = TensorFile(source)
            torch.save({k: tf.get(k, dtype=dtype).contiguous().clone() for k in tf.keys()},
                       os.path.join(out, PICKLED_NAMES[name]))
            print(f"  {source} -> {os.path.join(out, PICKLED_NAMES[name])}", flush=True)
    shutil.copy2(os.path.join(folder, "model_index.json"), os.path.join(target, "model_index.json"))


def pickled_folder(folder, fmt, timeout):
    """The checkpoint to measure for --format: `folder` itself, or its pickled copy FOLDER-FORMAT (written once, in
    its own process)."""
    if FORMATS[fmt] is None:
        return folder
    target = f"{folder}-{fmt}"
    if os.path.isfile(os.path.join(target, "model_index.json")):
        print(f"using the {fmt} copy in {target}", file=sys.stderr)
        return target
    print(f"writing a {fmt} copy of {folder} to {target} ...", file=sys.stderr)
    dtype = str(FORMATS[fmt]).removeprefix("torch.")
    result = run_isolated(dict(task="pickle", folder=folder, target=target, dtype=dtype), timeout)
    if "error" in result:
        raise SystemExit(f"could not write {target}: {result['error']}")
    return target


def worker(spec):
    """Entry point of a measurement process: run `spec`, print one RESULT line."""
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if spec["task"] == "build":
        build_checkpoint(spec["folder"], spec["tiny"], getattr(torch, spec["dtype"]))
        result = {}
    elif spec["task"] == "pickle":
        write_pickled(spec["folder"], spec["target"], getattr(torch, spec["dtype"]))
        result = {}
    elif spec["task"] == "prime":  # load the GPU libraries once, so the first measurement does not pay for it
        x = torch.randn(2, 64, 64, 64, device=spec["device"], dtype=getattr(torch, spec["dtype"]))
        nn.functional.scaled_dot_product_attention(x, x, x)
        nn.functional.conv2d(x, x[:8, :, :3, :3], padding=1).float().sum().item()
        (x.flatten(2) @ x.flatten(2).transpose(1, 2)).float().sum().item()  # cuBLAS
        result = {}
    else:
        result = measure(spec["impl"], spec["folder"], spec["flow"], spec["size"], spec["device"],
                         getattr(torch, spec["dtype"]), spec["steps"], spec.get("tensor_peak", False),
                         spec.get("reuse_heap", False))
    print(RESULT + json.dumps(result), flush=True)


def run_isolated(spec, timeout):
    """Run `spec` in a fresh Python process. Returns its result dict, or {"error": short message}."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # minivd/ and weights_loader.py
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "minivd.tools.bench", "--worker", json.dumps(spec)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:g} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT):])
    if done.returncode < 0:
        return {"error": f"killed by signal {-done.returncode}" + (" (out of memory?)" if done.returncode == -9 else "")}
    lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
    message = lines[-1] if lines else f"exit status {done.returncode}"
    return {"error": message.replace("|", "/")[:300]}


# ---------------------------------------------------------------------------------------------------------------------
# The report


def machine():
    """One line: CPU model and cores, memory, GPU, versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 if hasattr(os, "sysconf") else float("nan")
    gpu = f"; GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    versions = [f"torch {torch.__version__}"]
    for package in ("diffusers", "transformers"):
        try:
            versions.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{package} not installed")
    return f"{cpu} ({os.cpu_count()} cores), {memory:.0f} GiB RAM{gpu}; {', '.join(versions)}"


def best_of(results):
    """Combine repeated measurements: the fastest time and the largest memory of the runs that worked (other
    processes only ever slow a run down); the first error if none worked."""
    good = [r for r in results if "error" not in r]
    if not good:
        return results[0]
    largest = ("rss_gib", "cuda_gib", "tensor_gib", "weights_gib", "load_1min")  # memory and machine load
    combined = {}
    for key in {k for r in good for k in r}:
        values = [r[key] for r in good if key in r]
        combined[key] = max(values) if key in largest else min(values)
    return combined


def table(rows, cuda, tensors=False):
    """rows: (flow, size, minivd result, diffusers result) -> a markdown table whose cells read
    'minivd / diffusers (ratio minivd/diffusers)', followed by the error messages as numbered notes."""
    metrics = [("load s", "load_s"), ("s / step", "step_s"), ("generate s", "generate_s"), ("weights GiB", "weights_gib"),
               ("peak RSS GiB", "rss_gib")]
    metrics += [("peak CUDA GiB", "cuda_gib")] if cuda else []
    metrics += [("peak tensors GiB", "tensor_gib")] if tensors else []
    notes = []

    def show(result, key):
        if "error" not in result:
            return f"{result[key]:.3g}" if key in result else "-"
        if result["error"] in ("n/a", "not run"):
            return result["error"]
        if result["error"] not in notes:
            notes.append(result["error"])
        return f"error [{notes.index(result['error']) + 1}]"

    lines = ["| flow | size | " + " | ".join(name for name, _ in metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for flow, size, mine, theirs in rows:
        cells = []
        for _, key in metrics:
            text = f"{show(mine, key)} / {show(theirs, key)}"
            if key in mine and key in theirs and theirs[key] > 0:
                text += f" ({mine[key] / theirs[key]:.2f})"
            cells.append(text)
        lines.append(f"| {flow} | {size} | " + " | ".join(cells) + " |")
    lines += [""] + [f"[{i}] {note}" for i, note in enumerate(notes, 1)] if notes else []
    return "\n".join(lines)


def prepare_folder(folder, tiny, dtype, timeout):
    """Use the checkpoint in `folder`, or build a random one there (in its own process)."""
    marker = os.path.join(folder, MARKER)
    if os.path.isfile(os.path.join(folder, "model_index.json")):
        if os.path.isfile(marker):
            with open(marker) as f:
                built = json.load(f)
            if built["tiny"] != tiny:
                raise SystemExit(f"{folder} holds a {'tiny' if built['tiny'] else 'full-size'} random checkpoint, "
                                 f"but this run asks for a {'tiny' if tiny else 'full-size'} one: pass another --folder")
        print(f"using the checkpoint in {folder}", file=sys.stderr)
        return
    stored = dtype if dtype in ("float16", "bfloat16") else "float32"
    print(f"building a {'tiny' if tiny else 'full-size'} random checkpoint ({stored}) in {folder} ...", file=sys.stderr)
    os.makedirs(folder, exist_ok=True)
    start = time.perf_counter()
    result = run_isolated(dict(task="build", folder=folder, tiny=tiny, dtype=stored), timeout)
    if "error" in result:
        raise SystemExit(f"could not build the checkpoint in {folder}: {result['error']}")
    print(f"built in {time.perf_counter() - start:.0f} s", file=sys.stderr)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minivd.tools.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", help="checkpoint folder; built (random weights) if it has no model_index.json "
                                         "(default ./bench_checkpoint, ./bench_checkpoint_tiny with --tiny)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--format", choices=list(FORMATS), default="safetensors",
                        help="weights files to measure: the checkpoint's safetensors, or a pickled copy of it (bin: fp32, "
                             "bin-fp16: fp16; the Hub folder's format), written once to FOLDER-FORMAT")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="image sizes in pixels (square)")
    parser.add_argument("--steps", type=int, default=2, help="timed denoising steps (after one warm-up step)")
    parser.add_argument("--flows", nargs="+", default=None, help="default: the image flows, and minivd's text flows")
    parser.add_argument("--impls", nargs="+", choices=["minivd", "diffusers"], default=["minivd", "diffusers"])
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per measurement process")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per process (default: torch's)")
    parser.add_argument("--repeat", type=int, default=1, help="measure each case N times, report the fastest "
                                                               "(for a busy machine; the first run on a fresh GPU "
                                                               "machine also pays one-off start-up costs)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random checkpoint instead of the full-size one")
    parser.add_argument("--tensor-peak", action="store_true",
                        help="also report the weights plus the most tensor memory alive at once in a one-step "
                             "generate, counted per op: on a CPU, what peak CUDA memory counts on a GPU")
    parser.add_argument("--reuse-freed-memory", action="store_true",
                        help="run minivd's generate inside minivd.speed.reuse_freed_memory (opt-in: glibc's malloc "
                             "keeps large freed blocks while the UNet runs)")
    parser.add_argument("--out", help="also write the markdown report to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one measurement, as JSON
    args = parser.parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))

    from minivd.unet import FLOWS

    if args.steps < 1 or args.repeat < 1:
        parser.error("--steps and --repeat must be at least 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    flows = args.flows or [f for f in IMAGE_FLOWS + TEXT_FLOWS if f in FLOWS]
    unknown = [f for f in flows if f not in FLOWS]
    if unknown:
        parser.error(f"unknown flow(s) {', '.join(unknown)}; minivd has {', '.join(FLOWS)}")
    folder = os.path.abspath(args.folder or ("bench_checkpoint_tiny" if args.tiny else "bench_checkpoint"))
    prepare_folder(folder, args.tiny, args.dtype if args.format == "safetensors" else "float32", max(args.timeout, 3600))
    folder = pickled_folder(folder, args.format, max(args.timeout, 3600))

    if args.device.startswith("cuda"):
        run_isolated(dict(task="prime", device=args.device, dtype=args.dtype), args.timeout)
    rows = []
    for flow in flows:
        for size in (args.sizes if flow in IMAGE_FLOWS else ["-"]):
            runs = {"minivd": [], "diffusers": []}
            for _ in range(args.repeat):  # minivd and diffusers alternate, so both see the same machine load
                for impl in runs:
                    if impl not in args.impls or (impl == "diffusers" and flow not in IMAGE_FLOWS):
                        runs[impl] = [{"error": "n/a" if impl in args.impls else "not run"}]
                        continue
                    spec = dict(task="measure", impl=impl, folder=folder, flow=flow, size=size if size != "-" else 512,
                                device=args.device, dtype=args.dtype, steps=args.steps, threads=args.threads,
                                tensor_peak=args.tensor_peak, reuse_heap=args.reuse_freed_memory)
                    result = run_isolated(spec, args.timeout)
                    if flow not in IMAGE_FLOWS and "error" in result:
                        result = {"error": f"skipped: {result['error']}"}
                    print(f"{flow} {size} {impl}: {result}", file=sys.stderr, flush=True)
                    runs[impl].append(result)
            rows.append((flow, size, best_of(runs["minivd"]), best_of(runs["diffusers"])))

    loads = [r["load_1min"] for row in rows for r in row[2:] if "load_1min" in r]
    load = f"{min(loads):.1f} to {max(loads):.1f}" if loads else "unknown"
    tensors = ("Peak tensors = weights + the most memory the tensors of a one-step generate held at once, counted "
               "after every op (what peak CUDA memory counts on a GPU), measured after peak RSS in a second call. "
               if args.tensor_peak else "")
    report = "\n".join([
        f"## minivd vs diffusers: Versatile Diffusion, {'tiny' if args.tiny else 'full-size'} checkpoint ({folder})",
        "",
        f"Machine: {machine()}. 1-minute load average after each measurement: {load} (the measurement itself "
        f"keeps {args.threads or torch.get_num_threads()} threads busy; well above that, other processes were "
        "competing and timings are slower and noisier).",
        f"Weights: {args.format} files{' (fp16 pickles)' if args.format == 'bin-fp16' else ''}. "
        f"Device {args.device}, {args.dtype}; guidance 7.5, batch 1; best of {args.repeat} run(s) (fastest time, "
        f"largest memory); s / step = mean of {args.steps} step(s) after "
        f"one warm-up step; generate s = the whole call ({args.steps + 1} steps, encoders, VAE decode); load s = "
        "folder to ready for the flow; weights = the parameters the loaded modules hold (resident or not: memory-mapped "
        "pages count in RSS once read); peak RSS = the process's maximum resident memory (ru_maxrss). " + tensors +
        "Each cell: minivd / diffusers (ratio minivd/diffusers), each measured in a fresh process. minivd's generate "
        f"ran {'inside' if args.reuse_freed_memory else 'without'} the opt-in minivd.speed.reuse_freed_memory.",
        "",
        table(rows, args.device.startswith("cuda"), args.tensor_peak),
        "",
    ])
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
