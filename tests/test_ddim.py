"""DDIM timesteps and update rule against diffusers' DDIMScheduler (the VD scheduler config)."""

import pytest
import torch
from diffusers import DDIMScheduler

from minivd.ddim import DDIM, DDIMConfig

VD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                    set_alpha_to_one=False, steps_offset=1)


@pytest.mark.parametrize("steps", [1, 7, 50, 250, 999])  # 1000 steps reach timestep 1000: refused
def test_timesteps_match_diffusers(steps):
    ref = DDIMScheduler(**VD_SCHEDULER)
    ref.set_timesteps(steps)
    assert torch.equal(DDIM().timesteps(steps), ref.timesteps.long())


def test_schedule_matches_diffusers():
    ref = DDIMScheduler(**VD_SCHEDULER)
    assert torch.allclose(DDIM().alphas_cumprod, ref.alphas_cumprod, atol=0, rtol=1e-6)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_step_matches_diffusers(eta):
    steps = 10
    ref, ddim = DDIMScheduler(**VD_SCHEDULER), DDIM()
    ref.set_timesteps(steps)
    x = torch.randn(2, 4, 8, 8)
    for t in ref.timesteps:
        eps = torch.randn_like(x)
        g_ref, g_me = torch.Generator().manual_seed(int(t)), torch.Generator().manual_seed(int(t))
        expected = ref.step(eps, t, x, eta=eta, generator=g_ref)
        got, x0 = ddim.step(eps, t, x, steps, eta=eta, generator=g_me)
        assert (got - expected.prev_sample).abs().max() < 1e-5
        assert (x0 - expected.pred_original_sample).abs().max() < 1e-5
        x = expected.prev_sample


def test_config_from_diffusers_json_and_refusals():
    cfg = DDIMConfig.from_hf_config(dict(DDIMScheduler(**VD_SCHEDULER).config))
    assert cfg == DDIMConfig()
    with pytest.raises(ValueError, match="prediction_type"):
        DDIMConfig.from_hf_config({"prediction_type": "v_prediction"})
    with pytest.raises(ValueError, match="steps"):
        DDIM().timesteps(0)
