"""The toy CLIP: minivd's CLIPTextEncoder and CLIPVisionEncoder at toy widths, trained contrastively on
(render, caption) pairs.

Both towers already return VD's context: all tokens projected and divided by the length of the pooled token
(the first <|endoftext|> of the text, the class token of the image). So the pooled token of each output is CLIP's
unit-length embedding, and the contrastive loss reads it straight from the context:

    t_i = text_context_i[first EOS],  v_j = image_context_j[0]            (B, P) each, unit length
    logits = exp(s) * v @ t^T                                             (B, B), s learnable (starts at log 1/0.07)
    loss = (CE(logits, targets) + CE(logits^T, targets^T)) / 2            symmetric InfoNCE

A batch of 128 drawn from 240 scene classes often holds two pictures of one class; plain InfoNCE would push
their captions apart. The targets therefore spread each row's probability evenly over every pair whose scenes
are equal (the diagonal is the usual one-hot target when a class appears once).

Images enter as `minivd.clip.preprocess` would give them at 64 px: (pixels - CLIP mean) / CLIP std.
Legend for shape comments: B batch, T text tokens (16), N image tokens (65), P projection width (64).
"""

import math

import torch
import torch.nn.functional as F

from minivd.clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, CLIPTextConfig, CLIPTextEncoder, CLIPVisionConfig, \
    CLIPVisionEncoder
from minivd.toy import world
from minivd.toy.common import Progress, learning_rate, set_learning_rate
from minivd.toy.judge import HEADS, held_out_renders
from minivd.toy.vocab import CLIP_MAX_LENGTH

CONTEXT_DIM = 64  # the projection width = the width of the contexts the UNet's context layers read


def toy_text_config(tokenizer):
    """2 layers of width 64 over the toy vocabulary, 16 positions; pools the first <|endoftext|>."""
    return CLIPTextConfig(vocab_size=len(tokenizer.vocab), max_position_embeddings=CLIP_MAX_LENGTH, hidden_size=64,
                          intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                          projection_dim=CONTEXT_DIM, eos_token_id=tokenizer.eos_id)


def toy_vision_config():
    """3 layers of width 64 on 64 px images cut into 8 x 8 patches: 1 + 64 tokens."""
    return CLIPVisionConfig(image_size=64, patch_size=8, hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                            num_attention_heads=4, projection_dim=CONTEXT_DIM)


def normalise_pixels(images):
    """images (B, 3, S, S) in [0, 1] -> CLIP pixel values, as `minivd.clip.preprocess` makes them at size S."""
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    return (images - mean) / std


def text_embeddings(text_encoder, input_ids):
    """input_ids (B, T) -> the pooled unit-length text embeddings (B, P)."""
    context = text_encoder(input_ids)  # (B, T, P)
    return context[torch.arange(len(input_ids)), text_encoder.eos_positions(input_ids)]


def image_embeddings(vision_encoder, images):
    """images (B, 3, S, S) in [0, 1] -> the pooled unit-length image embeddings (B, P) (the class token)."""
    return vision_encoder(normalise_pixels(images))[:, 0]


def contrastive_loss(image_emb, text_emb, scene_ids, logit_scale):
    """Symmetric InfoNCE with every same-scene pair a positive. image_emb, text_emb (B, P), scene_ids (B,)."""
    logits = logit_scale.exp() * image_emb @ text_emb.T  # (B, B): image i against caption j
    same = (scene_ids[:, None] == scene_ids[None, :]).float()  # (B, B), symmetric
    targets = same / same.sum(dim=1, keepdim=True)
    image_to_text = F.cross_entropy(logits, targets)
    text_to_image = F.cross_entropy(logits.T, targets)
    return (image_to_text + text_to_image) / 2, logits


def scene_ids_of(labels):
    """labels (B, 4) -> the scene class (B,) as in `world.Scene.index`."""
    s, c, h, p = labels.unbind(dim=1)
    return ((s * len(world.COLOURS) + c) * len(world.SHAPES) + h) * len(world.PLACES) + p


def train_clip(tokenizer, steps=1500, batch_size=128, lr=2e-3, seed=0, text_cfg=None, vision_cfg=None,
               log_every=50, quiet=False):
    """Train both towers together on fresh (render, caption) pairs.
    -> (text_encoder, vision_encoder, both in eval mode, final logit scale, loss log)."""
    torch.manual_seed(seed)
    text_encoder = CLIPTextEncoder(text_cfg or toy_text_config(tokenizer))
    vision_encoder = CLIPVisionEncoder(vision_cfg or toy_vision_config())
    logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    parameters = [*text_encoder.parameters(), *vision_encoder.parameters(), logit_scale]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.05)
    data = world.batches(batch_size, seed=seed + 1)
    progress = Progress("clip", steps, log_every, quiet)
    text_encoder.train(), vision_encoder.train()
    for step in range(steps):
        set_learning_rate(optimizer, learning_rate(step, steps, lr, warmup=100))
        images, captions, labels = next(data)
        input_ids = tokenizer(captions)  # (B, T)
        loss, logits = contrastive_loss(image_embeddings(vision_encoder, images),
                                        text_embeddings(text_encoder, input_ids), scene_ids_of(labels), logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        with torch.no_grad():
            logit_scale.clamp_(0, math.log(100))
        same = scene_ids_of(labels)[:, None] == scene_ids_of(labels)[None, :]
        batch_accuracy = same[torch.arange(batch_size), logits.argmax(dim=1)].float().mean()
        progress.step(step, loss=loss.item(), acc=batch_accuracy.item(), scale=logit_scale.exp().item())
    return text_encoder.eval(), vision_encoder.eval(), logit_scale.exp().item(), progress.log


@torch.no_grad()
def measure_clip(tokenizer, text_encoder, vision_encoder, n=2000, seed=40_000):
    """Zero-shot classification of n held-out renders against the 240 canonical captions (per attribute and
    the whole scene), and of every caption of the language against the canonical ones (is the text embedding
    the same whatever the template?)."""
    scenes = world.all_scenes()
    canonical = text_embeddings(text_encoder, tokenizer([world.caption(s) for s in scenes]))  # (240, P)
    scene_labels = torch.tensor([s.labels() for s in scenes])  # (240, 4)

    images, labels = held_out_renders(n, seed)
    image_emb = torch.cat([image_embeddings(vision_encoder, images[i : i + 250]) for i in range(0, n, 250)])
    guess = scene_labels[(image_emb @ canonical.T).argmax(dim=1)]  # (n, 4)
    zero_shot = {name: 100 * (guess[:, i] == labels[:, i]).float().mean().item() for i, name in enumerate(HEADS)}
    zero_shot["all"] = 100 * (guess == labels).all(dim=1).float().mean().item()

    captions = world.all_captions()  # scene-major: 5 templates per scene
    caption_labels = scene_labels.repeat_interleave(len(world.TEMPLATES), dim=0)
    text_emb = text_embeddings(text_encoder, tokenizer(captions))
    text_guess = scene_labels[(text_emb @ canonical.T).argmax(dim=1)]
    text_to_canonical = 100 * (text_guess == caption_labels).all(dim=1).float().mean().item()
    return {"zero_shot_image_to_canonical_caption": zero_shot,
            "every_caption_to_its_canonical_caption": text_to_canonical}
