"""Lean loading and the memory/speed options: what is loaded per flow, and that the options keep the numbers."""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import minivd

H = W = 64
RUN = dict(prompt="a fox", steps=3, height=H, width=W, output="np")


def latents(seed=0):
    return torch.randn(1, 4, H // 8, W // 8, generator=torch.Generator().manual_seed(seed))


def test_text_to_image_reads_the_vae_decoder_only(tiny_vd):
    model = minivd.load(tiny_vd).prepare("text-to-image")
    assert model.vae.encoder is None and model.vae.decoder is not None
    assert model.image_encoder is None and set(model.unet.data) == {"image"}
    picture = Image.new("RGB", (W, H), (90, 140, 200))
    minivd.generate("image-variation", model=model, image=picture, fidelity=0.5, steps=2, height=H, width=W, seed=0)
    assert model.vae.encoder is not None  # fidelity encodes the input: the VAE was read again with its encoder


def test_low_memory_options_keep_the_result(tiny_vd):
    plain = minivd.generate("text-to-image", model=minivd.load(tiny_vd), latents=latents(), **RUN)
    lean = minivd.load(tiny_vd).enable_low_memory(attention_slice=7, vae_tile_size=H, offload=True)
    got = minivd.generate("text-to-image", model=lean, latents=latents(), **RUN)
    assert lean.unet.context["text"].blocks[0].block.attn1.slice_size == 7
    assert np.abs(got - plain).max() < 1e-5  # slicing changes float rounding only; one tile = the whole image
    assert all(p.device.type == "cpu" for p in lean.unet.parameters())


def test_bfloat16_on_cpu_runs_close_to_float32(tiny_vd):
    fp32 = minivd.generate("text-to-image", model=minivd.load(tiny_vd), latents=latents(1), **RUN)
    bf16 = minivd.generate("text-to-image", model=minivd.load(tiny_vd, dtype=torch.bfloat16), latents=latents(1), **RUN)
    assert bf16.dtype == np.float32 and np.isfinite(bf16).all()
    assert np.abs(bf16 - fp32).max() < 0.1  # bf16 keeps 8 bits of mantissa


def test_compile_needs_a_loaded_unet(tiny_vd):
    with pytest.raises(ValueError, match="prepare"):
        minivd.load(tiny_vd).compile()


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="torch.compile needs a C++ compiler on the CPU")
def test_compile_keeps_the_result(tiny_vd):
    model = minivd.load(tiny_vd)
    eager = minivd.generate("text-to-image", model=model, latents=latents(2), **RUN)
    model.prepare("text-to-image").compile()
    compiled = minivd.generate("text-to-image", model=model, latents=latents(2), **RUN)
    assert hasattr(model.unet.forward, "_torchdynamo_orig_callable")  # the forward that ran was torch.compile's
    assert np.abs(compiled - eager).max() < 1e-4  # fused kernels reorder float sums; nothing else may change
