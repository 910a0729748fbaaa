"""Attention and the transformer block that VD uses as a *context layer*.

Legend for shape comments:
    B batch, N query tokens (pixels H*W, or the 4 "pixels" of the flat text UNet), M context tokens,
    C channels, nh heads, hd head dim (C = nh * hd).

A context layer (`ContextBlock`) is what the paper swaps between modalities: the image data layers keep their
ResBlocks, and a flow plugs in the CLIP-text or the CLIP-image set of context blocks at the same 16 positions.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class Attention(nn.Module):
    """Multi-head attention: softmax(q k^T / sqrt(hd)) v, then an output projection.

    Self-attention when `context` is None, cross-attention otherwise. Used by the context blocks (8 heads, no
    q/k/v bias) and by the VAE's mid-block (1 head, with bias).
    """

    def __init__(self, dim, heads, head_dim, context_dim=None, qkv_bias=False):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.to_q = nn.Linear(dim, inner, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=qkv_bias)
        self.to_out = nn.Linear(inner, dim)
        self.probs_hook = None  # set by minivd.hooks.capture_attention; None = fast path

    def forward(self, x, context=None, causal=False):
        """x: (B, N, C), context: (B, M, Cc) or None -> (B, N, C). causal: token i sees tokens <= i (CLIP text)."""
        context = x if context is None else context
        B, N, _ = x.shape
        q = self.to_q(x).view(B, N, self.heads, self.head_dim).transpose(1, 2)  # (B, nh, N, hd)
        k = self.to_k(context).view(B, -1, self.heads, self.head_dim).transpose(1, 2)  # (B, nh, M, hd)
        v = self.to_v(context).view(B, -1, self.heads, self.head_dim).transpose(1, 2)  # (B, nh, M, hd)
        if self.probs_hook is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # the same math, fused
        else:
            scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)  # (B, nh, N, M)
            if causal:
                future = torch.ones(N, k.shape[2], dtype=torch.bool, device=x.device).triu(1)
                scores = scores.masked_fill(future, float("-inf"))
            probs = scores.softmax(dim=-1)
            self.probs_hook(self, probs)
            out = probs @ v
        out = out.transpose(1, 2).reshape(B, N, self.heads * self.head_dim)  # (B, N, nh*hd)
        return self.to_out(out)


class FeedForward(nn.Module):
    """GEGLU feed-forward: Linear C -> 8C, split into value and gate, value * gelu(gate), Linear 4C -> C."""

    def __init__(self, dim, mult=4):
        super().__init__()
        self.proj_in = nn.Linear(dim, 2 * mult * dim)
        self.proj_out = nn.Linear(mult * dim, dim)

    def forward(self, x):
        value, gate = self.proj_in(x).chunk(2, dim=-1)
        return self.proj_out(value * F.gelu(gate))


class TransformerBlock(nn.Module):
    """Self-attention, cross-attention to the context, feed-forward; each pre-LayerNorm with a residual."""

    def __init__(self, dim, heads, head_dim, context_dim):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, head_dim, context_dim=context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x, context):
        """x: (B, N, C), context: (B, M, Cc) -> (B, N, C)."""
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        x = x + self.ff(self.norm3(x))
        return x


class ContextBlock(nn.Module):
    """A VD context layer: GroupNorm, 1x1 conv in, one TransformerBlock over the pixels as tokens, 1x1 conv out,
    plus the input. Works on image features (B, C, H, W) and on flat text features (B, C, 4, 1) alike."""

    def __init__(self, channels, heads, context_dim, groups=32):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.block = TransformerBlock(channels, heads, channels // heads, context_dim)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x, context):
        """x: (B, C, H, W), context: (B, M, Cc) -> (B, C, H, W)."""
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x))
        h = h.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H*W, C)
        h = self.block(h, context)
        h = h.transpose(1, 2).reshape(B, C, H, W)  # (B, H*W, C) -> (B, C, H, W)
        return self.proj_out(h) + x
