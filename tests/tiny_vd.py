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


def build_tiny_vd(folder, fmt="safetensors", legacy_vae=False, seed=0, optimus=True):
    """Write a tiny VD folder: image_unet, text_unet, vae, text_encoder, image_encoder, tokenizer,
    image_feature_extractor, scheduler, model_index.json, and (optimus=True) optimus/optimus-vae.pth with its
    vocabularies. fmt "bin" writes pickled .bin files; legacy_vae renames the VAE attention to the old names found in
    the official file."""
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
    if optimus:
        write_tiny_optimus(os.path.join(folder, "optimus"), latent_dim=32, seed=seed + 100)
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


def tiny_optimus_references(latent_dim=32, seed=0):
    """transformers BertModel + GPT2LMHeadModel at minivd's tiny Optimus sizes, and the optimus-vae.pth state dict
    (the original code's names: encoder.* = BERT + latent head, decoder.transformer.* = GPT-2 + linear, linear_emb)."""
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

    from minivd.optimus import OptimusConfig

    cfg = OptimusConfig.tiny()
    cfg.latent_dim = latent_dim
    torch.manual_seed(seed)
    bert = BertModel(BertConfig(
        vocab_size=cfg.encoder_vocab_size, hidden_size=cfg.encoder_hidden, num_hidden_layers=cfg.encoder_layers,
        num_attention_heads=cfg.encoder_heads, intermediate_size=cfg.encoder_mlp, hidden_act="gelu",
        max_position_embeddings=cfg.encoder_positions, type_vocab_size=cfg.encoder_type_vocab,
        layer_norm_eps=cfg.encoder_eps, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        attn_implementation="eager")).eval()
    gpt2 = GPT2LMHeadModel(GPT2Config(
        vocab_size=cfg.decoder_vocab_size, n_positions=cfg.decoder_positions, n_embd=cfg.decoder_hidden,
        n_layer=cfg.decoder_layers, n_head=cfg.decoder_heads, n_inner=cfg.decoder_mlp, activation_function="gelu_new",
        layer_norm_epsilon=cfg.decoder_eps, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=None, eos_token_id=None, attn_implementation="eager")).eval()
    with torch.no_grad():
        for model in (bert, gpt2):
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        gpt2.transformer.wte.weight[-1] = 0  # <EOS> (last id): a neutral logit, so greedy decoding runs long
    sd = {"encoder." + k: v.clone() for k, v in bert.state_dict().items()}
    sd["encoder.linear.weight"] = torch.randn(2 * latent_dim, cfg.encoder_hidden) * 0.3
    sd.update({"decoder." + k: v.clone() for k, v in gpt2.state_dict().items()})
    sd["decoder.transformer.linear.weight"] = torch.randn(cfg.decoder_layers * cfg.decoder_hidden, latent_dim) * 0.3
    sd["decoder.transformer.linear_emb.weight"] = torch.randn(cfg.decoder_hidden, latent_dim) * 0.3
    n = cfg.decoder_positions
    for i in range(cfg.decoder_layers):  # the original saves its causal-mask buffers with the weights
        sd[f"decoder.transformer.h.{i}.attn.bias"] = torch.ones(n, n).tril().view(1, 1, n, n)
    return bert, gpt2, sd


def write_tiny_optimus(folder, latent_dim=32, seed=0):
    from minivd.optimus import write_tiny_vocabs

    os.makedirs(folder, exist_ok=True)
    write_tiny_vocabs(folder)
    _, _, sd = tiny_optimus_references(latent_dim, seed)
    torch.save(sd, os.path.join(folder, "optimus-vae.pth"))
    with open(os.path.join(folder, "config.json"), "w") as f:  # head counts: not in any tensor shape
        json.dump({"head_dim": 8}, f)
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
