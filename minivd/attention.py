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


def attend(q, k, v, causal=False):
    """softmax(q k^T / sqrt(hd)) v over the keys, fused by PyTorch (`attention_probs` writes the softmax out).
    q: (B, nh, N, hd), k, v: (B, nh, M, hd) -> (B, nh, N, hd). causal: query i sees keys 0..i."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def attention_probs(q, k, causal=False):
    """The attention probabilities written out: softmax(q k^T / sqrt(hd)) over the keys. (B, nh, N, M)."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, nh, N, M)
    if causal:
        future = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return scores.softmax(dim=-1)


class Attention(nn.Module):
    """Multi-head attention: softmax(q k^T / sqrt(hd)) v, then an output projection.

    Self-attention when `context` is None, cross-attention otherwise. Used by the context blocks (8 heads, no
    q/k/v bias), by the VAE's mid-block (1 head, with bias) and by CLIP.
    """

    def __init__(self, dim, heads, head_dim, context_dim=None, qkv_bias=False):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.to_q = nn.Linear(dim, inner, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=qkv_bias)
        self.to_out = nn.Linear(inner, dim)
        self.attend = attend  # minivd.speed.set_attention_slicing swaps in a sliced version (same numbers)
        self.probs_hook = None  # set by minivd.hooks.capture_attention: called with the probabilities

    def forward(self, x, context=None, causal=False):
        """x: (B, N, C), context: (B, M, Cc) or None -> (B, N, C). causal: token i sees tokens <= i (CLIP text)."""
        context = x if context is None else context
        B, N, _ = x.shape
        q = self.to_q(x).view(B, N, self.heads, self.head_dim).transpose(1, 2)  # (B, nh, N, hd)
        k = self.to_k(context).view(B, -1, self.heads, self.head_dim).transpose(1, 2)  # (B, nh, M, hd)
        v = self.to_v(context).view(B, -1, self.heads, self.head_dim).transpose(1, 2)  # (B, nh, M, hd)
        out = self.attend(q, k, v, causal)  # (B, nh, N, hd)
        if self.probs_hook is not None:  # a watcher wants the maps: computed beside, the output is untouched
            self.probs_hook(self, attention_probs(q, k, causal))
        out = out.transpose(1, 2).reshape(B, N, self.heads * self.head_dim)  # (B, nh, N, hd) -> (B, N, nh*hd)
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
        # (B, C, H, W) -> (B, H*W, C) and back. contiguous(): strided tokens or channels-last maps run slower
        h = h.flatten(2).transpose(1, 2).contiguous()
        h = self.block(h, context)
        h = h.transpose(1, 2).reshape(B, C, H, W).contiguous()
        return self.proj_out(h) + x
