"""Load the official Versatile Diffusion weights into minivd by key mapping, and check or convert checkpoint folders.

    python weights_loader.py check PATH                          # every missing, unexpected or mis-shaped tensor
    python weights_loader.py convert SRC DST [--dtype float16]   # pickled .bin -> .safetensors, same official keys

The official folder (Hugging Face `shi-labs/versatile-diffusion`, diffusers layout) holds one subfolder per component.
Each file's keys are renamed to minivd's module names by a short ordered list of regex rules (`rules_for`), applied in
order with re.sub; a rule whose replacement is None drops the key. Files are read as raw tensors only: safetensors
when present, otherwise a pickle through `torch.load(weights_only=True)`, which refuses anything but tensors.
"""

import argparse
import json
import os
import pickle
import re
import sys

import torch

# component -> (subfolder, minivd attribute). The UNet's two files fill one module with different layer sets.
COMPONENTS = {
    "image_unet": "unet",
    "text_unet": "unet",
    "vae": "vae",
    "text_encoder": "text_encoder",
    "image_encoder": "image_encoder",
}
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin", "pytorch_model.bin")

CONTEXT_BLOCK_RULES = [  # inside a context block: diffusers Transformer2DModel -> minivd ContextBlock
    (r"\.transformer_blocks\.0\.", ".block."),
    (r"\.to_out\.0\.", ".to_out."),
    (r"\.ff\.net\.0\.proj\.", ".ff.proj_in."),
    (r"\.ff\.net\.2\.", ".ff.proj_out."),
]
VAE_RULES = [
    (r"\.attentions\.0\.query\.", ".attentions.0.to_q."),  # old diffusers attention names (the official VD file)
    (r"\.attentions\.0\.key\.", ".attentions.0.to_k."),
    (r"\.attentions\.0\.value\.", ".attentions.0.to_v."),
    (r"\.attentions\.0\.proj_attn\.", ".attentions.0.to_out."),
    (r"\.to_out\.0\.", ".to_out."),
]
CLIP_RULES = [  # transformers CLIP*ModelWithProjection -> minivd.clip (one flat module per tower)
    (r"\.position_ids$", None),  # a buffer of 0..N-1 some files carry
    (r"^(text|vision)_model\.(embeddings\.|encoder\.)?", ""),
    (r"^pre_layrnorm\.", "pre_layernorm."),  # transformers' spelling
    (r"\.self_attn\.(q|k|v|out)_proj\.", r".self_attn.to_\1."),
]
OPTIMUS_RULES = [  # optimus-vae.pth (the original code's module names) -> minivd.optimus.Optimus
    (r"^decoder\.transformer\.h\.\d+\.attn\.bias$", None),  # a causal-mask buffer saved with the weights
    (r"^decoder\.lm_head\.weight$", None),  # tied to decoder.transformer.wte.weight
    (r"^decoder\.transformer\.", "decoder."),
    (r"^encoder\.encoder\.layer\.", "encoder.layers."),
    (r"^encoder\.embeddings\.LayerNorm\.", "encoder.embeddings.norm."),
    (r"^encoder\.pooler\.dense\.", "encoder.pooler."),
    (r"\.attention\.self\.", ".attn."),
    (r"\.attention\.output\.dense\.", ".attn.out."),
    (r"\.attention\.output\.LayerNorm\.", ".attn_norm."),
    (r"\.intermediate\.dense\.", ".mlp_in."),
    (r"\.output\.dense\.", ".mlp_out."),
    (r"\.output\.LayerNorm\.", ".mlp_norm."),
]


def unet_rules(cfg, data, context):
    """diffusers UNet keys -> minivd DualContextUNet keys. image_unet fills data "image" + context "image";
    text_unet fills data "text" + context "text". The block numbers come from minivd.unet.unet_layout."""
    from minivd.unet import unet_layout

    layout = unet_layout(cfg)
    data_index, context_index = {}, {}  # diffusers module path -> minivd block number
    for i, slot in enumerate(layout):
        if slot.kind == "res":
            path = f"mid_block.resnets.{slot.index}" if slot.stage == "mid" else f"{slot.stage}_blocks.{slot.level}.resnets.{slot.index}"
            if slot.context is not None:
                context_index[path.replace("resnets", "attentions")] = slot.context
        elif slot.kind in ("down", "up"):
            path = f"{slot.kind}_blocks.{slot.level}.{slot.kind}samplers.0"
        else:
            continue
        data_index[path] = i
    out = len(layout) - 1
    return [
        (r"^time_embedding\.", "time_embed."),
        (r"^conv_in\.", f"data.{data}.blocks.0."),
        (r"^conv_norm_out\.", f"data.{data}.blocks.{out}.norm."),
        (r"^conv_out\.", f"data.{data}.blocks.{out}.proj."),
        (r"^((?:down|up)_blocks\.\d+\.(?:resnets\.\d+|downsamplers\.0|upsamplers\.0)|mid_block\.resnets\.\d+)\.",
         lambda m: f"data.{data}.blocks.{data_index.get(m[1], m[1])}."),
        (r"^((?:down|up)_blocks\.\d+|mid_block)\.attentions\.\d+\.", lambda m: f"context.{context}.blocks.{context_index.get(m[0][:-1], m[0][:-1])}."),
        *CONTEXT_BLOCK_RULES,
    ]


def rules_for(component, unet_config=None):
    if component == "image_unet":
        return unet_rules(unet_config, "image", "image")
    if component == "text_unet":
        return unet_rules(unet_config, "text", "text")
    return {"vae": VAE_RULES, "text_encoder": CLIP_RULES, "image_encoder": CLIP_RULES, "optimus": OPTIMUS_RULES}[component]


def rename(key, rules):
    """Apply the rules in order; None when a rule drops the key."""
    for pattern, replacement in rules:
        if re.search(pattern, key):
            if replacement is None:
                return None
            key = re.sub(pattern, replacement, key)
    return key


# ---------------------------------------------------------------------------------------------------------------------
# Reading raw tensors


def find_weights(folder):
    """The weights file of a component folder: safetensors first, else the pickled .bin."""
    for name in WEIGHT_NAMES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"no weights file in {folder} (expected one of {', '.join(WEIGHT_NAMES)})")


class TensorFile:
    """Lazy, read-only access to the tensors of one .safetensors or pickled .bin file."""

    def __init__(self, path):
        self.path = path
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            try:
                self._file = safe_open(path, framework="pt", device="cpu")
                self._keys = list(self._file.keys())
            except Exception as e:
                raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from e
            self._shapes = {k: tuple(self._file.get_slice(k).get_shape()) for k in self._keys}
        else:
            self._file = load_pickle(path)
            self._keys = list(self._file.keys())
            self._shapes = {k: tuple(v.shape) for k, v in self._file.items()}

    def keys(self):
        return self._keys

    def shape(self, key):
        return self._shapes[key]

    def get(self, key, device="cpu", dtype=None):
        try:
            t = self._file[key] if isinstance(self._file, dict) else self._file.get_tensor(key)
        except Exception as e:
            raise ValueError(f"{self.path}: tensor {key!r} could not be read (truncated or corrupt file?): {e}") from e
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t.to(device)


def load_pickle(path):
    """torch.load restricted to tensors (weights_only=True), memory-mapped where the file format allows."""
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            sd = torch.load(path, map_location="cpu", weights_only=True)  # legacy (pre-zip) format: no mmap
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"refusing to load {path}: the pickle holds objects other than tensors (it may try to run code). "
            f"Only weights_only pickles are read. Details: {str(e).splitlines()[0]}"
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {e}") from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} does not hold a flat dict of tensors")
    return sd


# ---------------------------------------------------------------------------------------------------------------------
# Mapping files onto modules


def plan(module, files_and_rules, prefixes=None):
    """Match file keys to module parameters without reading data.

    Returns (sources, problems): sources maps each minivd key to (TensorFile, official key); problems lists
    missing, unexpected and mis-shaped tensors as readable lines. `prefixes` restricts both sides to the minivd keys
    starting with one of them (the layer sets a flow needs).
    """
    wanted = lambda k: prefixes is None or k.startswith(tuple(prefixes))
    expected = {k: tuple(v.shape) for k, v in module.state_dict(keep_vars=True).items() if wanted(k)}
    sources, problems = {}, []
    for tf, rules in files_and_rules:
        for key in tf.keys():
            name = rename(key, rules)
            if name is None or not wanted(name):
                continue
            if name not in expected:
                problems.append(f"unexpected tensor {key!r} in {tf.path} (maps to {name!r}, which minivd does not have)")
                continue
            if tf.shape(key) != expected[name]:
                problems.append(f"mis-shaped tensor {key!r} in {tf.path}: {list(tf.shape(key))}, minivd expects {list(expected[name])}")
            sources.setdefault(name, (tf, key))
    for name in expected:
        if name not in sources:
            problems.append(f"missing tensor for minivd {name!r} (no key in {', '.join(tf.path for tf, _ in files_and_rules)} maps to it)")
    return sources, problems


def summarize(problems, limit=12):
    """The first `limit` problem lines, then a count of the rest."""
    shown = problems[:limit] + ([f"... and {len(problems) - limit} more (python weights_loader.py check PATH lists all)"]
                                if len(problems) > limit else [])
    return "\n  ".join(shown)


def load_into(module, files_and_rules, prefixes=None, device="cpu", dtype=None):
    """Fill `module` (which may live on the meta device) from the files; raise naming every problem."""
    sources, problems = plan(module, files_and_rules, prefixes)
    if problems:
        raise ValueError("the checkpoint does not match minivd's modules:\n  " + summarize(problems))
    state = {name: tf.get(key, device, dtype) for name, (tf, key) in sources.items()}
    module.load_state_dict(state, strict=False, assign=True)
    return module


# ---------------------------------------------------------------------------------------------------------------------
# Command line


def check(path, model=None):
    """Report every problem of a checkpoint folder; returns the list of problem lines."""
    from minivd.model import VersatileDiffusion

    problems = []
    if model is None:
        try:
            model = VersatileDiffusion.from_folder(path, device="meta")
        except (ValueError, FileNotFoundError) as e:
            return [str(e)]
    for component in model.components():
        try:
            _, found = plan(*model.plan_args(component))
            problems += [f"{component}: {p}" for p in found]
        except (ValueError, FileNotFoundError) as e:
            problems.append(f"{component}: {e}")
    return problems


def convert(src, dst, dtype=None):
    """Copy a checkpoint folder, rewriting every pickled .bin as .safetensors with the same official keys."""
    import shutil

    from safetensors.torch import save_file

    for root, _, files in os.walk(src):
        out_dir = os.path.join(dst, os.path.relpath(root, src))
        os.makedirs(out_dir, exist_ok=True)
        for name in files:
            source = os.path.join(root, name)
            if name.endswith(".bin"):
                sd = load_pickle(source)
                sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous().clone() for k, v in sd.items()}
                target = os.path.join(out_dir, name[: -len(".bin")] + ".safetensors")
                save_file(sd, target, metadata={"format": "pt"})
                print(f"{source} -> {target} ({len(sd)} tensors)")
            elif name.endswith(".safetensors") and dtype is not None:
                tf = TensorFile(source)
                save_file({k: tf.get(k, dtype=dtype).contiguous() for k in tf.keys()}, os.path.join(out_dir, name), metadata={"format": "pt"})
            else:
                shutil.copy2(source, os.path.join(out_dir, name))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="report missing, unexpected or mis-shaped tensors; exit 1 if any")
    p.add_argument("path")
    p = sub.add_parser("convert", help="rewrite pickled .bin files as .safetensors (same official key names)")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None)
    args = parser.parse_args(argv)
    if args.command == "check":
        problems = check(args.path)
        for line in problems:
            print(line)
        print(f"{args.path}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
        return 1 if problems else 0
    convert(args.src, args.dst, getattr(torch, args.dtype) if args.dtype else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
