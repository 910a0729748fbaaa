"""The toy image VAE: minivd's AutoencoderKL at toy widths, trained on renders of the toy world.

Four levels give VD's 8x factor: a 64 x 64 image becomes a 4 x 8 x 8 latent. The objective is kl-f8's without
its perceptual and adversarial terms:

    z ~ N(mean, exp(logvar)) = encoder(x),   x_hat = decoder(z)
    loss = mean_pixels(w * (|x_hat - x| + (x_hat - x)^2)) + kl_weight * mean_latents(KL(N(mean, var) || N(0, 1)))

w is 1 on the black background and `foreground_weight` on the shape's pixels (the shape is 5-20% of the image;
its outline is what the judge and the other components must read). After training, `scaling_factor` is set to
1 / std of the latent means, the role 0.18215 plays for VD's kl-f8: the diffusion model then sees latents of
about unit variance.

Legend for shape comments: B batch, L latent channels (4), h = w = 8.
"""

import torch

from minivd.toy import world
from minivd.toy.common import Progress, learning_rate, set_learning_rate
from minivd.toy.judge import accuracy, held_out_renders
from minivd.vae import AutoencoderKL, VAEConfig


def toy_vae_config():
    """[16, 32, 48, 48] channels, one ResBlock per encoder level: 64 px -> 4 x 8 x 8."""
    return VAEConfig(block_out_channels=[16, 32, 48, 48], layers_per_block=1, norm_groups=8, latent_channels=4,
                     scaling_factor=1.0)


def vae_loss(vae, images, kl_weight, foreground_weight):
    """images (B, 3, 64, 64) in [0, 1] -> (loss, reconstruction term, KL per latent element)."""
    x = images * 2 - 1
    mean, logvar = vae.encode(x)  # (B, L, h, w) each
    z = mean + torch.randn_like(mean) * (0.5 * logvar).exp()  # a posterior sample (reparameterised)
    error = vae.decode(z) - x  # (B, 3, 64, 64)
    foreground = (images.amax(dim=1, keepdim=True) > 0.05).float()  # (B, 1, 64, 64)
    weight = 1 + (foreground_weight - 1) * foreground
    reconstruction = (weight * (error.abs() + error**2)).mean()
    kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).mean()
    return reconstruction + kl_weight * kl, reconstruction, kl


def train_vae(steps=1500, batch_size=32, lr=2e-3, kl_weight=1e-3, foreground_weight=4.0, seed=0, cfg=None,
              scale_samples=1000, log_every=50, quiet=False):
    """Train the toy VAE on fresh renders; set `cfg.scaling_factor` from the latents of `scale_samples` held-out
    renders. -> (vae in eval mode, loss log)."""
    torch.manual_seed(seed)
    cfg = cfg or toy_vae_config()
    vae = AutoencoderKL(cfg)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    data = world.batches(batch_size, seed=seed + 1)
    progress = Progress("vae", steps, log_every, quiet)
    vae.train()
    for step in range(steps):
        set_learning_rate(optimizer, learning_rate(step, steps, lr))
        images, _, _ = next(data)
        loss, reconstruction, kl = vae_loss(vae, images, kl_weight, foreground_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        progress.step(step, loss=loss.item(), rec=reconstruction.item(), kl=kl.item())
    vae.eval()
    cfg.scaling_factor = latent_scale(vae, scale_samples)
    return vae, progress.log


@torch.no_grad()
def latent_scale(vae, n=1000, seed=20_000):
    """1 / std of the latent means of n held-out renders (all elements together), rounded to 5 digits."""
    images, _ = held_out_renders(n, seed)
    mean, _ = vae.encode(images * 2 - 1)
    return round(1.0 / mean.std().item(), 5)


@torch.no_grad()
def reconstruct(vae, images, noise=0.0, generator=None, batch_size=250):
    """images (B, 3, 64, 64) in [0, 1] -> decode(encode mean) in [0, 1]. noise: add Gaussian noise of this std to
    the SCALED latent first (diffusion samples are never exact)."""
    out = []
    for start in range(0, images.shape[0], batch_size):
        mean, _ = vae.encode(images[start : start + batch_size] * 2 - 1)
        latents = mean * vae.cfg.scaling_factor
        if noise:
            latents = latents + noise * torch.randn(latents.shape, generator=generator)
        out.append((vae.decode(latents / vae.cfg.scaling_factor) / 2 + 0.5).clamp(0, 1))
    return torch.cat(out)


@torch.no_grad()
def measure_vae(vae, judge, n=1000, seed=30_000):
    """The judge's accuracy on reconstructions of n held-out renders (clean, and with latent noise of std 0.1 and
    0.2 in the scaled latent space), PSNR, and the latent statistics."""
    images, labels = held_out_renders(n, seed)
    generator = torch.Generator().manual_seed(seed)
    recon = reconstruct(vae, images)
    mse = ((recon - images) ** 2).mean(dim=(1, 2, 3))
    mean, logvar = vae.encode(images[:250] * 2 - 1)
    return {
        "judge_on_renders": accuracy(judge.predict(images), labels),
        "judge_on_reconstructions": accuracy(judge.predict(recon), labels),
        "judge_on_reconstructions_latent_noise_0.1": accuracy(
            judge.predict(reconstruct(vae, images, 0.1, generator)), labels),
        "judge_on_reconstructions_latent_noise_0.2": accuracy(
            judge.predict(reconstruct(vae, images, 0.2, generator)), labels),
        "psnr_db": (10 * torch.log10(1 / mse)).mean().item(),
        "mae": (recon - images).abs().mean().item(),
        "scaled_latent_std": (mean * vae.cfg.scaling_factor).std().item(),
        "scaled_latent_mean": (mean * vae.cfg.scaling_factor).mean().item(),
        "posterior_std_scaled": ((0.5 * logvar).exp() * vae.cfg.scaling_factor).mean().item(),
        "scaling_factor": vae.cfg.scaling_factor,
    }
