"""The loaded Versatile Diffusion model: a folder of official weights, read flow by flow.

`VersatileDiffusion` holds the configs of every component and builds a component only when a flow needs it:
    text-to-image    UNet (global + image data + text context layers), CLIP text encoder, VAE
    image-variation  UNet (global + image data + image context layers), CLIP vision encoder, VAE
    dual-guided      UNet (global + image data + text and image context layers), both CLIP encoders, VAE
    image-to-text    UNet (global + text data + image context layers), CLIP vision encoder, Optimus
    text-variation   UNet (global + text data + text context layers), CLIP text encoder, Optimus
Modules are created on the `meta` device (no memory) and filled straight from the files by `weights_loader`.

Folder layout accepted (Hugging Face `shi-labs/versatile-diffusion`, diffusers layout):
    model_index.json, image_unet/, text_unet/, vae/, text_encoder/, image_encoder/, tokenizer/ (vocab.json,
    merges.txt), image_feature_extractor/ (preprocessor_config.json), scheduler/ (scheduler_config.json);
    each weights folder has config.json and diffusion_pytorch_model.(safetensors|bin) or model.(safetensors)/pytorch_model.bin.
    The text flows also need the Optimus text VAE, which the diffusers folder lacks: optimus/optimus-vae.pth (from the
    same Hub repo's pretrained_pth/) and its vocabularies optimus/vocab.txt (bert-base-cased), optimus/vocab.json and
    optimus/merges.txt (GPT-2); the original file names bert-base-cased-vocab.txt, gpt2-vocab.json, gpt2-merges.txt
    are accepted too.
"""

import json
import os

import torch

import weights_loader

from .clip import CLIPTextConfig, CLIPTextEncoder, CLIPVisionConfig, CLIPVisionEncoder, ImagePreprocessConfig
from .ddim import DDIM, DDIMConfig
from .optimus import Optimus, OptimusConfig, bert_tokenizer, gpt2_tokenizer
from .tokenizer import CLIPTokenizer
from .unet import FLOWS, DualContextUNet, UNetConfig
from .vae import AutoencoderKL, VAEConfig

IMAGE_FLOWS = ("text-to-image", "image-variation", "dual-guided")
MODULES = ("text_encoder", "image_encoder", "vae", "optimus")  # everything besides the UNet


OPTIMUS_WEIGHTS = ("optimus/optimus-vae.safetensors", "optimus/optimus-vae.pth", "pretrained_pth/optimus-vae.pth",
                   "optimus-vae.pth")
OPTIMUS_VOCABS = {"vocab.txt": "bert-base-cased-vocab.txt", "vocab.json": "gpt2-vocab.json", "merges.txt": "gpt2-merges.txt"}


def flow_parts(flow):
    """What a flow uses: (UNet data layers, UNet context layers, modules besides the UNet).

    The modules are CLIP encoders for the conditions, then the VAE (image output) or Optimus (text output)."""
    if flow not in FLOWS:
        raise ValueError(f"unknown mode {flow!r}; choose one of {', '.join(FLOWS)}")
    data, contexts = FLOWS[flow]
    modules = tuple({"text": "text_encoder", "image": "image_encoder"}[c] for c in contexts)
    return data, contexts, modules + ("vae" if data == "image" else "optimus",)


def find_optimus(folder):
    """(weights file or None, {vocab name: path or None}) of the Optimus text VAE in a checkpoint folder."""
    weights = next((os.path.join(folder, p) for p in OPTIMUS_WEIGHTS if os.path.isfile(os.path.join(folder, p))), None)
    vocabs = {}
    for name, original in OPTIMUS_VOCABS.items():
        candidates = [os.path.join(folder, "optimus", n) for n in (name, original)]
        vocabs[name] = next((c for c in candidates if os.path.isfile(c)), None)
    return weights, vocabs


def read_json(path, what):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"missing {what}: {path}")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e


class VersatileDiffusion:
    """Configs, tokenizer and sampler always; the networks (unet, vae, text_encoder, image_encoder) on demand."""

    def __init__(self, unet_config, vae_config, text_config, vision_config, tokenizer, image_preprocess, ddim,
                 folder=None, device="cpu", dtype=torch.float32):
        self.unet_config, self.vae_config = unet_config, vae_config
        self.text_config, self.vision_config = text_config, vision_config
        self.tokenizer, self.image_preprocess, self.ddim = tokenizer, image_preprocess, ddim
        self.folder, self.device, self.dtype = folder, torch.device(device), dtype
        self.unet = self.vae = self.text_encoder = self.image_encoder = self.optimus = None
        self.is_demo = False

    # ------------------------------------------------------------------------------------------------------------
    # Construction

    @classmethod
    def from_folder(cls, folder, device="cpu", dtype=torch.float32):
        """Read configs, tokenizer and scheduler of an official folder; the weights are read later, per flow."""
        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"no such checkpoint folder: {folder}")
        if not any(os.path.isdir(os.path.join(folder, sub)) for sub in ("image_unet", "text_unet")):
            raise ValueError(
                f"{folder} is not a Versatile Diffusion checkpoint folder: expected the diffusers layout of "
                "shi-labs/versatile-diffusion (image_unet/, text_unet/, vae/, text_encoder/, image_encoder/, tokenizer/, ...)"
            )
        sub = lambda *p: os.path.join(folder, *p)
        image_unet = read_json(sub("image_unet", "config.json"), "image UNet config") if os.path.isdir(sub("image_unet")) else None
        text_unet = read_json(sub("text_unet", "config.json"), "text UNet config") if os.path.isdir(sub("text_unet")) else None
        scheduler = sub("scheduler", "scheduler_config.json")
        model = cls(
            unet_config=UNetConfig.from_hf_config(image_unet, text_unet),
            vae_config=VAEConfig.from_hf_config(read_json(sub("vae", "config.json"), "VAE config")),
            text_config=CLIPTextConfig.from_hf_config(read_json(sub("text_encoder", "config.json"), "CLIP text config")),
            vision_config=CLIPVisionConfig.from_hf_config(read_json(sub("image_encoder", "config.json"), "CLIP vision config")),
            tokenizer=CLIPTokenizer.from_folder(sub("tokenizer")),
            image_preprocess=ImagePreprocessConfig.from_hf_config(
                read_json(sub("image_feature_extractor", "preprocessor_config.json"), "image preprocessor config")),
            ddim=DDIM(DDIMConfig.from_hf_config(read_json(scheduler, "scheduler config")) if os.path.isfile(scheduler) else None),
            folder=folder, device=device, dtype=dtype,
        )
        return model

    def components(self):
        """The weight files this folder has (for `weights_loader check`)."""
        found = [c for c in weights_loader.COMPONENTS if os.path.isdir(os.path.join(self.folder, c))]
        return found + (["optimus"] if find_optimus(self.folder)[0] else [])

    def _file(self, component):
        cache = self.__dict__.setdefault("_files", {})
        if component not in cache:
            if component == "optimus":
                path = find_optimus(self.folder)[0]
                if path is None:
                    raise FileNotFoundError(
                        f"the text flows need the Optimus text VAE, and {self.folder} has none: put optimus-vae.pth "
                        f"(shi-labs/versatile-diffusion, pretrained_pth/) at {os.path.join(self.folder, 'optimus')}/")
            else:
                folder = os.path.join(self.folder, component)
                if not os.path.isdir(folder):
                    raise FileNotFoundError(f"the checkpoint has no {component}/ folder, which this flow needs")
                path = weights_loader.find_weights(folder)
            cache[component] = weights_loader.TensorFile(path)
        return cache[component]

    def _unet_sources(self):
        return [(self._file(c), weights_loader.rules_for(c, self.unet_config))
                for c in ("image_unet", "text_unet") if os.path.isdir(os.path.join(self.folder, c))]

    def plan_args(self, component):
        """(meta module, files and rules) for checking one component file in full."""
        with torch.device("meta"):
            if component in ("image_unet", "text_unet"):
                kind = component.split("_")[0]
                module = DualContextUNet(self.unet_config, data=(kind,), context=(kind,))
            elif component == "optimus":
                module = self._new_optimus(tokenizers=False)
            else:
                module = self._new(component)
        return module, [(self._file(component), weights_loader.rules_for(component, self.unet_config))]

    def _new(self, component):
        if component == "optimus":
            return self._new_optimus()
        return {
            "vae": lambda: AutoencoderKL(self.vae_config),
            "text_encoder": lambda: CLIPTextEncoder(self.text_config),
            "image_encoder": lambda: CLIPVisionEncoder(self.vision_config),
        }[component]()

    def _optimus_settings(self):
        """optimus/config.json, optional: OptimusConfig fields (e.g. head counts) or head_dim; the release has none."""
        path = os.path.join(self.folder, "optimus", "config.json")
        return read_json(path, "Optimus config") if os.path.isfile(path) else {}

    def _new_optimus(self, tokenizers=True):
        """An Optimus sized from its weights file's shapes, with its tokenizers."""
        tf = self._file("optimus")
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

    def prepare(self, flow, drop_unused=False):
        """Make sure every module `flow` needs is loaded; optionally free the ones it does not use."""
        data, contexts, wanted = flow_parts(flow)
        if self.folder is None:  # the demo model is built complete in memory
            return self
        if self.unet is None:
            with torch.device("meta"):
                self.unet = DualContextUNet(self.unet_config, data=(), context=())
            prefixes = ["time_embed."]
        else:
            prefixes = []
        new_data = [d for d in (data,) if d not in self.unet.data]
        new_ctx = [c for c in contexts if c not in self.unet.context]
        with torch.device("meta"):
            self.unet.add_layers(new_data, new_ctx)
        prefixes += [f"data.{d}." for d in new_data] + [f"context.{c}." for c in new_ctx]
        if prefixes:
            weights_loader.load_into(self.unet, self._unet_sources(), prefixes, self.device, self.dtype)
        for component in MODULES:
            if component in wanted and getattr(self, component) is None:
                with torch.device("meta"):
                    module = self._new(component)
                rules = weights_loader.rules_for(component)
                weights_loader.load_into(module, [(self._file(component), rules)], None, self.device, self.dtype)
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
        self.unet.eval()
        return self

    def to(self, device=None, dtype=None):
        """Move every loaded module (and later loads) to device / dtype."""
        self.device = torch.device(device) if device is not None else self.device
        self.dtype = dtype or self.dtype
        for name in ("unet", *MODULES):
            module = getattr(self, name)
            if module is not None:
                module.to(device=self.device, dtype=self.dtype)
        return self

    def __repr__(self):
        loaded = [n for n in ("unet", *MODULES) if getattr(self, n) is not None]
        source = "built-in tiny demo (random weights)" if self.is_demo else self.folder
        return f"VersatileDiffusion({source}, device={self.device}, dtype={self.dtype}, loaded={loaded})"


def load(path, device="cpu", dtype=torch.float32, flows=()):
    """Open a checkpoint folder in the official layout. Configs are read and every weights file is checked now
    (shapes and names, no tensor data); the networks are read when a flow first needs them, or now for `flows`."""
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
