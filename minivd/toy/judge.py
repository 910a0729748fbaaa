"""The judge: a small attribute classifier that grades images, trained only on clean renders of the toy world.

It is independent of everything it grades: it never sees a generated image and shares nothing with the toy's
CLIP. To read decoded images (slightly blurred, noisy, shifted in colour) it is trained on clean renders damaged
in those ways (`common.degrade`).

    image (B, 3, 64, 64) in [0, 1]
      -> 4 x [conv3x3 -> GroupNorm -> ReLU -> max-pool 2]        (B, 64, 4, 4)
      -> flatten -> Linear -> ReLU                                (B, hidden)
      -> four heads: size (2), colour (6), shape (4), place (5) logits

The flattened map keeps where things are, which the place head needs.
Legend for shape comments: B batch.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from minivd.toy import world
from minivd.toy.common import Progress, degrade, learning_rate, set_learning_rate

HEADS = tuple(world.ATTRIBUTES)  # ("size", "colour", "shape", "place")


@dataclass
class JudgeConfig:
    image_size: int = 64
    channels: tuple = (16, 32, 64, 64)  # one conv stage each, every stage halves the side
    hidden: int = 64
    classes: tuple = tuple(len(values) for values in world.ATTRIBUTES.values())  # (2, 6, 4, 5)

    def __post_init__(self):  # JSON gives lists back
        self.channels, self.classes = tuple(self.channels), tuple(self.classes)


class Judge(nn.Module):
    def __init__(self, cfg=None):
        super().__init__()
        self.config = cfg = cfg or JudgeConfig()
        stages, c_in = [], 3
        for c in cfg.channels:
            stages += [nn.Conv2d(c_in, c, 3, padding=1), nn.GroupNorm(8, c), nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c
        self.features = nn.Sequential(*stages)
        side = cfg.image_size // 2 ** len(cfg.channels)
        self.hidden = nn.Linear(c_in * side * side, cfg.hidden)
        self.heads = nn.ModuleList(nn.Linear(cfg.hidden, n) for n in cfg.classes)

    def forward(self, images):
        """images (B, 3, S, S) in [0, 1] -> list of 4 logit tensors (B, n_attribute), in HEADS order."""
        h = self.features(images * 2 - 1).flatten(1)  # (B, C, s, s) -> (B, C*s*s)
        h = F.relu(self.hidden(h))
        return [head(h) for head in self.heads]

    @torch.no_grad()
    def predict(self, images, batch_size=256):
        """images (B, 3, S, S) in [0, 1] -> labels (B, 4) long: the most likely size, colour, shape, place."""
        out = []
        for start in range(0, images.shape[0], batch_size):
            logits = self(images[start : start + batch_size])
            out.append(torch.stack([l.argmax(dim=-1) for l in logits], dim=1))
        return torch.cat(out)


def accuracy(predicted, labels):
    """predicted, labels (B, 4) -> {"size": %, "colour": %, "shape": %, "place": %, "all": %}."""
    right = predicted == labels  # (B, 4)
    scores = {name: 100 * right[:, i].float().mean().item() for i, name in enumerate(HEADS)}
    scores["all"] = 100 * right.all(dim=1).float().mean().item()
    return scores


def held_out_renders(n, seed):
    """n fresh renders and their labels (B, 4), from a seed that training does not use."""
    images, _, labels = next(world.batches(n, seed=seed))
    return images, labels


def train_judge(steps=600, batch_size=128, lr=3e-3, seed=0, cfg=None, log_every=50, quiet=False):
    """Train the judge on clean renders (a random 80% of them degraded) with cross-entropy summed over the four
    heads. -> (judge in eval mode, loss log)."""
    torch.manual_seed(seed)
    judge = Judge(cfg)
    optimizer = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed + 1)
    data = world.batches(batch_size, seed=seed + 2)
    progress = Progress("judge", steps, log_every, quiet)
    judge.train()
    for step in range(steps):
        set_learning_rate(optimizer, learning_rate(step, steps, lr))
        images, _, labels = next(data)
        images = degrade(images, generator)
        logits = judge(images)
        loss = sum(F.cross_entropy(l, labels[:, i]) for i, l in enumerate(logits))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        progress.step(step, loss=loss.item())
    return judge.eval(), progress.log


def measure_judge(judge, n=2000, seed=10_000):
    """Per-attribute accuracy on n held-out clean renders, and on the same renders degraded."""
    images, labels = held_out_renders(n, seed)
    damaged = degrade(images, torch.Generator().manual_seed(seed), p=1.0)
    return {"clean": accuracy(judge.predict(images), labels), "degraded": accuracy(judge.predict(damaged), labels)}
