"""Train Versatile Diffusion: the multi-flow diffusion objective on minivd's own modules.

    python -m minivd.train --init FOLDER --data toy --out runs/toy --steps 6000          # the toy world's UNet
    python -m minivd.train --init FOLDER --data PAIRS/ --flows text-to-image --train context.text --out runs/ft
    torchrun --nproc_per_node 2 -m minivd.train ...       # several processes: gloo on CPU, nccl on GPU
    python -m minivd.train ... --resume                   # continue from --out's last checkpoint

--init is a checkpoint folder in either official layout (minivd.load reads it): its encoders and VAEs stay frozen, as
in VD; its UNet is fine-tuned, or trained from scratch with --new-unet. --data is "toy" (minivd.toy.world, drawn on the
fly) or a folder of image files, each with a caption in a .txt file of the same name. The run writes, in --out:
state.pt (everything to resume), loss.jsonl (one line per log interval), and checkpoint/, the trained model in the
official diffusers layout (minivd.load and diffusers read it).

The objective (epsilon prediction, Ho et al. 2020), for each flow and each sample, with the sampler's alphas_cumprod:
    t ~ U{0, ..., T-1},   eps ~ N(0, I),   x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps,   loss = |eps - unet(x_t, t, c)|^2
x0 is the image's VAE latent (image flows) or the caption's Optimus latent (text flows); the context c is CLIP's
embedding of the caption (text conditions) or of the image (image conditions), replaced for a share `uncond` of the
samples by the unconditional context ("" / the mid-gray picture) that classifier-free guidance uses at sampling.

Multi-flow training (paper Sec. 4): every step computes each active flow's loss on the same batch and takes one step
on their mean, so each layer set gets the gradients of exactly the flows that use it:
    global layers (time embedding): all flows; data layers "image": text-to-image, image-variation; data layers "text":
    image-to-text, text-variation; context layers "text": text-to-image, text-variation; context layers "image":
    image-variation, image-to-text. (Dual-guided has no layers of its own: it mixes two flows' context layers.)
--progressive is the paper's order: text-to-image alone for the first quarter of the steps, then with image-variation
(the dual-context stage) for the second, then all four flows.
Where the paper is silent, minivd chooses: flows weigh equally (the mean of their losses); every flow draws its own
t, noise and unconditional samples; text-variation learns to write a paraphrase of its condition (another caption of
the same picture, when the data has one: the toy world's templates; a folder's single caption otherwise); AdamW (betas 0.9, 0.999, weight decay 0.01) with a linear warm-up and a cosine
decay of the learning rate to a tenth; gradients clipped to norm 1; an optional EMA of the UNet is what gets exported.

Legend: B batch, S image side, T text tokens, N image tokens, Cc context width, Z Optimus latent size.
"""

import argparse
import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from . import export
from .checkpoint import load
from .model import MODULES
from .unet import FLOWS

TRAINED_FLOWS = ("text-to-image", "image-variation", "image-to-text", "text-variation")
LAYER_SETS = ("time_embed", "data.image", "data.text", "context.text", "context.image")


@dataclass
class TrainConfig:
    init: str = None  # checkpoint folder to start from
    data: str = "toy"  # "toy" or a folder of image files with same-named .txt captions
    out: str = "runs/vd"
    flows: tuple = TRAINED_FLOWS
    train: tuple = LAYER_SETS  # the UNet layer sets that learn (those the active flows use)
    progressive: bool = False
    new_unet: bool = False  # start the UNet from a random initialisation
    size: int = None  # image side in pixels (None: the model's default height, 64 for the toy, 512 for VD)
    steps: int = 1000
    batch_size: int = 32  # the global batch: split between the processes of a torchrun
    lr: float = 1e-4
    warmup: int = 100
    uncond: float = 0.1  # share of conditions replaced by the unconditional context
    ema: float = 0.0  # e.g. 0.999; 0 switches the EMA off
    seed: int = 0
    log_every: int = 50
    save_every: int = 1000
    description: str = None  # minivd.json's description of the exported model
    resume: bool = False  # continue from out/state.pt


# ---------------------------------------------------------------------------------------------------------------------
# Data: every process draws the whole global batch of a step from (seed, step) and keeps its own share


class ToyPairs:
    """(image, caption) pairs of the toy world (minivd.toy.world), drawn on the fly: a random scene and template each,
    and a paraphrase: the same scene in another random template."""

    def __init__(self, size):
        from .toy import world

        self.world, self.size = world, size

    def batch(self, rng, n):
        """-> (n PIL images, n captions, n paraphrases)."""
        w = self.world
        scenes = [w.Scene.from_labels([rng.integers(len(v)) for v in w.ATTRIBUTES.values()]) for _ in range(n)]
        templates, others = rng.integers(len(w.TEMPLATES), size=(2, n))
        images = [w.render(scene, self.size, rng) for scene in scenes]
        return (images, [w.caption(s, int(t)) for s, t in zip(scenes, templates)],
                [w.caption(s, int(t)) for s, t in zip(scenes, others)])


class FolderPairs:
    """(image, caption) pairs from a folder: every image file with a .txt caption of the same name."""

    EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

    def __init__(self, folder, size):
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"--data {folder}: no such folder (or use --data toy)")
        names = sorted(n for n in os.listdir(folder) if n.lower().endswith(self.EXTENSIONS))
        self.pairs = [(os.path.join(folder, n), os.path.splitext(os.path.join(folder, n))[0] + ".txt") for n in names]
        self.pairs = [(image, text) for image, text in self.pairs if os.path.isfile(text)]
        if not self.pairs:
            raise ValueError(f"--data {folder}: no image file with a same-named .txt caption")
        self.size = size

    def batch(self, rng, n):
        """-> (n PIL images, n captions, the same captions as paraphrases)."""
        images, captions = [], []
        for i in rng.integers(len(self.pairs), size=n):
            image_path, text_path = self.pairs[i]
            with Image.open(image_path) as im:
                images.append(centre_square(im.convert("RGB"), self.size))
            with open(text_path, encoding="utf-8") as f:
                captions.append(f.read().strip())
        return images, captions, captions


def centre_square(image, size):
    """Resize the short side to `size` (bicubic) and crop the centre square."""
    w, h = image.size
    scale = size / min(w, h)
    image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def to_pixels(images):
    """PIL images -> (B, 3, S, S) float32 in [0, 1]."""
    return torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) / 255 for im in images])).permute(0, 3, 1, 2)


# ---------------------------------------------------------------------------------------------------------------------
# The objective


class MultiFlowLoss(nn.Module):
    """The VD objective of several flows in one forward call (so that DDP can wrap it: one forward per step)."""

    def __init__(self, unet, alphas_cumprod):
        super().__init__()
        self.unet = unet
        self.register_buffer("alphas_cumprod", alphas_cumprod.clone(), persistent=False)

    def forward(self, targets, flows):
        """targets: {flow: (x0, t, noise, context)} with x0 and noise (B, 4, h, w) or (B, Z, 1, 1), t (B,), context
        (B, T or N, Cc). Returns (the mean of the flows' losses, {flow: loss})."""
        losses = {}
        for flow in flows:
            x0, t, noise, context = targets[flow]
            data, (kind,) = FLOWS[flow]
            a = self.alphas_cumprod[t].view(-1, 1, 1, 1)  # (B, 1, 1, 1)
            x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise  # the forward process q(x_t | x0)
            eps = self.unet(x_t, t, [(kind, context, 1.0)], data)
            losses[flow] = F.mse_loss(eps.float(), noise.float())
        return sum(losses.values()) / len(losses), losses


@torch.no_grad()
def frozen_targets(model, images, captions, flows, uncond, generator, share=slice(None), paraphrases=None):
    """What the frozen networks give for the `share` of a batch, and each flow's draws for it (made for the whole
    batch, so that any split between processes sees the same numbers): {flow: (x0, t, noise, context)}.
    text-variation's x0 is the paraphrases' latent (default: the captions')."""
    device, B = model.device, len(images)
    draws = {}
    for flow in flows:  # t, noise and the unconditional samples of every flow, for the whole batch
        t = torch.randint(0, len(model.sampler.alphas_cumprod), (B,), generator=generator)
        if FLOWS[flow][0] == "image":  # (B, 4, S/8, S/8) like the VAE's latents
            shape = (B, model.config.unet.image_channels, images[0].size[1] // model.vae_factor,
                     images[0].size[0] // model.vae_factor)
        else:  # (B, Z, 1, 1) like the Optimus latents
            shape = (B, model.config.unet.text_channels, 1, 1)
        noise = torch.randn(shape, generator=generator)
        dropped = torch.rand(B, generator=generator) < uncond
        draws[flow] = t[share], noise[share], dropped[share]
    images, captions = images[share], captions[share]
    paraphrases = captions if paraphrases is None else paraphrases[share]
    x0, contexts, nulls = {}, {}, {}
    if any(FLOWS[f][0] == "image" for f in flows):
        # (B, 4, S/8, S/8). contiguous(): the VAE's last conv leaves a channels-last layout, and a UNet fed that with
        # frozen first layers crashed in backward (torch 2.13, CPU)
        x0["image"] = model.encode_images(to_pixels(images)).to(model.dtype).contiguous()
    if "image-to-text" in flows:
        x0["image-to-text"] = model.optimus.encode(captions).to(device, model.dtype)[:, :, None, None]  # (B, Z, 1, 1)
    if "text-variation" in flows:
        x0["text-variation"] = model.optimus.encode(paraphrases).to(device, model.dtype)[:, :, None, None]
    if any(FLOWS[f][1] == ("text",) for f in flows):
        contexts["text"], nulls["text"] = model.encode_text(captions), model.encode_text([""])  # (B, T, Cc), (1, T, Cc)
    if any(FLOWS[f][1] == ("image",) for f in flows):
        contexts["image"] = model.encode_image(images)  # (B, N, Cc)
        nulls["image"] = model.encode_image([model.unconditional_image()])
    targets = {}
    for flow in flows:
        data, (kind,) = FLOWS[flow]
        t, noise, dropped = draws[flow]
        context = torch.where(dropped.view(-1, 1, 1).to(device), nulls[kind], contexts[kind])  # uncond for a share
        targets[flow] = (x0[data] if data == "image" else x0[flow], t.to(device), noise.to(device, model.dtype), context)
    return targets


def stages(config):
    """[(first step, flows)]: one stage, or the paper's three (--progressive)."""
    if not config.progressive:
        return [(0, tuple(config.flows))]
    return [(0, ("text-to-image",)), (config.steps // 4, ("text-to-image", "image-variation")),
            (config.steps // 2, TRAINED_FLOWS)]


def learning_rate(step, config):
    """Linear warm-up to config.lr, then a cosine decay to a tenth of it at the last step."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


# ---------------------------------------------------------------------------------------------------------------------
# The run


def train(config: TrainConfig):
    """Train the UNet of config.init's model; returns the exported checkpoint folder."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    device = torch.device("cpu")
    if world > 1:  # started by torchrun: one process per GPU, or several on the CPU
        if torch.cuda.is_available():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    if config.batch_size % world:
        raise ValueError(f"--batch-size {config.batch_size} does not split evenly between {world} processes")
    check_config(config)
    main = rank == 0
    say = print if main else (lambda *a, **k: None)

    # the model: frozen encoders and VAEs, the UNet's chosen layer sets learning
    model = load(config.init, device=device)
    used = [f for f in TRAINED_FLOWS if any(f in flows for _, flows in stages(config))]  # in a fixed order: every
    for flow in used:  # process must build its layer sets (and so its parameter list) in the same order
        model.prepare(flow, vae_encoder=FLOWS[flow][0] == "image")
    if config.new_unet:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            model.unet = model.new_module("unet", tuple(used)).to(device)
    model.requires_grad_(False).eval()
    for name in MODULES:
        if getattr(model, name) is not None:
            getattr(model, name).eval()
    learning = [s for s in config.train if layer_set_used(s, used)]
    params = [p for s in learning for p in layer_set(model.unet, s).parameters()]
    for p in params:
        p.requires_grad_(True)
    model.unet.train()
    objective = MultiFlowLoss(model.unet, model.sampler.alphas_cumprod).to(device)
    if world > 1:
        objective = nn.parallel.DistributedDataParallel(objective, find_unused_parameters=config.progressive)
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.999), weight_decay=0.01)
    ema = {k: v.detach().clone() for k, v in model.unet.state_dict().items()} if config.ema else None
    size = config.size or model.config.defaults.height
    pairs = ToyPairs(size) if config.data == "toy" else FolderPairs(config.data, size)

    # resume
    step, state_path = 0, os.path.join(config.out, "state.pt")
    os.makedirs(config.out, exist_ok=True)
    if os.path.isfile(state_path) and config.resume:
        state = torch.load(state_path, map_location=device, weights_only=True)
        model.unet.load_state_dict(state["unet"])
        optimizer.load_state_dict(state["optimizer"])
        ema, step = state["ema"], state["step"]
        say(f"resumed from {state_path} at step {step}")
    n_learning = sum(p.numel() for p in params)
    say(f"training {', '.join(learning)} ({n_learning / 1e6:.2f} M parameters) on {world} process(es), {device}; "
        f"flows: {' | '.join(', '.join(f) for _, f in stages(config))}")

    local = config.batch_size // world
    log = open(os.path.join(config.out, "loss.jsonl"), "a" if step else "w") if main else None
    start, start_step, running = time.time(), step, {}
    while step < config.steps:
        flows = [f for first, f in stages(config) if first <= step][-1]
        rng = np.random.default_rng([config.seed, step])  # the step's batch, the same in every process
        images, captions, paraphrases = pairs.batch(rng, config.batch_size)
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        share = slice(rank * local, (rank + 1) * local)  # this process's share of the global batch
        targets = frozen_targets(model, images, captions, flows, config.uncond, generator, share, paraphrases)

        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, config)
        loss, losses = objective(targets, flows)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if ema is not None:
            with torch.no_grad():
                for k, v in model.unet.state_dict().items():
                    ema[k].lerp_(v, 1 - config.ema) if v.is_floating_point() else ema[k].copy_(v)
        step += 1

        for f, value in losses.items():
            running[f] = running.get(f, []) + [value.item()]
        if step % config.log_every == 0 or step == config.steps:
            means = {f: sum(v) / len(v) for f, v in running.items()}
            if world > 1:  # the mean over every process's share: the loss of the global batch
                values = torch.tensor(list(means.values()), dtype=torch.float64, device=device)
                dist.all_reduce(values)
                means = dict(zip(means, (values / world).tolist()))
            rate = (step - start_step) / (time.time() - start)
            left = (config.steps - step) / rate
            say(f"step {step:6d}/{config.steps}  loss {sum(means.values()) / len(means):.4f} ("
                + ", ".join(f"{f} {v:.4f}" for f, v in means.items()) + f")  lr {learning_rate(step - 1, config):.2e}"
                f"  {rate:.2f} steps/s  {int(left // 60)}m{int(left % 60):02d}s left", flush=True)
            if log:
                log.write(json.dumps({"step": step, "loss": sum(means.values()) / len(means), **means,
                                      "lr": learning_rate(step - 1, config), "time_s": round(time.time() - start, 1)}) + "\n")
                log.flush()
            running = {}
        if main and (step % config.save_every == 0 or step == config.steps):
            torch.save({"unet": model.unet.state_dict(), "optimizer": optimizer.state_dict(), "ema": ema, "step": step,
                        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}},
                       state_path + ".tmp")
            os.replace(state_path + ".tmp", state_path)  # a run stopped while saving keeps the previous state
    folder = os.path.join(config.out, "checkpoint")
    if main:
        save_model(model, ema, folder, config)
        say(f"saved {folder}")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return folder


def save_model(model, ema, folder, config):
    """The trained model (its EMA weights, if any) as an official diffusers-layout folder."""
    trained = model
    if ema is not None:
        trained = copy.copy(model)  # the same networks, but a UNet with the EMA's weights
        trained.unet = copy.deepcopy(model.unet)
        trained.unet.load_state_dict(ema)
    if config.description:
        trained.config.description = config.description
    export.save(trained, folder)


def layer_set(unet, name):
    if name == "time_embed":
        return unet.time_embed
    kind, which = name.split(".")[1], name.split(".")[0]
    return (unet.data if which == "data" else unet.context)[kind]


def layer_set_used(name, flows):
    """Does a flow of `flows` use the layer set `name`?"""
    if name == "time_embed":
        return bool(flows)
    which, kind = name.split(".")
    return any((FLOWS[f][0] == kind) if which == "data" else (kind in FLOWS[f][1]) for f in flows)


def check_config(config):
    if config.init is None:
        raise ValueError("--init is needed: the checkpoint folder whose encoders, VAEs and UNet the run starts from")
    unknown = [f for f in config.flows if f not in TRAINED_FLOWS]
    if unknown:
        hint = " (dual-guided has no layers of its own: train text-to-image and image-variation)" if "dual-guided" in unknown else ""
        raise ValueError(f"--flows: {', '.join(unknown)} cannot be trained; choose from {', '.join(TRAINED_FLOWS)}{hint}")
    unknown = [s for s in config.train if s not in LAYER_SETS]
    if unknown:
        raise ValueError(f"--train: unknown layer set(s) {', '.join(unknown)}; choose from {', '.join(LAYER_SETS)}")
    if not (config.steps >= 1 and config.batch_size >= 1 and config.lr > 0 and 0 <= config.uncond <= 1
            and 0 <= config.ema < 1):
        raise ValueError("need --steps >= 1, --batch-size >= 1, --lr > 0, --uncond in [0, 1], --ema in [0, 1)")


def main(argv=None):
    defaults = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m minivd.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--init", required=True, help="checkpoint folder to start from (either official layout)")
    p.add_argument("--data", default=defaults.data, help='"toy" or a folder of images with same-named .txt captions')
    p.add_argument("--out", default=defaults.out, help="run folder: state.pt, loss.jsonl, checkpoint/")
    p.add_argument("--flows", nargs="+", default=list(defaults.flows), help="the flows to train")
    p.add_argument("--train", nargs="+", default=list(defaults.train), help="the UNet layer sets that learn")
    p.add_argument("--progressive", action="store_true", help="the paper's order: 1 flow, 2 flows, 4 flows")
    p.add_argument("--new-unet", action="store_true", help="start the UNet from a random initialisation")
    p.add_argument("--resume", action="store_true", help="continue from --out/state.pt")
    for name in ("steps", "batch_size", "lr", "warmup", "uncond", "ema", "seed", "log_every", "save_every"):
        value = getattr(defaults, name)
        p.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's)")
    p.add_argument("--description", default=None, help="what the exported model says it is (minivd.json)")
    args = p.parse_args(argv)
    config = TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items()})
    try:
        train(config)
    except (ValueError, FileNotFoundError) as e:
        p.exit(2, f"error: {e}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
