"""Smoke tests of the toy's training stages: a few steps each, the loss must go down; files round-trip."""

import os

import numpy as np
import pytest
import torch

from minivd.optimus import load_tokenizers
from minivd.tokenizer import CLIPTokenizer
from minivd.toy import components, judge, train_clip, train_optimus, train_vae, vocab, world
from minivd.toy.common import degrade, load_component, save_component
from minivd.vae import AutoencoderKL, VAEConfig, images_to_latents


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("toy_run"))
    vocab.write_tokenizers(out)
    return out


def _went_down(log, key="loss", n=3):
    """The mean of the last n logged values is below the mean of the first n."""
    values = [row[key] for row in log]
    return np.mean(values[-n:]) < np.mean(values[:n])


def test_judge_learns():
    model, log = judge.train_judge(steps=15, batch_size=16, log_every=1, quiet=True)
    assert len(log) == 15 and _went_down(log)
    assert not model.training


def test_vae_learns_and_sets_its_scale():
    cfg = train_vae.toy_vae_config()
    model, log = train_vae.train_vae(steps=8, batch_size=4, log_every=1, quiet=True, cfg=cfg,
                                       scale_samples=16)
    assert _went_down(log, "rec")
    assert model.downscale == 8 and cfg.scaling_factor != 1.0
    images = next(world.batches(4, seed=9))[0]
    latents = images_to_latents(model, images)
    assert latents.shape == (4, 4, 8, 8)


def test_clip_learns(tokenizer_dir):
    tok = CLIPTokenizer.from_folder(os.path.join(tokenizer_dir, "clip_tokenizer"))
    text, vision, scale, log = train_clip.train_clip(tok, steps=20, batch_size=16, log_every=1, quiet=True)
    assert _went_down(log)
    assert text.config.projection_dim == vision.config.projection_dim == train_clip.CONTEXT_DIM
    images, captions, _ = next(world.batches(3, seed=1))
    with torch.no_grad():
        assert text(tok(captions)).shape == (3, vocab.CLIP_MAX_LENGTH, train_clip.CONTEXT_DIM)
        assert vision(train_clip.normalise_pixels(images)).shape == (3, 65, train_clip.CONTEXT_DIM)


def test_contrastive_targets_treat_equal_scenes_as_positives():
    emb = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    scene_ids = torch.tensor([0, 1, 0, 2])
    loss, logits = train_clip.contrastive_loss(emb, emb, scene_ids, torch.tensor(0.0))
    # images 0 and 2 share a scene: their caption columns are equally right, so swapping them changes nothing
    swapped = emb[[2, 1, 0, 3]]
    loss_swapped, _ = train_clip.contrastive_loss(emb, swapped, scene_ids, torch.tensor(0.0))
    assert torch.allclose(loss, loss_swapped)
    other, _ = train_clip.contrastive_loss(emb, emb[[1, 0, 2, 3]], scene_ids, torch.tensor(0.0))
    assert not torch.allclose(loss, other)


def test_optimus_learns(tokenizer_dir):
    bert, gpt2 = load_tokenizers(os.path.join(tokenizer_dir, "optimus_tokenizer"))
    model, log = train_optimus.train_optimus(bert, gpt2, steps=30, batch_size=16, log_every=1, quiet=True)
    assert _went_down(log, "rec")
    assert model.config.latent_dim == 32 and not model.training
    training, held_out = train_optimus.split_sentences()
    assert len(training) + len(held_out) == 1200 and len(held_out) == 120
    assert not {t for t, _ in training} & {t for t, _ in held_out}
    assert {s for _, s in training} == set(world.all_scenes())  # every scene stays in training


def test_degrade_keeps_range_and_changes_images():
    images = next(world.batches(8, seed=2))[0]
    damaged = degrade(images, torch.Generator().manual_seed(0), p=1.0)
    assert damaged.shape == images.shape and 0 <= damaged.min() and damaged.max() <= 1
    assert (damaged - images).abs().mean() > 1e-3
    again = degrade(images, torch.Generator().manual_seed(0), p=1.0)
    assert torch.equal(damaged, again)


def test_components_round_trip(tmp_path, tokenizer_dir):
    torch.manual_seed(0)
    cfg = VAEConfig(block_out_channels=[8, 8], layers_per_block=1, norm_groups=4, scaling_factor=0.5)
    vae = AutoencoderKL(cfg).eval()
    save_component(str(tmp_path), "vae", vae, cfg)
    loaded = load_component(str(tmp_path), "vae", VAEConfig, AutoencoderKL)
    assert loaded.cfg == cfg
    x = torch.rand(1, 3, 16, 16)
    assert torch.equal(loaded.encode(x)[0], vae.encode(x)[0])
    found = components.load(tokenizer_dir)
    assert {"clip_tokenizer", "bert_tokenizer", "gpt2_tokenizer"} <= set(found)


def test_a_stage_without_its_inputs_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="judge"):
        components.run_stage("vae", str(tmp_path), steps=1)
