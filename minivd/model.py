"""The loaded Versatile Diffusion model: a folder of official weights, read flow by flow.

`VersatileDiffusion` holds the configs of every component and builds a component only when a flow needs it:
    text-to-image    UNet (global + image data + text context layers), CLIP text encoder, VAE
    image-variation  UNet (global + image data + image context layers), CLIP vision encoder, VAE
    dual-guided      UNet (global + image data + text and image context layers), both CLIP encoders, VAE
    image-to-text    UNet (global + text data + image context layers), CLIP vision encoder, Optimus
    text-variation   UNet (global + text data + text context layers), CLIP text encoder, Optimus
Modules are created on the `meta` device (no memory) and filled straight from the files by `weights_loader`.

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
(the Hub repo's pretrained_pth/) in optimus/, pretrained_pth/ or the folder itself, and its vocabularies in
optimus/: vocab.txt (bert-base-cased), vocab.json and merges.txt (GPT-2), or their original names
bert-base-cased-vocab.txt, gpt2-vocab.json, gpt2-merges.txt (lib/model_zoo/optimus_models/vocab/ of the code).
"""

import json
import os
from contextlib import contextmanager
from dataclasses import fields

import torch

import weights_loader

from .attention import set_attention_slicing
from .clip import CLIPTextConfig, CLIPTextEncoder, CLIPVisionConfig, CLIPVisionEncoder, ImagePreprocessConfig
from .ddim import DDIM, DDIMConfig
from .optimus import Optimus, OptimusConfig, bert_tokenizer, gpt2_tokenizer
from .tokenizer import CLIPTokenizer
from .unet import FLOWS, DualContextUNet, UNetConfig
from .vae import AutoencoderKL, VAEConfig

MODULES = ("text_encoder", "image_encoder", "vae", "optimus")  # everything besides the UNet

UNET_FILES = {"diffusers": ("image_unet", "text_unet"), "original": ("unet",)}  # the UNet's weight components
ORIGINAL_FILES = {"unet": ("vd-four-flow-v1-0", "vd-four-flow-v1-0-fp16"), "vae": ("kl-f8",)}  # names, no extension
CLIP_FOLDER = "clip-vit-large-patch14"
WEIGHT_EXTENSIONS = (".safetensors", ".pth")
OPTIMUS_VOCABS = {"vocab.txt": "bert-base-cased-vocab.txt", "vocab.json": "gpt2-vocab.json", "merges.txt": "gpt2-merges.txt"}


@contextmanager
def shapes_only():
    """Build modules as shapes only: on the meta device (no memory), with torch.nn.init's random fills switched off.

    The fills have nothing to fill there, and on meta tensors `normal_` goes through torch's Python reference
    implementations, which import the compiler stack the first time (about a second of every load).
    """
    fills = ("normal_", "uniform_", "kaiming_uniform_", "trunc_normal_", "zeros_", "ones_")
    saved = {name: getattr(torch.nn.init, name) for name in fills}
    for name in fills:
        setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        with torch.device("meta"):
            yield
    finally:
        for name, fill in saved.items():
            setattr(torch.nn.init, name, fill)


def flow_parts(flow):
    """What a flow uses: (UNet data layers, UNet context layers, modules besides the UNet).

    The modules are CLIP encoders for the conditions, then the VAE (image output) or Optimus (text output)."""
    if flow not in FLOWS:
        raise ValueError(f"unknown mode {flow!r}; choose one of {', '.join(FLOWS)}")
    data, contexts = FLOWS[flow]
    modules = tuple({"text": "text_encoder", "image": "image_encoder"}[c] for c in contexts)
    return data, contexts, modules + ("vae" if data == "image" else "optimus",)


def find_file(folder, names, subfolders=("", "pretrained_pth")):
    """The first of folder/subfolder/name.(safetensors|pth) that exists, trying `names` in order; None if none."""
    for name in names:
        for ext in WEIGHT_EXTENSIONS:
            for sub in subfolders:
                path = os.path.join(folder, sub, name + ext)
                if os.path.isfile(path):
                    return path
    return None


def find_optimus(folder):
    """(weights file or None, {vocab name: path or None}) of the Optimus text VAE in a checkpoint folder."""
    weights = find_file(folder, ("optimus-vae",), ("optimus", "pretrained_pth", ""))
    vocabs = {}
    for name, original in OPTIMUS_VOCABS.items():
        candidates = [os.path.join(folder, "optimus", n) for n in (name, original)]
        vocabs[name] = next((c for c in candidates if os.path.isfile(c)), None)
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
        "  (see minivd/model.py for both)")


def read_json(path, what):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"missing {what}: {path}")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e


def config_from_fields(cls, values, where):
    """A config dataclass from a dict of some of its fields (the rest keep VD's defaults); JSON lists become
    tuples where the field is a tuple. Unknown fields are an error."""
    if not isinstance(values, dict):
        raise ValueError(f"{where} must be a JSON object of {cls.__name__} fields, got {type(values).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{where}: unknown {cls.__name__} fields {unknown}; known: {sorted(known)}")
    defaults = cls()
    return cls(**{k: tuple(v) if isinstance(getattr(defaults, k), tuple) and isinstance(v, list) else v
                  for k, v in values.items()})


def clip_tower_config(config, tower):
    """The "text_config" / "vision_config" of a transformers CLIPModel config.json as transformers reads it: updated
    by the "text_config_dict" / "vision_config_dict" that older files (openai's) also carry, with the model's
    projection_dim (CLIPModel sizes both projections by the top-level value). A one-tower config is returned as is."""
    sub = {**config.get(f"{tower}_config", config), **config.get(f"{tower}_config_dict", {})}
    if "projection_dim" in config:
        sub["projection_dim"] = config["projection_dim"]
    return sub


def diffusers_configs(folder):
    """Configs, tokenizer and sampler of a diffusers-layout folder, from its config files."""
    sub = lambda *p: os.path.join(folder, *p)
    image_unet = read_json(sub("image_unet", "config.json"), "image UNet config") if os.path.isdir(sub("image_unet")) else None
    text_unet = read_json(sub("text_unet", "config.json"), "text UNet config") if os.path.isdir(sub("text_unet")) else None
    scheduler = sub("scheduler", "scheduler_config.json")
    return dict(
        unet_config=UNetConfig.from_hf_config(image_unet, text_unet),
        vae_config=VAEConfig.from_hf_config(read_json(sub("vae", "config.json"), "VAE config")),
        text_config=CLIPTextConfig.from_hf_config(read_json(sub("text_encoder", "config.json"), "CLIP text config")),
        vision_config=CLIPVisionConfig.from_hf_config(read_json(sub("image_encoder", "config.json"), "CLIP vision config")),
        tokenizer=CLIPTokenizer.from_folder(sub("tokenizer")),
        image_preprocess=ImagePreprocessConfig.from_hf_config(
            read_json(sub("image_feature_extractor", "preprocessor_config.json"), "image preprocessor config")),
        ddim=DDIM(DDIMConfig.from_hf_config(read_json(scheduler, "scheduler config")) if os.path.isfile(scheduler) else None),
    )


def original_configs(folder):
    """Configs, tokenizer and sampler of an original-layout folder: UNet and VAE sizes from the optional minivd
    config.json (VD's otherwise), CLIP's from the openai folder, VD's DDIM."""
    path = os.path.join(folder, "config.json")
    sizes = read_json(path, "minivd config") if os.path.isfile(path) else {}
    if not isinstance(sizes, dict) or set(sizes) - {"unet", "vae"}:
        raise ValueError(f"{path} must be a JSON object with the keys 'unet' and/or 'vae' (minivd sizes)")
    clip = os.path.join(folder, CLIP_FOLDER)
    if not os.path.isdir(clip):
        raise FileNotFoundError(f"the original layout needs the CLIP folder {clip}/ (a download of openai/{CLIP_FOLDER}: "
                                "config.json, model.safetensors or pytorch_model.bin, vocab.json, merges.txt, "
                                "preprocessor_config.json)")
    clip_config = read_json(os.path.join(clip, "config.json"), "CLIP config")
    return dict(
        unet_config=config_from_fields(UNetConfig, sizes.get("unet", {}), f"{path} 'unet'"),
        vae_config=config_from_fields(VAEConfig, sizes.get("vae", {}), f"{path} 'vae'"),
        text_config=CLIPTextConfig.from_hf_config(clip_tower_config(clip_config, "text")),
        vision_config=CLIPVisionConfig.from_hf_config(clip_tower_config(clip_config, "vision")),
        tokenizer=CLIPTokenizer.from_folder(clip),
        image_preprocess=ImagePreprocessConfig.from_hf_config(
            read_json(os.path.join(clip, "preprocessor_config.json"), "CLIP image preprocessor config")),
        ddim=DDIM(),
    )


class VersatileDiffusion:
    """Configs, tokenizer and sampler always; the networks (unet, vae, text_encoder, image_encoder) on demand."""

    def __init__(self, unet_config, vae_config, text_config, vision_config, tokenizer, image_preprocess, ddim,
                 folder=None, device="cpu", dtype=torch.float32, layout="diffusers"):
        self.unet_config, self.vae_config = unet_config, vae_config
        self.text_config, self.vision_config = text_config, vision_config
        self.tokenizer, self.image_preprocess, self.ddim = tokenizer, image_preprocess, ddim
        self.folder, self.layout, self.device, self.dtype = folder, layout, torch.device(device), dtype
        self.unet = self.vae = self.text_encoder = self.image_encoder = self.optimus = None
        self.is_demo = False
        self.attention_slice = self.vae_tile_size = None  # enable_low_memory
        self.offload = False
        self._files = {}  # path -> weights_loader.TensorFile, open during one prepare() (the CLIP towers may share one)

    # ------------------------------------------------------------------------------------------------------------
    # Construction

    @classmethod
    def from_folder(cls, folder, device="cpu", dtype=torch.float32):
        """Read configs, tokenizer and scheduler of a checkpoint folder in either layout; the weights are read
        later, per flow."""
        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"no such checkpoint folder: {folder}")
        layout = detect_layout(folder)
        configs = diffusers_configs(folder) if layout == "diffusers" else original_configs(folder)
        context_dim = configs["unet_config"].context_dim
        for clip in ("text_config", "vision_config"):
            if configs[clip].projection_dim != context_dim:
                raise ValueError(f"{folder}: the CLIP {clip.split('_')[0]} projection_dim "
                                 f"{configs[clip].projection_dim} differs from the UNet's context_dim {context_dim}")
        return cls(**configs, folder=folder, device=device, dtype=dtype, layout=layout)

    def components(self):
        """The weight components of this folder (for `weights_loader check`): the UNet file(s), the VAE, the CLIP
        towers, and Optimus if present. In the diffusers layout, the component folders present."""
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

    def source(self, component):
        """(TensorFile, rename rules) of one component: what `weights_loader.load_into` reads."""
        path = self.weights_path(component)
        if path not in self._files:
            self._files[path] = weights_loader.TensorFile(path)
        return self._files[path], weights_loader.rules_for(component, self.unet_config, self.layout, self.vae_config)

    def _unet_sources(self):
        return [self.source(c) for c in UNET_FILES[self.layout] if c in self.components()]

    def plan_args(self, component):
        """(meta module, files and rules) for checking one component file in full."""
        with shapes_only():
            if component in UNET_FILES[self.layout]:
                kinds = ("image", "text") if component == "unet" else (component.split("_")[0],)
                module = DualContextUNet(self.unet_config, data=kinds, context=kinds)
            elif component == "optimus":
                module = self._new_optimus(tokenizers=False)
            else:
                module = self._new(component)
        return module, [self.source(component)]

    def _new(self, component, vae_encoder=True):
        if component == "optimus":
            return self._new_optimus()
        return {
            "vae": lambda: AutoencoderKL(self.vae_config, encoder=vae_encoder),
            "text_encoder": lambda: CLIPTextEncoder(self.text_config),
            "image_encoder": lambda: CLIPVisionEncoder(self.vision_config),
        }[component]()

    def _optimus_settings(self):
        """optimus/config.json, optional: OptimusConfig fields (e.g. head counts) or head_dim; the release has none."""
        path = os.path.join(self.folder, "optimus", "config.json")
        return read_json(path, "Optimus config") if os.path.isfile(path) else {}

    def _new_optimus(self, tokenizers=True):
        """An Optimus sized from its weights file's shapes, with its tokenizers."""
        tf = self.source("optimus")[0]
        config = OptimusConfig.from_state_dict({k: torch.empty(tf.shape(k), device="meta") for k in tf.keys()},
                                               head_dim=self._optimus_settings().get("head_dim", 64))
        for key, value in self._optimus_settings().items():  # sizes no tensor shape tells (head counts)
            if key != "head_dim":
                setattr(config, key, value)
        if not tokenizers:
            return Optimus(config, None, None)
        vocabs = find_optimus(self.folder)[1]
        missing = [f"optimus/{name} (or {OPTIMUS_VOCABS[name]})" for name, path in vocabs.items() if path is None]
        if missing:
            raise FileNotFoundError(f"the Optimus vocabularies are missing from {self.folder}: {', '.join(missing)} "
                                    "(they ship with the original code, lib/model_zoo/optimus_models/vocab/)")
        return Optimus(config, bert_tokenizer(vocabs["vocab.txt"]), gpt2_tokenizer(vocabs["vocab.json"], vocabs["merges.txt"]))

    # ------------------------------------------------------------------------------------------------------------
    # Per-flow loading

    def prepare(self, flow, drop_unused=False, vae_encoder=False):
        """Make sure every module `flow` needs is loaded; optionally free the ones it does not use.

        The VAE is read decoder-only unless `vae_encoder` (image-variation with fidelity encodes its input)."""
        data, contexts, wanted = flow_parts(flow)
        if self.folder is None:  # the demo model is built complete in memory
            return self
        if vae_encoder and self.vae is not None and self.vae.encoder is None:
            self.vae = None  # read again, now with its encoder
        if self.unet is None:
            with shapes_only():
                self.unet = DualContextUNet(self.unet_config, data=(), context=())
            prefixes = ["time_embed."]
        else:
            prefixes = []
        new_data = [d for d in (data,) if d not in self.unet.data]
        new_ctx = [c for c in contexts if c not in self.unet.context]
        with shapes_only():
            self.unet.add_layers(new_data, new_ctx)
        prefixes += [f"data.{d}." for d in new_data] + [f"context.{c}." for c in new_ctx]
        if prefixes:
            weights_loader.load_into(self.unet, self._unet_sources(), prefixes, self.storage_device, self.dtype)
        if self.attention_slice is not None:
            set_attention_slicing(self.unet, self.attention_slice)
        for component in MODULES:
            if component in wanted and getattr(self, component) is None:
                with shapes_only():
                    module = self._new(component, vae_encoder)
                prefixes = module.weight_prefixes() if component == "vae" else None  # decoder-only: its keys alone
                weights_loader.load_into(module, [self.source(component)], prefixes, self.storage_device, self.dtype)
                setattr(self, component, module.eval())
            elif drop_unused and component not in wanted:
                setattr(self, component, None)
        if drop_unused:
            for kind in list(self.unet.data):
                if kind != data:
                    del self.unet.data[kind]
            for kind in list(self.unet.context):
                if kind not in contexts:
                    del self.unet.context[kind]
        self._files.clear()  # close the files: mapped pages that no loaded tensor views are released
        self.unet.eval()
        return self

    # ------------------------------------------------------------------------------------------------------------
    # Memory and speed options (none changes fp32 results beyond float rounding)

    @property
    def storage_device(self):
        """Where loaded modules live: the compute device, or the CPU when offloading."""
        return torch.device("cpu") if self.offload else self.device

    def enable_low_memory(self, attention_slice=1024, vae_tile_size=512, offload=None):
        """Bound peak memory: attention in slices of `attention_slice` query rows, VAE decoding in tiles of
        `vae_tile_size` pixels (approximate at the seams), and, on a GPU, every module kept on the CPU and moved to
        the GPU only while it runs (offload; default on when the device is not the CPU). None switches one off."""
        self.attention_slice, self.vae_tile_size = attention_slice, vae_tile_size
        self.offload = (self.device.type != "cpu") if offload is None else offload
        if self.unet is not None:
            set_attention_slicing(self.unet, attention_slice)
        if self.offload:
            self.to(self.device)  # moves what is loaded to the CPU (storage_device)
        return self

    @contextmanager
    def running(self, *names):
        """Use modules on the compute device; with offload, move them there for the block and back after."""
        modules = [getattr(self, n) for n in names if getattr(self, n) is not None]
        if self.offload:
            for module in modules:
                module.to(self.device)
        try:
            yield
        finally:
            if self.offload:
                for module in modules:
                    module.to("cpu")

    def compile(self, **options):
        """torch.compile the UNet's forward pass (optional; the first steps are slow while it compiles)."""
        if self.unet is None:
            raise ValueError("no UNet loaded yet: call model.prepare(flow) before compile()")
        self.unet.forward = torch.compile(self.unet.forward, **options)
        return self

    def to(self, device=None, dtype=None):
        """Move every loaded module (and later loads) to device / dtype."""
        self.device = torch.device(device) if device is not None else self.device
        self.dtype = dtype or self.dtype
        for name in ("unet", *MODULES):
            module = getattr(self, name)
            if module is not None:
                module.to(device=self.storage_device, dtype=self.dtype)
        return self

    def __repr__(self):
        loaded = [n for n in ("unet", *MODULES) if getattr(self, n) is not None]
        source = "built-in tiny demo (random weights)" if self.is_demo else f"{self.folder}, {self.layout} layout"
        return f"VersatileDiffusion({source}, device={self.device}, dtype={self.dtype}, loaded={loaded})"


def load(path, device="cpu", dtype=torch.float32, flows=()):
    """Open a checkpoint folder in either layout (see the module docstring). Configs are read and every weights
    file is checked now (shapes and names, no tensor data); the networks are read when a flow first needs them, or
    now for `flows`."""
    model = VersatileDiffusion.from_folder(path, device=device, dtype=dtype)
    problems = weights_loader.check(model.folder, model=model)
    if problems:
        raise ValueError(f"{path} does not match Versatile Diffusion:\n  " + weights_loader.summarize(problems))
    for flow in flows:
        model.prepare(flow)
    return model


def demo_model(device="cpu", dtype=torch.float32, seed=0):
    """A complete, tiny, randomly initialised VD (every module at toy size). No download; outputs are noise-like."""
    from .tokenizer import demo_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet_cfg = UNetConfig.tiny()
        text_cfg, vision_cfg = CLIPTextConfig.tiny(), CLIPVisionConfig.tiny()
        text_cfg.projection_dim = vision_cfg.projection_dim = unet_cfg.context_dim
        vae_cfg = VAEConfig(block_out_channels=[16, 16, 32, 32], layers_per_block=1, norm_groups=8)  # 8x like VD
        model = VersatileDiffusion(unet_cfg, vae_cfg, text_cfg, vision_cfg, demo_tokenizer(),
                                   ImagePreprocessConfig(size=vision_cfg.image_size), DDIM(), device=device, dtype=dtype)
        model.unet = DualContextUNet(unet_cfg, data=("image", "text"), context=("text", "image")).eval()
        model.vae = AutoencoderKL(model.vae_config).eval()
        model.text_encoder = CLIPTextEncoder(text_cfg).eval()
        model.image_encoder = CLIPVisionEncoder(vision_cfg).eval()
        model.optimus = demo_optimus(latent_dim=unet_cfg.text_channels).eval()
    model.is_demo = True
    return model.to(device, dtype)


def demo_optimus(latent_dim):
    """A tiny random Optimus with tiny vocabularies trained on a built-in corpus (no download)."""
    import tempfile

    from .optimus import write_tiny_vocabs

    with tempfile.TemporaryDirectory() as folder:
        files = write_tiny_vocabs(folder)
        bert, gpt2 = bert_tokenizer(files["vocab.txt"]), gpt2_tokenizer(files["vocab.json"], files["merges.txt"])
    config = OptimusConfig.tiny()
    config.latent_dim = latent_dim
    return Optimus(config, bert, gpt2)
