"""Odd and hostile config files are refused at load, before anything is built, with the file and the key in the
message; sizes two files both give must agree; no load builds much more than its weights files hold; the scheduler
config is honoured or refused."""

import json
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

import minivd
from minivd.ddim import DDIM, DDIMConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def edit(tiny_vd, tmp_path):
    """edit(file, change) -> (a copy of the tiny checkpoint whose JSON `file` is changed in place by change(value), or
    replaced by its return value if it returns one; the edited file's path). `file` may be a tuple of files."""
    count = [0]

    def apply(files, change):
        count[0] += 1
        folder = shutil.copytree(tiny_vd, tmp_path / f"copy{count[0]}")
        for file in (files,) if isinstance(files, str) else files:
            path = os.path.join(folder, file)
            with open(path) as f:
                value = json.load(f)
            replaced = change(value)
            with open(path, "w") as f:
                json.dump(value if replaced is None else replaced, f)
        return str(folder), os.path.join(folder, files if isinstance(files, str) else files[0])

    return apply


def refused(folder, *patterns, error=ValueError):
    with pytest.raises(error) as caught:
        minivd.load(folder)
    for pattern in patterns:
        assert pattern in str(caught.value), (pattern, str(caught.value))
    return str(caught.value)


def setter(**values):
    return lambda config: config.update(values)


def deleter(key):
    def change(config):
        del config[key]
    return change


UNET, VAE, TEXT, VISION = "image_unet/config.json", "vae/config.json", "text_encoder/config.json", "image_encoder/config.json"
UNETS = (UNET, "text_unet/config.json")
PREPROCESS, TOKENIZER = "image_feature_extractor/preprocessor_config.json", "tokenizer/tokenizer_config.json"


@pytest.mark.parametrize("file, change, key", [
    (UNET, setter(attention_head_dim=0), "attention_head_dim"),  # was a ZeroDivisionError
    (UNET, setter(layers_per_block="2"), "layers_per_block must be an integer"),  # was a bare TypeError
    (UNET, deleter("block_out_channels"), "missing key 'block_out_channels'"),  # was a bare KeyError
    (UNET, lambda c: [c], "must be a JSON object"),  # a list: was an AttributeError
    (UNET, setter(norm_eps=float("nan")), "norm_eps must be a number > 0"),
    (UNET, setter(norm_num_groups=7), "not a multiple of norm_groups (norm_num_groups) 7"),
    (UNET, setter(block_out_channels=[32, 32, 64]), "down_block_types must name one of"),
    (UNET, setter(flip_sin_to_cos=False), "flip_sin_to_cos=False is not supported"),
    (UNET, setter(resnet_time_scale_shift="scale_shift"), "resnet_time_scale_shift"),
    (UNET, setter(up_block_types=["CrossAttnUpBlock2D"] * 3 + ["UpBlock2D"]), "mirror"),
    ("text_unet/config.json", setter(layers_per_block=-1), "text_unet/config.json"),
    (VAE, setter(latent_channels=0), "latent_channels must be an integer"),
    (VAE, setter(scaling_factor="0.18"), "scaling_factor must be a number"),
    (VAE, setter(in_channels=4), "in_channels must be an integer in [3, 3]"),
    (VAE, setter(force_upcast="yes"), "force_upcast must be true or false"),
    (TEXT, setter(num_attention_heads=0), "num_attention_heads must be an integer"),
    (TEXT, setter(hidden_act=["gelu"]), "unsupported hidden_act"),
    (TEXT, setter(eos_token_id=10**9), "eos_token_id must be an integer"),
    (VISION, setter(patch_size=13), "not a multiple of patch_size"),
    (VISION, setter(layer_norm_eps=None), "layer_norm_eps must be a number > 0"),
    (PREPROCESS, setter(size={"shortest_edge": 100000}), "more than 4 x crop_size"),  # was a 30 GB resize
    (PREPROCESS, setter(size={"shortest_edge": "224"}), "size (shortest_edge) must be an integer"),
    (PREPROCESS, setter(image_std=[0.3, 0.3, 0]), "std[2] (image_std) must be a number > 0"),
    (PREPROCESS, setter(do_resize="no"), "do_resize must be true or false"),
    (PREPROCESS, setter(rescale_factor="1/255"), "rescale_factor must be a finite number"),
    (TOKENIZER, setter(model_max_length="77"), "model_max_length must be an integer"),
    ("tokenizer/special_tokens_map.json", setter(pad_token=7), "pad_token must be a string"),
])
def test_a_bad_value_is_refused_naming_its_file_and_key(edit, file, change, key):
    folder, path = edit(file, change)
    refused(folder, path, key)


@pytest.mark.parametrize("file", [UNET, "text_unet/config.json", VAE, TEXT, VISION, PREPROCESS, TOKENIZER,
                                  "tokenizer/special_tokens_map.json", "scheduler/scheduler_config.json",
                                  "optimus/config.json"])
def test_a_config_file_holding_a_list_is_refused_naming_it(edit, file):
    folder, path = edit(file, lambda config: [config])
    refused(folder, path, "JSON object")


@pytest.mark.parametrize("file, change, names", [
    (VAE, setter(latent_channels=8), ["latent_channels 8", "image_channels (in_channels) 4", UNET]),
    (PREPROCESS, setter(crop_size={"height": 200, "width": 200}, size={"shortest_edge": 200}),
     ["crop_size 200", "image_size 224", VISION]),
    (TOKENIZER, setter(model_max_length=100), ["model_max_length (tokenizer_config.json) 100", "max_position_embeddings 77",
                                               TEXT]),
    (TEXT, setter(projection_dim=16), ["projection_dim 16", "context_dim (cross_attention_dim) 32", UNET]),
    ("tokenizer/vocab.json", setter(zzz=5000), ["vocab.json has ids up to 5000", "vocab_size 1000", TEXT]),
    (TEXT, setter(eos_token_id=0), ["<|endoftext|> id", "eos_token_id 0", TEXT]),
])
def test_sizes_two_files_give_must_agree(edit, file, change, names):
    """Each was found only at generate time (a tokenizer longer than the text encoder's positions, a crop CLIP cannot
    take, ...); now load names both files."""
    folder, path = edit(file, change)
    refused(folder, os.path.dirname(path) if file.startswith("tokenizer/") else path, *names)


def test_minivd_json_defaults_are_checked(tiny_vd, tmp_path):
    folder = shutil.copytree(tiny_vd, tmp_path / "copy")
    for defaults, message in [({"steps": "50"}, "steps must be an integer"), ({"height": 60}, "multiples of 8"),
                              ({"guidance_scale": float("inf")}, "guidance_scale must be a finite number")]:
        (folder / "minivd.json").write_text(json.dumps({"defaults": defaults}))
        refused(str(folder), str(folder / "minivd.json"), message)


def test_tokenizer_files_are_checked_with_their_paths(tiny_vd, tmp_path):
    folder = shutil.copytree(tiny_vd, tmp_path / "copy")
    tokenizer = folder / "tokenizer"
    vocab, merges = (tokenizer / "vocab.json").read_text(), (tokenizer / "merges.txt").read_text()
    (tokenizer / "vocab.json").write_text(vocab[: len(vocab) // 2])  # not JSON
    refused(str(folder), str(tokenizer / "vocab.json"), "not valid JSON")
    (tokenizer / "vocab.json").write_text(json.dumps([1, 2]))
    refused(str(folder), str(tokenizer / "vocab.json"), "must hold a JSON object")
    (tokenizer / "vocab.json").write_text(json.dumps({k: v for k, v in json.loads(vocab).items() if k != "<|endoftext|>"}))
    refused(str(folder), str(tokenizer / "vocab.json"), "no '<|endoftext|>' token")
    (tokenizer / "vocab.json").write_text(json.dumps({**json.loads(vocab), "x": "7"}))
    refused(str(folder), str(tokenizer / "vocab.json"), "its own id")
    (tokenizer / "vocab.json").write_text(vocab)
    lines = merges.splitlines()
    (tokenizer / "merges.txt").write_text("\n".join(lines[:3] + ["a b c"] + lines[3:]))
    refused(str(folder), str(tokenizer / "merges.txt"), "line 4", "two tokens")
    (tokenizer / "merges.txt").write_text("\n".join(lines[:3] + ["zzz\u2603 q"] + lines[3:]))
    refused(str(folder), str(tokenizer / "merges.txt"), "line 4", "not in vocab.json")


def test_optimus_config_is_checked(tiny_vd, tmp_path):
    folder = shutil.copytree(tiny_vd, tmp_path / "copy")
    path = folder / "optimus" / "config.json"
    for settings, message in [({"head_dim": 0}, "head_dim must be an integer"),  # was a ZeroDivisionError
                              ({"head_dim": 8, "encoder_heads": "4"}, "encoder_heads must be an integer"),
                              ({"head_dim": 8, "decoder_heads": 5}, "decoder_hidden (48) must be a multiple"),
                              ({"head_dim": 8, "max_word_pieces": 1000}, "max_word_pieces must be an integer"),
                              ({"head_dim": 8, "colour": 1}, "colour")]:
        path.write_text(json.dumps(settings))
        refused(str(folder), str(path), message)


BUILD_PEAK = """
import sys, time, tracemalloc, minivd
tracemalloc.start()
start = time.perf_counter()
try:
    minivd.load(sys.argv[1])
except ValueError as e:
    print("refused", time.perf_counter() - start, tracemalloc.get_traced_memory()[1] / 2**20, str(e).replace(chr(10), " "))
"""


@pytest.mark.parametrize("file, change, message", [
    (UNET, setter(layers_per_block=100000), "layers_per_block must be an integer in [1, 64]"),
    (TEXT, setter(num_hidden_layers=100000), "far more than this weights file holds"),
    (VAE, setter(layers_per_block=60), "far more than this weights file holds"),
    (UNETS, lambda c: c.update(block_out_channels=[32] * 8, layers_per_block=64,
                               down_block_types=[c["down_block_types"][-1]] * 8,
                               up_block_types=[c["up_block_types"][0]] * 8), "far more than this weights file holds"),
])
def test_no_load_builds_far_more_than_its_weights_files_hold(edit, file, change, message):
    """A config describing a far larger network than its file (100000 UNet layers per block used to build hundreds
    of thousands of blocks, 1.3 GB, before anything was compared) is refused quickly, in little memory."""
    folder, path = edit(file, change)
    done = subprocess.run([sys.executable, "-c", BUILD_PEAK, folder], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=ROOT), timeout=300)
    assert done.stdout.startswith("refused"), done.stdout + done.stderr[-2000:]
    _, seconds, peak_mib, text = done.stdout.split(" ", 3)
    assert message in text and (path in text or os.path.dirname(path) in text), text
    assert float(peak_mib) < 64, peak_mib  # Python allocations during the whole load, in MiB


def test_a_config_slightly_off_still_gets_the_detailed_report(edit):
    folder, _ = edit(UNETS, setter(layers_per_block=3))
    refused(folder, "missing tensor for minivd", "image_unet")


# ---------------------------------------------------------------------------------------------------------------------
# The scheduler config: honoured or refused


SCHEDULER = "scheduler/scheduler_config.json"


@pytest.mark.parametrize("change, message", [
    (setter(_class_name="EulerDiscreteScheduler"), "minivd samples with DDIM only"),
    (setter(num_train_timesteps=0), "num_train_timesteps must be an integer in [1, 100000]"),
    (setter(num_train_timesteps=10**10), "num_train_timesteps must be an integer in [1, 100000]"),
    (setter(beta_end=2.0), "beta_end must be a number > 0"),  # was a NaN image
    (setter(beta_start=-0.1), "beta_start must be a number > 0"),
    (setter(steps_offset=5000), "steps_offset must be an integer in [0, 999]"),  # was an IndexError at generate time
    (setter(set_alpha_to_one="false"), "set_alpha_to_one must be true or false"),
    (setter(timestep_spacing="trailing"), "timestep_spacing='trailing' is not supported"),
    (setter(trained_betas=[0.01] * 10), "trained_betas must be a list of num_train_timesteps (1000) numbers"),
    (setter(trained_betas=[0.01] * 999 + [1.5]), "trained_betas[999]"),
    (setter(beta_end=0.9, num_train_timesteps=100000), "alphas_cumprod reaches 0"),
])
def test_scheduler_settings_ddim_cannot_honour_are_refused(edit, change, message):
    folder, path = edit(SCHEDULER, change)
    refused(folder, path, message)


def test_trained_betas_are_honoured(edit):
    from diffusers import DDIMScheduler

    betas = torch.linspace(0.0001, 0.02, 1000).tolist()  # another schedule, given as numbers
    folder, _ = edit(SCHEDULER, setter(trained_betas=betas))
    model = minivd.load(folder)
    with open(os.path.join(folder, SCHEDULER)) as f:
        reference = DDIMScheduler.from_config(json.load(f))
    assert torch.allclose(model.sampler.alphas_cumprod, reference.alphas_cumprod, rtol=1e-6, atol=0)
    assert not torch.allclose(model.sampler.alphas_cumprod, DDIM().alphas_cumprod)


def test_keys_ddim_does_not_have_are_ignored_with_a_warning(edit):
    folder, path = edit(SCHEDULER, setter(skip_prk_steps=True, use_karras_sigmas=False))
    with pytest.warns(UserWarning, match=f"{path}: DDIMScheduler has no setting skip_prk_steps, use_karras_sigmas"):
        model = minivd.load(folder)
    assert model.config.scheduler == DDIMConfig()
    with warnings.catch_warnings(record=True) as caught:  # diffusers' own file: every key is DDIM's
        warnings.simplefilter("always")
        minivd.load(edit(SCHEDULER, setter())[0])
    assert not [w for w in caught if "DDIMScheduler has no setting" in str(w.message)]


def test_too_many_steps_for_the_offset_are_refused_before_denoising():
    """VD's steps_offset 1 with 1000 steps would start at timestep 1000, past the schedule (diffusers raises
    IndexError inside its step)."""
    with pytest.raises(ValueError, match="1000 steps with steps_offset 1 would start at timestep 1000"):
        DDIM().timesteps(1000)
    assert DDIM().timesteps(999)[0] == 999
