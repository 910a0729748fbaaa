"""The paper's extensions (minivd/extensions.py) against what their math must give, and focus against a
transcription of the original demo's randomized algorithm (app.py, `decompose` / `adjust_rank`, commit cf0f4a2)."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from minivd.ddim import DDIM
from minivd.extensions import (blend_image_tokens, colour_adjust, edit_text_latent, fidelity_start_step, focus,
                               focus_scales, mask_token_weights, mixed_contexts, noised_start)

RTOL = 1e-5  # fp32 relative tolerance for stds and normalised singular values
ATOL = 1e-5  # fp32 absolute tolerance on values of order 1
PCA_ATOL = 1e-4  # exact SVD vs torch.pca_lowrank(niter=100): both fp32, different algorithms
LEVELS = [0.0, 0.1, 0.3, 0.49, 0.51, 0.7, 0.9, 1.0]


def image_context(B=2, P=64, C=48, seed=0, decay=0.8):
    """Random tokens (B, 1+P, C) whose patch tokens have a decaying spectrum (as CLIP's do) and a per-token offset."""
    g = torch.Generator().manual_seed(seed)
    K = min(P, C)
    U = torch.linalg.qr(torch.randn(B, P, K, generator=g))[0]
    V = torch.linalg.qr(torch.randn(B, C, K, generator=g))[0]
    s = 5 * decay ** torch.arange(K, dtype=torch.float32)
    patches = (U * s) @ V.transpose(1, 2) + 0.3 * torch.randn(B, P, 1, generator=g)
    cls_token = torch.randn(B, 1, C, generator=g)
    return torch.cat([cls_token, patches], dim=1)


def centred_svdvals(tokens):
    """Singular values of the patch tokens after removing each token's feature mean: (B, K)."""
    x = tokens[:, 1:].double()
    return torch.linalg.svdvals(x - x.mean(dim=-1, keepdim=True))


# --- focus --------------------------------------------------------------------------------------------------------


def original_scales(level, q=20, max_drop_rank=(1, 5)):
    """adjust_rank's per-component factors, transcribed literally: two straight lines each, clipped at 0."""
    sem, sty = max_drop_rank
    line = lambda x, xa, ya, xb, yb: (x - xa) / (xb - xa) * (yb - ya) + ya  # through (xa, ya) and (xb, yb)
    ramp = lambda t: math.exp((t - 0.5) * 2)
    scales, keep_residual = [1.0] * q, True
    if level < 0.5:
        y0 = line(ramp(level), ramp(0), -sem, ramp(0.5), 1)
        for i in range(0, sem + 1):
            scales[i] *= max(0.0, line(i, 0, y0, sem + 1, 1))
    elif level > 0.5:
        y0 = line(ramp(level), ramp(1), -(q - sty), ramp(0.5), 1)
        for i in range(sty, q):
            scales[i] *= max(0.0, line(i, q - 1, y0, sty - 1, 1))
        keep_residual = False
    return scales, keep_residual


def original_focus(tokens, level, q=20, seed=0):
    """The demo's algorithm on tokens (B, 1+P, C) with torch.pca_lowrank (randomized, seeded here), class token kept."""
    x = tokens[:, 1:]
    std_save = x.std(dim=(-2, -1))
    mean = x.mean(-1, keepdim=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        u, s, v = torch.pca_lowrank(x - mean, q=q, center=False, niter=100)
    remain = x - mean - (u * s[:, None]) @ v.transpose(1, 2)
    scales, keep_residual = original_scales(level, q)
    x_new = (u * (s * torch.tensor(scales))[:, None]) @ v.transpose(1, 2) + mean + (remain if keep_residual else 0)
    x_new = x_new / x_new.std(dim=(-2, -1))[:, None, None] * std_save[:, None, None]
    return torch.cat([tokens[:, :1], x_new], dim=1)


def test_focus_half_is_identity():
    tokens = image_context()
    assert focus(tokens, 0.5) is tokens
    assert torch.equal(focus(tokens.half(), 0.5), tokens.half())


@pytest.mark.parametrize("level", [i / 40 for i in range(41)])
def test_focus_scales_match_original_formulas(level):
    scales, keep = focus_scales(level, 20)
    expected, expected_keep = original_scales(level, 20)
    assert keep == expected_keep
    assert torch.allclose(scales, torch.tensor(expected, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("level", [0.0, 0.25, 0.75, 1.0])
def test_focus_matches_original_randomized_algorithm(level):
    tokens = image_context()
    got, expected = focus(tokens, level), original_focus(tokens, level)
    assert (got - expected).abs().max() < PCA_ATOL


@pytest.mark.parametrize("level", LEVELS)
def test_focus_keeps_class_token_and_std(level):
    tokens = image_context(B=3)
    out = focus(tokens, level)
    assert out.shape == tokens.shape
    assert torch.equal(out[:, 0], tokens[:, 0])
    std_in, std_out = tokens[:, 1:].std(dim=(1, 2)), out[:, 1:].std(dim=(1, 2))  # the original's std: per element
    assert torch.allclose(std_out, std_in, rtol=RTOL, atol=0)


def test_focus_semantic_end_removes_top_two_components():
    tokens = image_context()
    before, after = centred_svdvals(tokens), centred_svdvals(focus(tokens, 0.0))
    # the rest of the spectrum is kept, up to the common std rescaling. Compared where it means something: the
    # components above 1% of the largest kept one (a float32 SVD's smallest singular values are rounding noise)
    kept = before[:, 2:] / before[:, 2:3]  # (B, K - 2), falling
    m = int((kept >= 1e-2).all(dim=0).sum())
    assert m >= 10
    assert torch.allclose(after[:, :m] / after[:, :1], kept[:, :m], rtol=1e-3, atol=0)
    # the share of the energy along the input's top-2 singular directions shrinks as the level goes down
    centred = lambda t: t[:, 1:].double() - t[:, 1:].double().mean(dim=-1, keepdim=True)
    top2 = torch.linalg.svd(centred(tokens), full_matrices=False)[2][:, :2].transpose(1, 2)  # (B, C, 2)
    share = lambda t: (centred(t) @ top2).square().sum((1, 2)) / centred(t).square().sum((1, 2))
    shares = [share(focus(tokens, lvl)) for lvl in (0.5, 0.4, 0.25, 0.1, 0.0)]
    for higher, lower in zip(shares, shares[1:]):
        assert (lower < higher).all()
    assert (shares[-1] < 1e-10).all()


def test_focus_style_end_keeps_top_five():
    tokens = image_context()
    before, after = centred_svdvals(tokens), centred_svdvals(focus(tokens, 1.0))
    assert (after[:, 5:] < 1e-5 * after[:, :1]).all()  # rank 5
    assert torch.allclose(after[:, :5] / after[:, :1], before[:, :5] / before[:, :1], rtol=1e-4)


def test_focus_style_side_drops_residual_and_scales_tail():
    tokens, q, level = image_context(), 20, 0.75
    before, after = centred_svdvals(tokens), centred_svdvals(focus(tokens, level, q=q))
    factors = torch.tensor(original_scales(level, q)[0], dtype=torch.float64)
    expected = before[:, :q] * factors  # still sorted: the factors fall with the index
    scale = after[:, :1] / expected[:, :1]
    big = (expected >= 1e-2 * expected[:, :1]).all(dim=0)  # components clear of float32 rounding noise
    assert big[:5].all()
    assert torch.allclose(after[:, :q][:, big], (expected * scale)[:, big], rtol=1e-3, atol=0)
    assert (after[:, :q][:, ~big] < 2e-2 * after[:, :1]).all()  # the scaled-away tail stays small
    assert (after[:, q:] < 1e-5 * after[:, :1]).all()  # no residual beyond rank q


def test_focus_small_contexts_and_dtypes():
    tokens = image_context(P=16, C=32)  # tiny-model sizes: q=20 > min(P, C)
    out = focus(tokens, 0.0)
    assert torch.allclose(out[:, 1:].std(dim=(1, 2)), tokens[:, 1:].std(dim=(1, 2)), rtol=RTOL)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        low = focus(tokens.to(dtype), 0.2)
        assert low.dtype == dtype
        assert (low.double() - focus(tokens, 0.2).double()).abs().max() < 0.05


@pytest.mark.parametrize("level", [-0.01, 1.01, float("nan"), "0.5", None])
def test_focus_rejects_bad_levels(level):
    with pytest.raises(ValueError, match="level"):
        focus(image_context(), level)


def test_focus_rejects_bad_shapes():
    with pytest.raises(ValueError, match="1\\+P"):
        focus(torch.zeros(2, 48), 0.3)
    with pytest.raises(ValueError, match="q"):
        focus(image_context(), 0.3, q=0)


# --- blend_image_tokens -------------------------------------------------------------------------------------------


def test_blend_single_plain_image_is_the_plain_context():
    tokens = image_context()
    assert torch.equal(blend_image_tokens([tokens], [1.0]), tokens)
    assert torch.equal(blend_image_tokens([tokens], [1], levels=[0.5], masks=[None]), tokens)


@pytest.mark.parametrize("level,weight", [(0.5, 1.0), (0.3, 0.7), (0.8, 0.25)])
def test_blend_all_ones_mask_equals_no_mask(level, weight):
    tokens = image_context()
    plain = blend_image_tokens([tokens], [weight], levels=[level])
    for mask in (np.ones((37, 21), dtype=np.float32), torch.ones(8, 8), torch.ones(5, 5, dtype=torch.float64)):
        assert torch.equal(blend_image_tokens([tokens], [weight], levels=[level], masks=[mask]), plain)


def test_blend_concatenates_weighted_focused_contexts():
    a, b = image_context(seed=1), image_context(P=16, seed=2)
    out = blend_image_tokens([a, b], [0.5, 0.25], levels=[0.5, 0.2])
    assert out.shape == (2, 65 + 17, 48)
    assert torch.equal(out[:, :65], a * 0.5)  # weights are not normalised (the original multiplies by each)
    assert torch.allclose(out[:, 65:], focus(b, 0.2) * 0.25, atol=ATOL)


def test_blend_mask_weights_tokens_by_patch_coverage():
    g, patch = 8, 14
    tokens = image_context(P=g * g)
    mask = torch.ones(g * patch, g * patch)
    mask[:, : g * patch // 2] = 0  # remove the left half of the picture
    out = blend_image_tokens([tokens], [1.0], masks=[mask])
    grid_in, grid_out = tokens[:, 1:].view(2, g, g, -1), out[:, 1:].view(2, g, g, -1)  # (B, rows, cols, C)
    assert (grid_out[:, :, : g // 2] == 0).all()
    assert torch.equal(grid_out[:, :, g // 2 :], grid_in[:, :, g // 2 :])
    assert torch.allclose(out[:, 0], tokens[:, 0] * 0.5, atol=ATOL)  # class token: the mask's mean


def test_mask_weights_of_any_size_mask():
    constant = torch.full((10, 13), 0.25)  # any size is resized; a constant mask weights every token the same
    assert torch.allclose(mask_token_weights(constant, 64), torch.full((65,), 0.25), atol=1e-6)
    ramp = torch.linspace(0, 1, 50).repeat(30, 1)  # (30, 50): rises left to right
    weights = mask_token_weights(ramp, 16, patch_size=8)[1:].view(4, 4)
    assert (weights.diff(dim=1) > 0).all() and torch.allclose(weights[0], weights[3])


def test_blend_rejects_bad_inputs():
    a, b = image_context(), image_context(seed=3)
    cases = [
        (([a, b], [0.0, 0.0]), {}, "not all be 0"),
        (([a, b], [1.0, -0.5]), {}, "weights\\[1\\]"),
        (([a, b], [1.0]), {}, "weights must be a list with one entry per image"),
        (([a, b], [1.0, 1.0]), {"levels": [0.5]}, "levels must be a list"),
        (([a, b], [1.0, 1.0]), {"masks": [None]}, "masks must be a list"),
        (([a, b], [1.0, 1.0]), {"levels": [0.5, 1.5]}, "levels\\[1\\]"),
        (([a], [1.0]), {"masks": [torch.ones(1, 8, 8)]}, "masks\\[0\\].*2-D"),
        (([a], [1.0]), {"masks": [np.full((8, 8), 2.0)]}, "masks\\[0\\].*\\[0, 1\\]"),
        (([image_context(P=15)], [1.0]), {"masks": [torch.zeros(8, 8)]}, "square"),
        (([a, image_context(B=3)], [1.0, 1.0]), {}, "token_sets\\[1\\]"),
        (([], []), {}, "non-empty"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            blend_image_tokens(*args, **kwargs)


def test_mixed_contexts_ratios():
    img, txt = image_context(), torch.randn(2, 77, 48)
    assert [(k, r) for k, _, r in mixed_contexts(img)] == [("image", 1.0)]
    assert [(k, r) for k, _, r in mixed_contexts(img, txt, 0.0)] == [("image", 1.0)]
    mixed = mixed_contexts(img, txt, 0.25)
    assert [(k, r) for k, _, r in mixed] == [("text", 0.25), ("image", 0.75)]
    assert mixed[0][1] is txt and mixed[1][1] is img
    assert [(k, r) for k, _, r in mixed_contexts(img, txt, 1.0)] == [("text", 1.0)]
    with pytest.raises(ValueError, match="text_ratio"):
        mixed_contexts(img, txt, 1.5)
    with pytest.raises(ValueError, match="no text_tokens"):
        mixed_contexts(img, None, 0.5)


# --- colour_adjust ------------------------------------------------------------------------------------------------


def test_colour_adjust_matches_reference_stats():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 24, 20, generator=g)
    reference = (0.5 + 0.08 * torch.randn(1, 3, 31, 17, generator=g)).clamp(0, 1)  # other size, small spread
    out = colour_adjust(images, reference)
    assert out.shape == images.shape
    assert (out > 0).all() and (out < 1).all()  # no clamping happened, so the stats must match exactly
    ref_mean, ref_std = reference.mean(dim=(2, 3)), reference.std(dim=(2, 3))
    assert torch.allclose(out.mean(dim=(2, 3)), ref_mean.expand(3, 3), atol=ATOL)
    assert torch.allclose(out.std(dim=(2, 3)), ref_std.expand(3, 3), rtol=RTOL, atol=1e-6)
    # each pixel keeps its standardised value (a per-channel affine map with positive slope)
    z = lambda x: (x - x.mean(dim=(2, 3), keepdim=True)) / x.std(dim=(2, 3), keepdim=True)
    assert torch.allclose(z(out), z(images), atol=1e-4)


def test_colour_adjust_per_image_reference_and_clamping():
    g = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 16, 16, generator=g)
    reference = torch.stack([torch.full((3, 8, 8), 0.3), torch.full((3, 8, 8), 0.7)])
    reference[:, :, 0, 0] += 0.05  # a tiny spread
    out = colour_adjust(images, reference)
    assert torch.allclose(out.mean(dim=(2, 3)), reference.mean(dim=(2, 3)), atol=ATOL)
    wide = torch.rand(1, 3, 16, 16, generator=g).round()  # 0/1 pixels: a large std pushes outputs past [0, 1]
    clamped = colour_adjust(images, wide)
    assert clamped.min() >= 0 and clamped.max() <= 1
    flat = colour_adjust(torch.full((1, 3, 4, 4), 0.2), reference[:1])  # constant channels -> reference mean
    assert torch.allclose(flat, reference[:1].mean(dim=(2, 3), keepdim=True).expand(1, 3, 4, 4), atol=ATOL)


def test_colour_adjust_rejects_bad_inputs():
    good = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match="reference must have batch"):
        colour_adjust(good, torch.rand(3, 3, 8, 8))
    with pytest.raises(ValueError, match="images must be \\(B, 3, H, W\\)"):
        colour_adjust(torch.rand(2, 4, 8, 8), good)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        colour_adjust(good * 2, good)


# --- fidelity -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 7, 50])
def test_fidelity_start_step_endpoints_and_monotonic(steps):
    assert fidelity_start_step(steps, 0.0) == 0 and fidelity_start_step(steps, 0) == 0
    assert fidelity_start_step(steps, 1.0) == steps
    starts = [fidelity_start_step(steps, i / 200) for i in range(201)]
    assert all(a <= b for a, b in zip(starts, starts[1:]))
    assert all(0 <= s <= steps for s in starts)


def test_fidelity_start_step_rejects_bad_input():
    for fidelity in (-0.1, 1.1, float("nan")):
        with pytest.raises(ValueError, match="fidelity"):
            fidelity_start_step(50, fidelity)
    with pytest.raises(ValueError, match="steps"):
        fidelity_start_step(0, 0.5)


def run_sampler(ddim, x_t, steps, start_step):
    """DDIM.sample from (x_t, start_step) with a denoiser that records the timesteps it is called at."""
    seen = []

    def denoiser(x, t):
        seen.append(int(t))
        return None, torch.zeros_like(x)

    out = ddim.sample(denoiser, x_t, steps, guidance_scale=1.0, start_step=start_step)
    return out, seen


@pytest.mark.parametrize("fidelity", [0.02, 0.3, 0.5, 0.77, 0.9, 0.98])
def test_noised_start_is_consistent_with_the_sampler(fidelity):
    steps, ddim = 50, DDIM()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    x_t, start = noised_start(ddim, x0, noise, steps, fidelity)
    _, seen = run_sampler(ddim, x_t, steps, start)
    assert len(seen) == int(steps * (1 - fidelity))  # the number of steps the original denoises
    reference = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    reference.set_timesteps(steps)
    assert seen[0] == int(reference.timesteps[start])  # noised to the level of the first step the sampler runs
    expected = reference.add_noise(x0, noise, torch.tensor([seen[0]]))
    assert torch.allclose(x_t, expected, atol=ATOL)


def test_noised_start_endpoints():
    steps, ddim = 50, DDIM()
    x0, noise = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    x_t, start = noised_start(ddim, x0, noise, steps, 1.0)
    assert start == steps and x_t is x0
    out, seen = run_sampler(ddim, x_t, steps, start)
    assert seen == [] and torch.equal(out, x0)  # fidelity 1: the input latents themselves
    x_t, start = noised_start(ddim, x0, noise, steps, 0.0)
    assert start == 0 and torch.equal(x_t, noise)  # fidelity 0: pure noise, the full schedule
    _, seen = run_sampler(ddim, x_t, steps, start)
    assert seen == ddim.timesteps(steps).tolist()
    with pytest.raises(ValueError, match="noise has shape"):
        noised_start(ddim, x0, noise[:, :3], steps, 0.5)


# --- edit_text_latent ---------------------------------------------------------------------------------------------


def test_edit_removes_the_negative_direction():
    g = torch.Generator().manual_seed(0)
    z, negative = torch.randn(4, 32, generator=g), torch.randn(1, 32, generator=g)
    out = edit_text_latent(z, negative)
    n_hat = negative / negative.norm()
    assert (out @ n_hat.T).abs().max() < ATOL  # orthogonal to the negative latent
    removed = z - out  # only the component along the negative direction was taken away
    assert torch.allclose(removed, (z @ n_hat.T) * n_hat, atol=ATOL)
    half = edit_text_latent(z, negative, negative_strength=0.5)
    assert torch.allclose(half @ n_hat.T, 0.5 * (z @ n_hat.T), atol=ATOL)


def test_edit_adds_the_positive_latent():
    g = torch.Generator().manual_seed(1)
    z, negative, positive = (torch.randn(3, 32, generator=g) for _ in range(3))
    out = edit_text_latent(z, negative, positive)
    n_hat = negative / negative.norm(dim=-1, keepdim=True)  # one negative per row
    assert ((out - positive) * n_hat).sum(-1).abs().max() < ATOL
    assert torch.allclose(edit_text_latent(z, None, positive[:1]), z + positive[:1], atol=0)
    assert torch.allclose(edit_text_latent(z, None, positive, positive_strength=0.5), z + 0.5 * positive)
    assert torch.equal(edit_text_latent(z), z)


def test_edit_rejects_bad_inputs():
    z = torch.randn(2, 16)
    with pytest.raises(ValueError, match="length 0"):
        edit_text_latent(z, torch.zeros(1, 16))
    with pytest.raises(ValueError, match="positive must be"):
        edit_text_latent(z, None, torch.randn(3, 16))
    with pytest.raises(ValueError, match="negative must be"):
        edit_text_latent(z, torch.randn(1, 8))
    with pytest.raises(ValueError, match="z must be"):
        edit_text_latent(torch.randn(16), None)
