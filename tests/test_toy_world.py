"""The toy world and its tokenizers: deterministic, every caption parses back, everything drawable."""

import filecmp
import os

import numpy as np
import pytest
import torch

from minivd.clip import ImagePreprocessConfig, preprocess
from minivd.optimus import load_tokenizers
from minivd.tokenizer import CLIPTokenizer
from minivd.toy import vocab, world
from minivd.toy.train_clip import normalise_pixels


def test_world_is_deterministic_from_its_seed():
    assert world.sample_scenes(50, seed=3) == world.sample_scenes(50, seed=3)
    assert world.sample_scenes(50, seed=3) != world.sample_scenes(50, seed=4)
    scene = world.Scene("large", "purple", "cross", "top")
    a = np.asarray(world.render(scene, rng=np.random.default_rng(7)))
    b = np.asarray(world.render(scene, rng=np.random.default_rng(7)))
    c = np.asarray(world.render(scene, rng=np.random.default_rng(8)))
    assert (a == b).all() and (a != c).any()
    (x1, c1, l1), (x2, c2, l2) = next(world.batches(16, seed=5)), next(world.batches(16, seed=5))
    assert torch.equal(x1, x2) and c1 == c2 and torch.equal(l1, l2)
    x3, _, _ = next(world.batches(16, seed=6))
    assert not torch.equal(x1, x3)


def test_batches_shapes_and_labels():
    images, captions, labels = next(world.batches(32, seed=0))
    assert images.shape == (32, 3, 64, 64) and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1
    assert labels.shape == (32, 4)
    for text, row in zip(captions, labels):  # each caption describes its own image's labels
        assert world.parse_caption(text) == world.Scene.from_labels(row)


def test_there_are_240_scene_classes_in_index_order():
    scenes = world.all_scenes()
    assert len(scenes) == len(set(scenes)) == 2 * 6 * 4 * 5
    assert [s.index for s in scenes] == list(range(240))
    assert all(world.Scene.from_labels(s.labels()) == s for s in scenes)
    with pytest.raises(ValueError):
        world.Scene("medium", "red", "circle", "left")


def test_every_template_parses_back_to_its_attributes():
    for scene in world.all_scenes():
        for t in range(len(world.TEMPLATES)):
            text = world.caption(scene, t)
            assert world.parse_caption_template(text) == (scene, t)
            # the forms a tokenizer's decoding may give are read the same way
            assert world.parse_caption(text.upper().replace(",", " ,") + ".") == scene
    assert world.caption(world.Scene("small", "red", "circle", "left")) == "a small red circle on the left"
    assert len(set(world.all_captions())) == 1200


@pytest.mark.parametrize("text", [
    "", "hello world", "a small red circle", "a red circle on the left", "a big red circle on the left",
    "a small red circle on the left and a blue square", "a small red circle on the left,", "small red circle",
    "a small orange circle on the left", "a small red circle in the left", "the circle on the left is small",
    "there is a small red circle on the left on the left", "on the left a small red circle", "a a small red circle",
])
def test_text_outside_the_caption_language_parses_to_none(text):
    assert world.parse_caption(text) is None


def _measure(image):
    """-> (bounding-box centre x, y, width, height, mean colour of the shape's core) of a render, in pixels."""
    pixels = np.asarray(image, dtype=np.float64)  # (S, S, 3)
    mask = pixels.max(axis=2) > 60
    ys, xs = np.nonzero(mask)
    core = pixels.max(axis=2) > 0.8 * pixels.max()
    return (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2, xs.max() - xs.min() + 1, ys.max() - ys.min() + 1, pixels[core].mean(axis=0)


def test_every_attribute_combination_is_drawable_and_unambiguous():
    rng = np.random.default_rng(0)
    for scene in world.all_scenes():
        for image in (world.render(scene), world.render(scene, rng=rng)):
            assert image.size == (64, 64) and image.mode == "RGB"
            cx, cy, width, height, colour = _measure(image)
            assert 12 <= max(width, height) <= 20 if scene.size == "small" else 24 <= max(width, height) <= 34
            want_x, want_y = (64 * f for f in world.CENTRES[scene.place])
            assert abs(cx - want_x) < 5.5 and abs(cy - want_y) < 5.5, (scene, cx, cy)
            distances = {name: np.abs(colour - np.array(rgb)).sum() for name, rgb in world.RGB.items()}
            assert min(distances, key=distances.get) == scene.colour
            corners = np.asarray(image)[[0, 0, -1, -1], [0, -1, 0, -1]]
            assert corners.max() == 0  # black background


def test_renders_are_anti_aliased():
    pixels = np.asarray(world.render(world.Scene("large", "white", "circle", "centre")))
    levels = np.unique(pixels[..., 0])
    assert len(levels) > 5  # edge pixels take in-between values


def test_clip_pixels_match_minivd_preprocess_at_64_px():
    image = world.render(world.Scene("small", "yellow", "triangle", "right"), rng=np.random.default_rng(1))
    ours = normalise_pixels(world.to_tensor([image]))
    theirs = preprocess(image, ImagePreprocessConfig(size=64))
    assert torch.allclose(ours, theirs, atol=1e-5)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("toy_tokenizers"))
    vocab.write_tokenizers(out)
    return out


def test_tokenizers_are_deterministic(tokenizer_dir, tmp_path):
    vocab.write_tokenizers(str(tmp_path))
    for sub in ("clip_tokenizer", "optimus_tokenizer"):
        names = sorted(os.listdir(os.path.join(tokenizer_dir, sub)))
        assert names and names == sorted(os.listdir(tmp_path / sub))
        match, mismatch, errors = filecmp.cmpfiles(os.path.join(tokenizer_dir, sub), tmp_path / sub, names,
                                                   shallow=False)
        assert not mismatch and not errors


def test_clip_tokenizer_layout_and_fit(tokenizer_dir):
    folder = os.path.join(tokenizer_dir, "clip_tokenizer")
    tok = CLIPTokenizer.from_folder(folder)
    assert tok.max_length == vocab.CLIP_MAX_LENGTH
    ids = list(tok.vocab.values())
    assert sorted(ids) == list(range(len(ids)))
    assert tok.bos_id == len(ids) - 2 and tok.eos_id == len(ids) - 1
    captions = world.all_captions()
    batch = tok(captions)  # (1200, 16)
    assert (batch[:, -1] == tok.eos_id).all()  # nothing truncated: the last position is padding
    for text, row in zip(captions[:50], batch[:50]):
        words = text.replace(",", " ,").split()
        assert len(tok.tokenize(text)) == len(words)  # one token per word: the merges learned the language
        assert world.parse_caption(tok.decode(row)) == world.parse_caption(text)
    from transformers import CLIPTokenizer as HFCLIPTokenizer
    hf = HFCLIPTokenizer.from_pretrained(folder)
    hf_ids = hf(captions, padding="max_length", max_length=tok.max_length)["input_ids"]
    assert torch.equal(torch.tensor(hf_ids), batch)


def test_optimus_tokenizers(tokenizer_dir):
    bert, gpt2 = load_tokenizers(os.path.join(tokenizer_dir, "optimus_tokenizer"))
    assert [bert.token_to_id(t) for t in vocab.BERT_SPECIAL] == [0, 1, 2, 3, 4]
    unk = bert.token_to_id("[UNK]")
    base = gpt2.get_vocab_size() - 3
    assert gpt2.token_to_id("<|endoftext|>") == base - 1
    assert [gpt2.token_to_id(t) for t in ("<PAD>", "<BOS>", "<EOS>")] == [base, base + 1, base + 2]
    for text in world.all_captions():
        assert unk not in bert.encode(text).ids
        ids = gpt2.encode(text).ids
        assert len(ids) == len(text.replace(",", " ,").split()) and gpt2.decode(ids) == text
