"""Versatile Diffusion as one `nn.Module`: the networks of every flow, their configs, tokenizers and the sampler.

    model = minivd.load("path/to/versatile-diffusion")   # minivd.checkpoint: a folder of official weights
    model.prepare("text-to-image")                       # read what this flow needs (generate does this itself)
    model.unet, model.vae, model.text_encoder            # the networks, as plain PyTorch modules
    model.to("cuda"), model.parameters(), model.state_dict(), model.train()   # as any PyTorch model

The networks a flow uses (paper Sec. 3.3; `flow_parts`):
    text-to-image    UNet (global + image data + text context layers), CLIP text encoder, VAE
    image-variation  UNet (global + image data + image context layers), CLIP vision encoder, VAE
    dual-guided      UNet (global + image data + text and image context layers), both CLIP encoders, VAE
    image-to-text    UNet (global + text data + image context layers), CLIP vision encoder, Optimus
    text-variation   UNet (global + text data + text context layers), CLIP text encoder, Optimus
A model read from a folder holds only what the flows it ran have needed (`prepare` reads the rest on demand, from the
`checkpoint` it came from); a model built for training holds everything (`build`).

Legend for shape comments: B batch, T text tokens, N image tokens, Cc context width, L latent channels.
"""

import threading
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from PIL import Image

from . import checks, speed
from .clip import CLIPTextConfig, CLIPTextEncoder, CLIPVisionConfig, CLIPVisionEncoder, ImagePreprocessConfig, preprocess
from .ddim import DDIM, DDIMConfig
from .optimus import Optimus, OptimusConfig
from .unet import FLOWS, DualContextUNet, UNetConfig
from .vae import AutoencoderKL, VAEConfig, images_to_latents, latents_to_images

MODULES = ("text_encoder", "image_encoder", "vae", "optimus")  # everything besides the UNet
PARTS = {"unet": "UNet", "vae": "VAE", "text": "CLIP text encoder", "vision": "CLIP vision encoder"}  # in messages


def flow_parts(flow):
    """What a flow uses: (UNet data layers, UNet context layers, modules besides the UNet).

    The modules are CLIP encoders for the conditions, then the VAE (image output) or Optimus (text output)."""
    if flow not in FLOWS:
        raise ValueError(f"unknown flow {flow!r}; choose one of {', '.join(FLOWS)}")
    data, contexts = FLOWS[flow]
    modules = tuple({"text": "text_encoder", "image": "image_encoder"}[c] for c in contexts)
    return data, contexts, modules + ("vae" if data == "image" else "optimus",)


@dataclass
class Defaults:
    """What `generate` uses when a call does not say: the official weights' 512 px, 50 steps, guidance 7.5."""

    height: int = 512
    width: int = 512
    steps: int = 50
    guidance_scale: float = 7.5

    def __post_init__(self):
        for key in ("height", "width", "steps"):
            checks.integer(getattr(self, key), key, low=8 if key != "steps" else 1)
        checks.real(self.guidance_scale, "guidance_scale", low=0)


@dataclass
class VDConfig:
    """The configs of every component, and what the checkpoint says about itself."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: CLIPTextConfig = field(default_factory=CLIPTextConfig)
    vision: CLIPVisionConfig = field(default_factory=CLIPVisionConfig)
    image_preprocess: ImagePreprocessConfig = field(default_factory=ImagePreprocessConfig)
    scheduler: DDIMConfig = field(default_factory=DDIMConfig)
    optimus: OptimusConfig = None  # None: sized from its weights file when a text flow first needs it
    defaults: Defaults = field(default_factory=Defaults)
    description: str = "Versatile Diffusion"

    def check(self, tokenizer, files=None):
        """Sizes that two configs (or a config and the CLIP tokenizer) both give must agree: a mismatch would fail only
        at generate time. files: {"unet", "vae", "text", "vision", "image_preprocess", "tokenizer", "defaults": path}
        names them in messages."""
        name = lambda part: (files or {}).get(part, f"the {part} config")
        pairs = [  # (one config, its key and value, the other config, its key and value)
            ("text", "projection_dim", self.text.projection_dim, "unet", "context_dim (cross_attention_dim)",
             self.unet.context_dim),
            ("vision", "projection_dim", self.vision.projection_dim, "unet", "context_dim (cross_attention_dim)",
             self.unet.context_dim),
            ("vae", "latent_channels", self.vae.latent_channels, "unet", "image_channels (in_channels)",
             self.unet.image_channels),
            ("image_preprocess", "crop_size", self.image_preprocess.crop_size, "vision", "image_size",
             self.vision.image_size),
        ]
        if self.text.eos_token_id != 2:  # 2: the legacy value, "pool the highest id" (see CLIPTextConfig)
            pairs.append(("tokenizer", "<|endoftext|> id", tokenizer.eos_id, "text", "eos_token_id",
                          self.text.eos_token_id))
        for a, key_a, value_a, b, key_b, value_b in pairs:
            if value_a != value_b:
                raise ValueError(f"{name(a)}: {key_a} {value_a} differs from the {PARTS[b]}'s {key_b} {value_b} "
                                 f"({name(b)})")
        if tokenizer.max_length > self.text.max_position_embeddings:
            raise ValueError(f"{name('tokenizer')}: model_max_length (tokenizer_config.json) {tokenizer.max_length} is "
                             f"more than the max_position_embeddings {self.text.max_position_embeddings} of {name('text')}")
        if max(tokenizer.vocab.values()) >= self.text.vocab_size:
            raise ValueError(f"{name('tokenizer')}: vocab.json has ids up to {max(tokenizer.vocab.values())}, beyond "
                             f"the vocab_size {self.text.vocab_size} of {name('text')}")
        factor = 2 ** (len(self.vae.block_out_channels) - 1)
        if self.defaults.height % factor or self.defaults.width % factor:
            raise ValueError(f"{name('defaults')}: the default height and width ({self.defaults.height}, "
                             f"{self.defaults.width}) must be multiples of {factor}, the VAE's factor")


def build_network(config, name, flows=tuple(FLOWS), vae_encoder=True, optimus_tokenizers=(None, None)):
    """A freshly initialised network of a VDConfig: "unet" with the layer sets of `flows`, "vae" (decoder only
    unless `vae_encoder`), "text_encoder", "image_encoder" or "optimus". The checkpoint reader builds them as shapes on
    the meta device and fills them from the files."""
    if name == "unet":
        data = sorted({FLOWS[f][0] for f in flows})
        contexts = sorted({kind for f in flows for kind in FLOWS[f][1]})
        return DualContextUNet(config.unet, data=data, context=contexts)
    if name == "vae":
        return AutoencoderKL(config.vae, encoder=vae_encoder)
    if name == "text_encoder":
        return CLIPTextEncoder(config.text)
    if name == "image_encoder":
        return CLIPVisionEncoder(config.vision)
    if name == "optimus":
        if config.optimus is None:
            raise ValueError("this model has no Optimus config: the text flows need one (config.optimus)")
        return Optimus(config.optimus, *optimus_tokenizers)
    raise ValueError(f"no network {name!r}; the networks are unet, {', '.join(MODULES)}")


class VersatileDiffusion(nn.Module):
    """unet, vae, text_encoder, image_encoder, optimus (each None until built or read), plus the tokenizers and the
    DDIM sampler. `checkpoint` (a `minivd.checkpoint.Checkpoint`) is where missing networks are read from."""

    def __init__(self, config: VDConfig, tokenizer, optimus_tokenizers=(None, None), checkpoint=None):
        super().__init__()
        self.config, self.tokenizer, self.optimus_tokenizers = config, tokenizer, optimus_tokenizers
        self.checkpoint = checkpoint
        self.sampler = DDIM(config.scheduler)
        self.unet = self.vae = self.text_encoder = self.image_encoder = self.optimus = None
        # A zero-size buffer that moves and casts with the module: where networks read later go, in which dtype.
        self.register_buffer("placement", torch.empty(0), persistent=False)
        self.low_memory = None  # minivd.speed.LowMemory, set by enable_low_memory
        self.lock = threading.RLock()  # one generate or prepare at a time; other threads wait

    @property
    def device(self):
        return self.placement.device

    @property
    def dtype(self):
        return self.placement.dtype

    @property
    def vae_factor(self):
        """Pixels per latent pixel along each side: 2 ** (levels - 1) = 8 for VD."""
        return 2 ** (len(self.config.vae.block_out_channels) - 1)

    # ------------------------------------------------------------------------------------------------------------
    # The networks

    def new_module(self, name, flows=tuple(FLOWS), vae_encoder=True):
        """A freshly initialised network of this model's config (see `build_network`)."""
        return build_network(self.config, name, flows, vae_encoder, self.optimus_tokenizers)

    def build(self, flows=tuple(FLOWS)):
        """Create every network `flows` need, randomly initialised, on this model's device and dtype (training
        from scratch). Returns self."""
        names = {name for flow in flows for name in flow_parts(flow)[2]}
        for name in ("unet", *MODULES):
            if name == "unet" or name in names:
                setattr(self, name, self.new_module(name, flows).to(self.device, self.dtype))
        return self

    def missing(self, flow, vae_encoder=False):
        """The networks (and UNet layer sets) `flow` needs that this model does not hold."""
        data, contexts, modules = flow_parts(flow)
        missing = [name for name in modules if getattr(self, name) is None]
        if vae_encoder and self.vae is not None and self.vae.encoder is None:
            missing.append("vae encoder")
        if self.unet is None:
            missing.append("unet")
        else:
            missing += [f"unet data layers {data!r}"] if data not in self.unet.data else []
            missing += [f"unet context layers {c!r}" for c in contexts if c not in self.unet.context]
        return missing

    def prepare(self, flow, vae_encoder=False, drop_unused=False):
        """Make sure every network `flow` needs is here, reading what is missing from the checkpoint; optionally
        free the ones it does not use. The VAE is read decoder-only unless `vae_encoder` (image-variation with
        fidelity encodes its input). Thread-safe: a second caller waits. Returns self."""
        with self.lock:
            if self.missing(flow, vae_encoder):
                if self.checkpoint is None:
                    raise ValueError(f"{flow} needs {', '.join(self.missing(flow, vae_encoder))}, which this model "
                                     "does not hold and has no checkpoint to read from")
                self.checkpoint.read_into(self, flow, vae_encoder)
            if drop_unused:
                self.drop_unused(flow)
            if self.low_memory is not None:  # apply the opt-in memory options to what was just read, too
                self.low_memory.apply(self)
        return self

    def drop_unused(self, flow):
        """Free every network and UNet layer set `flow` does not use."""
        data, contexts, modules = flow_parts(flow)
        for name in MODULES:
            if name not in modules:
                setattr(self, name, None)
        for kind in [k for k in self.unet.data if k != data]:
            del self.unet.data[kind]
        for kind in [k for k in self.unet.context if k not in contexts]:
            del self.unet.context[kind]

    # ------------------------------------------------------------------------------------------------------------
    # What the pipeline asks of the networks

    def encode_text(self, prompts):
        """CLIP text context, VD-normalised: list of B strings -> (B, T, Cc)."""
        return self.text_encoder(self.tokenizer(prompts).to(self.device))

    def encode_image(self, images, token_weights=None):
        """CLIP image context, VD-normalised: list of B PIL images -> (B, N, Cc). token_weights: see CLIPVisionEncoder."""
        pixels = preprocess(images, self.config.image_preprocess).to(self.device, self.dtype)
        return self.image_encoder(pixels, token_weights)

    def unconditional_image(self):
        """The unconditional image: a uniform mid-gray picture (uint8 127), as in diffusers and the original code."""
        return Image.new("RGB", (512, 512), (127, 127, 127))

    def encode_images(self, pixels):
        """Images (B, 3, H, W) in [0, 1] -> diffusion latents (B, L, H/8, W/8) (the posterior mean, scaled)."""
        vae = self.vae
        if next(vae.parameters()).dtype == torch.float16:  # a float32 retry if float16 overflows (minivd.speed)
            return speed.float16_guarded(lambda x: images_to_latents(vae, x), pixels.to(self.device),
                                         [vae.encoder, vae.quant_conv], vae.cfg.force_upcast)
        return images_to_latents(vae, pixels.to(self.device, next(vae.parameters()).dtype))

    def decode_images(self, latents):
        """Diffusion latents (B, L, h, w) -> images (B, 3, 8h, 8w) in [0, 1], float32."""
        if self.low_memory is not None or next(self.vae.parameters()).dtype == torch.float16:
            return speed.decode_images(self, latents)  # tiles, and a float32 retry if float16 overflows
        return latents_to_images(self.vae, latents.to(next(self.vae.parameters()).dtype)).float()

    def decode_texts(self, z, generator=None, **options):
        """Optimus text latents (B, Z) -> B sentences (`Optimus.decode` options: max_length, temperature, ...)."""
        return self.optimus.decode(z, generator=generator, **options)

    # ------------------------------------------------------------------------------------------------------------
    # Opt-in speed and memory options (minivd.speed)

    def enable_low_memory(self, attention_slice=1024, vae_tile_size=512, offload=None):
        """Bound peak memory: attention in slices of `attention_slice` query rows, VAE decoding in tiles of
        `vae_tile_size` pixels (approximate at the seams) and, on a GPU, networks kept on the CPU and moved to the
        GPU only while they run (offload; on by default when this model's device is not the CPU). None switches
        one off. Returns self."""
        with self.lock:
            self.low_memory = speed.LowMemory(attention_slice, vae_tile_size, offload)
            self.low_memory.apply(self)
        return self

    def compile(self, **options):
        """torch.compile the UNet (nn.Module.compile: its calls go through the compiled graph; the first steps are
        slow while it compiles). Returns self."""
        if self.unet is None:
            raise ValueError("no UNet loaded yet: call model.prepare(flow) before compile()")
        self.unet.compile(**options)
        return self

    @property
    def storage_device(self):
        """Where networks read later are put: this model's device, or the CPU when offloading."""
        return torch.device("cpu") if self.low_memory is not None and self.low_memory.offload else self.device

    def __getstate__(self):  # copy.deepcopy and pickle: a lock cannot be copied, the copy gets its own
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state.pop("lock", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.lock = threading.RLock()

    def extra_repr(self):
        where = "built in memory" if self.checkpoint is None else f"from {self.checkpoint.folder}"
        return f"{self.config.description!r}, {where}, device={self.device}, dtype={self.dtype}"
