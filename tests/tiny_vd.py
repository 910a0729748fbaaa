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
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.pipelines.deprecated.versatile_diffusion.modeling_text_unet import UNetFlatConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionConfig, CLIPVisionModelWithProjection

    from minivd.tools.random_checkpoint import write_pipeline_files
    from minivd.tools.vocab import write_clip_vocab

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
    if optimus:
        write_tiny_optimus(os.path.join(folder, "optimus"), latent_dim=32, seed=seed + 100)
    with open(os.path.join(folder, "minivd.json"), "w") as f:  # what the folder is, and sizes that run in seconds
        json.dump({"description": "a tiny checkpoint with RANDOM weights, for tests",
                   "defaults": {"height": 64, "width": 64, "steps": 4, "guidance_scale": 7.5}}, f)
    return write_pipeline_files(folder)  # image_feature_extractor, scheduler, model_index.json: as the benchmark's


def bert_and_gpt2(cfg):
    """transformers' BertModel and GPT2LMHeadModel at an OptimusConfig's sizes (eager attention, no dropout)."""
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

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
    return bert, gpt2


def tiny_optimus_references(latent_dim=32, seed=0):
    """transformers BertModel + GPT2LMHeadModel at minivd's tiny Optimus sizes, and the optimus-vae.pth state dict
    (the original code's names: encoder.* = BERT + latent head, decoder.transformer.* = GPT-2 + linear, linear_emb)."""
    from minivd.optimus import OptimusConfig

    cfg = OptimusConfig.tiny()
    cfg.latent_dim = latent_dim
    torch.manual_seed(seed)
    bert, gpt2 = bert_and_gpt2(cfg)
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
    from minivd.tools.vocab import write_tiny_vocabs

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


# ---------------------------------------------------------------------------------------------------------------------
# The original (SHI-Labs) layout, derived from a diffusers-layout folder.
#
# An explicit diffusers -> original key mapping, written from VD_REFERENCE §5 and the original code
# (lib/model_zoo/openaimodel.py UNetModel2D_Next / UNetModel0D_Next, attention.py SpatialTransformer,
# autokl_modules.py Encoder / Decoder), independently of minivd's rename rules:
#   UNet  vd-four-flow-v1-0.pth holds the VD model's `diffuser` ModuleDict: diffuser.image = global + image data +
#         IMAGE-context layers (= diffusers image_unet), diffuser.text = text data + TEXT-context layers (= text_unet,
#         whose time embedding VD does not keep). Blocks are numbered in execution order (tables below) and each is
#         wrapped in a TimestepEmbedSequential, hence `.N.0.`. ResBlocks use the openai names (RESBLOCK_NAMES), the
#         image Downsample calls its conv `op`, the out block is Sequential(GroupNorm, SiLU, conv|Linear) -> .0. / .2.,
#         SpatialTransformer has the inner names of diffusers' Transformer2DModel.
#   VAE   kl-f8.pth: LDM AutoencoderKL names (VAE_NAMES); the decoder's levels are numbered by resolution
#         (up.0 = full size), the reverse of diffusers' up_blocks; the mid-block attention q/k/v/proj_out are 1x1
#         convs, stored (C, C, 1, 1).
#   CLIP  clip-vit-large-patch14/: a transformers CLIPModel (both towers + logit_scale in one file, CLIPConfig).

ORIGINAL_DATA_BLOCKS = [  # diffuser.<kind>.data_blocks.N -> the diffusers module (4 levels, 2 ResBlocks per level)
    "conv_in",  # 0
    "down_blocks.0.resnets.0", "down_blocks.0.resnets.1", "down_blocks.0.downsamplers.0",  # 1-3
    "down_blocks.1.resnets.0", "down_blocks.1.resnets.1", "down_blocks.1.downsamplers.0",  # 4-6
    "down_blocks.2.resnets.0", "down_blocks.2.resnets.1", "down_blocks.2.downsamplers.0",  # 7-9
    "down_blocks.3.resnets.0", "down_blocks.3.resnets.1",  # 10, 11
    "mid_block.resnets.0", "mid_block.resnets.1",  # 12, 13
    "up_blocks.0.resnets.0", "up_blocks.0.resnets.1", "up_blocks.0.resnets.2", "up_blocks.0.upsamplers.0",  # 14-17
    "up_blocks.1.resnets.0", "up_blocks.1.resnets.1", "up_blocks.1.resnets.2", "up_blocks.1.upsamplers.0",  # 18-21
    "up_blocks.2.resnets.0", "up_blocks.2.resnets.1", "up_blocks.2.resnets.2", "up_blocks.2.upsamplers.0",  # 22-25
    "up_blocks.3.resnets.0", "up_blocks.3.resnets.1", "up_blocks.3.resnets.2",  # 26-28
    "out",  # 29: conv_norm_out (.0.) and conv_out (.2.)
]
ORIGINAL_CONTEXT_BLOCKS = [  # diffuser.<kind>.context_blocks.N -> the diffusers module
    "down_blocks.0.attentions.0", "down_blocks.0.attentions.1",  # 0, 1
    "down_blocks.1.attentions.0", "down_blocks.1.attentions.1",  # 2, 3
    "down_blocks.2.attentions.0", "down_blocks.2.attentions.1",  # 4, 5
    "mid_block.attentions.0",  # 6
    "up_blocks.1.attentions.0", "up_blocks.1.attentions.1", "up_blocks.1.attentions.2",  # 7-9
    "up_blocks.2.attentions.0", "up_blocks.2.attentions.1", "up_blocks.2.attentions.2",  # 10-12
    "up_blocks.3.attentions.0", "up_blocks.3.attentions.1", "up_blocks.3.attentions.2",  # 13-15
]
RESBLOCK_NAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                  "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_NAMES = [  # (diffusers, LDM) substrings, replaced in this order
    ("mid_block.resnets.0.", "mid.block_1."), ("mid_block.resnets.1.", "mid.block_2."),
    ("mid_block.attentions.0.group_norm.", "mid.attn_1.norm."), ("mid_block.attentions.0.to_q.", "mid.attn_1.q."),
    ("mid_block.attentions.0.to_k.", "mid.attn_1.k."), ("mid_block.attentions.0.to_v.", "mid.attn_1.v."),
    ("mid_block.attentions.0.to_out.0.", "mid.attn_1.proj_out."),
    ("conv_shortcut.", "nin_shortcut."), ("conv_norm_out.", "norm_out."),
]
CLIP_FOLDER = "clip-vit-large-patch14"  # openai/clip-vit-large-patch14 as downloaded


def original_unet_key(key, kind):
    """A diffusers image_unet (kind "image") or text_unet (kind "text") key -> its vd-four-flow-v1-0.pth key."""
    prefix = f"diffuser.{kind}."
    if key.startswith("time_embedding."):  # Sequential(Linear, SiLU, Linear)
        key = key.replace("time_embedding.linear_1.", "time_embed.0.")
        return prefix + key.replace("time_embedding.linear_2.", "time_embed.2.")
    if key.startswith(("conv_norm_out.", "conv_out.")):
        index = "0" if key.startswith("conv_norm_out.") else "2"
        return f"{prefix}data_blocks.29.0.{index}.{key.split('.')[-1]}"
    for n, module in enumerate(ORIGINAL_CONTEXT_BLOCKS):
        if key.startswith(module + "."):
            return f"{prefix}context_blocks.{n}.0.{key[len(module) + 1:]}"
    for n, module in enumerate(ORIGINAL_DATA_BLOCKS):
        if key.startswith(module + "."):
            rest = key[len(module) + 1:]
            if ".resnets." in module:
                layer, param = rest.split(".", 1)
                rest = f"{RESBLOCK_NAMES[layer]}.{param}"
            elif ".downsamplers." in module and rest.startswith("conv."):  # the image Downsample's conv is `op`
                rest = "op." + rest[len("conv."):]
            return f"{prefix}data_blocks.{n}.0.{rest}"
    raise KeyError(f"no original name for UNet key {key!r}")


def original_unet_state(image_unet_sd, text_unet_sd):
    """The vd-four-flow-v1-0.pth state dict from the two diffusers UNets' state dicts (text time embedding left out)."""
    sd = {original_unet_key(k, "image"): v for k, v in image_unet_sd.items()}
    sd.update({original_unet_key(k, "text"): v for k, v in text_unet_sd.items() if not k.startswith("time_embedding.")})
    return sd


def original_vae_key(key, levels):
    """A diffusers AutoencoderKL key -> its kl-f8.pth (LDM) key."""
    for diffusers_name, ldm_name in VAE_NAMES:
        key = key.replace(diffusers_name, ldm_name)
    parts = key.split(".")
    if parts[1] in ("down_blocks", "up_blocks"):  # encoder.down_blocks.i.resnets.j / downsamplers.0 ...
        level = int(parts[2]) if parts[1] == "down_blocks" else levels - 1 - int(parts[2])
        inner = {"resnets": ["block", parts[4]], "downsamplers": ["downsample"], "upsamplers": ["upsample"]}[parts[3]]
        parts = [parts[0], parts[1].split("_")[0], str(level), *inner, *parts[5:]]
    return ".".join(parts)


def original_vae_state(vae_sd, levels):
    """The kl-f8.pth state dict from a diffusers AutoencoderKL state dict: LDM names, attention as 1x1 convs."""
    sd = {}
    for key, value in vae_sd.items():
        name = original_vae_key(key, levels)
        is_projection = ".attn_1." in name and name.endswith("weight") and value.ndim == 2  # q, k, v, proj_out
        sd[name] = value[:, :, None, None] if is_projection else value
    return sd


def clip_model_config(text_config, vision_config):
    """A transformers CLIPConfig holding the two tower configs (dicts), as openai/clip-vit-large-patch14 has."""
    from transformers import CLIPConfig

    assert text_config["projection_dim"] == vision_config["projection_dim"]
    return CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=text_config["projection_dim"])


def read_state(folder):
    """The state dict of a diffusers / transformers weights folder (safetensors or pickled .bin)."""
    for name in ("diffusion_pytorch_model.safetensors", "model.safetensors"):
        if os.path.isfile(os.path.join(folder, name)):
            from safetensors.torch import load_file
            return load_file(os.path.join(folder, name))
    for name in ("diffusion_pytorch_model.bin", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(folder, name)):
            return torch.load(os.path.join(folder, name), weights_only=True)
    raise FileNotFoundError(folder)


def build_tiny_original(diffusers_folder, folder):
    """Write the original-layout twin of a tiny diffusers-layout folder (the same weights):
        pretrained_pth/vd-four-flow-v1-0.pth, pretrained_pth/kl-f8.pth, pretrained_pth/optimus-vae.pth,
        clip-vit-large-patch14/ (CLIPModel config.json, model.safetensors and pytorch_model.bin like openai's,
        vocab.json, merges.txt, preprocessor_config.json), optimus/ (vocabularies under their original names,
        config.json), config.json (minivd's tiny sizes)."""
    import shutil

    from transformers import CLIPModel

    src = lambda *p: os.path.join(diffusers_folder, *p)
    out = lambda *p: os.path.join(folder, *p)
    os.makedirs(out("pretrained_pth"), exist_ok=True)
    unet = original_unet_state(read_state(src("image_unet")), read_state(src("text_unet")))
    torch.save(unet, out("pretrained_pth", "vd-four-flow-v1-0.pth"))
    with open(src("vae", "config.json")) as f:
        vae_config = json.load(f)
    levels = len(vae_config["block_out_channels"])
    torch.save(original_vae_state(read_state(src("vae")), levels), out("pretrained_pth", "kl-f8.pth"))

    with open(src("text_encoder", "config.json")) as f:
        text_config = json.load(f)
    with open(src("image_encoder", "config.json")) as f:
        vision_config = json.load(f)
    clip = CLIPModel(clip_model_config(text_config, vision_config)).eval()
    state = {**read_state(src("text_encoder")), **read_state(src("image_encoder")), "logit_scale": torch.tensor(2.6592)}
    clip.load_state_dict(state, strict=True)  # the CLIPModel names: both towers' keys and logit_scale
    clip.save_pretrained(out(CLIP_FOLDER))
    torch.save(clip.state_dict(), out(CLIP_FOLDER, "pytorch_model.bin"))  # openai's folder has both formats
    for name in os.listdir(src("tokenizer")):
        shutil.copy(src("tokenizer", name), out(CLIP_FOLDER, name))
    shutil.copy(src("image_feature_extractor", "preprocessor_config.json"), out(CLIP_FOLDER))

    os.makedirs(out("optimus"), exist_ok=True)
    shutil.copy(src("optimus", "optimus-vae.pth"), out("pretrained_pth", "optimus-vae.pth"))
    for name, original in {"vocab.txt": "bert-base-cased-vocab.txt", "vocab.json": "gpt2-vocab.json",
                           "merges.txt": "gpt2-merges.txt", "config.json": "config.json"}.items():
        shutil.copy(src("optimus", name), out("optimus", original))

    with open(out("config.json"), "w") as f:  # minivd's sizes: the tiny folder is not VD-sized
        json.dump({"unet": dict(block_out_channels=list(TINY_UNET["block_out_channels"]),
                                layers_per_block=TINY_UNET["layers_per_block"],
                                heads=TINY_UNET["attention_head_dim"], context_dim=TINY_UNET["cross_attention_dim"],
                                norm_groups=TINY_UNET["norm_num_groups"], text_channels=32),
                   "vae": dict(block_out_channels=vae_config["block_out_channels"],
                               layers_per_block=vae_config["layers_per_block"],
                               norm_groups=vae_config["norm_num_groups"])}, f, indent=2)
    return folder

