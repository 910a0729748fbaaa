"""minivd.vae against diffusers' AutoencoderKL on the same random weights (diffusers is only the reference)."""

import re

import pytest
import torch

import weights_loader
from minivd.vae import AutoencoderKL, VAEConfig, images_to_latents, latents_to_images

diffusers = pytest.importorskip("diffusers")

ATOL = 1e-5  # fp32, on moments, decoded images and [0, 1] images

RULES = weights_loader.VAE_RULES  # official diffusers VAE key -> minivd name (legacy attention names first)

# shi-labs/versatile-diffusion vae/config.json (the sizes that matter)
VD_VAE_CONFIG = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 256,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

TINY = dict(VD_VAE_CONFIG, block_out_channels=[32, 64], norm_num_groups=8, sample_size=32,
            down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)


def rename(state_dict):
    return {weights_loader.rename(name, RULES): tensor for name, tensor in state_dict.items()}


def to_legacy_names(state_dict):
    """The names of the official VD file: mid-block attention as query/key/value/proj_attn."""
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    out = {}
    for name, tensor in state_dict.items():
        for new, legacy in old.items():
            name = name.replace(f".attentions.0.{new}.", f".attentions.0.{legacy}.")
        out[name] = tensor
    return out


def tiny_reference(**overrides):
    torch.manual_seed(0)
    config = dict(TINY, **overrides)
    ref = diffusers.AutoencoderKL(**{k: v for k, v in config.items() if not k.startswith("_")}).eval()
    # convs are randomly initialised already; perturb the GroupNorms (weight 1, bias 0 at init) so they count too
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return ref, config


def minivd_from(ref, config):
    vae = AutoencoderKL(VAEConfig.from_hf_config(config)).eval()
    vae.load_state_dict(rename(ref.state_dict()), strict=True)
    return vae


def max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize(
    "overrides",
    [{}, {"use_quant_conv": False, "use_post_quant_conv": False, "mid_block_add_attention": False}],
    ids=["vd-layout", "no-quant-conv-no-attention"],
)
def test_encode_decode_match_diffusers(overrides):
    ref, config = tiny_reference(**overrides)
    vae = minivd_from(ref, config)
    torch.manual_seed(1)
    x = torch.rand(2, 3, 16, 24) * 2 - 1  # non-square, in [-1, 1]
    z = torch.randn(2, 4, 8, 12)
    with torch.no_grad():
        dist = ref.encode(x).latent_dist
        mean, logvar = vae.encode(x)
        ref_img, img = ref.decode(z).sample, vae.decode(z)
    assert mean.shape == (2, 4, 8, 12) and img.shape == (2, 3, 16, 24)
    diffs = {
        "mean": max_diff(mean, dist.mean),
        "logvar": max_diff(logvar, dist.logvar),
        "decode": max_diff(img, ref_img),
    }
    print(overrides, diffs)
    assert all(d < ATOL for d in diffs.values()), diffs


def test_pipeline_helpers_match_diffusers():
    ref, config = tiny_reference()
    vae = minivd_from(ref, config)
    torch.manual_seed(2)
    images = torch.rand(1, 3, 16, 16)
    latents = torch.randn(1, 4, 8, 8)
    sf = ref.config.scaling_factor
    with torch.no_grad():
        ref_latents = ref.encode(2 * images - 1).latent_dist.mean * sf
        ref_images = (ref.decode(latents / sf).sample / 2 + 0.5).clamp(0, 1)
        diff_lat = max_diff(images_to_latents(vae, images), ref_latents)
        diff_img = max_diff(latents_to_images(vae, latents), ref_images)
    print("images_to_latents", diff_lat, "latents_to_images", diff_img)
    assert diff_lat < ATOL and diff_img < ATOL


def test_legacy_attention_names_from_bin(tmp_path):
    """The official file stores the mid-block attention as query/key/value/proj_attn: load that through the rules."""
    ref, config = tiny_reference()
    legacy = to_legacy_names(ref.state_dict())
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in legacy
    assert not any(".to_q." in k or ".to_out." in k for k in legacy)
    torch.save(legacy, tmp_path / "diffusion_pytorch_model.bin")

    loaded = torch.load(tmp_path / "diffusion_pytorch_model.bin", weights_only=True)
    vae = AutoencoderKL(VAEConfig.from_hf_config(config)).eval()
    vae.load_state_dict(rename(loaded), strict=True)
    torch.manual_seed(3)
    x, z = torch.rand(1, 3, 16, 16) * 2 - 1, torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert max_diff(vae.encode(x)[0], ref.encode(x).latent_dist.mean) < ATOL
        assert max_diff(vae.decode(z), ref.decode(z).sample) < ATOL


def test_legacy_names_are_what_diffusers_accepts(tmp_path):
    """Independent check of the legacy layout: diffusers itself loads our legacy-named .bin to the same model."""
    import json

    ref, config = tiny_reference()
    (tmp_path / "config.json").write_text(json.dumps(config))
    torch.save(to_legacy_names(ref.state_dict()), tmp_path / "diffusion_pytorch_model.bin")
    reloaded = diffusers.AutoencoderKL.from_pretrained(tmp_path, use_safetensors=False).eval()
    for name, tensor in ref.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


def test_conv_shaped_attention_weights_load_through_the_loader(tmp_path):
    ref, config = tiny_reference()
    sd = to_legacy_names(ref.state_dict())
    conv_shaped = {k: (v[:, :, None, None] if re.search(r"attentions\.0\.\w+\.weight$", k) and v.ndim == 2 else v)
                   for k, v in sd.items()}
    assert conv_shaped["decoder.mid_block.attentions.0.query.weight"].ndim == 4
    vae = AutoencoderKL(VAEConfig.from_hf_config(config)).eval()
    with pytest.raises(RuntimeError, match="size mismatch"):
        vae.load_state_dict(rename(conv_shaped), strict=True)
    torch.save(conv_shaped, tmp_path / "diffusion_pytorch_model.bin")  # the loader drops the trailing 1x1 dims
    source = weights_loader.TensorFile(str(tmp_path / "diffusion_pytorch_model.bin"))
    with torch.device("meta"):
        vae = AutoencoderKL(VAEConfig.from_hf_config(config)).eval()
    weights_loader.load_into(vae, [(source, RULES)])
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert max_diff(vae.decode(z), ref.decode(z).sample) < ATOL


def test_meta_build_then_assign():
    ref, config = tiny_reference()
    with torch.device("meta"):
        vae = AutoencoderKL(VAEConfig.from_hf_config(config))
    vae.load_state_dict(rename(ref.state_dict()), strict=True, assign=True)
    vae.eval()
    assert not any(p.is_meta for p in vae.parameters())
    z = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        assert max_diff(vae.decode(z), ref.decode(z).sample) < ATOL


@pytest.mark.parametrize("legacy", [False, True], ids=["diffusers-names", "official-legacy-names"])
def test_full_size_keys_cover_minivd(legacy):
    """Every official VD VAE key maps onto a minivd parameter of the same shape, and every parameter is filled."""
    with torch.device("meta"):
        ref = diffusers.AutoencoderKL(**{k: v for k, v in VD_VAE_CONFIG.items() if not k.startswith("_")})
        vae = AutoencoderKL(VAEConfig.from_hf_config(VD_VAE_CONFIG))
    official = ref.state_dict()
    if legacy:
        official = to_legacy_names(official)
        assert "encoder.mid_block.attentions.0.query.weight" in official
    mapped = rename(official)
    ours = vae.state_dict()
    assert len(mapped) == len(official), "two official keys mapped to the same name"
    assert set(mapped) == set(ours), (sorted(set(mapped) - set(ours))[:5], sorted(set(ours) - set(mapped))[:5])
    for name, tensor in mapped.items():
        assert tensor.shape == ours[name].shape, name
    vae.load_state_dict(mapped, strict=True, assign=True)
    assert sum(p.numel() for p in vae.parameters()) == sum(p.numel() for p in ref.parameters())
    assert vae.downscale == 8


def test_vd_defaults_equal_official_config():
    assert VAEConfig.from_hf_config(VD_VAE_CONFIG) == VAEConfig()


def test_bad_inputs_raise():
    vae = AutoencoderKL(VAEConfig.tiny())
    with pytest.raises(ValueError, match="latents must be \\(B, 4, H, W\\)"):
        vae.decode(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="images must be \\(B, 3, H, W\\)"):
        vae.encode(torch.randn(1, 4, 16, 16))
    with pytest.raises(ValueError, match="\\[0, 1\\]"):
        images_to_latents(vae, torch.rand(1, 3, 16, 16) * 2 - 1)
    with pytest.raises(ValueError, match="act_fn"):
        VAEConfig.from_hf_config(dict(VD_VAE_CONFIG, act_fn="gelu"))
