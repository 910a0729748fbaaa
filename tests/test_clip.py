"""minivd.clip against transformers' CLIPTextModelWithProjection / CLIPVisionModelWithProjection (same random
weights, contexts computed the way diffusers' VD pipelines do) and against CLIPImageProcessor's PIL path."""

import re

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")

from minivd.clip import (  # noqa: E402
    CLIPTextConfig,
    CLIPTextEncoder,
    CLIPVisionConfig,
    CLIPVisionEncoder,
    ImagePreprocessConfig,
    preprocess,
)

CONTEXT_ATOL = 1e-5  # fp32 contexts (unit-norm pooled token, so absolute = relative)
PIXEL_ATOL = 1e-5  # preprocessed pixel values

# Official (transformers) key -> minivd name, applied in order with re.sub; None drops the key.
CLIP_RULES = [
    (r"\.position_ids$", None),  # a buffer of 0..N-1 that some files carry
    (r"^(text|vision)_model\.(embeddings\.|encoder\.)?", ""),  # minivd keeps one flat module per tower
    (r"^pre_layrnorm\.", "pre_layernorm."),  # HF's spelling
    (r"\.self_attn\.(q|k|v|out)_proj\.", r".self_attn.to_\1."),  # minivd.attention.Attention names
]


def rename(state_dict):
    out = {}
    for key, tensor in state_dict.items():
        for pattern, replacement in CLIP_RULES:
            if replacement is None and re.search(pattern, key):
                break  # dropped
            if replacement is not None:
                key = re.sub(pattern, replacement, key)
        else:
            out[key] = tensor
    return out


def perturbed(model, seed):
    """transformers initialises with std 0.02 and LayerNorm (1, 0): add noise so every parameter matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


def minivd_from(module_cls, config, reference):
    """Build the minivd module on the meta device and fill it from the renamed reference weights (the loader's path)."""
    with torch.device("meta"):
        module = module_cls(config)
    module.load_state_dict(rename(reference.state_dict()), strict=True, assign=True)
    return module.eval()


def tiny_hf_text(eos_token_id, seed=0):
    cfg = transformers.CLIPTextConfig(
        vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=24, hidden_act="quick_gelu", eos_token_id=eos_token_id,
        bos_token_id=998, pad_token_id=999, attn_implementation="eager",
    )
    torch.manual_seed(seed)
    return perturbed(transformers.CLIPTextModelWithProjection(cfg), seed)


def vd_text_context(reference, input_ids):
    """diffusers VD `_encode_prompt`: text_projection(last_hidden_state) / ||text_embeds||."""
    out = reference(input_ids=input_ids)
    embeds = reference.text_projection(out.last_hidden_state)
    return embeds / torch.norm(out.text_embeds.unsqueeze(1), dim=-1, keepdim=True)


def prompt_ids(lengths, T=77, bos=998, eos=999, seed=0):
    """Token rows like the tokenizer makes them: BOS, random tokens, EOS, EOS padding."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), T), eos)
    for row, n in enumerate(lengths):
        ids[row, 0] = bos
        ids[row, 1 : n + 1] = torch.randint(0, 998, (n,), generator=gen)
    return ids


@torch.no_grad()
def test_text_context_matches_transformers_legacy_eos():
    """VD's config has eos_token_id 2: transformers pools at the highest id (the first EOS)."""
    ref = tiny_hf_text(eos_token_id=2)
    ours = minivd_from(CLIPTextEncoder, CLIPTextConfig.from_hf_config(ref.config.to_dict()), ref)
    ids = prompt_ids([0, 5, 40, 75])
    ctx = ours(ids)
    assert ctx.shape == (4, 77, 24)
    torch.testing.assert_close(ctx, vd_text_context(ref, ids), atol=CONTEXT_ATOL, rtol=0)
    pooled = ctx[torch.arange(4), torch.tensor([1, 6, 41, 76])]  # the first EOS of each row has unit length
    torch.testing.assert_close(pooled.norm(dim=-1), torch.ones(4), atol=1e-6, rtol=0)
    short = ids[:, :50]  # fewer than 77 tokens also works
    torch.testing.assert_close(ours(short), vd_text_context(ref, short), atol=CONTEXT_ATOL, rtol=0)


@torch.no_grad()
def test_text_context_matches_transformers_explicit_eos():
    """A config with a real eos_token_id pools at its first occurrence, even when higher ids come before it."""
    ref = tiny_hf_text(eos_token_id=7, seed=1)
    ours = minivd_from(CLIPTextEncoder, CLIPTextConfig.from_hf_config(ref.config.to_dict()), ref)
    ids = prompt_ids([3, 20, 60], eos=7, seed=1)
    ids[:, -1] = 999  # the highest id sits after the EOS: the legacy rule would pool the wrong token
    ctx = ours(ids)
    torch.testing.assert_close(ctx, vd_text_context(ref, ids), atol=CONTEXT_ATOL, rtol=0)
    assert not torch.allclose(ctx, ctx / ctx[:, -1:].norm(dim=-1, keepdim=True))


def tiny_hf_vision(image_size, patch_size, seed=0):
    cfg = transformers.CLIPVisionConfig(
        image_size=image_size, patch_size=patch_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, projection_dim=24, hidden_act="quick_gelu", attn_implementation="eager",
    )
    torch.manual_seed(seed)
    return perturbed(transformers.CLIPVisionModelWithProjection(cfg), seed)


@torch.no_grad()
@pytest.mark.parametrize("image_size, patch_size, tokens", [(224, 14, 257), (32, 8, 17)])
def test_image_context_matches_transformers(image_size, patch_size, tokens):
    ref = tiny_hf_vision(image_size, patch_size)
    ours = minivd_from(CLIPVisionEncoder, CLIPVisionConfig.from_hf_config(ref.config.to_dict()), ref)
    pixels = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    out = ref(pixel_values=pixels)
    # diffusers VD `_encode_image_prompt`: visual_projection(post_layernorm(last_hidden_state)) / ||token 0||
    embeds = ref.visual_projection(ref.vision_model.post_layernorm(out.last_hidden_state))
    expected = embeds / torch.norm(embeds[:, 0:1], dim=-1, keepdim=True)
    torch.testing.assert_close(embeds[:, 0], out.image_embeds, atol=1e-6, rtol=0)  # token 0 is CLIP's image embedding
    ctx = ours(pixels)
    assert ctx.shape == (2, tokens, 24)
    torch.testing.assert_close(ctx, expected, atol=CONTEXT_ATOL, rtol=0)


# --- Full-size (ViT-L/14) key coverage, on the meta device ----------------------------------------------------

VIT_L_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
                  layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2, pad_token_id=1)  # VD text_encoder/config.json
VIT_L_VISION = dict(image_size=224, patch_size=14, num_channels=3, hidden_size=1024, intermediate_size=4096,
                    num_hidden_layers=24, num_attention_heads=16, projection_dim=768, hidden_act="quick_gelu",
                    layer_norm_eps=1e-5)


@pytest.mark.parametrize("tower", ["text", "vision"])
def test_full_size_keys_map_onto_minivd(tower):
    if tower == "text":
        hf_cfg, hf_cls = transformers.CLIPTextConfig(**VIT_L_TEXT), transformers.CLIPTextModelWithProjection
        ours_cls, cfg_cls, positions = CLIPTextEncoder, CLIPTextConfig, 77
    else:
        hf_cfg, hf_cls = transformers.CLIPVisionConfig(**VIT_L_VISION), transformers.CLIPVisionModelWithProjection
        ours_cls, cfg_cls, positions = CLIPVisionEncoder, CLIPVisionConfig, 257
    config = cfg_cls.from_hf_config(hf_cfg.to_dict())
    assert config == cfg_cls()  # the defaults are ViT-L/14
    with torch.device("meta"):
        official = hf_cls(hf_cfg).state_dict()
        # files written by older transformers also carry this buffer
        official[f"{tower}_model.embeddings.position_ids"] = torch.empty(1, positions, dtype=torch.long)
        ours = ours_cls(config)
    renamed = rename(official)
    assert len(renamed) == len(official) - 1  # only position_ids is dropped, no two keys collide
    expected = ours.state_dict()
    assert sorted(renamed) == sorted(expected)
    for name, tensor in renamed.items():
        assert tensor.shape == expected[name].shape, name
    ours.load_state_dict(renamed, strict=True, assign=True)
    n_official = sum(t.numel() for k, t in official.items() if not k.endswith("position_ids"))
    assert sum(p.numel() for p in ours.parameters()) == n_official


# --- Image preprocessing ------------------------------------------------------------------------------------------

def make_image(width, height, mode="RGB", seed=0):
    """A smooth gradient plus noise, so resampling and cropping offsets both show."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), (x + y) % 256], axis=-1)
    pixels = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    if mode == "RGBA":
        alpha = (rng.random((height, width)) * 255).astype(np.uint8)
        image = Image.fromarray(np.dstack([pixels, alpha]), "RGBA")
    elif mode != "RGB":
        image = image.convert(mode)
    return image


def reference_pixels(images, **kwargs):
    return transformers.CLIPImageProcessorPil(**kwargs)(images=images, return_tensors="pt").pixel_values


@pytest.mark.parametrize("width, height", [(640, 480), (480, 640), (224, 224), (225, 301), (301, 225), (1000, 223),
                                           (97, 131), (513, 77), (333, 999)])
def test_preprocess_matches_transformers(width, height):
    image = make_image(width, height)
    ours = preprocess([image])
    assert ours.shape == (1, 3, 224, 224) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, reference_pixels([image]), atol=PIXEL_ATOL, rtol=0)


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "CMYK"])
def test_preprocess_modes_match_transformers(mode):
    image = make_image(300, 250, mode=mode, seed=1)
    torch.testing.assert_close(preprocess(image), reference_pixels([image]), atol=PIXEL_ATOL, rtol=0)


def test_preprocess_batch_and_config_from_preprocessor_config():
    settings = dict(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32},
                    image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.3, 0.25])
    processor = transformers.CLIPImageProcessorPil(**settings)
    config = ImagePreprocessConfig.from_hf_config(processor.to_dict())
    assert (config.size, config.crop_size) == (40, 32)
    images = [make_image(64, 48, seed=2), make_image(37, 90, seed=3)]
    expected = reference_pixels(images, **settings)
    torch.testing.assert_close(preprocess(images, config), expected, atol=PIXEL_ATOL, rtol=0)
    # VD's image_feature_extractor/preprocessor_config.json (old CLIPFeatureExtractor style) gives the defaults
    vd_style = {"crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True, "resample": 3,
                "feature_extractor_type": "CLIPFeatureExtractor", "size": 224,
                "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
    assert ImagePreprocessConfig.from_hf_config(vd_style) == ImagePreprocessConfig()


def test_bad_inputs():
    with pytest.raises(TypeError, match="ndarray"):
        preprocess(np.zeros((32, 32, 3), dtype=np.uint8))
    with pytest.raises(TypeError, match="Tensor"):
        preprocess([make_image(32, 32), torch.zeros(3, 32, 32)])
    with pytest.raises(ValueError, match="empty"):
        preprocess([])
    with pytest.raises(ValueError, match="bicubic"):
        ImagePreprocessConfig.from_hf_config({"size": 224, "resample": 2})
    with pytest.raises(ValueError, match="larger"):
        preprocess(make_image(40, 40), ImagePreprocessConfig(size=16, crop_size=32))
    text, vision = CLIPTextEncoder(CLIPTextConfig.tiny()), CLIPVisionEncoder(CLIPVisionConfig.tiny())
    with pytest.raises(ValueError, match="max_position_embeddings"):
        text(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(ValueError, match="token ids"):
        text(torch.full((1, 77), 1000))
    with pytest.raises(ValueError, match="integer"):
        text(torch.zeros(1, 77))
    with pytest.raises(TypeError, match="list"):
        text([[1, 2, 3]])
    with pytest.raises(ValueError, match="pixel_values"):
        vision(torch.zeros(1, 3, 224, 224))
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPTextConfig(hidden_act="relu")
    with pytest.raises(ValueError, match="hidden_size"):
        CLIPVisionConfig.from_hf_config({"image_size": 224})
