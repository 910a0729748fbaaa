"""Step-through hooks: callback state, intermediates, attention capture and previews leave outputs bit-identical."""

import numpy as np
import pytest
import torch

import minivd
from minivd.hooks import StepRecorder, capture_attention, preview, word_attention

H = W = 64
RUN = dict(prompt="a red fox in the snow", steps=3, height=H, width=W, output="np")


@pytest.fixture(scope="module")
def model(tiny_vd):
    return minivd.load(tiny_vd)


def latents(seed=0):
    return torch.randn(1, 4, H // 8, W // 8, generator=torch.Generator().manual_seed(seed))


def test_hooks_leave_the_output_bit_identical(model):
    plain = minivd.generate("text-to-image", model=model, latents=latents(), **RUN)
    steps = StepRecorder()
    with capture_attention(model, self_attention=True) as maps:
        hooked = minivd.generate("text-to-image", model=model, latents=latents(), callback=steps, **RUN)
    assert np.array_equal(plain, hooked)
    assert [s["step"] for s in steps] == [0, 1, 2] and maps.layers()
    after = minivd.generate("text-to-image", model=model, latents=latents(), **RUN)
    assert np.array_equal(plain, after)  # the context manager detached every hook


def test_captured_probabilities_sum_to_one_over_the_context(model):
    with capture_attention(model) as maps:
        minivd.generate("text-to-image", model=model, latents=latents(1), **RUN)
    assert len(maps.layers()) == 16  # one per context block of the text context layers
    for layer in maps.layers():
        assert len(maps.records[layer]) == 3  # one per step
        probs = maps.records[layer][-1]  # (2B, N, 77): rows [uncond; cond]
        assert probs.shape[0] == 2 and probs.shape[-1] == 77
        assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-5)
    assert maps.mean_map(maps.layers()[0]).shape == (H // 8, W // 8, 77)
    words = word_attention(maps, model.tokenizer, "a red fox in the snow")
    assert [w for w, _ in words][:1] and all(h.shape == words[0][1].shape for _, h in words)


@torch.no_grad()
def test_callback_state_is_what_the_sampler_used(model):
    x_T, g = latents(2), 7.5
    steps = StepRecorder()
    minivd.generate("text-to-image", model=model, latents=x_T, callback=steps, **RUN)
    ddim, x_t = model.sampler, x_T
    prompt_ctx = model.encode_text([RUN["prompt"]])
    for state in steps:
        t = state["t"]
        a_t = ddim.alphas_cumprod[t]
        a_prev = ddim.alphas_cumprod[t - 1000 // 3] if t - 1000 // 3 >= 0 else ddim.alphas_cumprod[0]
        assert torch.allclose(state["eps"], state["eps_uncond"] + g * (state["eps_cond"] - state["eps_uncond"]))
        # the conditional prediction, recomputed by calling the UNet on its own (not batched with uncond)
        eps_cond = model.unet(x_t, torch.tensor([t]), [("text", prompt_ctx, 1.0)], "image")
        assert (eps_cond - state["eps_cond"]).abs().max() < 1e-5
        x0 = (x_t - (1 - a_t).sqrt() * state["eps"]) / a_t.sqrt()
        assert (x0 - state["x0_pred"]).abs().max() < 1e-5
        x_prev = a_prev.sqrt() * state["x0_pred"] + (1 - a_prev).sqrt() * state["eps"]
        assert (x_prev - state["latents"]).abs().max() < 1e-5
        x_t = state["latents"]


def test_maps_keep_the_grid_of_non_square_images(model):
    with capture_attention(model) as maps:
        minivd.generate("text-to-image", model=model, **{**RUN, "height": 96, "width": 64, "seed": 0})
    assert maps.mean_map("context.text.blocks.0").shape == (12, 8, 77)  # (h, w, tokens) at full latent size
    assert maps.token_heatmaps().shape == (77, 12, 8)


def test_callback_gets_every_state_keyword(model):
    seen = []
    minivd.generate("text-to-image", model=model, seed=0, callback=lambda i, t, x, **state: seen.append(state), **RUN)
    assert len(seen) == 3 and all(set(s) == {"eps_cond", "eps_uncond", "eps", "x0_pred"} for s in seen)
    assert all(s["x0_pred"].shape == (1, 4, H // 8, W // 8) for s in seen)


def test_preview_decodes_the_predicted_x0(model):
    steps = StepRecorder()
    minivd.generate("text-to-image", model=model, latents=latents(3), callback=steps, **RUN)
    images = preview(model, steps[0]["x0_pred"])
    assert len(images) == 1 and images[0].size == (W, H)


def test_capture_needs_a_loaded_unet(tiny_vd):
    with pytest.raises(ValueError, match="no UNet loaded"):
        with capture_attention(minivd.load(tiny_vd)):
            pass
