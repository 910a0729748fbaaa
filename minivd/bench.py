"""Benchmark minivd against diffusers' Versatile Diffusion pipelines: load time, seconds per step, peak memory.

    python -m minivd.bench                                        # full-size random weights, CPU, float32, 256 and 512 px
    python -m minivd.bench --device cuda --dtype float16 --sizes 512 --steps 4 --out results.md
    python -m minivd.bench --folder path/to/versatile-diffusion   # the real weights: nothing is built
    python -m minivd.bench --tiny --sizes 64 --steps 1 --flows text-to-image   # seconds; what the tests run

Unless --folder holds a checkpoint already, a checkpoint with RANDOM weights (std 0.02) is written there first, in
the official diffusers layout and at VD's full size, plus a random Optimus for the text flows (about 13 GB in float32,
6.5 GB in float16): timings and memory are real, the images are noise. Every measurement (one implementation, one
flow, one size) runs in a fresh Python process, so its peak memory is its own, under a timeout; a failed one shows as
"error [n]" in the table, with its message below. On a busy machine, --repeat N reports the fastest of N runs.

diffusers and transformers are needed to build the checkpoint and for the reference column. They are imported in this
file only, inside the functions that use them; minivd itself never imports them.
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

IMAGE_FLOWS = ("text-to-image", "image-variation", "dual-guided")
TEXT_FLOWS = ("image-to-text", "text-variation")  # minivd only: diffusers has no pipeline for them
RESULT = "BENCH_RESULT "  # a worker's last line: this prefix, then JSON
MARKER = "bench_checkpoint.json"  # written into folders built here

# diffusers / transformers constructor arguments. FULL = shi-labs/versatile-diffusion, TINY = tests/tiny_vd.py
FULL = dict(
    unet=dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
              attention_head_dim=8, norm_num_groups=32),
    text_latent=768,
    vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, sample_size=256),
    clip_text=dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, projection_dim=768),
    clip_vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                     image_size=224, patch_size=14, projection_dim=768),
    bert=dict(vocab_size=28996, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
              max_position_embeddings=512, layer_norm_eps=1e-12),  # bert-base-cased
    gpt2=dict(vocab_size=50260, n_embd=768, n_layer=12, n_head=12, n_inner=3072, n_positions=1024),  # + 3 tokens
    head_dim=64,
)
TINY = dict(
    unet=dict(block_out_channels=(32, 32, 64, 64), layers_per_block=2, cross_attention_dim=32, attention_head_dim=2,
              norm_num_groups=8),
    text_latent=32,
    vae=dict(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=64),
    clip_text=dict(vocab_size=None, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                   projection_dim=32),  # vocab_size None: the tokenizer's
    clip_vision=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2, image_size=224,
                     patch_size=14, projection_dim=32),
    bert=dict(vocab_size=160, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              max_position_embeddings=96, layer_norm_eps=1e-12),  # the vocab of minivd.optimus.write_tiny_vocabs
    gpt2=dict(vocab_size=323, n_embd=48, n_layer=3, n_head=6, n_inner=192, n_positions=64),
    head_dim=8,
)


def reference_libraries():
    """Import diffusers and transformers, or explain how to get them."""
    try:
        import diffusers
        import transformers
    except ImportError as e:
        raise SystemExit(f"minivd.bench needs diffusers and transformers for this ({e}); install them with "
                         "`pip install diffusers==0.42.1 transformers` (or `pip install -e .[test]`)") from e
    return diffusers, transformers


# ---------------------------------------------------------------------------------------------------------------------
# A random checkpoint in the official layout


def reference_modules(sizes, vocab_size):
    """The five networks of VD as diffusers/transformers modules, on the meta device (no memory)."""
    reference_libraries()
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.pipelines.deprecated.versatile_diffusion.modeling_text_unet import UNetFlatConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionConfig, CLIPVisionModelWithProjection

    n = sizes["text_latent"]
    text = dict(sizes["clip_text"], vocab_size=sizes["clip_text"]["vocab_size"] or vocab_size)
    with torch.device("meta"):
        return {
            "image_unet": UNet2DConditionModel(
                in_channels=4, out_channels=4, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, **sizes["unet"]),
            "text_unet": UNetFlatConditionModel(
                sample_size=None, in_channels=(n, 1, 1), out_channels=(n, 1, 1),
                down_block_types=("CrossAttnDownBlockFlat",) * 3 + ("DownBlockFlat",),
                up_block_types=("UpBlockFlat",) + ("CrossAttnUpBlockFlat",) * 3, **sizes["unet"]),
            "vae": AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                                 down_block_types=("DownEncoderBlock2D",) * len(sizes["vae"]["block_out_channels"]),
                                 up_block_types=("UpDecoderBlock2D",) * len(sizes["vae"]["block_out_channels"]),
                                 **sizes["vae"]),
            # eos_token_id 2: the legacy value of the VD config, "pool the highest id" (<|endoftext|> is the last id)
            "text_encoder": CLIPTextModelWithProjection(CLIPTextConfig(
                max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1,
                **text)),
            "image_encoder": CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_act="quick_gelu",
                                                                            **sizes["clip_vision"])),
        }


def random_state_dict(module, generator, dtype, buffers=True):
    """Materialise `module`'s state dict with cheap random values: norms weight 1 / bias 0, other biases 0, every
    other weight N(0, 0.02^2) (small enough that nothing overflows in float16). buffers=False: parameters only."""
    state = {}
    for prefix, m in module.named_modules(remove_duplicate=False):
        for name, p in m.named_parameters(recurse=False):
            t = torch.empty(p.shape, dtype=torch.float32)
            if isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
                t.fill_(1.0 if name == "weight" else 0.0)
            elif name == "bias":
                t.zero_()
            else:
                t.normal_(0.0, 0.02, generator=generator)
            state[f"{prefix}.{name}" if prefix else name] = t.to(dtype)
    for key, b in module.state_dict().items() if buffers else ():  # persistent buffers (e.g. CLIP position_ids)
        if key not in state:  # integer buffers are position ids (0 .. n-1); float ones start at zero
            arange = torch.arange(b.shape[-1]).expand(b.shape).clone() if b.shape else torch.tensor(0)
            state[key] = torch.zeros(b.shape, dtype=dtype) if b.is_floating_point() else arange
    return state


def write_optimus(folder, sizes, latent_dim, generator, dtype):
    """A random Optimus text VAE as the original optimus-vae file names it (encoder.* = BERT + latent head,
    decoder.transformer.* = GPT-2 + latent projections), with stand-in vocabularies. Needs minivd.optimus."""
    from safetensors.torch import save_file
    from transformers import BertConfig, BertModel, GPT2Config, GPT2Model

    from minivd.optimus import write_tiny_vocabs

    write_tiny_vocabs(folder)  # stand-ins trained on a few sentences; BERT's may be smaller than its embedding,
    vocab_json = os.path.join(folder, "vocab.json")  # but GPT-2's must fill its embedding (less the 3 added tokens):
    with open(vocab_json, encoding="utf-8") as f:  # pad it with tokens no text produces
        vocab = json.load(f)
    for i in range(len(vocab), sizes["gpt2"]["vocab_size"] - 3):
        vocab[f"<|unused{i}|>"] = i
    with open(vocab_json, "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with torch.device("meta"):
        bert = BertModel(BertConfig(hidden_act="gelu", **sizes["bert"]))
        gpt2 = GPT2Model(GPT2Config(activation_function="gelu_new", **sizes["gpt2"]))
    state = {"encoder." + k: v for k, v in random_state_dict(bert, generator, dtype, buffers=False).items()}
    gpt2_state = random_state_dict(gpt2, generator, dtype, buffers=False)
    state.update({"decoder.transformer." + k: v for k, v in gpt2_state.items()})
    width, layers = sizes["gpt2"]["n_embd"], sizes["gpt2"]["n_layer"]
    for key, shape in [("encoder.linear.weight", (2 * latent_dim, sizes["bert"]["hidden_size"])),
                       ("decoder.transformer.linear.weight", (layers * width, latent_dim)),
                       ("decoder.transformer.linear_emb.weight", (width, latent_dim))]:
        state[key] = torch.empty(shape).normal_(0.0, 0.02, generator=generator).to(dtype)
    save_file(state, os.path.join(folder, "optimus-vae.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"head_dim": sizes["head_dim"]}, f)
    return sum(t.numel() for t in state.values())


def build_checkpoint(folder, tiny=False, dtype=torch.float32, seed=0):
    """Write a random VD checkpoint in the official diffusers layout (model_index.json last: its presence marks a
    complete folder). Returns the folder."""
    from safetensors.torch import save_file

    from minivd.tokenizer import write_clip_vocab

    reference_libraries()
    vocab_size = write_clip_vocab(os.path.join(folder, "tokenizer"))
    generator = torch.Generator().manual_seed(seed)
    for name, module in reference_modules(TINY if tiny else FULL, vocab_size).items():
        sub = os.path.join(folder, name)
        os.makedirs(sub, exist_ok=True)
        if name.endswith("encoder"):  # transformers
            module.config.architectures = [type(module).__name__]
            module.config.save_pretrained(sub)
            path = os.path.join(sub, "model.safetensors")
        else:  # diffusers
            module.save_config(sub)
            path = os.path.join(sub, "diffusion_pytorch_model.safetensors")
        state = random_state_dict(module, generator, dtype)
        save_file(state, path, metadata={"format": "pt"})
        print(f"  {name}: {sum(t.numel() for t in state.values()) / 1e6:.1f} M parameters -> {path}", flush=True)
        del state
    try:
        import minivd.optimus  # noqa: F401  (the text flows' VAE; older minivd versions have none)
    except ImportError:
        print("  optimus: minivd has no minivd.optimus, skipped (no text flows)", flush=True)
    else:
        sizes = TINY if tiny else FULL
        count = write_optimus(os.path.join(folder, "optimus"), sizes, sizes["text_latent"], generator, dtype)
        print(f"  optimus: {count / 1e6:.1f} M parameters", flush=True)
    with open(os.path.join(folder, MARKER), "w") as f:
        json.dump({"tiny": tiny, "dtype": str(dtype).removeprefix("torch."), "seed": seed}, f)
    return write_pipeline_files(folder)


def write_pipeline_files(folder):
    """The weight-free parts of the official folder: image_feature_extractor/, scheduler/ (VD's DDIM settings), and
    model_index.json last (its presence marks a complete folder). Returns the folder."""
    from diffusers import DDIMScheduler
    from transformers import CLIPImageProcessor

    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(
        os.path.join(folder, "image_feature_extractor"))
    DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1).save_pretrained(os.path.join(folder, "scheduler"))
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump({"_class_name": "VersatileDiffusionPipeline", "_diffusers_version": "0.8.0.dev0",
                   "image_unet": ["diffusers", "UNet2DConditionModel"],
                   "text_unet": ["versatile_diffusion", "UNetFlatConditionModel"],
                   "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "DDIMScheduler"],
                   "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
                   "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
                   "tokenizer": ["transformers", "CLIPTokenizer"],
                   "image_feature_extractor": ["transformers", "CLIPImageProcessor"]}, f, indent=2)
    return folder


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


def load_minivd(folder, flow, device, dtype):
    import minivd

    model = minivd.load(folder, device=device, dtype=dtype)
    model.prepare(flow)  # what generate would do first: read the weights this flow needs
    output = {"output": "np"} if flow in IMAGE_FLOWS else {}  # text flows return strings
    modules = [model.unet, model.vae, model.text_encoder, model.image_encoder, model.optimus]
    return held_gib(modules), lambda steps, size, callback: minivd.generate(
        flow, model=model, steps=steps, height=size, width=size, seed=0, callback=callback, **output, **inputs(flow))


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


def measure(impl, folder, flow, size, device, dtype, steps):
    """Load, then generate with steps + 1 DDIM steps (the first one is the warm-up) at guidance 7.5."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    start = time.perf_counter()
    weights_gib, run = {"minivd": load_minivd, "diffusers": load_diffusers}[impl](folder, flow, device, dtype)
    sync()
    load_s = time.perf_counter() - start
    stamps = []

    def callback(step, t, latents):
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
    if hasattr(os, "getloadavg"):
        result["load_1min"] = os.getloadavg()[0]  # other processes on the machine skew the timings
    return result


def worker(spec):
    """Entry point of a measurement process: run `spec`, print one RESULT line."""
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if spec["task"] == "build":
        build_checkpoint(spec["folder"], spec["tiny"], getattr(torch, spec["dtype"]))
        result = {}
    elif spec["task"] == "prime":  # load the GPU libraries once, so the first measurement does not pay for it
        x = torch.randn(2, 64, 64, 64, device=spec["device"], dtype=getattr(torch, spec["dtype"]))
        nn.functional.scaled_dot_product_attention(x, x, x)
        nn.functional.conv2d(x, x[:8, :, :3, :3], padding=1).float().sum().item()
        (x.flatten(2) @ x.flatten(2).transpose(1, 2)).float().sum().item()  # cuBLAS
        result = {}
    else:
        result = measure(spec["impl"], spec["folder"], spec["flow"], spec["size"], spec["device"],
                         getattr(torch, spec["dtype"]), spec["steps"])
    print(RESULT + json.dumps(result), flush=True)


def run_isolated(spec, timeout):
    """Run `spec` in a fresh Python process. Returns its result dict, or {"error": short message}."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # minivd/ and weights_loader.py live here
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "minivd.bench", "--worker", json.dumps(spec)]
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
    combined = {}
    for key in {k for r in good for k in r}:
        values = [r[key] for r in good if key in r]
        combined[key] = max(values) if key in ("rss_gib", "cuda_gib", "load_1min", "weights_gib") else min(values)
    return combined


def table(rows, cuda):
    """rows: (flow, size, minivd result, diffusers result) -> a markdown table whose cells read
    'minivd / diffusers (ratio minivd/diffusers)', followed by the error messages as numbered notes."""
    metrics = [("load s", "load_s"), ("s / step", "step_s"), ("generate s", "generate_s"), ("weights GiB", "weights_gib"),
               ("peak RSS GiB", "rss_gib")]
    metrics += [("peak CUDA GiB", "cuda_gib")] if cuda else []
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
    parser = argparse.ArgumentParser(prog="python -m minivd.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", help="checkpoint folder; built (random weights) if it has no model_index.json "
                                         "(default ./bench_checkpoint, ./bench_checkpoint_tiny with --tiny)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
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
    prepare_folder(folder, args.tiny, args.dtype, max(args.timeout, 3600))

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
                                device=args.device, dtype=args.dtype, steps=args.steps, threads=args.threads)
                    result = run_isolated(spec, args.timeout)
                    if flow not in IMAGE_FLOWS and "error" in result:
                        result = {"error": f"skipped: {result['error']}"}
                    print(f"{flow} {size} {impl}: {result}", file=sys.stderr, flush=True)
                    runs[impl].append(result)
            rows.append((flow, size, best_of(runs["minivd"]), best_of(runs["diffusers"])))

    loads = [r["load_1min"] for row in rows for r in row[2:] if "load_1min" in r]
    load = f"{min(loads):.1f} to {max(loads):.1f}" if loads else "unknown"
    report = "\n".join([
        f"## minivd vs diffusers: Versatile Diffusion, {'tiny' if args.tiny else 'full-size'} checkpoint ({folder})",
        "",
        f"Machine: {machine()}. 1-minute load average after each measurement: {load} (the measurement itself "
        f"keeps {args.threads or torch.get_num_threads()} threads busy; well above that, other processes were "
        "competing and timings are slower and noisier).",
        f"Device {args.device}, {args.dtype}; guidance 7.5, batch 1; best of {args.repeat} run(s) (fastest time, "
        f"largest memory); s / step = mean of {args.steps} step(s) after "
        f"one warm-up step; generate s = the whole call ({args.steps + 1} steps, encoders, VAE decode); load s = "
        "folder to ready for the flow; weights = the parameters the loaded modules hold (resident or not: memory-mapped "
        "pages count in RSS once read); peak RSS = the process's maximum resident memory (ru_maxrss). Each cell: "
        "minivd / diffusers (ratio minivd/diffusers), each measured in a fresh process.",
        "",
        table(rows, args.device.startswith("cuda")),
        "",
    ])
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
