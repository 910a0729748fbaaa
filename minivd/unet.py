"""The dual-context UNet of Versatile Diffusion: global layers + data layers + context layers.

Legend for shape comments: B batch, C channels, H/W latent height/width, M context tokens, Cc context width (768).

VD splits one UNet into three kinds of layers (paper, Sec. 3.3 and Fig. 4):
    global layers   the timestep embedding, shared by every flow                     -> `DualContextUNet.time_embed`
    data layers     ResBlocks and resamplers, one set per OUTPUT modality            -> `DualContextUNet.data[kind]`
                    "image": conv ResBlocks on (B, 4, H/8, W/8) latents
                    "text":  "flat" ResBlocks on (B, 768, 1, 1) Optimus latents, features (B, C, 4, 1)
    context layers  cross-attention transformer blocks, one set per CONDITION modality -> `DualContextUNet.context[kind]`
                    "text": attends to CLIP-text tokens (B, 77, 768); "image": to CLIP-image tokens (B, 257, 768)

A flow is a choice of one data-layer set and one or more context-layer sets:
    text-to-image = data "image" + context "text"     image-variation = data "image" + context "image"
    image-to-text = data "text"  + context "image"    text-variation  = data "text"  + context "text"
    dual-guided   = data "image" + contexts "text" and "image", their residuals mixed at every context position.

Both data-layer sets share one topology, written down once in `unet_layout`: a flat list of data blocks
(conv_in, ResBlocks, resamplers, out) that says where skip connections are stored and consumed and after which
data block a context block runs (16 of them in VD). The forward pass is one loop over that list.
"""

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import checks
from .attention import ContextBlock
from .resnet import FlatLinear, FlatResBlock, Downsample, ResBlock, TimeEmbedding, Upsample

FLOWS = {  # flow -> (data layers, context layers)
    "text-to-image": ("image", ("text",)),
    "image-variation": ("image", ("image",)),
    "dual-guided": ("image", ("text", "image")),
    "image-to-text": ("text", ("image",)),
    "text-variation": ("text", ("text",)),
}


@dataclass
class UNetConfig:
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    attention_levels: tuple = (True, True, True, False)  # which levels have context blocks
    heads: int = 8  # diffusers calls this `attention_head_dim`; in SD-1.x/VD configs it is the number of heads
    context_dim: int = 768  # width of the CLIP context tokens
    norm_groups: int = 32
    norm_eps: float = 1e-5
    image_channels: int = 4  # image data layers: VAE latent channels
    text_channels: int = 768  # text data layers: Optimus latent size
    second_dim: int = 4  # text data layers: "pixels" per flat feature

    @classmethod
    def tiny(cls):
        return cls(block_out_channels=(32, 32, 64, 64), heads=2, context_dim=32, norm_groups=8, text_channels=32)

    def __post_init__(self):
        channels = checks.integers(self.block_out_channels, "block_out_channels", count=(1, 8))
        checks.integer(self.layers_per_block, "layers_per_block", high=64)
        if not isinstance(self.attention_levels, (list, tuple)) or len(self.attention_levels) != len(channels) \
                or not all(isinstance(a, bool) for a in self.attention_levels):
            raise ValueError(f"attention_levels (down_block_types) must give one level with or without context blocks "
                             f"per block_out_channels entry ({len(channels)}), got {self.attention_levels!r}")
        heads = checks.integer(self.heads, "heads (attention_head_dim)")
        groups = checks.integer(self.norm_groups, "norm_groups (norm_num_groups)")
        checks.integer(self.context_dim, "context_dim (cross_attention_dim)")
        checks.real(self.norm_eps, "norm_eps", positive=True)
        for key in ("image_channels", "text_channels", "second_dim"):
            checks.integer(getattr(self, key), f"{key} (in_channels)" if key != "second_dim" else key)
        for c, has_context in zip(channels, self.attention_levels):
            if c % groups or (has_context and c % heads):
                raise ValueError(f"block_out_channels {c} is not a multiple of norm_groups (norm_num_groups) {groups}"
                                 + (f" and heads (attention_head_dim) {heads}" if has_context else ""))

    @classmethod
    def from_hf_config(cls, image_cfg, text_cfg=None):
        """From diffusers' image_unet/config.json (UNet2DConditionModel) and, if given, text_unet/config.json
        (UNetFlatConditionModel). The two must describe the same topology; a setting minivd does not implement
        (`HF_SETTINGS`) is refused."""
        cfg = image_cfg if image_cfg is not None else text_cfg
        flat = image_cfg is None
        for key, allowed in HF_SETTINGS.items():
            if key in cfg:
                checks.choice(cfg[key], key, allowed[flat] if isinstance(allowed, list) else allowed)
        heads = cfg.get("num_attention_heads")
        heads = cfg.get("attention_head_dim", 8) if heads is None else heads
        if isinstance(heads, (list, tuple)):
            if len(set(heads)) != 1:
                raise ValueError(f"minivd needs one head count for every level, the config has {heads}")
            heads = heads[0]
        levels = len(checks.integers(cfg["block_out_channels"], "block_out_channels", count=(1, 8)))
        down, up = (BLOCK_TYPES[flat][key] for key in ("down", "up"))
        for key, kinds in (("down_block_types", down), ("up_block_types", up)):
            types = cfg.get(key, [kinds[0]] * levels)
            if not isinstance(types, (list, tuple)) or len(types) != levels or any(t not in kinds for t in types):
                raise ValueError(f"{key} must name one of {kinds} per level ({levels}), got {types!r}")
        attention = tuple(t == down[0] for t in cfg.get("down_block_types", [down[0]] * levels))
        if tuple(t == up[0] for t in cfg.get("up_block_types", [up[0]] * levels)) != attention[::-1]:
            raise ValueError("up_block_types must mirror down_block_types (context blocks at the same levels)")
        kwargs = dict(
            block_out_channels=tuple(cfg["block_out_channels"]),
            layers_per_block=cfg.get("layers_per_block", 2),
            attention_levels=attention,
            heads=heads,
            context_dim=cfg.get("cross_attention_dim", 768),
            norm_groups=cfg.get("norm_num_groups", 32),
            norm_eps=cfg.get("norm_eps", 1e-5),
        )
        if image_cfg is not None:
            kwargs["image_channels"] = image_cfg.get("in_channels", 4)
            if image_cfg.get("out_channels", kwargs["image_channels"]) != kwargs["image_channels"]:
                raise ValueError(f"out_channels {image_cfg['out_channels']!r} differs from in_channels "
                                 f"{kwargs['image_channels']!r} (the UNet predicts noise of its input's shape)")
        if text_cfg is not None:
            in_ch = text_cfg["in_channels"]
            kwargs["text_channels"] = in_ch[0] if isinstance(in_ch, (list, tuple)) and in_ch else in_ch
            if text_cfg.get("out_channels", in_ch) != in_ch:
                raise ValueError(f"text_unet out_channels {text_cfg['out_channels']!r} differs from in_channels {in_ch!r}")
            second = text_cfg.get("second_dim", 4)
            kwargs["second_dim"] = second[0] if isinstance(second, (list, tuple)) and second else second
        config = cls(**kwargs)  # checks the values
        if image_cfg is not None and text_cfg is not None:
            other = cls.from_hf_config(None, text_cfg)
            for key in ("block_out_channels", "layers_per_block", "attention_levels", "heads", "context_dim",
                        "norm_groups", "norm_eps"):
                if getattr(other, key) != getattr(config, key):
                    raise ValueError(f"image_unet and text_unet configs disagree on {key}")
        return config


# diffusers UNet settings and the values minivd implements (VD's): anything else is refused. [image, text] where the
# two UNets differ. Settings that change no computation here (dropout, sample_size, upcast_attention) are not listed.
HF_SETTINGS = {
    "act_fn": ("silu",), "addition_embed_type": (None,), "attention_type": ("default",),
    "center_input_sample": (False,), "class_embed_type": (None,), "conv_in_kernel": (3,), "conv_out_kernel": (3,),
    "cross_attention_norm": (None,), "downsample_padding": (1,), "dual_cross_attention": (False,),
    "encoder_hid_dim": (None,), "encoder_hid_dim_type": (None,), "flip_sin_to_cos": (True,), "freq_shift": (0,),
    "mid_block_only_cross_attention": (None, False), "mid_block_scale_factor": (1,),
    "mid_block_type": [("UNetMidBlock2DCrossAttn",), ("UNetMidBlockFlatCrossAttn",)], "num_class_embeds": (None,),
    "only_cross_attention": (False,), "resnet_out_scale_factor": (1.0,), "resnet_skip_time_act": (False,),
    "resnet_time_scale_shift": ("default",), "time_cond_proj_dim": (None,), "time_embedding_act_fn": (None,),
    "time_embedding_dim": (None,), "time_embedding_type": ("positional",), "timestep_post_act": (None,),
    "transformer_layers_per_block": (1,), "reverse_transformer_layers_per_block": (None,),
    "use_linear_projection": (False,),
}
BLOCK_TYPES = [  # [image, text]: (with context blocks, without)
    {"down": ("CrossAttnDownBlock2D", "DownBlock2D"), "up": ("CrossAttnUpBlock2D", "UpBlock2D")},
    {"down": ("CrossAttnDownBlockFlat", "DownBlockFlat"), "up": ("CrossAttnUpBlockFlat", "UpBlockFlat")},
]


@dataclass
class Slot:
    """One data block of the UNet and what happens around it."""

    kind: str  # "conv_in" | "res" | "down" | "up" | "out"
    in_channels: int
    out_channels: int
    stage: str = ""  # "down" | "mid" | "up": where a ResBlock sits
    level: int = 0  # UNet level (down: 0 = full resolution; up: 0 = lowest resolution, as diffusers counts)
    index: int = 0  # position of a ResBlock within its level
    skip_in: bool = False  # concatenate the last stored skip before this block
    skip_out: bool = False  # store the output as a skip
    context: int = None  # index of the context block that follows, if any


def unet_layout(cfg: UNetConfig):
    """The data blocks in execution order, with skip and context positions. For VD: 30 data blocks, 16 contexts."""
    chans, n, lpb = cfg.block_out_channels, len(cfg.block_out_channels), cfg.layers_per_block
    slots, skip_channels, ctx = [Slot("conv_in", 0, chans[0], skip_out=True)], [chans[0]], 0
    ch = chans[0]
    for level in range(n):  # down path
        for i in range(lpb):
            has_ctx = cfg.attention_levels[level]
            slots.append(Slot("res", ch, chans[level], "down", level, i, skip_out=True, context=ctx if has_ctx else None))
            ctx, ch = ctx + has_ctx, chans[level]
            skip_channels.append(ch)
        if level < n - 1:
            slots.append(Slot("down", ch, ch, "down", level, skip_out=True))
            skip_channels.append(ch)
    slots.append(Slot("res", ch, ch, "mid", 0, 0, context=ctx))  # mid block: ResBlock, context, ResBlock
    slots.append(Slot("res", ch, ch, "mid", 0, 1))
    ctx += 1
    for level in range(n):  # up path, lowest resolution first
        out_ch, has_ctx = chans[n - 1 - level], cfg.attention_levels[n - 1 - level]
        for i in range(lpb + 1):
            skip = skip_channels.pop()
            slots.append(Slot("res", ch + skip, out_ch, "up", level, i, skip_in=True, context=ctx if has_ctx else None))
            ctx, ch = ctx + has_ctx, out_ch
        if level < n - 1:
            slots.append(Slot("up", ch, ch, "up", level))
    slots.append(Slot("out", ch, 0))
    return slots


class OutBlock(nn.Module):
    """GroupNorm -> SiLU -> projection back to the latent (conv3x3 for images, FlatLinear for text)."""

    def __init__(self, channels, proj, groups, eps):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=eps)
        self.proj = proj

    def forward(self, x):
        return self.proj(F.silu(self.norm(x)))


class DataLayers(nn.Module):
    """One set of data layers: `blocks[i]` is the data block of `layout[i]`.

    kind "image": x (B, 4, H, W) -> (B, 4, H, W).  kind "text": x (B, 768, 1, 1) -> (B, 768, 1, 1).
    """

    def __init__(self, cfg: UNetConfig, kind: str):
        super().__init__()
        self.kind, self.layout = kind, unet_layout(cfg)
        temb, groups, eps, s = 4 * cfg.block_out_channels[0], cfg.norm_groups, cfg.norm_eps, cfg.second_dim
        blocks = []
        for slot in self.layout:
            cin, cout = slot.in_channels, slot.out_channels
            if kind == "image":
                block = {
                    "conv_in": lambda: nn.Conv2d(cfg.image_channels, cout, 3, padding=1),
                    "res": lambda: ResBlock(cin, cout, temb, groups, eps),
                    "down": lambda: Downsample(cout),
                    "up": lambda: Upsample(cout),
                    "out": lambda: OutBlock(cin, nn.Conv2d(cin, cfg.image_channels, 3, padding=1), groups, eps),
                }[slot.kind]()
            else:
                block = {
                    "conv_in": lambda: FlatLinear(cfg.text_channels, cout * s, cout),
                    "res": lambda: FlatResBlock(cin, cout, temb, groups, eps, s),
                    "down": lambda: FlatLinear(cout * s, cout * s, cout),
                    "up": lambda: FlatLinear(cout * s, cout * s, cout),
                    "out": lambda: OutBlock(cin, FlatLinear(cin * s, cfg.text_channels, cfg.text_channels), groups, eps),
                }[slot.kind]()
            blocks.append(block)
        self.blocks = nn.ModuleList(blocks)


class ContextLayers(nn.Module):
    """One set of context layers: the 16 cross-attention blocks for one condition modality."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        channels = [s.out_channels for s in unet_layout(cfg) if s.context is not None]
        self.blocks = nn.ModuleList(ContextBlock(c, cfg.heads, cfg.context_dim, cfg.norm_groups) for c in channels)


class DualContextUNet(nn.Module):
    """Global layers + any subset of the data layers {"image", "text"} and context layers {"text", "image"}.

    A model built for one flow holds only the layer sets that flow uses (see `FLOWS`); `add_layers` adds more.
    """

    def __init__(self, cfg: UNetConfig, data=("image",), context=("text",)):
        super().__init__()
        self.config = cfg
        self.time_embed = TimeEmbedding(cfg.block_out_channels[0], 4 * cfg.block_out_channels[0])
        self.data = nn.ModuleDict()
        self.context = nn.ModuleDict()
        self.add_layers(data, context)

    def add_layers(self, data=(), context=()):
        """Create (randomly initialised) layer sets not yet present; the weights loader fills them."""
        for kind in data:
            if kind not in self.data:
                self.data[kind] = DataLayers(self.config, kind)
        for kind in context:
            if kind not in self.context:
                self.context[kind] = ContextLayers(self.config)

    def forward(self, x, t, contexts, data="image"):
        """Predict the noise in x.

        x: (B, 4, H, W) image latents or (B, 768, 1, 1) text latents; t: (B,) timesteps;
        contexts: list of (kind, tokens (B, M, Cc), ratio) with ratios summing to 1. One entry = a plain flow;
        several = VD's mixing: at each context position i, out = h + sum_k ratio_k * (T_i^k(h, c_k) - h).
        Returns eps with the shape of x.
        """
        layers = self.data[data]
        temb = self.time_embed(t)  # (B, 4 C0)
        h, skips = x, []
        for slot, block in zip(layers.layout, layers.blocks):
            if slot.skip_in:
                h = torch.cat([h, skips.pop()], dim=1)  # (B, C + C_skip, H, W)
            if slot.kind == "res":
                h = block(h, temb)
            elif slot.kind == "up":
                h = block(h, size=skips[-1].shape[-2:])  # match the skip it meets next (odd sizes)
            else:
                h = block(h)
            if slot.context is not None:
                h = self.apply_context(slot.context, h, contexts)
            if slot.skip_out:
                skips.append(h)
        return h

    def apply_context(self, i, h, contexts):
        """Run context block i of each context's modality on h and mix their residuals by ratio."""
        if len(contexts) == 1:
            kind, tokens, _ = contexts[0]
            return self.context[kind].blocks[i](h, tokens)
        mixed = sum(ratio * (self.context[kind].blocks[i](h, tokens) - h) for kind, tokens, ratio in contexts)
        return mixed + h
