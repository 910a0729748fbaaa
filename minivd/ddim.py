"""DDIM sampling (Song et al. 2021) with classifier-free guidance, as one visible loop.

Legend: B batch; x_t the latent at timestep t, (B, 4, H/8, W/8) for images or (B, 768, 1, 1) for text.

Noise schedule ("scaled linear", as in Stable Diffusion and VD):
    beta_t = (linspace(sqrt(beta_start), sqrt(beta_end), T))_t ** 2,   alphas_cumprod_t = prod_{s<=t} (1 - beta_s)

One DDIM step from t to the previous sampled timestep t' (a_t = alphas_cumprod[t]):
    x0_pred = (x_t - sqrt(1 - a_t) * eps) / sqrt(a_t)
    sigma_t = eta * sqrt((1 - a_t') / (1 - a_t) * (1 - a_t / a_t'))
    x_t'    = sqrt(a_t') * x0_pred + sqrt(1 - a_t' - sigma_t^2) * eps + sigma_t * z,   z ~ N(0, I)
eta = 0 is deterministic DDIM; eta = 1 is DDPM-like.

Classifier-free guidance: eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond).
"""

from dataclasses import dataclass

import torch


@dataclass
class DDIMConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    steps_offset: int = 1  # "leading" spacing shifted by 1: 50 steps -> 981, 961, ..., 1
    set_alpha_to_one: bool = False  # the last step goes to alphas_cumprod[0], not to 1

    @classmethod
    def from_hf_config(cls, cfg):
        """From diffusers' scheduler/scheduler_config.json; refuses settings this sampler does not implement."""
        unsupported = {
            "beta_schedule": ("scaled_linear",),
            "prediction_type": ("epsilon",),
            "timestep_spacing": ("leading",),
            "clip_sample": (False,),
            "thresholding": (False,),
            "rescale_betas_zero_snr": (False,),
        }
        for key, allowed in unsupported.items():
            if key in cfg and cfg[key] not in allowed:
                raise ValueError(f"scheduler {key}={cfg[key]!r} is not supported (minivd's DDIM implements {allowed[0]!r})")
        return cls(
            num_train_timesteps=cfg.get("num_train_timesteps", 1000),
            beta_start=cfg.get("beta_start", 0.00085),
            beta_end=cfg.get("beta_end", 0.012),
            steps_offset=cfg.get("steps_offset", 1),
            set_alpha_to_one=cfg.get("set_alpha_to_one", False),
        )


class DDIM:
    def __init__(self, cfg: DDIMConfig = None):
        self.config = cfg = cfg or DDIMConfig()
        betas = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, cfg.num_train_timesteps, dtype=torch.float32) ** 2
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)  # (T,)
        self.final_alpha_cumprod = torch.tensor(1.0) if cfg.set_alpha_to_one else self.alphas_cumprod[0]

    def timesteps(self, steps):
        """The sampled timesteps, high to low: (steps,) int64."""
        if not 1 <= steps <= self.config.num_train_timesteps:
            raise ValueError(f"steps must be in [1, {self.config.num_train_timesteps}], got {steps}")
        stride = self.config.num_train_timesteps // steps
        return (torch.arange(steps - 1, -1, -1) * stride + self.config.steps_offset).long()

    def alpha_prev(self, t, steps):
        prev = t - self.config.num_train_timesteps // steps
        return self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha_cumprod

    def step(self, eps, t, x_t, steps, eta=0.0, generator=None):
        """One update x_t -> x_t' (formulas in the module docstring). Returns (x_t', x0_pred)."""
        a_t, a_prev = self.alphas_cumprod[t], self.alpha_prev(int(t), steps)
        x0_pred = (x_t - (1 - a_t) ** 0.5 * eps) / a_t**0.5
        sigma_t = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
        x_prev = a_prev**0.5 * x0_pred + (1 - a_prev - sigma_t**2) ** 0.5 * eps
        if eta > 0:
            z = torch.randn(x_t.shape, generator=generator, dtype=x_t.dtype, device=generator_device(generator))
            x_prev = x_prev + sigma_t * z.to(x_t.device)
        return x_prev, x0_pred

    def add_noise(self, x0, noise, t):
        """Forward process q(x_t | x0): sqrt(a_t) x0 + sqrt(1 - a_t) noise (used by fidelity in image variation)."""
        a_t = self.alphas_cumprod[t]
        return a_t**0.5 * x0 + (1 - a_t) ** 0.5 * noise

    def sample(self, denoiser, x_t, steps, guidance_scale=7.5, eta=0.0, generator=None, callback=None, start_step=0):
        """Run the reverse process from x_t (pure noise unless start_step > 0): the timesteps[start_step:].

        denoiser(x, t) -> (eps_uncond, eps_cond): the noise predicted without and with the condition; eps_uncond is
        None when guidance is off (guidance_scale <= 1). Then eps = eps_uncond + guidance_scale (eps_cond - eps_uncond).
        callback(step, t, x_t, **state) is called after every step with state = eps_cond, eps_uncond, eps, x0_pred.
        """
        with torch.no_grad():
            for i, t in enumerate(self.timesteps(steps)[start_step:], start=start_step):
                eps_uncond, eps_cond = denoiser(x_t, t)
                eps = eps_cond if eps_uncond is None else eps_uncond + guidance_scale * (eps_cond - eps_uncond)
                x_t, x0_pred = self.step(eps, t, x_t, steps, eta, generator)
                if callback is not None:
                    callback(i, t, x_t, eps_cond=eps_cond, eps_uncond=eps_uncond, eps=eps, x0_pred=x0_pred)
        return x_t


def generator_device(generator):
    return generator.device if generator is not None else "cpu"
