"""What every toy training stage shares: the learning-rate schedule, the progress line and loss log, image
augmentation, and writing a component as <name>.safetensors (minivd state-dict names) + <name>.json (its config).

Legend for shape comments: B batch, S image side.
"""

import dataclasses
import json
import math
import os
import time

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file


def learning_rate(step, total, peak, warmup=50, final=0.05):
    """Linear warm-up over `warmup` steps to `peak`, then a cosine down to `final` * peak at step `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_learning_rate(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


class Progress:
    """One log line every `every` steps: the stage, the step, the losses, steps per second and the time left.
    Keeps every logged line in `self.log` (a list of dicts) for the loss log."""

    def __init__(self, stage, total, every=50, quiet=False):
        self.stage, self.total, self.every, self.quiet = stage, total, every, quiet
        self.start = time.perf_counter()
        self.log = []

    def step(self, step, **losses):
        """Call after step `step` (0-based) with the current losses (floats or 0-d tensors)."""
        done = step + 1
        if done % self.every and done != self.total:
            return
        elapsed = time.perf_counter() - self.start
        rate = done / elapsed
        losses = {name: float(value) for name, value in losses.items()}
        self.log.append({"step": done, "time_s": round(elapsed, 2), **losses})
        if not self.quiet:
            shown = "  ".join(f"{name} {value:.4g}" for name, value in losses.items())
            left = (self.total - done) / rate
            print(f"{self.stage:8s} step {done:5d}/{self.total}  {shown}  {rate:.2f} steps/s  "
                  f"left {int(left // 60)}m{int(left % 60):02d}s", flush=True)

    @property
    def seconds(self):
        return time.perf_counter() - self.start


def gaussian_blur(images, sigma):
    """images (B, C, S, S), sigma (B,) in pixels (0: unchanged) -> (B, C, S, S), each image blurred with its own
    separable Gaussian kernel (7 taps)."""
    B, C, S, _ = images.shape
    taps = torch.arange(-3, 4, dtype=images.dtype, device=images.device)  # (7,)
    kernel = torch.exp(-0.5 * (taps[None] / sigma.clamp(min=1e-3)[:, None]) ** 2)  # (B, 7)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    kernel = kernel.repeat_interleave(C, dim=0)  # (B*C, 7): one kernel per (image, channel)
    x = images.reshape(1, B * C, S, S)  # every (image, channel) becomes a channel of one "image"
    x = F.conv2d(F.pad(x, (3, 3, 0, 0), mode="replicate"), kernel[:, None, None, :], groups=B * C)
    x = F.conv2d(F.pad(x, (0, 0, 3, 3), mode="replicate"), kernel[:, None, :, None], groups=B * C)
    return x.reshape(B, C, S, S)


def degrade(images, generator, strength=1.0, p=0.8):
    """Mild damage of the kind a decoder adds, applied to a random `p` of the images (B, 3, S, S) in [0, 1]:
    blur (sigma up to 1.2 px), Gaussian noise (std up to 0.05), a per-channel gain (0.9-1.1) and offset
    (+-0.03). `strength` scales all of them. Returns images in [0, 1]."""
    B = images.shape[0]

    def uniform(*shape, low=0.0, high=1.0):
        return low + (high - low) * torch.rand(*shape, generator=generator)

    apply = (torch.rand(B, generator=generator) < p).float()  # (B,) 1 where the image is damaged
    sigma = uniform(B, high=1.2 * strength) * apply
    out = torch.where(sigma[:, None, None, None] > 0.05, gaussian_blur(images, sigma), images)
    gain = 1 + uniform(B, 3, 1, 1, low=-0.1, high=0.1) * strength * apply[:, None, None, None]
    offset = uniform(B, 3, 1, 1, low=-0.03, high=0.03) * strength * apply[:, None, None, None]
    noise_std = uniform(B, 1, 1, 1, high=0.05 * strength) * apply[:, None, None, None]
    noise = torch.randn(images.shape, generator=generator) * noise_std
    return (out * gain + offset + noise).clamp(0, 1)


def parameter_count(module):
    return sum(p.numel() for p in module.parameters())


def save_component(out_dir, name, module, config):
    """Write out_dir/<name>.safetensors (the module's state dict) and out_dir/<name>.json (the config's fields)."""
    os.makedirs(out_dir, exist_ok=True)
    tensors = {key: value.detach().contiguous() for key, value in module.state_dict().items()}
    save_file(tensors, os.path.join(out_dir, f"{name}.safetensors"))
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(dataclasses.asdict(config), f, indent=2)


def load_component(out_dir, name, config_class, build):
    """Read a component written by `save_component`: build(config) makes the module, the weights load strictly."""
    with open(os.path.join(out_dir, f"{name}.json")) as f:
        config = config_class(**json.load(f))
    module = build(config)
    module.load_state_dict(load_file(os.path.join(out_dir, f"{name}.safetensors")), strict=True)
    return module.eval()


def write_json(path, data):
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
