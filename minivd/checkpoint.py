"""Reading Versatile Diffusion checkpoint folders: the layout, the configs, and each flow's weights.

    model = minivd.load("path/to/versatile-diffusion")   # configs and tokenizers now; weights when a flow needs them
    model = minivd.load()                                # $MINIVD_WEIGHTS if set, else the built-in model

Two folder layouts are accepted; `detect_layout` tells them apart (a folder with both is read as diffusers).

diffusers layout (Hugging Face `shi-labs/versatile-diffusion`):
    model_index.json, image_unet/, text_unet/, vae/, text_encoder/, image_encoder/, tokenizer/ (vocab.json,
    merges.txt), image_feature_extractor/ (preprocessor_config.json), scheduler/ (scheduler_config.json);
    each weights folder has config.json and diffusion_pytorch_model.(safetensors|bin) or model.safetensors /
    pytorch_model.bin.

original layout (the files the SHI-Labs code reads; the Hub repo's pretrained_pth/ folder and openai's CLIP):
    [pretrained_pth/]vd-four-flow-v1-0.pth   the whole dual-context UNet (or vd-four-flow-v1-0-fp16.pth)
    [pretrained_pth/]kl-f8.pth                the image VAE, LDM names
    clip-vit-large-patch14/                   the openai/clip-vit-large-patch14 transformers folder: config.json
                                              (a CLIPModel config), model.safetensors or pytorch_model.bin (both
                                              towers in one file), vocab.json, merges.txt, preprocessor_config.json
    config.json (optional)                    minivd sizes for non-standard checkpoints, {"unet": {UNetConfig
                                              fields}, "vae": {VAEConfig fields}}; VD's sizes otherwise
    The sampler is VD's DDIM (the `DDIMConfig` defaults). Each .pth may be replaced by a .safetensors of the same
    name and keys (`python weights_loader.py convert`); safetensors is read first, and fp32 before -fp16.

Both layouts: the text flows also need the Optimus text VAE, which the diffusers folder lacks: optimus-vae.pth
(the Hub repo's pretrained_pth/) in optimus/, pretrained_pth/ or the folder itself, and its vocabularies: optimus/
vocab.txt (bert-base-cased), vocab.json and merges.txt (GPT-2), or their original names bert-base-cased-vocab.txt,
gpt2-vocab.json, gpt2-merges.txt; with none of them there, minivd's copies in minivd/optimus_vocab/ are used.
An optional minivd.json says what the checkpoint is and what `generate` should default to
({"description": ..., "defaults": {"height", "width", "steps", "guidance_scale"}}).

Networks are built as shapes on the meta device (no memory, no random fills) and filled straight from the files by
`weights_loader`, which holds the key-mapping rules.
"""

import dataclasses
import json
import os
import warnings

import torch
from torch.overrides import TorchFunctionMode

import weights_loader

from . import checks
from .clip import CLIPTextConfig, CLIPVisionConfig, ImagePreprocessConfig, clip_tower_config
from .ddim import DDIMConfig
from .model import MODULES, Defaults, VDConfig, VersatileDiffusion, build_network, flow_parts
from .optimus import Optimus, OptimusConfig, bert_tokenizer, gpt2_tokenizer
from .speed import LeanTensorFile
from .tokenizer import CLIPTokenizer
from .unet import DualContextUNet, UNetConfig
from .vae import VAEConfig

UNET_FILES = {"diffusers": ("image_unet", "text_unet"), "original": ("unet",)}  # the UNet's weight components
ORIGINAL_FILES = {"unet": ("vd-four-flow-v1-0", "vd-four-flow-v1-0-fp16"), "vae": ("kl-f8",)}  # names, no extension
CLIP_FOLDER = "clip-vit-large-patch14"
WEIGHT_EXTENSIONS = (".safetensors", ".pth")
OPTIMUS_VOCABS = {"vocab.txt": "bert-base-cased-vocab.txt", "vocab.json": "gpt2-vocab.json", "merges.txt": "gpt2-merges.txt"}
BUILT_IN_VOCABS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "optimus_vocab")  # bert-base-cased, GPT-2
MAX_CONFIG_BYTES = 2**24  # 16 MiB: VD's largest config file (a vocabulary) has 1.6 MB


class ShapesOnly(TorchFunctionMode):
    """Inside this mode (with `torch.device("meta")`), building a module skips the random fills of its parameters:
    on the meta device there is nothing to fill, and meta-device `normal_` would import torch's compiler stack (about
    a second). It skips every in-place method (`normal_`, `uniform_`, ...) on a meta tensor. Building more than
    `limit` tensors is a ValueError: a config far larger than its weights file is refused before it is built whole.
    Torch function modes belong to the thread that enters them: nothing outside this block or thread changes."""

    def __init__(self, limit=None, what=""):
        super().__init__()
        self.limit, self.what, self.count = limit, what, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs, name = kwargs or {}, getattr(func, "__name__", "")
        target = args[0] if args else kwargs.get("tensor")
        if name.endswith("_") and not name.startswith("_") and isinstance(target, torch.Tensor) and target.is_meta:
            return target
        out = func(*args, **kwargs)
        self.count += isinstance(out, torch.Tensor)  # a new tensor (parameters and buffers are made by empty, zeros)
        if self.limit is not None and self.count > self.limit:
            raise ValueError(f"{self.what}: the config describes more than {self.limit} tensors, far more than this "
                             "weights file holds: stopped building it (is a size in the config wrong?)")
        return out


def find_file(folder, names, subfolders=("", "pretrained_pth")):
    """The first of folder/subfolder/name.(safetensors|pth) that exists, trying `names` in order; None if none."""
    paths = (os.path.join(folder, sub, name + ext) for name in names for ext in WEIGHT_EXTENSIONS for sub in subfolders)
    return next((path for path in paths if os.path.isfile(path)), None)


def find_optimus(folder):
    """(weights file or None, {vocab name: path or None}) of the Optimus text VAE in a checkpoint folder; with none of
    the three vocabularies in optimus/, minivd's copies of the released ones (bert-base-cased, GPT-2)."""
    weights = find_file(folder, ("optimus-vae",), ("optimus", "pretrained_pth", ""))
    vocabs = {}
    for name, original in OPTIMUS_VOCABS.items():
        candidates = [os.path.join(folder, "optimus", n) for n in (name, original)]
        vocabs[name] = next((c for c in candidates if os.path.isfile(c)), None)
    if all(p is None for p in vocabs.values()):
        vocabs = {name: os.path.join(BUILT_IN_VOCABS, original) for name, original in OPTIMUS_VOCABS.items()}
    return weights, vocabs


def detect_layout(folder):
    """"diffusers" (image_unet/ or text_unet/ present) or "original" (a vd-four-flow-v1-0 file present)."""
    if any(os.path.isdir(os.path.join(folder, sub)) for sub in UNET_FILES["diffusers"]):
        return "diffusers"
    if find_file(folder, ORIGINAL_FILES["unet"]) is not None:
        return "original"
    raise ValueError(
        f"{folder} is not a Versatile Diffusion checkpoint folder. minivd reads two layouts:\n"
        "  diffusers layout (Hugging Face shi-labs/versatile-diffusion): image_unet/, text_unet/, vae/, text_encoder/, "
        "image_encoder/, tokenizer/, image_feature_extractor/, scheduler/\n"
        "  original layout (SHI-Labs code): [pretrained_pth/]vd-four-flow-v1-0.pth (or -fp16, or .safetensors), "
        f"[pretrained_pth/]kl-f8.pth, {CLIP_FOLDER}/ (openai's transformers folder)\n"
        "  (see minivd/checkpoint.py for both)")


def read_json(path, what):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"missing {what}: {path}")
    if os.path.getsize(path) > MAX_CONFIG_BYTES:
        raise ValueError(f"{path} has {os.path.getsize(path)} bytes: too large for a {what}")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e


def parse_config(path, what, parse, *dicts):
    """parse(*dicts) for the config file(s) at `path`; any error names the file."""
    for d in dicts:
        if d is not None and not isinstance(d, dict):
            raise ValueError(f"{path}: the {what} must be a JSON object, got {type(d).__name__}")
    try:
        return parse(*dicts)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        detail = f"missing key {e}" if isinstance(e, KeyError) else str(e)
        raise ValueError(f"{path}: bad {what}: {detail}") from None


def config_from_fields(cls, values, where):
    """A config dataclass from a dict of some of its fields (the rest keep VD's defaults); JSON lists become
    tuples where the field is a tuple. Unknown fields are an error; the dataclass checks the values."""
    if not isinstance(values, dict):
        raise ValueError(f"{where} must be a JSON object of {cls.__name__} fields, got {type(values).__name__}")
    known = set(cls.__dataclass_fields__)
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{where}: unknown {cls.__name__} fields {unknown}; known: {sorted(known)}")
    defaults = cls()
    return cls(**{k: tuple(v) if isinstance(getattr(defaults, k), tuple) and isinstance(v, list) else v
                  for k, v in values.items()})


def describe(folder):
    """description and Defaults from the folder's optional minivd.json."""
    path = os.path.join(folder, "minivd.json")
    info = read_json(path, "minivd.json") if os.path.isfile(path) else {}
    if not isinstance(info, dict) or set(info) - {"description", "defaults"}:
        raise ValueError(f"{path} must be a JSON object with the keys 'description' and/or 'defaults'")
    defaults = parse_config(path, "'defaults'", lambda i: config_from_fields(Defaults, i.get("defaults", {}), "'defaults'"),
                            info)
    description = info.get("description", "Versatile Diffusion")
    if not isinstance(description, str):
        raise ValueError(f"{path}: 'description' must be a string, got {description!r}")
    return description, defaults


class Checkpoint:
    """A checkpoint folder: its layout, configs and tokenizers (read at once, small), and its weights files (read per
    flow, by `read_into`). `problems()` checks every weights file against minivd's modules without reading data."""

    def __init__(self, folder):
        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"no such checkpoint folder: {folder}")
        self.folder, self.layout = folder, detect_layout(folder)
        self.files = {}  # config name -> the file it was read from, for messages
        self.config, self.tokenizer = self.diffusers_configs() if self.layout == "diffusers" else self.original_configs()
        self.config.description, self.config.defaults = describe(folder)
        self.config.check(self.tokenizer, dict(self.files, defaults=os.path.join(folder, "minivd.json")))

    def diffusers_configs(self):
        """Configs and tokenizer of a diffusers-layout folder, from its config files."""
        sub = lambda *p: os.path.join(self.folder, *p)
        read = lambda path, what, parse: parse_config(path, what, parse, read_json(path, what))
        unets = {name: read_json(sub(name, "config.json"), f"{name} config") if os.path.isdir(sub(name)) else None
                 for name in UNET_FILES["diffusers"]}
        if unets["text_unet"] is not None:  # its own errors name its own file
            parse_config(sub("text_unet", "config.json"), "UNet config", lambda t: UNetConfig.from_hf_config(None, t),
                         unets["text_unet"])
        unet_path = sub("image_unet" if unets["image_unet"] is not None else "text_unet", "config.json")
        scheduler = sub("scheduler", "scheduler_config.json")
        self.files = dict(unet=unet_path, vae=sub("vae", "config.json"), text=sub("text_encoder", "config.json"),
                          vision=sub("image_encoder", "config.json"), tokenizer=sub("tokenizer"),
                          image_preprocess=sub("image_feature_extractor", "preprocessor_config.json"))
        config = VDConfig(
            unet=parse_config(unet_path, "UNet config", UNetConfig.from_hf_config, unets["image_unet"], unets["text_unet"]),
            vae=read(self.files["vae"], "VAE config", VAEConfig.from_hf_config),
            text=read(self.files["text"], "CLIP text config", CLIPTextConfig.from_hf_config),
            vision=read(self.files["vision"], "CLIP vision config", CLIPVisionConfig.from_hf_config),
            image_preprocess=read(self.files["image_preprocess"], "image preprocessor config",
                                  ImagePreprocessConfig.from_hf_config),
            scheduler=read(scheduler, "scheduler config", lambda c: DDIMConfig.from_hf_config(c, scheduler))
            if os.path.isfile(scheduler) else DDIMConfig(),
        )
        return config, CLIPTokenizer.from_folder(sub("tokenizer"))

    def original_configs(self):
        """Configs and tokenizer of an original-layout folder: UNet and VAE sizes from the optional minivd config.json
        (VD's otherwise), CLIP's from the openai folder, VD's DDIM."""
        path = os.path.join(self.folder, "config.json")
        sizes = read_json(path, "minivd config") if os.path.isfile(path) else {}
        if not isinstance(sizes, dict) or set(sizes) - {"unet", "vae"}:
            raise ValueError(f"{path} must be a JSON object with the keys 'unet' and/or 'vae' (minivd sizes)")
        clip = os.path.join(self.folder, CLIP_FOLDER)
        if not os.path.isdir(clip):
            raise FileNotFoundError(f"the original layout needs the CLIP folder {clip}/ (a download of "
                                    f"openai/{CLIP_FOLDER}: config.json, model.safetensors or pytorch_model.bin, "
                                    "vocab.json, merges.txt, preprocessor_config.json)")
        clip_path = os.path.join(clip, "config.json")
        clip_config = read_json(clip_path, "CLIP config")
        preprocess_path = os.path.join(clip, "preprocessor_config.json")
        self.files = dict(unet=path, vae=path, text=clip_path, vision=clip_path, tokenizer=clip,
                          image_preprocess=preprocess_path)
        tower = lambda name, cls: parse_config(clip_path, f"CLIP {name} config",
                                               lambda c: cls.from_hf_config(clip_tower_config(c, name)), clip_config)
        part = lambda key, cls: parse_config(path, f"'{key}'", lambda s: config_from_fields(cls, s.get(key, {}), f"'{key}'"),
                                             sizes)
        config = VDConfig(
            unet=part("unet", UNetConfig),
            vae=part("vae", VAEConfig),
            text=tower("text", CLIPTextConfig),
            vision=tower("vision", CLIPVisionConfig),
            image_preprocess=parse_config(preprocess_path, "CLIP image preprocessor config",
                                          ImagePreprocessConfig.from_hf_config,
                                          read_json(preprocess_path, "CLIP image preprocessor config")),
        )
        return config, CLIPTokenizer.from_folder(clip)

    def model(self):
        """A VersatileDiffusion that reads its networks from this folder when a flow needs them."""
        return VersatileDiffusion(self.config, self.tokenizer, checkpoint=self)

    # ------------------------------------------------------------------------------------------------------------
    # Weights files

    def components(self):
        """The weight components of this folder: the UNet file(s), the VAE, the CLIP towers, and Optimus if present.
        In the diffusers layout, the component folders present."""
        if self.layout == "diffusers":
            found = [c for c in weights_loader.COMPONENTS if os.path.isdir(os.path.join(self.folder, c))]
        else:
            found = ["unet", "vae", "text_encoder", "image_encoder"]
        return found + (["optimus"] if find_optimus(self.folder)[0] else [])

    def weights_path(self, component):
        """The file holding one component's weights; FileNotFoundError naming what is missing."""
        if component == "optimus":
            path = find_optimus(self.folder)[0]
            if path is None:
                raise FileNotFoundError(
                    f"the text flows need the Optimus text VAE, and {self.folder} has none: put optimus-vae.pth "
                    f"(shi-labs/versatile-diffusion, pretrained_pth/) at {os.path.join(self.folder, 'optimus')}/")
            return path
        if self.layout == "diffusers":
            folder = os.path.join(self.folder, component)
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"the checkpoint has no {component}/ folder, which this flow needs")
            return weights_loader.find_weights(folder)
        if component in ("text_encoder", "image_encoder"):
            return weights_loader.find_weights(os.path.join(self.folder, CLIP_FOLDER))
        if component not in ORIGINAL_FILES:
            raise ValueError(f"no weights component {component!r} in the original layout")
        path = find_file(self.folder, ORIGINAL_FILES[component])
        if path is None:
            names = " or ".join(n + ".pth" for n in ORIGINAL_FILES[component])
            raise FileNotFoundError(f"no weights file {names} (or .safetensors) in {self.folder} or its pretrained_pth/")
        return path

    def open(self, component, files):
        """(TensorFile, rename rules) of one component; `files` (path -> TensorFile) shares a file between the CLIP
        towers of the original layout."""
        path = self.weights_path(component)
        if path not in files:
            files[path] = LeanTensorFile(path)
        return files[path], weights_loader.rules_for(component, self.config.unet, self.layout, self.config.vae)

    def optimus_parts(self, files, tokenizers=True):
        """(OptimusConfig, (bert, gpt2) tokenizers or (None, None)): sized from its weights file's shapes, head counts
        from optimus/config.json (the release has none: 64-wide heads), vocabularies from find_optimus."""
        tf, _ = self.open("optimus", files)
        path = os.path.join(self.folder, "optimus", "config.json")
        settings = read_json(path, "Optimus config") if os.path.isfile(path) else {}
        head_dim = parse_config(path, "Optimus config", lambda s: checks.integer(s.get("head_dim", 64), "head_dim"),
                                settings)
        shapes = {k: torch.empty(tf.shape(k), device="meta") for k in tf.keys()}
        config = parse_config(tf.path, "Optimus weights", lambda sd: OptimusConfig.from_state_dict(sd, head_dim), shapes)
        settings = {k: v for k, v in settings.items() if k != "head_dim"}  # sizes no tensor shape tells (head counts)
        config = parse_config(path, "Optimus config", lambda s: dataclasses.replace(config, **s), settings)
        if "text_unet" in self.components() or self.layout == "original":
            if config.latent_dim != self.config.unet.text_channels:
                raise ValueError(f"{tf.path}: the Optimus latent has {config.latent_dim} numbers, the text UNet's "
                                 f"text_channels (in_channels) {self.config.unet.text_channels} ({self.files['unet']})")
        if not tokenizers:
            return config, (None, None)
        vocabs = find_optimus(self.folder)[1]
        missing = [f"optimus/{name} (or {OPTIMUS_VOCABS[name]})" for name, p in vocabs.items() if p is None]
        if missing:  # some but not all: a half-copied folder, not one that means minivd's copies
            raise FileNotFoundError(f"the Optimus vocabularies are missing from {self.folder}: {', '.join(missing)} "
                                    f"(copy all three, or none to use the released ones in {BUILT_IN_VOCABS})")
        try:
            bert, gpt2 = bert_tokenizer(vocabs["vocab.txt"]), gpt2_tokenizer(vocabs["vocab.json"], vocabs["merges.txt"])
        except Exception as e:  # the tokenizers library raises plain Exceptions for malformed files
            raise ValueError(f"the Optimus vocabularies {', '.join(vocabs.values())} could not be read: {e}") from None
        if bert.get_vocab_size() > config.encoder_vocab_size or gpt2.get_vocab_size() != config.decoder_vocab_size:
            built_in = os.path.dirname(vocabs["vocab.txt"]) == BUILT_IN_VOCABS  # find_optimus fell back to them
            where = " (minivd's copies of the released ones: the folder has none)" if built_in else ""
            raise ValueError(f"{vocabs['vocab.txt']} ({bert.get_vocab_size()} word pieces) and {vocabs['vocab.json']} "
                             f"({gpt2.get_vocab_size()} with <PAD> <BOS> <EOS>) do not fit the {config.encoder_vocab_size}"
                             f" and {config.decoder_vocab_size} embeddings of {tf.path}{where}")
        return config, (bert, gpt2)

    def problems(self):
        """Every missing, unexpected, mis-shaped or wrongly typed tensor of every weights file, as lines. Each module
        is built (as shapes) with at most about twice the tensors its file holds."""
        problems = []
        for component in self.components():
            try:
                files = {}
                source = self.open(component, files)
                optimus = self.optimus_parts(files, tokenizers=False)[0] if component == "optimus" else None
                limit = 2 * len(source[0].keys()) + 64  # a near miss gets plan's report; a config far too big stops
                with ShapesOnly(limit, source[0].path), torch.device("meta"):
                    if component in UNET_FILES[self.layout]:
                        kinds = ("image", "text") if component == "unet" else (component.split("_")[0],)
                        module = DualContextUNet(self.config.unet, data=kinds, context=kinds)
                    elif component == "optimus":
                        module = Optimus(optimus, None, None)
                    else:
                        module = build_network(self.config, component)
                problems += [f"{component}: {p}" for p in weights_loader.plan(module, [source])[1]]
            except (ValueError, FileNotFoundError, KeyError) as e:
                problems.append(f"{component}: {e}")
        return problems

    # ------------------------------------------------------------------------------------------------------------
    # Per-flow reading

    def read_into(self, model, flow, vae_encoder=False):
        """Read every network (and UNet layer set) `flow` needs that `model` does not hold yet, on the model's storage
        device and in its dtype. The VAE is read decoder-only unless `vae_encoder`."""
        data, contexts, wanted = flow_parts(flow)
        device, dtype, files = model.storage_device, model.dtype, {}
        if vae_encoder and model.vae is not None and model.vae.encoder is None:
            model.vae = None  # read again, now with its encoder
        prefixes = []
        with ShapesOnly(), torch.device("meta"):
            if model.unet is None:
                model.unet, prefixes = DualContextUNet(self.config.unet, data=(), context=()), ["time_embed."]
            new_data = [d for d in (data,) if d not in model.unet.data]
            new_contexts = [c for c in contexts if c not in model.unet.context]
            model.unet.add_layers(new_data, new_contexts)
        prefixes += [f"data.{d}." for d in new_data] + [f"context.{c}." for c in new_contexts]
        if prefixes:
            sources = [self.open(c, files) for c in UNET_FILES[self.layout] if c in self.components()]
            weights_loader.load_into(model.unet, sources, prefixes, device, dtype)
            model.unet.eval()
        for name in MODULES:
            if name in wanted and getattr(model, name) is None:
                if name == "optimus" and model.config.optimus is None:
                    model.config.optimus, model.optimus_tokenizers = self.optimus_parts(files)
                with ShapesOnly(), torch.device("meta"):
                    module = model.new_module(name, vae_encoder=vae_encoder)
                prefixes = module.weight_prefixes() if name == "vae" else None  # decoder-only: its keys alone
                weights_loader.load_into(module, [self.open(name, files)], prefixes, device, dtype)
                setattr(model, name, module.eval())
        files.clear()  # close the files: mapped pages that no loaded tensor views are released


# ---------------------------------------------------------------------------------------------------------------------


def resolve_dtype(dtype):
    """A torch floating dtype from a dtype or its name ("float16", "bfloat16", "float32")."""
    if isinstance(dtype, str) and dtype in ("float16", "bfloat16", "float32", "float64", "half", "float"):
        dtype = getattr(torch, dtype)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype or its name (float32, float16, bfloat16), got {dtype!r}")
    return dtype


def resolve_device(device):
    """A torch.device that exists on this machine (a CUDA index the machine does not have is an error now)."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or another torch device, got {device!r}") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r}: this machine has no CUDA GPU (torch {torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif device.type not in ("cpu", "meta") and not getattr(getattr(torch, device.type, None), "is_available", bool)():
        raise ValueError(f"device {str(device)!r} is not available on this machine or in this PyTorch build")
    return device


def load(path=None, device="cpu", dtype=torch.float32, flows=()):
    """Open a checkpoint folder in either layout (see the module docstring). Configs are read and every weights file
    is checked now (names and shapes, no tensor data); the networks are read when a flow first needs them, or now for
    `flows`. path None: $MINIVD_WEIGHTS if set, else the built-in model (no download)."""
    device, dtype = resolve_device(device), resolve_dtype(dtype)
    flows = [flows] if isinstance(flows, str) else list(flows)
    for flow in flows:
        flow_parts(flow)  # an unknown flow is an error now, before anything is read
    if path is None:
        path = os.environ.get("MINIVD_WEIGHTS") or None
    if path is None:
        return builtin_model(device, dtype)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a checkpoint folder (str or os.PathLike) or None, got {type(path).__name__}")
    checkpoint = Checkpoint(path)
    problems = checkpoint.problems()
    if problems:
        raise ValueError(f"{path} does not match Versatile Diffusion:\n  " + weights_loader.summarize(problems))
    model = checkpoint.model().to(device, dtype)
    for flow in flows:
        model.prepare(flow)
    return model


TOY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy", "weights")  # python -m minivd.toy.build --ship


def builtin_model(device="cpu", dtype=torch.float32):
    """The model minivd runs with no weights given: the toy VD trained on pictures of coloured shapes, shipped in
    minivd/toy/weights/ (its description says what it is)."""
    if not os.path.isfile(os.path.join(TOY, "model_index.json")):
        raise FileNotFoundError(f"the built-in toy model is missing from {TOY}: reinstall minivd, or rebuild it with "
                                "python -m minivd.toy.build --out toy_build --ship")
    warnings.warn("minivd: no weights given (path or $MINIVD_WEIGHTS): using the built-in TOY model, trained on "
                  "pictures of coloured shapes, not Versatile Diffusion's weights", stacklevel=3)
    return load(TOY, device, dtype)
