"""The two CLIP encoders (ViT-L/14) that turn a prompt or an image into the *context* that VD's context layers read.

Legend for shape comments:
    B batch, T text tokens (77), g patches per image side (image_size / patch_size = 16),
    N image tokens (1 class token + g*g patches = 257), C hidden width, P projection width (768 = the context dim).

Both towers are pre-LayerNorm transformers with the weights and names of openai/clip-vit-large-patch14 as stored by
Hugging Face (`CLIPTextModelWithProjection`, `CLIPVisionModelWithProjection`):
    text:  token + position embeddings -> 12 causal layers -> final_layer_norm -> text_projection        (B, 77, 768)
    image: [class; patch embeddings] + positions -> pre_layernorm -> 24 layers -> post_layernorm
           -> visual_projection                                                                           (B, 257, 768)
CLIP itself keeps one vector per input (the EOS token of the text, the class token of the image). VD keeps ALL the
tokens as the context and divides them by the length of that one pooled vector (h: the last layer's output):
    text context  = e / ||e[first EOS]||,    e = text_projection(final_layer_norm(h))     (B, T, P)
    image context = e / ||e[class token]||,  e = visual_projection(post_layernorm(h))     (B, N, P)

Also here: `preprocess`, CLIP's image preprocessing (RGB, resize the short side, centre crop, normalize).
"""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from minivd import checks
from minivd.attention import Attention

ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # CLIP's sigmoid approximation of GELU
    "gelu": F.gelu,
}


def _check_activation(name):
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ValueError(f"unsupported hidden_act {name!r}; supported: {', '.join(ACTIVATIONS)}")
    return name


def _check_sizes(cfg, sizes):
    """The sizes both towers have, and `sizes`: positive integers; heads that divide the width; a known activation."""
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "projection_dim", *sizes):
        checks.integer(getattr(cfg, key), key)
    checks.real(cfg.layer_norm_eps, "layer_norm_eps", positive=True)
    _check_activation(cfg.hidden_act)
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ValueError(f"hidden_size {cfg.hidden_size} is not divisible by {cfg.num_attention_heads} heads "
                         "(num_attention_heads)")


def _read_fields(cls, config, optional):
    """The dataclass fields of `cls` read from a transformers config dict; a missing key is an error unless it has
    a fallback in `optional` (transformers always writes the others, and its defaults differ from ViT-L/14's)."""
    missing = [name for name in cls.__dataclass_fields__ if name not in config and name not in optional]
    if missing:
        raise ValueError(f"{cls.__name__}: the config has no {', '.join(missing)}")
    return {name: config.get(name, optional.get(name)) for name in cls.__dataclass_fields__}


def clip_tower_config(config, tower):
    """The "text_config" / "vision_config" of a transformers CLIPModel config.json as transformers reads it: updated
    by the "text_config_dict" / "vision_config_dict" that older files (openai's) also carry, with the model's
    projection_dim (CLIPModel sizes both projections by the top-level value). A one-tower config is returned as is."""
    sub = {**config.get(f"{tower}_config", config), **config.get(f"{tower}_config_dict", {})}
    if "projection_dim" in config:
        sub["projection_dim"] = config["projection_dim"]
    return sub



@dataclass
class CLIPTextConfig:
    vocab_size: int = 49408
    max_position_embeddings: int = 77
    hidden_size: int = 768
    intermediate_size: int = 3072  # MLP width
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    projection_dim: int = 768
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    # Which token is pooled. 2 is the legacy value of the OpenAI/VD configs, which transformers reads as "the
    # position of the highest id" (<|endoftext|> is the last vocab entry); any other value: its first occurrence.
    eos_token_id: int = 2

    @classmethod
    def tiny(cls):
        """2 layers of width 32: for tests and the demo model (vocab 1000 = `minivd.tools.vocab.demo_tokenizer`)."""
        return cls(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, projection_dim=32)

    @classmethod
    def from_hf_config(cls, config):
        """Build from a transformers CLIPTextModelWithProjection config.json dict (e.g. versatile-diffusion
        text_encoder/), or a full CLIPModel config (its "text_config" is used)."""
        config = config.get("text_config", config)
        # a config without eos_token_id means the current transformers default, <|endoftext|> = 49407
        return cls(**_read_fields(cls, config, optional={"eos_token_id": 49407}))

    def __post_init__(self):
        _check_sizes(self, ("vocab_size", "max_position_embeddings"))
        checks.integer(self.eos_token_id, "eos_token_id", low=0, high=self.vocab_size - 1)


@dataclass
class CLIPVisionConfig:
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    hidden_size: int = 1024
    intermediate_size: int = 4096  # MLP width
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    projection_dim: int = 768
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @classmethod
    def tiny(cls):
        """2 layers of width 32 on 32x32 images cut into 8x8 patches (17 tokens): for tests and the demo model."""
        return cls(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, projection_dim=32)

    @classmethod
    def from_hf_config(cls, config):
        """Build from a transformers CLIPVisionModelWithProjection config.json dict (e.g. versatile-diffusion
        image_encoder/), or a full CLIPModel config (its "vision_config" is used)."""
        config = config.get("vision_config", config)
        return cls(**_read_fields(cls, config, optional={"num_channels": 3}))

    def __post_init__(self):
        _check_sizes(self, ("image_size", "patch_size"))
        checks.integer(self.num_channels, "num_channels", low=3, high=3)  # RGB pixels
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")


class MLP(nn.Module):
    """fc1 -> activation -> fc2."""

    def __init__(self, dim, hidden, act):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = ACTIVATIONS[act]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPLayer(nn.Module):
    """One pre-LayerNorm transformer layer: x += self_attn(LN x); x += mlp(LN x)."""

    def __init__(self, cfg):
        super().__init__()
        dim, heads = cfg.hidden_size, cfg.num_attention_heads
        self.layer_norm1 = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.self_attn = Attention(dim, heads, dim // heads, qkv_bias=True)
        self.layer_norm2 = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.mlp = MLP(dim, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, x, causal=False):
        """x: (B, T, C) -> (B, T, C). causal: each token sees only itself and the tokens before it (text)."""
        x = x + self.self_attn(self.layer_norm1(x), causal=causal)
        x = x + self.mlp(self.layer_norm2(x))
        return x


class CLIPTextEncoder(nn.Module):
    """CLIP text tower: token ids -> VD's text context, all tokens projected and scaled by the pooled EOS token."""

    def __init__(self, cfg=None):
        super().__init__()
        self.config = cfg = cfg or CLIPTextConfig()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.layers = nn.ModuleList(CLIPLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.text_projection = nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False)

    def eos_positions(self, input_ids):
        """input_ids: (B, T) -> (B,) index of the token CLIP pools (the first <|endoftext|>)."""
        if self.config.eos_token_id == 2:  # legacy configs: the highest id, i.e. <|endoftext|> (argmax takes the first)
            return input_ids.argmax(dim=-1)
        is_eos = input_ids == self.config.eos_token_id  # (B, T)
        if not is_eos.any(dim=-1).all():
            raise ValueError(f"every row of input_ids must contain the EOS id {self.config.eos_token_id}")
        return is_eos.int().argmax(dim=-1)

    def forward(self, input_ids):
        """input_ids: (B, T) token ids from `minivd.tokenizer.CLIPTokenizer`, T <= 77 -> context (B, T, P)."""
        cfg = self.config
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be an integer tensor (B, T), got {type(input_ids).__name__}")
        if input_ids.dim() != 2 or input_ids.is_floating_point():
            raise ValueError(f"input_ids must be integers (B, T), got {input_ids.dtype} {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if T > cfg.max_position_embeddings:
            raise ValueError(f"input_ids has {T} tokens, max_position_embeddings is {cfg.max_position_embeddings}")
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= cfg.vocab_size):
            raise ValueError(f"token ids must lie in [0, {cfg.vocab_size}), got [{input_ids.min()}, {input_ids.max()}]")

        x = self.token_embedding(input_ids) + self.position_embedding.weight[:T]  # (B, T, C)
        for layer in self.layers:
            x = layer(x, causal=True)
        tokens = self.text_projection(self.final_layer_norm(x))  # (B, T, P)
        pooled = tokens[torch.arange(B, device=tokens.device), self.eos_positions(input_ids)]  # (B, P)
        return tokens / pooled.norm(dim=-1)[:, None, None]


class CLIPVisionEncoder(nn.Module):
    """CLIP vision tower (ViT): pixels -> VD's image context, all tokens projected and scaled by the class token."""

    def __init__(self, cfg=None):
        super().__init__()
        self.config = cfg = cfg or CLIPVisionConfig()
        C = cfg.hidden_size
        num_tokens = 1 + (cfg.image_size // cfg.patch_size) ** 2
        self.class_embedding = nn.Parameter(nn.init.normal_(torch.empty(C), std=C**-0.5))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, C, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(num_tokens, C)
        self.pre_layernorm = nn.LayerNorm(C, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(CLIPLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.post_layernorm = nn.LayerNorm(C, eps=cfg.layer_norm_eps)
        self.visual_projection = nn.Linear(C, cfg.projection_dim, bias=False)

    def forward(self, pixel_values, token_weights=None):
        """pixel_values: (B, 3, S, S) from `preprocess`, S = image_size -> context (B, N, P), N = 1 + (S/patch)^2.

        token_weights: optional (N,) or (B, N) weights of the input embeddings (a mask over the patches, as the
        original's multi-context blending applies it; see minivd.extensions.mask_token_weights)."""
        cfg = self.config
        want = f"(B, {cfg.num_channels}, {cfg.image_size}, {cfg.image_size})"
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"pixel_values must be a tensor {want}, got {type(pixel_values).__name__}")
        if pixel_values.shape[1:] != (cfg.num_channels, cfg.image_size, cfg.image_size):
            raise ValueError(f"pixel_values must be {want}, got {tuple(pixel_values.shape)}")
        B = pixel_values.shape[0]

        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (B, C, g, g)
        patches = patches.flatten(2).transpose(1, 2)  # (B, C, g, g) -> (B, g*g, C)
        class_token = self.class_embedding.expand(B, 1, -1)  # (B, 1, C)
        x = torch.cat([class_token, patches], dim=1) + self.position_embedding.weight  # (B, N, C)
        if token_weights is not None:
            x = x * token_weights.to(x).view(-1, x.shape[1], 1)  # (B or 1, N, 1) broadcasts over C
        x = self.pre_layernorm(x)
        for layer in self.layers:
            x = layer(x)
        tokens = self.visual_projection(self.post_layernorm(x))  # (B, N, P)
        return tokens / tokens[:, :1].norm(dim=-1, keepdim=True)


# --- Image preprocessing ----------------------------------------------------------------------------------------

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ImagePreprocessConfig:
    size: int = 224  # the short side after resizing
    crop_size: int = None  # side of the centre crop; None: the same as size
    mean: tuple = OPENAI_CLIP_MEAN
    std: tuple = OPENAI_CLIP_STD

    def __post_init__(self):
        if self.crop_size is None:
            self.crop_size = self.size
        size = checks.integer(self.size, "size (shortest_edge)")
        crop = checks.integer(self.crop_size, "crop_size")
        if crop > size:
            raise ValueError(f"crop_size {crop} is larger than size (shortest_edge) {size}, the resized short side")
        if size > 4 * crop:  # the resize would cost memory for pixels the crop throws away
            raise ValueError(f"size (shortest_edge) {size} is more than 4 x crop_size {crop}")
        for key in ("mean", "std"):
            values = getattr(self, key)
            if not isinstance(values, (list, tuple)) or len(values) != 3:
                raise ValueError(f"{key} (image_{key}) must be 3 numbers (R, G, B), got {values!r}")
            for i, v in enumerate(values):
                checks.real(v, f"{key}[{i}] (image_{key})", positive=key == "std")

    @classmethod
    def from_hf_config(cls, config):
        """Build from a preprocessor_config.json dict (e.g. versatile-diffusion image_feature_extractor/), old
        ("size": 224) or new ("size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}) style."""
        size, crop = config.get("size", 224), config.get("crop_size", None)
        if isinstance(size, dict):
            if set(size) != {"shortest_edge"}:
                raise ValueError(f"only short-side resizing ('shortest_edge') is supported, got size={size}")
            size = size["shortest_edge"]
        if isinstance(crop, dict):
            if set(crop) != {"height", "width"} or crop["height"] != crop["width"]:
                raise ValueError(f"only square centre crops are supported, got crop_size={crop}")
            crop = crop["height"]
        for flag in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"):
            if checks.flag(config.get(flag, True), flag) is False:
                raise ValueError(f"{flag}=false is not supported (CLIP always resizes, crops, rescales, normalizes)")
        if config.get("resample", 3) != 3 or isinstance(config.get("resample"), bool):
            raise ValueError(f"only bicubic resampling (resample=3) is supported, got {config['resample']!r}")
        if abs(checks.real(config.get("rescale_factor", 1 / 255), "rescale_factor") - 1 / 255) > 1e-12:
            raise ValueError(f"only rescale_factor 1/255 is supported, got {config['rescale_factor']}")
        mean, std = config.get("image_mean", OPENAI_CLIP_MEAN), config.get("image_std", OPENAI_CLIP_STD)
        return cls(size=size, crop_size=crop, mean=tuple(mean) if isinstance(mean, list) else mean,
                   std=tuple(std) if isinstance(std, list) else std)


def _to_rgb(image):
    """Drop transparency by painting the image over white (as transformers does), then RGB."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def _resize_and_crop(image, size, crop):
    """PIL image -> uint8 array (crop, crop, 3): bicubic resize so the short side is `size`, then centre crop."""
    width, height = image.size
    long_side = int(size * max(width, height) / min(width, height))  # truncated, not rounded (640x480 -> 298)
    new_size = (size, long_side) if width <= height else (long_side, size)  # PIL sizes are (width, height)
    pixels = np.asarray(_to_rgb(image).resize(new_size, Image.Resampling.BICUBIC))  # (H', W', 3)
    top, left = (new_size[1] - crop) // 2, (new_size[0] - crop) // 2
    if top < 0 or left < 0:
        raise ValueError(f"crop_size {crop} is larger than the resized image {new_size[0]}x{new_size[1]}")
    return pixels[top : top + crop, left : left + crop]


def preprocess(images, config=None):
    """images: a PIL.Image.Image or a list of B of them -> pixel_values (B, 3, crop, crop) float32 for
    `CLIPVisionEncoder`: RGB, short side resized to `size` (bicubic), centre crop, /255, (x - mean) / std."""
    config = config or ImagePreprocessConfig()
    if isinstance(images, Image.Image):
        images = [images]
    if not isinstance(images, (list, tuple)):
        raise TypeError(f"images must be a PIL.Image.Image or a list of them, got {type(images).__name__}")
    if not images:
        raise ValueError("images is an empty list")
    for image in images:
        if not isinstance(image, Image.Image):
            raise TypeError(f"images must be PIL.Image.Image, got {type(image).__name__} "
                            "(convert arrays with PIL.Image.fromarray)")
    pixels = np.stack([_resize_and_crop(image, config.size, config.crop_size) for image in images])  # (B, H, W, 3)
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255  # (B, H, W, 3) -> (B, 3, H, W)
    mean = torch.tensor(config.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(config.std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x - mean) / std
