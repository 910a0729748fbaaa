"""The original (SHI-Labs) layout: vd-four-flow-v1-0.pth, kl-f8.pth, clip-vit-large-patch14/, optimus-vae.pth.

The tiny original folder is written from the tiny diffusers one (the `tiny_vd` fixture) by the independent key mapping
in tiny_vd.py (`build_tiny_original`), so both folders hold the same numbers: minivd must load exactly the same
parameters and generate exactly the same outputs from either. At full size, the same mapping applied to the official
diffusers / transformers modules (on the meta device) must cover every minivd parameter through minivd's rules.
"""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import minivd
import weights_loader
from minivd.checkpoint import Checkpoint, detect_layout
from minivd.unet import FLOWS
from tiny_vd import build_tiny_original, clip_model_config, original_unet_key, original_vae_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = ("unet", "vae", "text_encoder", "image_encoder", "optimus")


@pytest.fixture(scope="module")
def tiny_original(tiny_vd, tmp_path_factory):
    return build_tiny_original(tiny_vd, str(tmp_path_factory.mktemp("tiny_vd_original")))


def assert_same_parameters(a, b):
    """Every loaded module of two models: the same names and exactly equal tensors."""
    for name in MODULES:
        ma, mb = getattr(a, name), getattr(b, name)
        assert (ma is None) == (mb is None), name
        if ma is None:
            continue
        sa, sb = ma.state_dict(), mb.state_dict()
        assert sa.keys() == sb.keys(), name
        unequal = [k for k in sa if not torch.equal(sa[k], sb[k])]
        assert not unequal, f"{name}: {unequal[:5]}"


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "weights_loader.py"), *args], capture_output=True,
                          text=True, cwd=ROOT)


def test_layouts_are_detected(tiny_vd, tiny_original):
    assert detect_layout(tiny_vd) == "diffusers" and detect_layout(tiny_original) == "original"
    checkpoint = minivd.load(tiny_original).checkpoint
    assert checkpoint.layout == "original"
    assert checkpoint.components() == ["unet", "vae", "text_encoder", "image_encoder", "optimus"]
    assert checkpoint.weights_path("text_encoder") == checkpoint.weights_path("image_encoder")  # one CLIPModel file
    assert checkpoint.weights_path("text_encoder").endswith("model.safetensors")  # safetensors before pytorch_model.bin


@pytest.mark.parametrize("flow", list(FLOWS))
def test_every_flow_loads_exactly_the_diffusers_parameters(tiny_vd, tiny_original, flow):
    a = minivd.load(tiny_vd).prepare(flow)
    b = minivd.load(tiny_original).prepare(flow)
    assert_same_parameters(a, b)
    assert set(b.unet.data) == {FLOWS[flow][0]} and set(b.unet.context) == set(FLOWS[flow][1])
    assert b.config.unet == a.config.unet and b.config.vae == a.config.vae
    assert b.config.text == a.config.text and b.config.vision == a.config.vision
    assert b.config.image_preprocess == a.config.image_preprocess and b.sampler.config == a.sampler.config


def test_generate_is_the_same_from_either_layout(tiny_vd, tiny_original):
    a, b = minivd.load(tiny_vd), minivd.load(tiny_original)
    kwargs = dict(prompt="a red fox in the snow", steps=3, seed=0, height=64, width=64, output="np")
    images_a = minivd.generate("text-to-image", model=a, **kwargs)
    images_b = minivd.generate("text-to-image", model=b, **kwargs)
    # The parameters are equal bit for bit (the test above); the outputs agree to float32 rounding only, because
    # the kernels may take another path for storage read from another file at another alignment.
    assert images_a.shape == (1, 64, 64, 3) and np.allclose(images_a, images_b, rtol=0, atol=1e-5)
    kwargs = dict(prompt="a cat on a couch", steps=3, seed=1, output="latent")
    z_a, z_b = (minivd.generate("text-variation", model=m, **kwargs) for m in (a, b))
    assert a.optimus.decode(z_a, greedy=True, max_length=12) == b.optimus.decode(z_b, greedy=True, max_length=12)


# ---------------------------------------------------------------------------------------------------------------------
# Full size, on the meta device


class MetaFile:
    """Keys and shapes shaped like weights_loader.TensorFile."""

    def __init__(self, shapes, path):
        self.shapes, self.path = shapes, path

    def keys(self):
        return list(self.shapes)

    def shape(self, key):
        return self.shapes[key]


def assert_fills(module, file, rules, dropped=()):
    """minivd's rules map every key of `file` onto a parameter of the right shape (or drop exactly `dropped`), and
    every parameter of `module` is filled."""
    sources, problems = weights_loader.plan(module, [(file, rules)])
    assert problems == [], problems[:5]
    assert len(sources) == len(module.state_dict())
    unused = set(file.keys()) - {key for _, key in sources.values()}
    assert unused == set(dropped), sorted(unused ^ set(dropped))[:5]


def test_full_size_original_keys_fill_every_parameter():
    from test_weights import official_modules
    from transformers import CLIPModel

    from minivd.clip import CLIPTextConfig, CLIPTextEncoder, CLIPVisionConfig, CLIPVisionEncoder
    from minivd.checkpoint import clip_tower_config
    from minivd.unet import DualContextUNet, UNetConfig
    from minivd.vae import AutoencoderKL, VAEConfig

    ref = official_modules()
    shapes = lambda module: {k: tuple(v.shape) for k, v in module.state_dict().items()}
    unet = {original_unet_key(k, "image"): s for k, s in shapes(ref["image_unet"]).items()}
    text = {original_unet_key(k, "text"): s for k, s in shapes(ref["text_unet"]).items()}
    unet.update(text)  # with diffuser.text.time_embed.*, which VD does not keep: minivd must drop it
    assert len(unet) == 686 + 686 and sum(".data_blocks.29.0." in k for k in unet) == 8
    with torch.device("meta"):
        module = DualContextUNet(UNetConfig(), data=("image", "text"), context=("image", "text"))
    rules = weights_loader.rules_for("unet", UNetConfig(), "original")
    assert_fills(module, MetaFile(unet, "vd-four-flow-v1-0.pth"), rules,
                 dropped=[k for k in text if k.startswith("diffuser.text.time_embed.")])

    vae = {k: tuple(v.shape) for k, v in original_vae_state(ref["vae"].state_dict(), levels=4).items()}
    assert vae["encoder.mid.attn_1.q.weight"] == (512, 512, 1, 1) and "decoder.up.3.upsample.conv.weight" in vae
    with torch.device("meta"):
        module = AutoencoderKL(VAEConfig())
    rules = weights_loader.rules_for("vae", layout="original", vae_config=VAEConfig())
    assert_fills(module, MetaFile(vae, "kl-f8.pth"), rules)

    config = clip_model_config(ref["text_encoder"].config.to_dict(), ref["image_encoder"].config.to_dict())
    with torch.device("meta"):
        clip = CLIPModel(config)
        text_encoder = CLIPTextEncoder(CLIPTextConfig.from_hf_config(clip_tower_config(config.to_dict(), "text")))
        image_encoder = CLIPVisionEncoder(CLIPVisionConfig.from_hf_config(clip_tower_config(config.to_dict(), "vision")))
    file = MetaFile(shapes(clip), "clip-vit-large-patch14/model.safetensors")
    assert text_encoder.config == CLIPTextConfig(eos_token_id=text_encoder.config.eos_token_id)  # ViT-L/14 sizes
    assert image_encoder.config == CLIPVisionConfig()
    for tower, module, other in [("text_encoder", text_encoder, "vision"), ("image_encoder", image_encoder, "text")]:
        dropped = [k for k in file.keys() if k.startswith((f"{other}_model.", "visual_projection" if other == "vision"
                                                           else "text_projection")) or k == "logit_scale"]
        assert_fills(module, file, weights_loader.rules_for(tower, layout="original"), dropped)


def test_full_size_optimus_keys_fill_every_parameter():
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

    from minivd.optimus import Optimus, OptimusConfig

    with torch.device("meta"):
        bert = BertModel(BertConfig(vocab_size=28996))  # bert-base-cased
        gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50260))  # GPT-2 small + <PAD>, <BOS>, <EOS>
        module = Optimus(OptimusConfig(), None, None)
    shapes = {"encoder." + k: tuple(v.shape) for k, v in bert.state_dict().items()}
    shapes.update({"decoder." + k: tuple(v.shape) for k, v in gpt2.state_dict().items()})
    shapes["encoder.linear.weight"] = (2 * 768, 768)  # (mu, logvar)
    shapes["decoder.transformer.linear.weight"] = (12 * 768, 768)  # the latent as one memory slot per layer
    shapes["decoder.transformer.linear_emb.weight"] = (768, 768)
    masks = {f"decoder.transformer.h.{i}.attn.bias": (1, 1, 1024, 1024) for i in range(12)}  # causal-mask buffers
    shapes.update(masks)
    assert_fills(module, MetaFile(shapes, "optimus-vae.pth"), weights_loader.rules_for("optimus", layout="original"),
                 dropped=[*masks, "decoder.lm_head.weight"])  # lm_head is tied to wte


# ---------------------------------------------------------------------------------------------------------------------
# check, convert, file names, errors


def test_check_and_convert_the_original_layout(tiny_original, tmp_path):
    result = run_cli("check", tiny_original)
    assert result.returncode == 0 and "OK" in result.stdout, result.stdout + result.stderr
    out = tmp_path / "converted"
    result = run_cli("convert", tiny_original, str(out))
    assert result.returncode == 0, result.stderr
    for name in ("vd-four-flow-v1-0", "kl-f8", "optimus-vae"):
        assert (out / "pretrained_pth" / f"{name}.safetensors").is_file()
        assert not (out / "pretrained_pth" / f"{name}.pth").exists()
    assert sorted(p.name for p in (out / "clip-vit-large-patch14").glob("*.safetensors")) == ["model.safetensors"]
    assert run_cli("check", str(out)).returncode == 0
    converted = minivd.load(str(out))
    assert converted.checkpoint.weights_path("unet").endswith("vd-four-flow-v1-0.safetensors")
    assert converted.checkpoint.weights_path("optimus").endswith("optimus-vae.safetensors")
    for flow in ("dual-guided", "image-to-text", "text-variation"):
        converted.prepare(flow)
    original = minivd.load(tiny_original, flows=("dual-guided", "image-to-text", "text-variation"))
    assert_same_parameters(converted, original)


def test_fp16_file_and_file_precedence(tiny_original, tmp_path):
    folder = shutil.copytree(tiny_original, tmp_path / "fp16")
    fp32 = folder / "pretrained_pth" / "vd-four-flow-v1-0.pth"
    sd = torch.load(fp32, weights_only=True)
    torch.save({k: v.half() for k, v in sd.items()}, folder / "vd-four-flow-v1-0-fp16.pth")  # not in pretrained_pth/
    assert Checkpoint(folder).weights_path("unet") == str(fp32)  # fp32 first, wherever it is
    os.remove(fp32)
    model = minivd.load(str(folder), flows=("text-variation",))
    assert detect_layout(str(folder)) == "original" and model.checkpoint.weights_path("unet").endswith("vd-four-flow-v1-0-fp16.pth")
    reference = minivd.load(tiny_original, flows=("text-variation",))
    for (name, p), (_, q) in zip(model.unet.named_parameters(), reference.unet.named_parameters()):
        assert p.dtype == torch.float32 and torch.equal(p, q.half().float()), name


def test_a_folder_of_neither_layout_names_both(tmp_path):
    (tmp_path / "model.ckpt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a Versatile Diffusion checkpoint folder") as error:
        minivd.load(str(tmp_path))
    assert "diffusers layout" in str(error.value) and "original layout" in str(error.value)
    assert "vd-four-flow-v1-0.pth" in str(error.value) and "image_unet/" in str(error.value)
    result = run_cli("check", str(tmp_path))
    assert result.returncode == 1 and "original layout" in result.stdout and "diffusers layout" in result.stdout


def test_old_clip_config_json(tiny_original, tmp_path):
    """openai's config.json (transformers 4.16): tower configs without projection_dim (CLIPModel's is top level), the
    real sizes repeated in text_config_dict / vision_config_dict, which transformers reads over text_config."""
    import json

    folder = shutil.copytree(tiny_original, tmp_path / "old_clip")
    path = folder / "clip-vit-large-patch14" / "config.json"
    config = json.loads(path.read_text())
    for tower in ("text", "vision"):
        sub = config[f"{tower}_config"]
        del sub["projection_dim"]
        config[f"{tower}_config_dict"] = {"hidden_size": sub["hidden_size"], "num_hidden_layers": sub["num_hidden_layers"]}
        sub["hidden_size"], sub["num_hidden_layers"] = 512, 12  # transformers' defaults, overridden by the _dict
    path.write_text(json.dumps(config))
    old, new = minivd.load(str(folder)), minivd.load(tiny_original)
    assert old.config.text == new.config.text and old.config.vision == new.config.vision


def test_original_layout_errors(tiny_original, tmp_path):
    no_clip = shutil.copytree(tiny_original, tmp_path / "no_clip")
    shutil.rmtree(no_clip / "clip-vit-large-patch14")
    with pytest.raises(FileNotFoundError, match="clip-vit-large-patch14"):
        minivd.load(str(no_clip))

    no_vae = shutil.copytree(tiny_original, tmp_path / "no_vae")
    os.remove(no_vae / "pretrained_pth" / "kl-f8.pth")
    with pytest.raises(ValueError, match="vae: no weights file kl-f8.pth"):
        minivd.load(str(no_vae))

    bad_config = shutil.copytree(tiny_original, tmp_path / "bad_config")
    (bad_config / "config.json").write_text('{"unet": {"channels": [32, 64]}}')
    with pytest.raises(ValueError, match="unknown UNetConfig fields \\['channels'\\]"):
        minivd.load(str(bad_config))
    (bad_config / "config.json").write_text('{"unet": {"context_dim": 48}}')  # CLIP projects to 32
    with pytest.raises(ValueError, match=r"projection_dim 32 differs from the UNet's context_dim \(cross_attention_dim\) 48"):
        minivd.load(str(bad_config))
    (bad_config / "config.json").write_text('{"unet": {"context_dim": 32}}')  # VD's other sizes: check says so
    with pytest.raises(ValueError, match="mis-shaped tensor 'diffuser.image.data_blocks.0.0.weight'"):
        minivd.load(str(bad_config))


def test_check_names_original_keys_and_only_accepts_singleton_trailing_dims(tiny_original, tmp_path):
    broken = shutil.copytree(tiny_original, tmp_path / "broken")
    path = broken / "pretrained_pth" / "kl-f8.pth"
    sd = torch.load(path, weights_only=True)
    q = sd["encoder.mid.attn_1.q.weight"]
    assert q.shape[2:] == (1, 1)  # stored as a 1x1 conv, loaded as a Linear weight
    sd["encoder.mid.attn_1.q.weight"] = q.expand(-1, -1, 2, 1).contiguous()  # (C, C, 2, 1): not a 1x1 conv
    del sd["decoder.up.0.block.1.conv2.bias"]
    torch.save(sd, path)
    result = run_cli("check", str(broken))
    assert result.returncode == 1
    assert "mis-shaped tensor 'encoder.mid.attn_1.q.weight'" in result.stdout
    n = len(minivd.load(tiny_original).config.vae.block_out_channels)
    assert f"missing tensor for minivd 'decoder.up_blocks.{n - 1}.resnets.1.conv2.bias'" in result.stdout
