"""The shipped toy VD (minivd/toy/weights): the built-in default, what it measurably does, graded by the independent
judge on small samples with margins (`python -m minivd.evaluate` measures the full sample), and the same numbers from
diffusers' pipelines on its files."""

import os

import numpy as np
import pytest
import torch

import minivd
from minivd import evaluate
from minivd.checkpoint import TOY
from minivd.toy import world
from minivd.tools.random_checkpoint import random_model

@pytest.fixture(scope="module")
def toy():
    return minivd.load(TOY)


@pytest.fixture(scope="module")
def judge():
    return evaluate.load_judge()


def test_the_toy_is_the_default_and_says_what_it_is():
    with pytest.warns(UserWarning, match="TOY model, trained on pictures of coloured shapes"):
        model = minivd.load()
    assert model.checkpoint.folder == TOY and "not Versatile Diffusion's weights" in model.config.description
    d = model.config.defaults
    assert (d.height, d.width) == (64, 64) and d.steps <= 30 and 1 < d.guidance_scale < 7.5


def test_it_ships_small_in_the_package():
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(TOY) for f in files)
    assert size < 20 * 2**20, size
    assert minivd.checkpoint.Checkpoint(TOY).problems() == []


def test_a_call_with_only_a_prompt_draws_it(judge):
    with pytest.warns(UserWarning):
        images = minivd.generate("text-to-image", prompt=["a small red circle on the left", "a large blue square at the top"])
    assert [im.size for im in images] == [(64, 64), (64, 64)]
    got = evaluate.judged(judge, images)
    want = torch.tensor([world.Scene("small", "red", "circle", "left").labels(),
                         world.Scene("large", "blue", "square", "top").labels()])
    assert (got == want).float().mean() >= 0.75  # 8 attributes, 6 must be right


def test_the_judge_reads_clean_renders(judge):
    scenes, _ = evaluate.scenes_for(200, seed=123)
    right = evaluate.judged(judge, evaluate.renders(scenes, seed=123)) == torch.tensor([s.labels() for s in scenes])
    assert right.float().mean(0).min() >= 0.98


def test_text_to_image_draws_every_attribute(toy, judge):
    r = evaluate.text_to_image(toy, judge, seeds=1)  # the 24 colour x shape prompts
    assert r["colour"] >= 85 and r["shape"] >= 80 and r["place"] >= 80 and r["all"] >= 60, r


def test_image_variation_keeps_colour_and_shape(toy, judge):
    r = evaluate.image_variation(toy, judge, 48)  # 94% and 100% on these 48; 21% and 31% with random weights
    assert r["colour"] >= 85 and r["shape"] >= 85, r


def test_image_to_text_captions_in_the_language(toy):
    r, captions = evaluate.image_to_text(toy, 16)
    assert r["in language"] >= 85 and r["colour"] >= 75 and r["shape"] >= 75 and r["place"] >= 65, (r, captions)


def test_text_variation_rewords_and_keeps_the_meaning(toy):
    r, pairs = evaluate.text_variation(toy, 16)
    assert r["in language"] >= 85 and r["attributes kept"] >= 70 and r["other wording"] >= 10, (r, pairs)


def test_the_mix_ratio_moves_dual_guided_from_the_image_to_the_prompt(toy, judge):
    shares = evaluate.mix_sweep(toy, judge, 10, "dual-guided")
    assert shares[0.0] <= 40 and shares[1.0] >= 60, shares
    values = [shares[r] for r in evaluate.RATIOS]
    assert all(b >= a - 20 for a, b in zip(values, values[1:])), shares  # rising, give or take two of ten


def test_random_weights_fail_the_same_measurements(judge):
    """The measurements can fail: a model with random weights draws nothing the judge can read and writes no caption
    of the language."""
    model = random_model()
    assert evaluate.text_to_image(model, judge, seeds=1)["all"] <= 25
    assert evaluate.image_to_text(model, 8)[0]["in language"] == 0


@pytest.mark.parametrize("mode", ["text-to-image", "image-variation", "dual-guided"])
def test_diffusers_gets_minivd_images_from_the_toy(toy, mode):
    """diffusers' VD pipelines on the shipped files, from the same initial latents, give minivd's images."""
    from tiny_vd import reference_pipeline

    picture = world.render(world.Scene("large", "green", "triangle", "centre"), 64, np.random.default_rng(0))
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    kwargs = {"text-to-image": dict(prompt="a small red circle on the left"), "image-variation": dict(image=picture),
              "dual-guided": dict(prompt="a small red circle on the left", image=picture)}[mode]
    from PIL import Image

    gray = Image.new("RGB", (512, 512), (127, 127, 127))  # the unconditional image, as minivd uses it
    reference = {"dual-guided": dict(kwargs, text_to_image_strength=0.5),
                 "image-variation": dict(kwargs, negative_prompt=gray)}.get(mode, kwargs)
    pipe = reference_pipeline(mode, TOY)
    pipe.set_progress_bar_config(disable=True)
    d = toy.config.defaults
    expected = pipe(num_inference_steps=d.steps, guidance_scale=d.guidance_scale, height=64, width=64,
                    latents=x_T.clone(), output_type="np", **reference).images
    got = minivd.generate(mode, model=toy, latents=x_T, output="np", **kwargs)
    assert np.abs(got - expected).max() < 1e-4
