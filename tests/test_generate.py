"""End to end: minivd.generate against diffusers' VD pipelines on the same tiny files and the same initial latents."""

import numpy as np
import pytest
import torch
from PIL import Image

import minivd
from minivd.tools.random_checkpoint import random_model
from tiny_vd import reference_pipeline

IMAGE_ATOL = 1e-4  # fp32, [0, 1] images after 4 DDIM steps with guidance 7.5 (measured differences are ~1e-6)
H = W = 64  # latents 8 x 8


def picture(seed, size=(80, 60)):
    """A deterministic RGB picture with structure (not a flat colour), odd aspect so resizing matters."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    return Image.fromarray(base).resize(size, Image.BILINEAR)


def latents(batch=1, seed=0):
    return torch.randn(batch, 4, H // 8, W // 8, generator=torch.Generator().manual_seed(seed))


def run_reference(mode, folder, x_T, steps=4, guidance_scale=7.5, eta=0.0, seed=None, **kwargs):
    pipe = reference_pipeline(mode, folder)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    out = pipe(num_inference_steps=steps, guidance_scale=guidance_scale, eta=eta, height=H, width=W,
               latents=x_T.clone(), generator=generator, output_type="np", **kwargs)
    return out.images


CASES = {
    "text-to-image": (dict(prompt="a red fox in the snow"), dict(prompt="a red fox in the snow")),
    "image-variation": (dict(image=picture(0)), dict(image=picture(0), negative_prompt=Image.new("RGB", (512, 512), (127,) * 3))),
    "dual-guided": (dict(prompt="a watercolor fox", image=picture(1), mix_ratio=0.3),
                    dict(prompt="a watercolor fox", image=picture(1), text_to_image_strength=0.3)),
}


@pytest.mark.parametrize("mode", list(CASES))
def test_generate_equals_diffusers(tiny_vd, mode):
    mine_kwargs, ref_kwargs = CASES[mode]
    x_T = latents()
    expected = run_reference(mode, tiny_vd, x_T, **ref_kwargs)
    got = minivd.generate(mode, model=minivd.load(tiny_vd), steps=4, height=H, width=W, latents=x_T, output="np",
                          **mine_kwargs)
    assert got.shape == expected.shape == (1, H, W, 3) and got.dtype == np.float32
    assert np.abs(got - expected).max() < IMAGE_ATOL


def test_negative_prompt_eta_and_num_images_equal_diffusers(tiny_vd):
    x_T = latents(batch=2, seed=5)
    expected = run_reference("text-to-image", tiny_vd, x_T, eta=0.7, seed=11, prompt="a cat",
                             negative_prompt="blurry", num_images_per_prompt=2)
    got = minivd.generate("text-to-image", model=minivd.load(tiny_vd), prompt="a cat", negative_prompt="blurry",
                          steps=4, eta=0.7, seed=11, height=H, width=W, latents=x_T, num_images=2, output="np")
    assert np.abs(got - expected).max() < IMAGE_ATOL


def test_no_guidance_equals_diffusers(tiny_vd):
    x_T = latents(seed=2)
    expected = run_reference("text-to-image", tiny_vd, x_T, guidance_scale=1.0, prompt="a dog")
    got = minivd.generate("text-to-image", model=minivd.load(tiny_vd), prompt="a dog", guidance_scale=1.0, steps=4,
                          height=H, width=W, latents=x_T, output="np")
    assert np.abs(got - expected).max() < IMAGE_ATOL


def test_seed_gives_the_diffusers_initial_noise(tiny_vd):
    """Without latents, the seed drives a CPU generator exactly as diffusers' generator= does."""
    model = minivd.load(tiny_vd)
    pipe = reference_pipeline("text-to-image", tiny_vd)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe("a fox", num_inference_steps=3, height=H, width=W, generator=torch.Generator().manual_seed(42),
                    output_type="latent").images
    got = minivd.generate("text-to-image", model=model, prompt="a fox", steps=3, height=H, width=W, seed=42,
                          output="latent")
    assert (got - expected).abs().max() < 1e-4


def test_outputs_and_determinism(tiny_vd):
    model = minivd.load(tiny_vd)
    kwargs = dict(model=model, prompt="a fox", steps=2, height=H, width=W + 16, seed=3)
    a, b = minivd.generate("text-to-image", **kwargs), minivd.generate("text-to-image", **kwargs)
    assert len(a) == 1 and isinstance(a[0], Image.Image) and a[0].size == (W + 16, H)
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    other = minivd.generate("text-to-image", **{**kwargs, "seed": 4})
    assert not np.array_equal(np.asarray(a[0]), np.asarray(other[0]))
    lat = minivd.generate("text-to-image", output="latent", **kwargs)
    assert lat.shape == (1, 4, H // 8, (W + 16) // 8)


def test_callback_sees_every_step(tiny_vd):
    seen = []
    minivd.generate("text-to-image", model=minivd.load(tiny_vd), prompt="x", steps=3, height=H, width=W, seed=0,
                    output="latent", callback=lambda step, t, x, **state: seen.append((step, int(t), tuple(x.shape))))
    assert [s for s, _, _ in seen] == [0, 1, 2] and [t for _, t, _ in seen] == [667, 334, 1]


def test_demo_model_runs_every_image_flow():
    model = random_model()
    for mode, kwargs in [("text-to-image", dict(prompt="a fox")), ("image-variation", dict(image=picture(2))),
                         ("dual-guided", dict(prompt="a fox", image=picture(3)))]:
        out = minivd.generate(mode, model=model, steps=2, height=64, width=64, seed=0, output="np", **kwargs)
        assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(mode="text-to-picture", prompt="x"), ValueError, "unknown mode"),
    (dict(mode="text-to-image"), ValueError, "needs a prompt"),
    (dict(mode="image-variation"), ValueError, "needs an image"),
    (dict(mode="dual-guided", prompt="x"), ValueError, "needs an image"),
    (dict(mode="image-variation", image=np.zeros((8, 8, 3), np.uint8)), TypeError, "PIL"),
    (dict(mode="text-to-image", prompt=3), TypeError, "prompt must be a string"),
    (dict(mode="text-to-image", prompt="x", height=60), ValueError, "multiples of 8"),
    (dict(mode="text-to-image", prompt="x", latents=torch.zeros(1, 4, 4, 4)), ValueError, "latents have shape"),
    (dict(mode="dual-guided", prompt="x", image=picture(0), mix_ratio=1.5), ValueError, "mix_ratio"),
    (dict(mode="text-to-image", prompt="x", steps=0), ValueError, "steps"),
    (dict(mode="text-to-image", prompt="x", output="jpeg"), ValueError, "output"),
    (dict(mode="text-to-image", prompt="x", model=3.5), TypeError, "model must be"),
])
def test_bad_input_gets_a_clear_error(kwargs, error, match):
    kwargs = {"model": random_model(), "steps": 1, "height": 64, "width": 64, **kwargs}
    mode = kwargs.pop("mode")
    with pytest.raises(error, match=match):
        minivd.generate(mode, **kwargs)
