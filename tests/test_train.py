"""Training (minivd.train) on a tiny random official-layout checkpoint: the objective against diffusers' forward
process, the routing of each flow's gradients to its layer sets, splitting a batch between processes (in process and
with torchrun), resuming, fine-tuning one layer set, and the exported checkpoint read by minivd and diffusers."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import minivd
import weights_loader
from minivd.train import TRAINED_FLOWS, FolderPairs, MultiFlowLoss, TrainConfig, frozen_targets, train
from minivd.unet import FLOWS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 64
RUN = dict(data=None, batch_size=4, lr=1e-3, warmup=1, size=SIZE, log_every=1)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Four (image, caption) pairs: coloured discs, 80 x 64 (cropped to the centre square)."""
    folder = tmp_path_factory.mktemp("pairs")
    for i, (colour, rgb) in enumerate([("red", (220, 30, 30)), ("green", (30, 200, 40)), ("blue", (40, 60, 230)),
                                       ("yellow", (230, 220, 30))]):
        image = Image.new("RGB", (80, 64))
        ImageDraw.Draw(image).ellipse((20 + 4 * i, 12, 56 + 4 * i, 48), fill=rgb)
        image.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a {colour} circle")
    (folder / "notes.txt").write_text("a caption without an image is ignored")
    return str(folder)


def model_for(tiny_vd, flows=TRAINED_FLOWS):
    model = minivd.load(tiny_vd)
    for flow in flows:
        model.prepare(flow, vae_encoder=True)
    model.requires_grad_(False)
    model.unet.requires_grad_(True).train()
    return model


def test_the_objective_is_the_forward_process_and_the_noise_mse(tiny_vd, pairs):
    """x_t is diffusers' DDIMScheduler.add_noise(x0, noise, t) on VD's schedule; the loss is the MSE to the noise."""
    from diffusers import DDIMScheduler

    model = model_for(tiny_vd, ("text-to-image",))
    seen = []

    class Recorder(torch.nn.Module):  # stands in for the UNet: records its input, predicts zero noise
        def forward(self, x, t, contexts, data):
            seen.append((x, t, contexts, data))
            return torch.zeros_like(x)

    images, captions, _ = FolderPairs(pairs, SIZE).batch(np.random.default_rng(0), 4)
    targets = frozen_targets(model, images, captions, ["text-to-image"], 0.5, torch.Generator().manual_seed(0))
    x0, t, noise, context = targets["text-to-image"]
    loss, losses = MultiFlowLoss(Recorder(), model.sampler.alphas_cumprod)(targets, ["text-to-image"])
    reference = DDIMScheduler.from_pretrained(os.path.join(tiny_vd, "scheduler"))
    x_t, t_seen, contexts, data = seen[0]
    assert torch.allclose(x_t, reference.add_noise(x0, noise, t), atol=1e-6)
    assert torch.equal(t_seen, t) and data == "image" and contexts[0][0] == "text"
    assert torch.allclose(loss, noise.square().mean(), rtol=1e-6)
    with torch.no_grad():  # x0 is the VAE's scaled posterior mean of the pictures, as diffusers' VAE gives it
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(os.path.join(tiny_vd, "vae"))
        pixels = torch.stack([torch.from_numpy(np.asarray(im, np.float32) / 255).permute(2, 0, 1) for im in images])
        expected = vae.encode(pixels * 2 - 1).latent_dist.mean * vae.config.scaling_factor
    assert (x0 - expected).abs().max() < 1e-4 * max(1.0, expected.abs().max().item()), (x0 - expected).abs().max()
    # the unconditional rows are the "" context, the others the captions' (a share of 0.5 here)
    empty, captioned = model.encode_text([""]), model.encode_text(captions)
    rows = [torch.equal(context[i], empty[0]) for i in range(4)]
    assert all(rows[i] or torch.equal(context[i], captioned[i]) for i in range(4))


def test_each_layer_set_gets_the_gradients_of_the_flows_that_use_it(tiny_vd, pairs):
    """The multi-flow loss's gradient on every layer set is the sum of the gradients of the flows that use it (each
    weighted 1/4); the other flows contribute nothing to it."""
    model = model_for(tiny_vd)
    objective = MultiFlowLoss(model.unet, model.sampler.alphas_cumprod)
    images, captions, _ = FolderPairs(pairs, SIZE).batch(np.random.default_rng(1), 4)
    targets = frozen_targets(model, images, captions, TRAINED_FLOWS, 0.1, torch.Generator().manual_seed(1))
    sets = {"time_embed": model.unet.time_embed, **{f"data.{k}": m for k, m in model.unet.data.items()},
            **{f"context.{k}": m for k, m in model.unet.context.items()}}

    def grads(flows, weight):
        model.unet.zero_grad(set_to_none=True)
        loss, losses = objective(targets, flows)
        (loss * len(flows) * weight).backward()
        return {name: [None if p.grad is None else p.grad.clone() for p in m.parameters()] for name, m in sets.items()}

    everything = grads(TRAINED_FLOWS, 1 / 4)
    each = {flow: grads([flow], 1 / 4) for flow in TRAINED_FLOWS}
    for name in sets:
        users = [f for f in TRAINED_FLOWS if name == "time_embed" or
                 (name.startswith("data.") and FLOWS[f][0] == name[5:]) or
                 (name.startswith("context.") and name[8:] in FLOWS[f][1])]
        assert len(users) == (4 if name == "time_embed" else 2), name
        for flow in TRAINED_FLOWS:
            got = each[flow][name]
            assert all(g is None for g in got) == (flow not in users), (name, flow)
        for i, g in enumerate(everything[name]):
            expected = sum(each[f][name][i] for f in users)
            assert torch.allclose(g, expected, atol=1e-7), name


def test_splitting_the_batch_gives_the_whole_batch_gradient(tiny_vd, pairs):
    """What each process computes on its share (the same draws, sliced) averages to the whole batch's gradient."""
    model = model_for(tiny_vd)
    objective = MultiFlowLoss(model.unet, model.sampler.alphas_cumprod)
    images, captions, _ = FolderPairs(pairs, SIZE).batch(np.random.default_rng(2), 4)

    def grads(share):
        targets = frozen_targets(model, images, captions, TRAINED_FLOWS, 0.1, torch.Generator().manual_seed(2), share)
        model.unet.zero_grad(set_to_none=True)
        objective(targets, TRAINED_FLOWS)[0].backward()
        return [p.grad.clone() for p in model.unet.parameters()]

    whole, first, second = grads(slice(None)), grads(slice(0, 2)), grads(slice(2, 4))
    scale = max(g.abs().max() for g in whole)
    assert max(((a + b) / 2 - w).abs().max() for a, b, w in zip(first, second, whole)) < 1e-5 * scale


def run_train(tiny_vd, out, pairs, **settings):
    return train(TrainConfig(init=tiny_vd, out=str(out), **{**RUN, "data": pairs, **settings}))


def losses(out):
    return [json.loads(line) for line in open(os.path.join(out, "loss.jsonl"))]


@pytest.fixture(scope="module")
def short_run(tiny_vd, pairs, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    run_train(tiny_vd, out, pairs, steps=12, ema=0.5, save_every=6)
    return out


def test_training_lowers_the_loss_and_logs_it(short_run):
    log = losses(short_run)
    assert [r["step"] for r in log] == list(range(1, 13))
    assert set(log[0]) >= {"step", "loss", "lr", "time_s", *TRAINED_FLOWS}
    first, last = np.mean([r["loss"] for r in log[:4]]), np.mean([r["loss"] for r in log[-4:]])
    assert last < 0.9 * first, (first, last)


def test_resuming_gives_the_weights_of_one_run(tiny_vd, pairs, tmp_path):
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    run_train(tiny_vd, straight, pairs, steps=4, ema=0.5)
    run_train(tiny_vd, halves, pairs, steps=2, ema=0.5)
    run_train(tiny_vd, halves, pairs, steps=4, ema=0.5, resume=True)
    a, b = (torch.load(p / "state.pt", weights_only=True) for p in (straight, halves))
    assert a["step"] == b["step"] == 4
    for part in ("unet", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert [r["loss"] for r in losses(straight)] == [r["loss"] for r in losses(halves)]


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo, tested on Linux")
def test_torchrun_with_two_processes_matches_one(tiny_vd, pairs, tmp_path):
    """Two processes (gloo on the CPU), each with half of the global batch of 4, against one process with all of it.
    Tolerance, after 3 AdamW steps at lr 1e-3: 99% of the weights within 1e-6, all within 5e-4 (half a step). The
    gradients agree to float rounding (the test above), but AdamW's first steps move every weight by about the
    learning rate however small its gradient is, so the rounding of a near-zero gradient (this random model has many)
    can show at that scale."""
    args = ["--init", tiny_vd, "--data", pairs, "--steps", "3", "--batch-size", "4", "--lr", "1e-3", "--warmup", "1",
            "--size", str(SIZE), "--log-every", "1"]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "minivd.train", *args, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "on 2 process(es)" in two.stdout
    run_train(tiny_vd, tmp_path / "one", pairs, steps=3)
    a, b = (torch.load(tmp_path / name / "state.pt", weights_only=True)["unet"] for name in ("two", "one"))
    differences = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert (differences < 1e-6).float().mean() > 0.99 and differences.max() < 5e-4, differences.max()
    for x, y in zip(losses(tmp_path / "two"), losses(tmp_path / "one")):  # the logged loss is the global batch's
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-3)


def test_fine_tuning_one_layer_set_changes_only_it(tiny_vd, pairs, tmp_path):
    out = run_train(tiny_vd, tmp_path / "ft", pairs, steps=2, flows=("text-to-image",), train=("context.text",))
    for component in ("image_unet", "text_unet", "vae", "text_encoder", "image_encoder"):
        before = weights_loader.TensorFile(weights_loader.find_weights(os.path.join(tiny_vd, component)))
        after = weights_loader.TensorFile(weights_loader.find_weights(os.path.join(out, component)))
        assert set(before.keys()) == set(after.keys()), component
        changed = {k for k in before.keys() if not torch.equal(before.get(k), after.get(k))}
        if component == "text_unet":  # the text context layers live in the text UNet file
            assert changed and all(".attentions." in k for k in changed)
        else:
            assert not changed, (component, sorted(changed)[:3])


def test_the_exported_checkpoint_runs_in_minivd_and_diffusers(short_run):
    """The trained model in the official layout: minivd reads it, and diffusers' pipeline gives minivd's image."""
    from tiny_vd import reference_pipeline

    folder = str(short_run / "checkpoint")
    assert weights_loader.check(folder) == []
    x_T = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(0))
    pipe = reference_pipeline("text-to-image", folder)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe("a red circle", num_inference_steps=3, height=SIZE, width=SIZE, latents=x_T.clone(),
                    output_type="np").images
    got = minivd.generate("text-to-image", model=minivd.load(folder), prompt="a red circle", steps=3, height=SIZE,
                          width=SIZE, latents=x_T, output="np")
    assert np.abs(got - expected).max() < 1e-4
    state = torch.load(short_run / "state.pt", weights_only=True)
    exported = minivd.load(folder, flows=TRAINED_FLOWS).unet.state_dict()
    assert all(torch.equal(exported[k], state["ema"][k]) for k in exported)  # the EMA weights are what ships


@pytest.mark.parametrize("settings, match", [
    (dict(flows=("dual-guided",)), "dual-guided has no layers of its own"),
    (dict(train=("context.audio",)), "unknown layer set"),
    (dict(init=None), "--init is needed"),
    (dict(batch_size=0), "batch-size"),
])
def test_bad_settings_are_refused(tiny_vd, pairs, tmp_path, settings, match):
    with pytest.raises(ValueError, match=match):
        train(TrainConfig(**{**dict(RUN, init=tiny_vd, out=str(tmp_path), data=pairs), **settings}))
