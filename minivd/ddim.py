"""DDIM sampling (Song et al. 2021) with classifier-free guidance, as one visible loop.

Legend: B batch; x_t the latent at timestep t, (B, 4, H/8, W/8) for images or (B, 768, 1, 1) for text.

Noise schedule ("scaled linear", as in Stable Diffusion and VD; or a config's own trained_betas):
    beta_t = (linspace(sqrt(beta_start), sqrt(beta_end), T))_t ** 2,   alphas_cumprod_t = prod_{s<=t} (1 - beta_s)

One DDIM step from t to the previous sampled timestep t' (a_t = alphas_cumprod[t]):
    x0_pred = (x_t - sqrt(1 - a_t) * eps) / sqrt(a_t)
    sigma_t = eta * sqrt((1 - a_t') / (1 - a_t) * (1 - a_t / a_t'))
    x_t'    = sqrt(a_t') * x0_pred + sqrt(1 - a_t' - sigma_t^2) * eps + sigma_t * z,   z ~ N(0, I)
eta = 0 is deterministic DDIM; eta = 1 is DDPM-like.

Classifier-free guidance: eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond).
"""

import warnings
from dataclasses import dataclass

import torch

from . import checks


@dataclass
class DDIMConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    steps_offset: int = 1  # "leading" spacing shifted by 1: 50 steps -> 981, 961, ..., 1
    set_alpha_to_one: bool = False  # the last step goes to alphas_cumprod[0], not to 1
    trained_betas: tuple = None  # the betas themselves, one per training timestep, instead of the schedule

    def __post_init__(self):
        T = checks.integer(self.num_train_timesteps, "num_train_timesteps", high=MAX_TIMESTEPS)
        if self.trained_betas is None:
            for key in ("beta_start", "beta_end"):  # a beta of 1 or more zeroes (or flips) every alpha after it
                checks.real(getattr(self, key), key, high=0.999, positive=True)
        else:
            if not isinstance(self.trained_betas, (list, tuple)) or len(self.trained_betas) != T:
                raise ValueError(f"trained_betas must be a list of num_train_timesteps ({T}) numbers")
            for i, beta in enumerate(self.trained_betas):
                checks.real(beta, f"trained_betas[{i}]", high=0.999, positive=True)
        checks.integer(self.steps_offset, "steps_offset", low=0, high=T - 1)
        checks.flag(self.set_alpha_to_one, "set_alpha_to_one")
        if not torch.cumprod(1.0 - betas(self), dim=0)[-1] > 0:  # each DDIM step divides by sqrt(alphas_cumprod)
            raise ValueError(f"the betas are too large for {T} timesteps: alphas_cumprod reaches 0 in float32")

    @classmethod
    def from_hf_config(cls, cfg, source="the scheduler config"):
        """From diffusers' scheduler/scheduler_config.json: every DDIMScheduler setting is honoured or refused (those
        this sampler does not implement); keys DDIMScheduler does not have are ignored, with a warning."""
        name = cfg.get("_class_name", "DDIMScheduler")
        if name != "DDIMScheduler":
            raise ValueError(f"_class_name {name!r}: minivd samples with DDIM only; give a DDIMScheduler config "
                             "(or none: VD's DDIM settings are the defaults)")
        for key, allowed in REFUSED.items():
            if key in cfg:
                checks.choice(cfg[key], key, allowed)
        ignored = sorted(k for k in cfg if not k.startswith("_") and k not in DDIM_KEYS)
        if ignored:
            warnings.warn(f"{source}: DDIMScheduler has no setting {', '.join(ignored)}; ignored", stacklevel=2)
        betas = cfg.get("trained_betas")
        return cls(
            num_train_timesteps=cfg.get("num_train_timesteps", 1000),
            beta_start=cfg.get("beta_start", 0.00085),
            beta_end=cfg.get("beta_end", 0.012),
            steps_offset=cfg.get("steps_offset", 1),
            set_alpha_to_one=cfg.get("set_alpha_to_one", False),
            trained_betas=tuple(betas) if isinstance(betas, list) else betas,
        )


MAX_TIMESTEPS = 100_000  # training schedules have about 1000; more is a broken config, not a schedule
REFUSED = {  # DDIMScheduler settings and the one value this sampler implements
    "beta_schedule": ("scaled_linear",),
    "prediction_type": ("epsilon",),
    "timestep_spacing": ("leading",),
    "clip_sample": (False,),
    "thresholding": (False,),
    "rescale_betas_zero_snr": (False,),
}
# and those it honours: the fields of DDIMConfig, and settings of clipping and thresholding, which are off
DDIM_KEYS = {*DDIMConfig.__dataclass_fields__, *REFUSED, "clip_sample_range", "dynamic_thresholding_ratio",
             "sample_max_value"}


def betas(cfg):
    """(T,) float32: the config's trained_betas, or the scaled linear schedule of the module docstring."""
    if cfg.trained_betas is not None:
        return torch.tensor(cfg.trained_betas, dtype=torch.float32)
    return torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, cfg.num_train_timesteps, dtype=torch.float32) ** 2


class DDIM:
    def __init__(self, cfg: DDIMConfig = None):
        self.config = cfg = cfg or DDIMConfig()
        self.alphas_cumprod = torch.cumprod(1.0 - betas(cfg), dim=0)  # (T,)
        self.final_alpha_cumprod = torch.tensor(1.0) if cfg.set_alpha_to_one else self.alphas_cumprod[0]

    def timesteps(self, steps):
        """The sampled timesteps, high to low: (steps,) int64."""
        if not 1 <= steps <= self.config.num_train_timesteps:
            raise ValueError(f"steps must be in [1, {self.config.num_train_timesteps}], got {steps}")
        stride = self.config.num_train_timesteps // steps
        last = (steps - 1) * stride + self.config.steps_offset
        if last >= self.config.num_train_timesteps:
            raise ValueError(f"{steps} steps with steps_offset {self.config.steps_offset} would start at timestep {last}, "
                             f"past the schedule's {self.config.num_train_timesteps}: use fewer steps")
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
