"""Tiny random Versatile Diffusion checkpoints in the official (diffusers) folder layout, and the diffusers reference
pipelines over the same files. Test-only: this is where diffusers and transformers are used."""

import json
import os

import torch

TINY_UNET = dict(
    block_out_channels=(32, 32, 64, 64),
    layers_per_block=2,
    cross_attention_dim=32,
    attention_head_dim=2,
    norm_num_groups=8,
)


def build_tiny_vd(folder, fmt="safetensors", legacy_vae=False, seed=0):
    """Write a tiny VD folder: image_unet, text_unet, vae, text_encoder, image_encoder, tokenizer,
    image_feature_extractor, scheduler, model_index.json. fmt "bin" writes pickled .bin files; legacy_vae renames the
    VAE attention to the old names found in the official file."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from diffusers.pipelines.deprecated.versatile_diffusion.modeling_text_unet import UNetFlatConditionModel
    from transformers import (CLIPImageProcessor, CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionConfig,
                              CLIPVisionModelWithProjection)

    from minivd.tokenizer import write_clip_vocab

    folder = os.fspath(folder)
    safe = fmt == "safetensors"
    torch.manual_seed(seed)
    image_unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, **TINY_UNET)
    text_unet = UNetFlatConditionModel(
        sample_size=None, in_channels=(32, 1, 1), out_channels=(32, 1, 1),
        down_block_types=("CrossAttnDownBlockFlat",) * 3 + ("DownBlockFlat",),
        up_block_types=("UpBlockFlat",) + ("CrossAttnUpBlockFlat",) * 3, **TINY_UNET)
    text_unet.time_embedding.load_state_dict(image_unet.time_embedding.state_dict())  # as in the official files
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(16, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64)
    write_clip_vocab(os.path.join(folder, "tokenizer"))
    with open(os.path.join(folder, "tokenizer", "vocab.json")) as f:
        vocab = json.load(f)
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, projection_dim=32, hidden_act="quick_gelu", bos_token_id=bos, eos_token_id=eos,
        pad_token_id=eos))
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2, image_size=224,
        patch_size=14, projection_dim=32, hidden_act="quick_gelu"))
    for name, module in [("image_unet", image_unet), ("text_unet", text_unet), ("vae", vae),
                         ("text_encoder", text_encoder), ("image_encoder", image_encoder)]:
        module.eval().save_pretrained(os.path.join(folder, name), safe_serialization=safe)
    if legacy_vae:
        path = os.path.join(folder, "vae", "diffusion_pytorch_model." + ("safetensors" if safe else "bin"))
        sd = vae.state_dict()
        old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
        renamed = {}
        for key, value in sd.items():
            for new, legacy in old.items():
                key = key.replace(f"attentions.0.{new}.", f"attentions.0.{legacy}.")
            renamed[key] = value.contiguous()
        if safe:
            from safetensors.torch import save_file
            save_file(renamed, path)
        else:
            torch.save(renamed, path)
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(
        os.path.join(folder, "image_feature_extractor"))
    DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1).save_pretrained(os.path.join(folder, "scheduler"))
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump({"_class_name": "VersatileDiffusionPipeline", "_diffusers_version": "0.8.0.dev0",
                   "image_unet": ["diffusers", "UNet2DConditionModel"],
                   "text_unet": ["versatile_diffusion", "UNetFlatConditionModel"],
                   "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "DDIMScheduler"],
                   "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
                   "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
                   "tokenizer": ["transformers", "CLIPTokenizer"],
                   "image_feature_extractor": ["transformers", "CLIPImageProcessor"]}, f, indent=2)
    return folder


def reference_components(folder):
    """Every component loaded by diffusers/transformers from the folder (the Hub folder cannot be loaded by
    diffusers' pipeline from_pretrained, VD_REFERENCE §8, so each is loaded on its own)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from diffusers.pipelines.deprecated.versatile_diffusion.modeling_text_unet import UNetFlatConditionModel
    from transformers import (CLIPImageProcessor, CLIPTextModelWithProjection, CLIPTokenizer,
                              CLIPVisionModelWithProjection)

    sub = lambda name: os.path.join(folder, name)
    return dict(
        image_unet=UNet2DConditionModel.from_pretrained(sub("image_unet")).eval(),
        text_unet=UNetFlatConditionModel.from_pretrained(sub("text_unet")).eval(),
        vae=AutoencoderKL.from_pretrained(sub("vae")).eval(),
        text_encoder=CLIPTextModelWithProjection.from_pretrained(sub("text_encoder")).eval(),
        image_encoder=CLIPVisionModelWithProjection.from_pretrained(sub("image_encoder")).eval(),
        tokenizer=CLIPTokenizer.from_pretrained(sub("tokenizer")),
        image_feature_extractor=CLIPImageProcessor.from_pretrained(sub("image_feature_extractor")),
        scheduler=DDIMScheduler.from_pretrained(sub("scheduler")),
    )


def reference_pipeline(mode, folder):
    """diffusers' VD pipeline for `mode`, with the VD_REFERENCE §8 workarounds applied."""
    from diffusers import (VersatileDiffusionDualGuidedPipeline, VersatileDiffusionImageVariationPipeline,
                           VersatileDiffusionTextToImagePipeline)

    c = reference_components(folder)
    fix_gray_unconditional(c["image_feature_extractor"])
    if mode == "text-to-image":
        keys = ("tokenizer", "text_encoder", "image_unet", "text_unet", "vae", "scheduler")
        return VersatileDiffusionTextToImagePipeline(**{k: c[k] for k in keys})
    if mode == "image-variation":
        keys = ("image_feature_extractor", "image_encoder", "image_unet", "vae", "scheduler")
        return VersatileDiffusionImageVariationPipeline(**{k: c[k] for k in keys})
    if mode == "dual-guided":
        keys = ("tokenizer", "image_feature_extractor", "text_encoder", "image_encoder", "image_unet", "text_unet",
                "vae", "scheduler")
        pipe = VersatileDiffusionDualGuidedPipeline(**{k: c[k] for k in keys})
        from diffusers.models import DualTransformer2DModel

        for module in pipe.image_unet.modules():
            if isinstance(module, DualTransformer2DModel):
                module.forward = drop_attention_mask(module.forward)  # the TypeError trap of diffusers >= 0.17
        return pipe
    raise ValueError(mode)


def fix_gray_unconditional(processor):
    """diffusers' unconditional image is a float 0.5 array that current processors rescale twice (almost black,
    VD_REFERENCE §8). Replace it with the uint8 mid-gray picture both diffusers and the original code mean."""
    import numpy as np
    from PIL import Image

    preprocess = processor.preprocess

    def fixed(images, *args, **kwargs):
        images = [Image.new("RGB", (512, 512), (127, 127, 127)) if isinstance(im, np.ndarray) else im
                  for im in (images if isinstance(images, list) else [images])]
        return preprocess(images, *args, **kwargs)

    processor.preprocess = fixed


def drop_attention_mask(forward):
    def wrapped(*args, encoder_attention_mask=None, **kwargs):
        return forward(*args, **kwargs)

    return wrapped
