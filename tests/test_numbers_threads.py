"""Non-finite numbers are never a silent result; calls from several threads give the sequential results and change no
process-wide state; awkward but valid inputs (numpy seeds, dtype names) work and invalid ones fail at once."""

import os
import shutil
import threading

import numpy as np
import pytest
import torch
from PIL import Image

import minivd
import weights_loader
from minivd.tools.random_checkpoint import random_model

SMALL = dict(steps=2, height=64, width=64)


def picture(seed, size=(72, 56)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)).resize(size, Image.BILINEAR)


# ---------------------------------------------------------------------------------------------------------------------
# Non-finite numbers


def poisoned(folder, tmp_path, component, key, value):
    """A copy of the checkpoint whose tensor `key` of `component` (a folder, or "optimus") holds `value` everywhere."""
    from safetensors.torch import load_file, save_file

    broken = shutil.copytree(folder, tmp_path / "poisoned")
    if component == "optimus":
        path = os.path.join(broken, "optimus", "optimus-vae.pth")
        sd = torch.load(path, weights_only=True)
        sd[key] = torch.full_like(sd[key], value)
        torch.save(sd, path)
    else:
        path = weights_loader.find_weights(os.path.join(broken, component))
        sd = load_file(path)
        sd[key] = torch.full_like(sd[key], value)
        save_file(sd, path)
    return str(broken)


@pytest.mark.parametrize("component, key, value, mode, kwargs, where", [
    ("image_unet", "conv_in.weight", float("nan"), "text-to-image", dict(prompt="a fox"), "the denoised latents"),
    ("vae", "decoder.conv_out.bias", float("inf"), "text-to-image", dict(prompt="a fox"), "the decoded images"),
    ("text_encoder", "text_model.final_layer_norm.weight", float("nan"), "dual-guided",
     dict(prompt="a fox", image=picture(0)), "the text context"),
    ("image_encoder", "visual_projection.weight", float("inf"), "image-variation", dict(image=picture(1)),
     "the image context"),
    ("text_unet", "conv_in.weight", float("nan"), "text-variation", dict(prompt="a fox"), "the denoised latents"),
    ("optimus", "decoder.transformer.ln_f.weight", float("nan"), "image-to-text", dict(image=picture(2)),
     "the Optimus decoder's logits"),
])
def test_a_non_finite_weight_is_an_error_naming_where(tiny_vd, tmp_path, component, key, value, mode, kwargs, where):
    """Was: an all-black image, a NaN array or a garbage sentence, and no message."""
    model = minivd.load(poisoned(tiny_vd, tmp_path, component, key, value))
    size = dict(SMALL) if mode not in ("text-variation", "image-to-text") else dict(steps=2)
    with pytest.raises(FloatingPointError, match=f"non-finite values \\(NaN or inf\\) in {where}"):
        minivd.generate(mode, model=model, seed=0, **size, **kwargs)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(guidance_scale=float("nan")), ValueError, "guidance_scale must be a finite number"),
    (dict(guidance_scale=float("inf")), ValueError, "guidance_scale must be a finite number"),
    (dict(eta=float("nan")), ValueError, "eta must be a finite number"),
    (dict(mode="dual-guided", image=picture(0), mix_ratio=float("nan")), ValueError, "mix_ratio"),
    (dict(latents=torch.full((1, 4, 8, 8), float("nan"))), FloatingPointError, "the latents given"),
    (dict(latents=torch.zeros(1, 4, 8, 8).index_fill_(0, torch.tensor([0]), float("inf"))), FloatingPointError,
     "the latents given"),
])
def test_non_finite_inputs_are_refused(kwargs, error, match):
    kwargs = {"mode": "text-to-image", "prompt": "a fox", "model": random_model(), **SMALL, **kwargs}
    with pytest.raises(error, match=match):
        minivd.generate(kwargs.pop("mode"), **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Threads


CALLS = [
    ("text-to-image", dict(prompt="a red fox", seed=1, output="np", **SMALL)),
    ("image-variation", dict(image=picture(3), seed=2, output="np", **SMALL)),
    ("dual-guided", dict(prompt="a cat", image=picture(4), seed=3, output="np", **SMALL)),
    ("text-variation", dict(prompt="a fox", seed=4, steps=2, output="latent")),
    ("image-to-text", dict(image=picture(5), seed=5, steps=2)),
]


def same(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    return a == b


def test_threads_on_a_fresh_model_give_the_sequential_results(tiny_vd):
    """Was: a false "checkpoint does not match", "dictionary changed size during iteration" or meta-device tensors,
    and a model that stayed broken. Every flow starts at once on a model that has read nothing yet."""
    sequential = minivd.load(tiny_vd)
    expected = [minivd.generate(mode, model=sequential, **kwargs) for mode, kwargs in CALLS]

    model = minivd.load(tiny_vd)
    start, results, errors = threading.Barrier(2 * len(CALLS)), {}, []

    def call(i, mode, kwargs):
        start.wait()
        try:
            results[i] = minivd.generate(mode, model=model, **kwargs)
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(f"{mode}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=call, args=(i, *CALLS[i % len(CALLS)])) for i in range(2 * len(CALLS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert errors == []
    for i, result in results.items():
        assert same(result, expected[i % len(CALLS)]), CALLS[i % len(CALLS)][0]
    assert len(results) == 2 * len(CALLS)
    for (mode, kwargs), want in zip(CALLS, expected):  # and the model still works
        assert same(minivd.generate(mode, model=model, **kwargs), want), mode


def test_a_call_changes_no_process_wide_state(tiny_vd):
    """Loading and generating leave the global RNG, the default dtype, grad mode, thread count, torch.nn.init and
    the torch function mode stack as they were, in this thread and in the one that ran the call."""
    def state():
        return (torch.random.get_rng_state(), torch.get_default_dtype(), torch.is_grad_enabled(),
                torch.get_num_threads(), torch.nn.init.normal_, torch.nn.init.kaiming_uniform_,
                torch._C._len_torch_function_stack())

    before, seen = state(), []

    def work():
        inside = state()
        model = minivd.load(tiny_vd)
        for mode, kwargs in CALLS[:2] + CALLS[3:4]:
            minivd.generate(mode, model=model, **kwargs)
        seen.append((inside, state()))

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=600)
    after = state()
    for a, b in [(before, after), *seen]:
        assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


# ---------------------------------------------------------------------------------------------------------------------
# Awkward valid inputs, and invalid ones that fail at once


def test_a_numpy_integer_is_a_seed():
    model = random_model()
    want = minivd.generate("text-to-image", model=model, prompt="a fox", seed=7, output="np", **SMALL)
    for seed in (np.int64(7), np.uint8(7), np.int32(7)):
        got = minivd.generate("text-to-image", model=model, prompt="a fox", seed=seed, output="np", **SMALL)
        assert np.array_equal(got, want), type(seed)
    minivd.generate("text-to-image", model=model, prompt="a fox", seed=np.uint64(2**64 - 1), **SMALL)
    numpy_sizes = dict(steps=np.int64(2), height=np.int64(64), width=np.int32(64), num_images=np.int8(1),
                       guidance_scale=np.float32(7.5))  # numpy numbers elsewhere too
    got = minivd.generate("text-to-image", model=model, prompt="a fox", seed=7, output="np", **numpy_sizes)
    assert np.array_equal(got, want)
    for bad in (-1, 2**64, 1.5, True, "7"):
        with pytest.raises(ValueError, match="seed must be an integer"):
            minivd.generate("text-to-image", model=model, prompt="a fox", seed=bad, **SMALL)


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompt="a fox \ud800 in snow"), "prompt\\[0\\] is not valid text: surrogates not allowed at position 6"),
    (dict(prompt=["a fox", "\udfff"]), "prompt\\[1\\] is not valid text"),
    (dict(prompt="a fox", negative_prompt="\ud83d"), "negative_prompt\\[0\\] is not valid text"),
])
def test_a_prompt_with_a_lone_surrogate_is_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        minivd.generate("text-to-image", model=random_model(), **SMALL, **kwargs)


def test_edit_image_checks_its_inputs_before_running(monkeypatch):
    model = random_model()
    monkeypatch.setattr(minivd.pipeline, "generate", lambda *a, **k: pytest.fail("ran before checking its inputs"))
    for kwargs, error, match in [(dict(remove="a \ud800"), ValueError, "remove is not valid text"),
                                 (dict(add=["a cat"]), TypeError, "add must be a string"),
                                 (dict(add="a cat", image_ratio=float("nan")), ValueError, "image_ratio"),
                                 (dict(add="a cat", seed=-3), ValueError, "seed"),
                                 (dict(add="a cat", height=60), ValueError, "multiples of 8")]:
        with pytest.raises(error, match=match):
            minivd.edit_image(picture(0), model=model, steps=2, **kwargs)


def test_load_refuses_a_bad_dtype_device_or_flow_at_once(tiny_vd):
    for kwargs, match in [(dict(dtype="float17"), "dtype must be a floating torch dtype"),
                          (dict(dtype=torch.int8), "dtype must be a floating torch dtype"),
                          (dict(device="gpu"), "device must be 'cpu', 'cuda', 'cuda:N'"),
                          (dict(device="cuda:7"), "device 'cuda:7'"),
                          (dict(flows=["text-to-picture"]), "unknown flow 'text-to-picture'")]:
        if kwargs.get("device") == "cuda:7" and torch.cuda.device_count() > 7:
            continue
        with pytest.raises(ValueError, match=match):
            minivd.load(tiny_vd, **kwargs)
    with pytest.raises(TypeError, match="path must be a checkpoint folder"):
        minivd.load(3)
    model = minivd.load(tiny_vd, dtype="bfloat16", flows="text-to-image")  # a name, and one flow as a string
    assert model.dtype == torch.bfloat16 and model.missing("text-to-image") == []
