"""Load the official Versatile Diffusion weights into minivd by key mapping, and check or convert checkpoint folders.

    python weights_loader.py check PATH                          # every missing, unexpected or mis-shaped tensor
    python weights_loader.py convert SRC DST [--dtype float16]   # pickled .bin/.pth -> .safetensors, same keys

Two folder layouts are read (`minivd.checkpoint` describes them and tells them apart):
    diffusers  Hugging Face `shi-labs/versatile-diffusion`: one subfolder per component, diffusers/transformers names
    original   the SHI-Labs release: vd-four-flow-v1-0.pth (the whole dual-context UNet), kl-f8.pth (LDM names),
               an openai/clip-vit-large-patch14 folder (one transformers CLIPModel file holds both CLIP towers)
and in both, optimus-vae.pth (the Optimus text VAE, the original code's names).

Each file's keys are renamed to minivd's module names by a short ordered list of regex rules (`rules_for`), applied in
order with re.sub (a replacement may be a function of the match, for computed block numbers); a rule whose
replacement is None drops the key. `export_rules` are the way back, for writing checkpoints in the diffusers layout.
A file tensor must have the shape of the parameter it fills, except that extra trailing dimensions of size 1 are
allowed and removed as it is read: the LDM VAE stores its attention projections as 1x1 convs (C, C, 1, 1) where
minivd has Linear weights (C, C). Files are read as raw tensors only: safetensors when present, otherwise a pickle
through `torch.load(weights_only=True)`, which refuses anything but tensors. A safetensors header is checked whole
(names, dtypes, shapes, byte ranges) before any tensor is read.

This file imports nothing from the minivd package at module level: the package imports it for the rules and the
reader. Only the `check` command, which needs minivd's modules to know their shapes, imports the package when run.
"""

import argparse
import json
import os
import pickle
import re
import sys

import torch

# diffusers layout: component subfolder -> minivd attribute. The two UNet files fill one module's layer sets.
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
CLIP_MODEL_RULES = {  # a transformers CLIPModel file (openai/clip-vit-large-patch14) holds both towers: keep one
    "text_encoder": [(r"^(vision_model|visual_projection)\.|^logit_scale$", None), *CLIP_RULES],
    "image_encoder": [(r"^(text_model|text_projection)\.|^logit_scale$", None), *CLIP_RULES],
}
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


def unet_block_paths(cfg):
    """The diffusers module path of every minivd UNet block: ({data block number: path}, {context block: path}).
    The block numbers come from minivd.unet.unet_layout (imported here, when a UNet's rules are asked for)."""
    from minivd.unet import unet_layout

    data, context = {}, {}
    for i, slot in enumerate(unet_layout(cfg)):
        if slot.kind == "res":
            path = f"mid_block.resnets.{slot.index}" if slot.stage == "mid" else f"{slot.stage}_blocks.{slot.level}.resnets.{slot.index}"
            if slot.context is not None:
                context[slot.context] = path.replace("resnets", "attentions")
        elif slot.kind in ("down", "up"):
            path = f"{slot.kind}_blocks.{slot.level}.{slot.kind}samplers.0"
        else:  # conv_in and the out block are named by their own rules
            continue
        data[i] = path
    return data, context


def unet_rules(cfg, data, context):
    """diffusers UNet keys -> minivd DualContextUNet keys. image_unet fills data "image" + context "image";
    text_unet fills data "text" + context "text"."""
    data_blocks, context_blocks = unet_block_paths(cfg)
    data_index = {path: i for i, path in data_blocks.items()}
    context_index = {path: i for i, path in context_blocks.items()}
    out = max(data_blocks) + 1
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


# Original layout: the module names of the SHI-Labs code (lib/model_zoo/openaimodel.py UNetModel2D_Next and
# UNetModel0D_Next, attention.py SpatialTransformer, autokl_modules.py Encoder/Decoder), saved from its VD model, whose
# ModuleDict `diffuser` holds "image" (global + data + context layers) and "text" (data + context layers).
ORIGINAL_UNET_RULES = [  # vd-four-flow-v1-0.pth -> minivd DualContextUNet (both data and both context layer sets)
    (r"^(?!diffuser\.)", None),  # other parts a file may carry (vae.*, ctx.*): minivd reads them from their own files
    (r"^diffuser\.text\.time_embed\.", None),  # the global layers are the image UNet's (global_layer_ptr: image)
    (r"^diffuser\.image\.time_embed\.0\.", "time_embed.linear_1."),  # Sequential(Linear, SiLU, Linear)
    (r"^diffuser\.image\.time_embed\.2\.", "time_embed.linear_2."),
    (r"^diffuser\.(image|text)\.data_blocks\.(\d+)\.0\.", r"data.\1.blocks.\2."),  # each block is wrapped: .N.0.
    (r"^diffuser\.(image|text)\.context_blocks\.(\d+)\.0\.", r"context.\1.blocks.\2."),
    (r"^(data\.\w+\.blocks\.\d+\.)0\.", r"\1norm."),  # the out block: Sequential(GroupNorm, SiLU, conv | Linear)
    (r"^(data\.\w+\.blocks\.\d+\.)2\.", r"\1proj."),
    (r"\.in_layers\.0\.", ".norm1."),  # ResBlock: in_layers (GN, SiLU, conv), emb_layers (SiLU, Linear),
    (r"\.in_layers\.2\.", ".conv1."),  # out_layers (GN, SiLU, Dropout, conv), skip_connection
    (r"\.emb_layers\.1\.", ".time_emb_proj."),
    (r"\.out_layers\.0\.", ".norm2."),
    (r"\.out_layers\.3\.", ".conv2."),
    (r"\.skip_connection\.", ".conv_shortcut."),
    (r"\.op\.", ".conv."),  # Downsample
    *CONTEXT_BLOCK_RULES,  # SpatialTransformer has the inner names of diffusers' Transformer2DModel
]


def ldm_vae_rules(levels):
    """kl-f8.pth (LDM AutoencoderKL names) -> minivd.vae.AutoencoderKL. The LDM decoder numbers its levels by
    resolution (up.0 = full size, run last), minivd in execution order (up_blocks.0 = lowest resolution)."""
    up = lambda m: f".up_blocks.{levels - 1 - int(m[1])}."
    return [
        (r"^loss\.", None),  # LDM training checkpoints also hold the LPIPS/discriminator loss
        (r"\.down\.(\d+)\.block\.", r".down_blocks.\1.resnets."),
        (r"\.down\.(\d+)\.downsample\.", r".down_blocks.\1.downsamplers.0."),
        (r"\.up\.(\d+)\.block\.", lambda m: up(m) + "resnets."),
        (r"\.up\.(\d+)\.upsample\.", lambda m: up(m) + "upsamplers.0."),
        (r"\.mid\.block_([12])\.", lambda m: f".mid_block.resnets.{int(m[1]) - 1}."),
        (r"\.mid\.attn_1\.norm\.", ".mid_block.attentions.0.group_norm."),
        (r"\.mid\.attn_1\.(q|k|v)\.", r".mid_block.attentions.0.to_\1."),  # 1x1 convs (C, C, 1, 1), read as (C, C)
        (r"\.mid\.attn_1\.proj_out\.", ".mid_block.attentions.0.to_out."),
        (r"\.nin_shortcut\.", ".conv_shortcut."),
        (r"\.norm_out\.", ".conv_norm_out."),
    ]


def rules_for(component, unet_config=None, layout="diffusers", vae_config=None):
    """The rename rules of one component's file in a folder layout. The diffusers UNet rules need the UNet config
    (block numbers), the original VAE rules the VAE config (number of levels; VD's 4 when None)."""
    if layout == "diffusers" and component in ("image_unet", "text_unet"):
        kind = component.split("_")[0]
        return unet_rules(unet_config, kind, kind)
    if layout == "original" and component == "vae":
        return ldm_vae_rules(4 if vae_config is None else len(vae_config.block_out_channels))
    rules = {
        "diffusers": {"vae": VAE_RULES, "text_encoder": CLIP_RULES, "image_encoder": CLIP_RULES, "optimus": OPTIMUS_RULES},
        "original": {"unet": ORIGINAL_UNET_RULES, **CLIP_MODEL_RULES, "optimus": OPTIMUS_RULES},
    }
    if component not in rules.get(layout, {}):
        raise ValueError(f"no weights component {component!r} in the {layout!r} layout")
    return rules[layout][component]


def export_rules(component, unet_config=None):
    """minivd keys -> the diffusers-layout names (and the original names for "optimus"): the way back, used to write
    a checkpoint that `rules_for` and diffusers/transformers read. UNet components: "image_unet" takes the time
    embedding, data "image" and context "image"; "text_unet" the same with "text". Keys of other layer sets are
    dropped (None)."""
    if component in ("image_unet", "text_unet"):
        kind = component.split("_")[0]
        data_blocks, context_blocks = unet_block_paths(unet_config)
        out = max(data_blocks) + 1
        return [
            (rf"^(data|context)\.(?!{kind}\.)\w+\.", None),
            (r"^time_embed\.", "time_embedding."),
            (rf"^data\.{kind}\.blocks\.0\.", "conv_in."),
            (rf"^data\.{kind}\.blocks\.{out}\.norm\.", "conv_norm_out."),
            (rf"^data\.{kind}\.blocks\.{out}\.proj\.", "conv_out."),
            (rf"^data\.{kind}\.blocks\.(\d+)\.", lambda m: data_blocks[int(m[1])] + "."),
            (rf"^context\.{kind}\.blocks\.(\d+)\.", lambda m: context_blocks[int(m[1])] + "."),
            (r"\.block\.", ".transformer_blocks.0."),
            (r"\.to_out\.", ".to_out.0."),
            (r"\.ff\.proj_in\.", ".ff.net.0.proj."),
            (r"\.ff\.proj_out\.", ".ff.net.2."),
        ]
    if component == "vae":
        return [(r"\.to_out\.", ".to_out.0.")]
    if component in ("text_encoder", "image_encoder"):
        tower = "text_model" if component == "text_encoder" else "vision_model"
        return [
            (r"^(token_embedding|patch_embedding|position_embedding|class_embedding)\b", rf"{tower}.embeddings.\1"),
            (r"^layers\.", f"{tower}.encoder.layers."),
            (r"^(final_layer_norm|post_layernorm)\.", rf"{tower}.\1."),
            (r"^pre_layernorm\.", f"{tower}.pre_layrnorm."),
            (r"\.self_attn\.to_(q|k|v|out)\.", r".self_attn.\1_proj."),
        ]
    if component == "optimus":
        return [
            (r"^decoder\.", "decoder.transformer."),
            (r"^encoder\.layers\.", "encoder.encoder.layer."),
            (r"^encoder\.embeddings\.norm\.", "encoder.embeddings.LayerNorm."),
            (r"^encoder\.pooler\.", "encoder.pooler.dense."),
            (r"\.attn\.out\.", ".attention.output.dense."),
            (r"^(encoder\..*)\.attn\.", r"\1.attention.self."),
            (r"\.attn_norm\.", ".attention.output.LayerNorm."),
            (r"\.mlp_in\.", ".intermediate.dense."),
            (r"\.mlp_out\.", ".output.dense."),
            (r"\.mlp_norm\.", ".output.LayerNorm."),
        ]
    raise ValueError(f"no export rules for {component!r}")


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


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


class TensorFile:
    """Lazy, read-only access to the tensors of one .safetensors or pickled .bin/.pth file.

    `keys`, `shape` and `dtype` read no tensor data. `get` returns one tensor: on the CPU in the stored dtype it is
    a view of the memory-mapped file (no copy; pages are read on first use), otherwise a copy on `device` in `dtype`.
    """

    def __init__(self, path):
        self.path = path
        if path.endswith(".safetensors"):
            self._entries, self._data_start = read_safetensors_header(path)  # checked whole, see there
            from safetensors import safe_open

            try:
                self._file = safe_open(path, framework="pt", device="cpu")
            except Exception as e:
                raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from e
            self._info = {k: (tuple(shape), dtype) for k, (dtype, shape, _) in self._entries.items()}
        else:
            self._file, self.mapped = load_pickle(path, mapped=True)  # mapped: views of torch.load's map of the file
            self._info = {k: (tuple(v.shape), v.dtype) for k, v in self._file.items()}

    def keys(self):
        return list(self._info)

    def shape(self, key):
        return self._info[key][0]

    def dtype(self, key):
        return self._info[key][1]

    def stored(self, key):
        """The tensor as stored: a view of the mapped file (safetensors) or of the unpickled storage."""
        if key not in self._info:
            raise KeyError(f"{self.path} has no tensor {key!r}")
        try:
            return self._file[key] if isinstance(self._file, dict) else self._file.get_tensor(key)
        except Exception as e:
            raise ValueError(f"{self.path}: tensor {key!r} could not be read (truncated or corrupt file?): {e}") from e

    def get(self, key, device="cpu", dtype=None):
        t = self.stored(key).to(device)  # in the stored dtype first: a GPU casts faster, and no CPU cast copy is made
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def _no_duplicates(pairs):
    """json object_pairs_hook: a key twice is an error (the format forbids it; parsers disagree on which one wins)."""
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"the header names tensor {key!r} twice")
        seen[key] = value
    return seen


def read_safetensors_header(path):
    """The layout of a .safetensors file: 8 bytes (little-endian header length n), n bytes of JSON, then the raw
    tensor bytes. Every entry is checked before any tensor is read: a known dtype, a shape of non-negative integers,
    a byte range of exactly shape x itemsize inside the data, no two ranges overlapping, no name twice.
    Returns ({key: (torch dtype, shape, (begin, end) byte offsets in the data)}, where the data starts)."""
    def fail(why):
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {why}")

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if size < 8:
            fail(f"it has {size} bytes, not even the 8-byte header length")
        n = int.from_bytes(f.read(8), "little")
        if n > size - 8:
            fail(f"the header claims {n} bytes, the file has {size - 8} after the length")
        try:
            header = json.loads(f.read(n), object_pairs_hook=_no_duplicates)
        except (ValueError, UnicodeDecodeError) as e:
            fail(f"the header is not valid JSON ({e})")
    if not isinstance(header, dict):
        fail("the header is not a JSON object")
    header.pop("__metadata__", None)
    unknown = sorted({str(v.get("dtype")) for v in header.values() if isinstance(v, dict)} - set(SAFETENSORS_DTYPES))
    if unknown:
        fail(f"tensor dtype(s) {', '.join(unknown)} are not read by minivd (it reads {', '.join(SAFETENSORS_DTYPES)})")
    entries, data_size, ranges = {}, size - 8 - n, []
    for key, v in header.items():
        shape, offsets = v.get("shape") if isinstance(v, dict) else None, v.get("data_offsets") if isinstance(v, dict) else None
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            fail(f"tensor {key!r} has no valid shape: {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            fail(f"tensor {key!r} has no valid data_offsets: {offsets!r}")
        dtype = SAFETENSORS_DTYPES[v["dtype"]]
        count = 1
        for d in shape:
            count *= d
        begin, end = offsets
        if not 0 <= begin <= end <= data_size:
            fail(f"tensor {key!r} lies at bytes {begin}..{end}, outside the {data_size} data bytes")
        if end - begin != count * dtype.itemsize:
            fail(f"tensor {key!r} {v['dtype']} {shape} needs {count * dtype.itemsize} bytes, its range has {end - begin}")
        entries[key] = (dtype, shape, (begin, end))
        ranges.append((begin, end, key))
    ranges.sort()
    for (_, end, key), (begin, _, other) in zip(ranges, ranges[1:]):
        if begin < end:
            fail(f"tensors {key!r} and {other!r} overlap")
    return entries, 8 + n


def load_pickle(path, mapped=False):
    """torch.load restricted to tensors (weights_only=True), memory-mapped where the file format allows.
    Returns the state dict, or with `mapped` (state dict, whether its tensors are views of a map of the file)."""
    try:
        try:
            sd, is_mapped = torch.load(path, map_location="cpu", weights_only=True, mmap=True), True
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            sd, is_mapped = torch.load(path, map_location="cpu", weights_only=True), False  # legacy (pre-zip) format
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"refusing to load {path}: the pickle holds objects other than tensors (it may try to run code). "
            f"Only weights_only pickles are read. Details: {str(e).splitlines()[0]}"
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {e}") from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise ValueError(f"{path} does not hold a flat dict of named tensors")
    return (sd, is_mapped) if mapped else sd


# ---------------------------------------------------------------------------------------------------------------------
# Mapping files onto modules


def plan(module, files_and_rules, prefixes=None):
    """Match file keys to module parameters without reading data.

    Returns (sources, problems): sources maps each minivd key to (TensorFile, official key); problems lists
    missing, unexpected, mis-shaped and wrongly typed tensors as readable lines. A file tensor fits a parameter if
    the shapes are equal or differ only by trailing dimensions of size 1 in the file (1x1 convs read as Linear
    weights), and if both are floating point (or both not). When several files fill one key (both UNet files carry the
time embedding, the global layers), the first file's tensor is read. `prefixes` restricts both sides to the minivd keys
    starting with one of them (the layer sets a flow needs).
    """
    wanted = lambda k: prefixes is None or k.startswith(tuple(prefixes))
    expected = {k: v for k, v in module.state_dict(keep_vars=True).items() if wanted(k)}
    fits = lambda shape, want: shape[: len(want)] == want and all(d == 1 for d in shape[len(want):])
    sources, problems = {}, []
    for tf, rules in files_and_rules:
        for key in tf.keys():
            name = rename(key, rules)
            if name is None or not wanted(name):
                continue
            if name not in expected:
                problems.append(f"unexpected tensor {key!r} in {tf.path} (maps to {name!r}, which minivd does not have)")
                continue
            want = expected[name]
            if name in sources:  # a second file's copy (the text UNet's time embedding) is not read; one file's, a fault
                if sources[name][0] is tf:
                    problems.append(f"two tensors fill minivd {name!r}: {sources[name][1]!r} and {key!r} in {tf.path}")
            elif not fits(tuple(tf.shape(key)), tuple(want.shape)):
                problems.append(f"mis-shaped tensor {key!r} in {tf.path}: {list(tf.shape(key))}, minivd expects {list(want.shape)}")
            elif hasattr(tf, "dtype") and tf.dtype(key).is_floating_point != want.dtype.is_floating_point:
                problems.append(f"tensor {key!r} in {tf.path} is {str(tf.dtype(key)).removeprefix('torch.')}, minivd's "
                                f"{name!r} is {str(want.dtype).removeprefix('torch.')}")
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
    """Fill `module` (which may live on the meta device) from the files; raise naming every problem first."""
    sources, problems = plan(module, files_and_rules, prefixes)
    if problems:
        raise ValueError("the checkpoint does not match minivd's modules:\n  " + summarize(problems))
    shapes = {k: v.shape for k, v in module.state_dict(keep_vars=True).items()}  # (C, C, 1, 1) files -> (C, C)
    state = {name: tf.get(key, device, dtype).reshape(shapes[name]) for name, (tf, key) in sources.items()}
    module.load_state_dict(state, strict=False, assign=True)
    return module


# ---------------------------------------------------------------------------------------------------------------------
# Command line


def check(path):
    """Report every problem of a checkpoint folder; returns the list of problem lines (empty: it loads)."""
    from minivd.checkpoint import Checkpoint  # the only import of the package: minivd's shapes

    try:
        checkpoint = Checkpoint(path)
    except (ValueError, FileNotFoundError, TypeError) as e:
        return [str(e)]
    return checkpoint.problems()


PICKLES = (".bin", ".pth")


def safetensors_name(name):
    """The name a pickled weights file gets as safetensors: the one the loaders look for first."""
    if name == "pytorch_model.bin":
        return "model.safetensors"  # transformers' two names for one model
    return name.rsplit(".", 1)[0] + ".safetensors"


def convert(src, dst, dtype=None):
    """Copy a checkpoint folder (either layout), rewriting every pickled .bin/.pth as .safetensors with the same keys
    (or copying the safetensors twin a folder already has, as openai/clip-vit-large-patch14 does)."""
    import shutil

    from safetensors.torch import save_file

    for root, _, files in os.walk(src):
        out_dir = os.path.join(dst, os.path.relpath(root, src))
        os.makedirs(out_dir, exist_ok=True)
        for name in files:
            source = os.path.join(root, name)
            if name.endswith(PICKLES) and safetensors_name(name) in files:
                continue  # the folder has the same weights as safetensors already
            if name.endswith(PICKLES):
                sd = load_pickle(source)
                sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous().clone() for k, v in sd.items()}
                target = os.path.join(out_dir, safetensors_name(name))
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
    p = sub.add_parser("convert", help="rewrite pickled .bin/.pth files as .safetensors (same key names)")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None)
    args = parser.parse_args(argv)
    try:
        if args.command == "check":
            problems = check(args.path)
            for line in problems:
                print(line)
            print(f"{args.path}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
            return 1 if problems else 0
        convert(args.src, args.dst, getattr(torch, args.dtype) if args.dtype else None)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    # minivd imports this file as `weights_loader`: let it find this very module instead of running the file again
    sys.modules.setdefault("weights_loader", sys.modules[__name__])
    sys.exit(main())
