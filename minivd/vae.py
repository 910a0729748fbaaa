"""The image VAE (AutoencoderKL, "kl-f8") that maps pixels to the 4-channel latent the image data layers denoise.

Legend for shape comments:
    B batch, C channels, H/W image height/width, h/w latent height/width (H/8, W/8 for the VD VAE),
    L latent channels (4), N = H*W tokens of the mid-block attention.

The VAE is frozen in VD and shared by every flow whose output (or input) is an image:
    encoder: image (B, 3, H, W) in [-1, 1] -> (mean, logvar) of a diagonal Gaussian, each (B, L, h, w)
    decoder: latent (B, L, h, w) -> image (B, 3, H, W), roughly in [-1, 1]
The diffusion model works on *scaled* latents z * scaling_factor (0.18215), which have about unit variance.
`encode`/`decode` work on unscaled latents; `images_to_latents`/`latents_to_images` apply the scale and the
[0, 1] <-> [-1, 1] pixel mapping, which is what a pipeline wants.

Each level of the encoder halves H and W (except the last), each level of the decoder doubles them, so
4 levels give the factor 8. Both have a middle block: ResBlock, single-head self-attention over the pixels, ResBlock.
Parameter names follow the diffusers AutoencoderKL checkpoint. `AutoencoderKL(cfg, encoder=False)` builds the decoder
only, for flows that never encode an image (text-to-image, ...). Tiled decoding and the float16 overflow guard are in
minivd/speed.py.
"""

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from minivd import checks
from minivd.attention import Attention
from minivd.resnet import Downsample, ResBlock, Upsample


@dataclass
class VAEConfig:
    block_out_channels: list = field(default_factory=lambda: [128, 256, 512, 512])
    layers_per_block: int = 2  # ResBlocks per encoder level (the decoder has one more per level)
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    norm_groups: int = 32
    norm_eps: float = 1e-6
    scaling_factor: float = 0.18215
    use_quant_conv: bool = True  # 1x1 conv on the (mean, logvar) moments
    use_post_quant_conv: bool = True  # 1x1 conv on the latent before decoding
    mid_block_attention: bool = True
    force_upcast: bool = True  # run in float32 when the weights are float16 (diffusers' name for the same switch)

    @classmethod
    def tiny(cls):
        """Two levels of 32/64 channels: latents are H/2 x W/2. For tests and tutorials."""
        return cls(block_out_channels=[32, 64], layers_per_block=2, norm_groups=8)

    def __post_init__(self):
        channels = checks.integers(self.block_out_channels, "block_out_channels", count=(1, 8))
        checks.integer(self.layers_per_block, "layers_per_block", high=64)
        for key in ("in_channels", "out_channels"):  # pixels in and out are RGB
            checks.integer(getattr(self, key), key, low=3, high=3)
        checks.integer(self.latent_channels, "latent_channels")
        groups = checks.integer(self.norm_groups, "norm_groups (norm_num_groups)")
        checks.real(self.norm_eps, "norm_eps", positive=True)
        checks.real(self.scaling_factor, "scaling_factor", positive=True)
        for key in ("use_quant_conv", "use_post_quant_conv", "mid_block_attention", "force_upcast"):
            checks.flag(getattr(self, key), key)
        if any(c % groups for c in channels):
            raise ValueError(f"block_out_channels {list(channels)} must be multiples of norm_groups (norm_num_groups) "
                             f"{groups}")

    @classmethod
    def from_hf_config(cls, config):
        """Build from a diffusers AutoencoderKL config.json dict (e.g. shi-labs/versatile-diffusion vae/)."""
        if config.get("act_fn", "silu") != "silu":
            raise ValueError(f"only act_fn 'silu' is supported, got {config['act_fn']!r}")
        levels = len(checks.integers(config["block_out_channels"], "block_out_channels", count=(1, 8)))
        for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            types = config.get(key, [kind] * levels)
            if not isinstance(types, (list, tuple)) or len(types) != levels or any(t != kind for t in types):
                raise ValueError(f"{key} must be {kind} for each of the {levels} levels, got {types!r}")
        if config.get("shift_factor") is not None or config.get("latents_mean") is not None:
            raise ValueError("latent shift_factor / latents_mean are not supported (VD uses scaling only)")
        default = cls()
        return cls(
            block_out_channels=list(config["block_out_channels"]),
            layers_per_block=config["layers_per_block"],
            in_channels=config.get("in_channels", default.in_channels),
            out_channels=config.get("out_channels", default.out_channels),
            latent_channels=config.get("latent_channels", default.latent_channels),
            norm_groups=config.get("norm_num_groups", default.norm_groups),
            scaling_factor=config.get("scaling_factor", default.scaling_factor),
            use_quant_conv=config.get("use_quant_conv", True),
            use_post_quant_conv=config.get("use_post_quant_conv", True),
            mid_block_attention=config.get("mid_block_add_attention", True),
            force_upcast=config.get("force_upcast", True),
        )


class SpatialSelfAttention(Attention):
    """The VAE mid-block attention: GroupNorm, single-head self-attention with the H*W pixels as tokens,
    plus the input (residual). Inherits to_q/to_k/to_v/to_out from `Attention`; adds `group_norm`."""

    def __init__(self, channels, groups, eps):
        super().__init__(channels, heads=1, head_dim=channels, qkv_bias=True)
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)

    def forward(self, x):
        """x: (B, C, H, W) -> (B, C, H, W)."""
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, N, C)
        h = super().forward(h)
        h = h.transpose(1, 2).reshape(B, C, H, W)  # (B, N, C) -> (B, C, H, W)
        return x + h


class MidBlock(nn.Module):
    """ResBlock -> [self-attention] -> ResBlock, at the lowest resolution, keeping C channels."""

    def __init__(self, channels, groups, eps, attention=True):
        super().__init__()
        self.resnets = nn.ModuleList([ResBlock(channels, channels, None, groups, eps) for _ in range(2)])
        self.attentions = nn.ModuleList([SpatialSelfAttention(channels, groups, eps)] if attention else [])

    def forward(self, x):
        """x: (B, C, h, w) -> (B, C, h, w)."""
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class Level(nn.Module):
    """One resolution level: a few ResBlocks, then a downsampler (encoder), an upsampler (decoder) or neither
    (the last level). The resampler sits in a one-element list so the names match diffusers."""

    def __init__(self, in_channels, out_channels, num_resnets, groups, eps, resample=None):
        super().__init__()
        channels = [in_channels] + [out_channels] * num_resnets
        self.resnets = nn.ModuleList(
            [ResBlock(channels[i], channels[i + 1], None, groups, eps) for i in range(num_resnets)]
        )
        # the VAE's downsampler pads right/bottom only (padding=0)
        self.downsamplers = nn.ModuleList([Downsample(out_channels, padding=0)] if resample == "down" else [])
        self.upsamplers = nn.ModuleList([Upsample(out_channels)] if resample == "up" else [])

    def forward(self, x):
        """x: (B, Cin, H, W) -> (B, Cout, H', W') with H' = H/2 (down), 2H (up) or H."""
        for resnet in self.resnets:
            x = resnet(x)
        for resampler in [*self.downsamplers, *self.upsamplers]:
            x = resampler(x)
        return x


class Encoder(nn.Module):
    """conv_in -> levels (downsampling after all but the last) -> mid-block -> GN, SiLU, conv_out to 2L channels."""

    def __init__(self, cfg):
        super().__init__()
        chans, groups, eps = cfg.block_out_channels, cfg.norm_groups, cfg.norm_eps
        self.conv_in = nn.Conv2d(cfg.in_channels, chans[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        for i, out_ch in enumerate(chans):
            in_ch = chans[max(i - 1, 0)]
            last = i == len(chans) - 1
            self.down_blocks.append(Level(in_ch, out_ch, cfg.layers_per_block, groups, eps, None if last else "down"))
        self.mid_block = MidBlock(chans[-1], groups, eps, cfg.mid_block_attention)
        self.conv_norm_out = nn.GroupNorm(groups, chans[-1], eps=eps)
        self.conv_out = nn.Conv2d(chans[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x):
        """x: (B, 3, H, W) -> (B, 2L, h, w): the mean and log-variance stacked on channels."""
        x = self.conv_in(x)
        for level in self.down_blocks:
            x = level(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """conv_in -> mid-block -> levels from the deepest (upsampling after all but the last) -> GN, SiLU, conv_out."""

    def __init__(self, cfg):
        super().__init__()
        chans, groups, eps = cfg.block_out_channels[::-1], cfg.norm_groups, cfg.norm_eps
        self.conv_in = nn.Conv2d(cfg.latent_channels, chans[0], 3, padding=1)
        self.mid_block = MidBlock(chans[0], groups, eps, cfg.mid_block_attention)
        self.up_blocks = nn.ModuleList()
        for i, out_ch in enumerate(chans):
            in_ch = chans[max(i - 1, 0)]
            last = i == len(chans) - 1
            self.up_blocks.append(Level(in_ch, out_ch, cfg.layers_per_block + 1, groups, eps, None if last else "up"))
        self.conv_norm_out = nn.GroupNorm(groups, chans[-1], eps=eps)
        self.conv_out = nn.Conv2d(chans[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z):
        """z: (B, L, h, w) -> (B, 3, H, W)."""
        x = self.mid_block(self.conv_in(z))
        for level in self.up_blocks:
            x = level(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    """kl-f8 VAE. `encode` gives latent moments, `decode` maps an (unscaled) latent back to pixels.

    encoder=False / decoder=False build only the other half (its parameters, and so its state-dict keys, do not
    exist): text-to-image, image-variation and dual-guided only decode, so they need no encoder.
    """

    def __init__(self, cfg, encoder=True, decoder=True):
        super().__init__()
        if not (encoder or decoder):
            raise ValueError("an AutoencoderKL needs its encoder, its decoder or both")
        self.cfg = cfg
        L = cfg.latent_channels
        self.encoder = Encoder(cfg) if encoder else None
        self.decoder = Decoder(cfg) if decoder else None
        self.quant_conv = nn.Conv2d(2 * L, 2 * L, 1) if encoder and cfg.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(L, L, 1) if decoder and cfg.use_post_quant_conv else None

    @property
    def downscale(self):
        """Pixels per latent along each side: 2 ** (levels - 1) = 8 for VD."""
        return 2 ** (len(self.cfg.block_out_channels) - 1)

    def weight_prefixes(self):
        """The state-dict prefixes of the halves this VAE has (for loading a full VAE file into a half)."""
        encoder = ["encoder.", "quant_conv."] if self.encoder is not None else []
        decoder = ["decoder.", "post_quant_conv."] if self.decoder is not None else []
        return encoder + decoder

    def _check_shape(self, x, channels, what):
        if x.ndim != 4 or x.shape[1] != channels:
            raise ValueError(f"{what} must be (B, {channels}, H, W), got shape {tuple(x.shape)}")

    def encode(self, x):
        """x: (B, 3, H, W) images in [-1, 1] -> (mean, logvar), each (B, L, H/8, W/8).

        The latent is Gaussian with these moments; VD uses `mean` (no sampling). These latents are UNSCALED:
        the caller multiplies by `cfg.scaling_factor` before diffusion (see `images_to_latents`).
        H and W should be multiples of 8.
        """
        if self.encoder is None:
            raise ValueError("this VAE was built without its encoder (AutoencoderKL(cfg, encoder=False))")
        self._check_shape(x, self.cfg.in_channels, "images")
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)  # (B, 2L, h, w) -> 2 x (B, L, h, w)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z):
        """z: (B, L, h, w) UNSCALED latents (divide diffusion latents by `cfg.scaling_factor` first)
        -> (B, 3, 8h, 8w) images, roughly in [-1, 1]."""
        if self.decoder is None:
            raise ValueError("this VAE was built without its decoder (AutoencoderKL(cfg, decoder=False))")
        self._check_shape(z, self.cfg.latent_channels, "latents")
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)


def latents_to_images(vae, latents):
    """Diffusion latents (B, L, h, w), scaled by scaling_factor -> images (B, 3, 8h, 8w) in [0, 1]."""
    images = vae.decode(latents / vae.cfg.scaling_factor)
    return to_unit_range(images)


def to_unit_range(images):
    """[-1, 1] -> [0, 1], clamped. An inf (an overflow, a bad weight) becomes NaN, not a saturated 0 or 1, so that
    whoever checks the result sees it."""
    return (images / 2 + 0.5).nan_to_num(nan=float("nan"), posinf=float("nan"), neginf=float("nan")).clamp(0, 1)


def images_to_latents(vae, images):
    """Images (B, 3, H, W) in [0, 1] -> diffusion latents (B, L, H/8, W/8): the posterior mean, scaled."""
    if images.numel() and (images.min() < 0 or images.max() > 1):
        raise ValueError(
            f"images must be in [0, 1], got values in [{images.min().item():.3g}, {images.max().item():.3g}]"
        )
    mean, _ = vae.encode(2 * images - 1)
    return mean * vae.cfg.scaling_factor
