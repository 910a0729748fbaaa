"""The building blocks of VD's *data layers*: ResBlocks and resamplers, in an image (conv) and a text ("flat") kind.

Legend for shape comments: B batch, C channels, H/W height/width, S = 4 the "pixels" of a flat text feature.

Image data layers work on (B, C, H, W) with 3x3 convs. Text data layers reuse the same UNet topology on a
768-d text latent: a feature is (B, C, 4, 1), flattened to 4C numbers, and every conv becomes a fully connected
layer (a 1x1 conv over 4C channels). Flat index = c * 4 + s.

The time embedding (`TimeEmbedding`) is VD's *global layer*: shared by every flow.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of the timesteps t: (B,) -> (B, dim), laid out as [cos | sin]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class TimeEmbedding(nn.Module):
    """Global layer: sinusoid(C0) -> Linear(C0, 4 C0) -> SiLU -> Linear(4 C0, 4 C0)."""

    def __init__(self, base_channels, embed_dim):
        super().__init__()
        self.base_channels = base_channels
        self.linear_1 = nn.Linear(base_channels, embed_dim)
        self.linear_2 = nn.Linear(embed_dim, embed_dim)

    def forward(self, t):
        """t: (B,) timesteps -> (B, embed_dim)."""
        emb = timestep_embedding(t, self.base_channels).to(self.linear_1.weight.dtype)
        return self.linear_2(F.silu(self.linear_1(emb)))


class ResBlock(nn.Module):
    """GN -> SiLU -> conv3x3 (+ Linear(SiLU(temb))) -> GN -> SiLU -> conv3x3, plus a (1x1-projected) shortcut.

    `temb_channels=None` gives the VAE's ResBlock, which has no time input.
    """

    def __init__(self, in_channels, out_channels, temb_channels=None, groups=32, eps=1e-5, kernel_size=3):
        super().__init__()
        pad = kernel_size // 2
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size, padding=pad)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels else None
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size, padding=pad)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x, temb=None):
        """x: (B, Cin, H, W), temb: (B, T) or None -> (B, Cout, H, W)."""
        # SiLU runs in place on the norm's fresh output, and h is rebound before each conv, so at most three
        # feature maps are alive at once (x, h and the conv's output): the VAE decoder's peak at full size.
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = F.silu(self.norm2(h), inplace=True)
        h = self.conv2(h)
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return shortcut + h


class FlatResBlock(ResBlock):
    """The text data layers' ResBlock: the same computation on (B, C, 4, 1) seen as 4C channels of one pixel,
    so each 'conv' is a 1x1 conv (a Linear over the 4C numbers). GroupNorm groups span 4C channels."""

    def __init__(self, in_channels, out_channels, temb_channels, groups=32, eps=1e-5, second_dim=4):
        # kernel 1: all mixing is across the 4C channels of the single pixel
        super().__init__(in_channels * second_dim, out_channels * second_dim, temb_channels, groups, eps, kernel_size=1)
        self.out_channels = out_channels

    def forward(self, x, temb=None):
        """x: (B, Cin, 4, 1) -> (B, Cout, 4, 1)."""
        B = x.shape[0]
        h = super().forward(x.reshape(B, -1, 1, 1), temb)  # (B, Cin, 4, 1) -> (B, 4 Cin, 1, 1)
        return h.view(B, self.out_channels, -1, 1)  # (B, 4 Cout, 1, 1) -> (B, Cout, 4, 1)


class Downsample(nn.Module):
    """Halve H and W with a stride-2 conv3x3. padding=0 pads right/bottom only (the VAE's variant)."""

    def __init__(self, channels, padding=1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x, temb=None):
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Double H and W (nearest neighbour, or to `size` when a skip connection needs it), then a conv3x3."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, temb=None, size=None):
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


class FlatLinear(nn.Linear):
    """A Linear on flat text features: (B, Cin, S, 1) seen as Cin*S numbers -> (B, Cout, S', 1).

    Serves as the text data layers' conv_in (768 -> 320*4), down/upsamplers (square 4C -> 4C, no change of shape)
    and conv_out (320*4 -> 768)."""

    def __init__(self, in_features, out_features, out_channels):
        super().__init__(in_features, out_features)
        self.out_channels = out_channels

    def forward(self, x, temb=None, size=None):
        """x: (B, Cin, S, 1) -> (B, Cout, out_features / Cout, 1)."""
        return super().forward(x.reshape(x.shape[0], -1)).view(x.shape[0], self.out_channels, -1, 1)
