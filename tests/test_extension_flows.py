"""The paper's extensions through `generate`: what the math must give, end to end on the tiny official-layout folder."""

import numpy as np
import pytest
import torch
from PIL import Image

import minivd
from minivd import ImagePrompt
from minivd.extensions import colour_adjust
from tiny_vd import reference_components

H = W = 64
RUN = dict(steps=3, height=H, width=W, output="np")


def picture(seed, size=(72, 56)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)).resize(size, Image.BILINEAR)


@pytest.fixture(scope="module")
def model(tiny_vd):
    return minivd.load(tiny_vd)


def x_T(seed=0):
    return torch.randn(1, 4, H // 8, W // 8, generator=torch.Generator().manual_seed(seed))


def test_one_blended_image_with_weight_1_is_image_variation(model):
    plain = minivd.generate("image-variation", model=model, image=picture(0), latents=x_T(), **RUN)
    blend = minivd.generate("multi-context", model=model, image=[ImagePrompt(picture(0), weight=1.0)], latents=x_T(), **RUN)
    assert np.array_equal(plain, blend)


def test_text_ratio_1_is_text_to_image_and_0_is_image_variation(model):
    t2i = minivd.generate("text-to-image", model=model, prompt="a fox", latents=x_T(1), **RUN)
    var = minivd.generate("image-variation", model=model, image=picture(1), latents=x_T(1), **RUN)
    for mode in ("dual-guided", "multi-context"):
        image = picture(1) if mode == "dual-guided" else [picture(1)]
        kwargs = dict(model=model, prompt="a fox", image=image, latents=x_T(1), **RUN)
        assert np.array_equal(minivd.generate(mode, mix_ratio=1.0, **kwargs), t2i)
        assert np.array_equal(minivd.generate(mode, mix_ratio=0.0, **kwargs), var)
        mixed = minivd.generate(mode, mix_ratio=0.5, **kwargs)
        assert not np.array_equal(mixed, t2i) and not np.array_equal(mixed, var)


def test_all_ones_mask_equals_no_mask(model):
    images = lambda mask=None: [ImagePrompt(picture(2), mask=mask), ImagePrompt(picture(3), weight=0.5)]
    kwargs = dict(model=model, latents=x_T(2), **RUN)
    no_mask = minivd.generate("multi-context", image=images(), **kwargs)
    ones = minivd.generate("multi-context", image=images(np.ones((40, 30))), **kwargs)
    assert np.array_equal(no_mask, ones)
    half = np.ones((40, 30))
    half[:, 15:] = 0
    assert not np.array_equal(no_mask, minivd.generate("multi-context", image=images(half), **kwargs))


def test_focus_half_is_identity_and_other_levels_change_the_result(model):
    base = minivd.generate("image-variation", model=model, image=picture(4), latents=x_T(3), **RUN)
    assert np.array_equal(base, minivd.generate("image-variation", model=model, image=ImagePrompt(picture(4), focus=0.5),
                                                latents=x_T(3), **RUN))
    for level in (0.0, 1.0):
        other = minivd.generate("image-variation", model=model, image=ImagePrompt(picture(4), focus=level),
                                latents=x_T(3), **RUN)
        assert not np.array_equal(base, other)


@torch.no_grad()
def test_fidelity_1_returns_the_reconstruction_of_the_input(model, tiny_vd):
    """Reference: diffusers' AutoencoderKL on the same file, encode (mean) then decode."""
    image = picture(5, size=(W, H))
    got = minivd.generate("image-variation", model=model, image=ImagePrompt(image, fidelity=1.0), seed=0, **RUN)
    vae = reference_components(tiny_vd)["vae"]
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255 * 2 - 1
    expected = (vae.decode(vae.encode(x).latent_dist.mean).sample / 2 + 0.5).clamp(0, 1)
    assert np.abs(got - expected.permute(0, 2, 3, 1).numpy()).max() < 1e-4
    partial = minivd.generate("image-variation", model=model, image=ImagePrompt(image, fidelity=0.5), seed=0, **RUN)
    assert not np.array_equal(partial, got)


def test_colour_adjust_matches_the_input_statistics(model):
    image = Image.fromarray((np.random.default_rng(6).random((H, W, 3)) * 120 + 60).astype(np.uint8))
    generated = torch.from_numpy(minivd.generate("image-variation", model=model, image=image, seed=0, **RUN))
    reference = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    out = colour_adjust(generated.permute(0, 3, 1, 2), reference)[0].permute(1, 2, 0).numpy()
    ref = np.asarray(image).astype(np.float64) / 255
    assert 0 < out.min() and out.max() < 1  # no clamping happened, so the statistics must match exactly
    np.testing.assert_allclose(out.mean(axis=(0, 1)), ref.mean(axis=(0, 1)), atol=1e-5)
    np.testing.assert_allclose(out.std(axis=(0, 1), ddof=1), ref.std(axis=(0, 1), ddof=1), atol=1e-5)


def test_edit_image_runs_and_returns_the_edited_sentence(tiny_vd):
    model = minivd.load(tiny_vd)
    images, sentence = minivd.edit_image(picture(7), model=model, remove="a dog", add="a cat", steps=2, seed=0,
                                         height=H, width=W)
    assert isinstance(sentence, str) and len(images) == 1 and images[0].size == (W, H)


@pytest.mark.parametrize("make, match", [
    (lambda: dict(mode="multi-context", image=[ImagePrompt(picture(0), weight=0.0), ImagePrompt(picture(1), weight=0.0)]),
     "weights must not all be 0"),
    (lambda: dict(mode="multi-context", image=[ImagePrompt(picture(0), mask=np.ones((2, 3, 4)))]), "image\\[0\\].mask"),
    (lambda: dict(mode="image-variation", image=ImagePrompt(picture(0), weight=-1.0)), "weight must be a finite number"),
    (lambda: dict(mode="image-variation", image=ImagePrompt(picture(0), focus=1.5)), "focus must be a number in \\[0, 1\\]"),
    (lambda: dict(mode="multi-context", image=[ImagePrompt(picture(0), focus=-0.1)]), "focus must be a number"),
    (lambda: dict(mode="image-variation", image=ImagePrompt(picture(0), fidelity=2.0)), "fidelity must be a number in \\[0, 1\\]"),
    (lambda: dict(mode="dual-guided", prompt="x", image=ImagePrompt(picture(0), fidelity=0.5)),
     "fidelity applies to image-variation only"),
    (lambda: dict(mode="image-variation", image=ImagePrompt(picture(0), weight=0.5)), "weight and mask apply to multi-context only"),
    (lambda: dict(mode="text-to-image", prompt="x", image=picture(0)), "takes no image"),
    (lambda: dict(mode="text-to-image", prompt="x", mix_ratio=0.3), "mix_ratio applies to dual-guided"),
    (lambda: dict(mode="image-variation", image=[ImagePrompt(picture(0), fidelity=0.2), ImagePrompt(picture(1), fidelity=0.4)]),
     "the same fidelity"),
])
def test_extension_inputs_get_clear_errors(model, make, match):
    with pytest.raises(ValueError, match=match):
        kwargs = make()
        minivd.generate(kwargs.pop("mode"), model=model, steps=1, height=H, width=W, **kwargs)


def test_mask_follows_the_centre_crop_of_a_wide_picture(model):
    """CLIP sees the centre square of a 2:1 picture: a mask that removes only the outer quarters changes nothing."""
    wide = picture(8, size=(128, 64))
    outer = np.ones((64, 128))
    outer[:, :32] = outer[:, 96:] = 0
    kwargs = dict(model=model, latents=x_T(4), **RUN)
    assert np.array_equal(minivd.generate("multi-context", image=[ImagePrompt(wide, mask=outer)], **kwargs),
                          minivd.generate("multi-context", image=[wide], **kwargs))
    inner = np.ones((64, 128))
    inner[:, 32:64] = 0
    assert not np.array_equal(minivd.generate("multi-context", image=[ImagePrompt(wide, mask=inner)], **kwargs),
                              minivd.generate("multi-context", image=[wide], **kwargs))


def test_text_seed_gives_the_same_sentences_with_or_without_latents(model):
    z_T = torch.randn(1, 32, 1, 1, generator=torch.Generator().manual_seed(9))
    a = minivd.generate("text-variation", model=model, prompt="a fox", steps=2, seed=9)
    b = minivd.generate("text-variation", model=model, prompt="a fox", steps=2, seed=9, latents=z_T)
    assert a == b
