"""Writing a VersatileDiffusion as a checkpoint folder in the official diffusers layout.

    minivd.export.save(model, "my_vd")   # image_unet/, text_unet/, vae/, text_encoder/, image_encoder/, tokenizer/,
                                         # image_feature_extractor/, scheduler/, optimus/, model_index.json, minivd.json

What `minivd.load` reads (checkpoint.py) and what diffusers' VD pipelines read (each component with its
`from_pretrained`), with transformers' and diffusers' config names. Weights are written as safetensors under the
official key names (`weights_loader.export_rules`, the way back from minivd's names); Optimus keeps the original
code's names, beside its three vocabularies. A network the model does not hold (a flow it never ran) is copied from
`base`, the checkpoint it was read from; a UNet file is rebuilt from the base file with the model's layer sets on top.
"""

import json
import math
import os
import shutil

from safetensors.torch import save_file

import weights_loader

from .checkpoint import Checkpoint

DIFFUSERS_VERSION = "0.42.1"  # the diffusers release the configs are written for (and tested against)


def unet_config(cfg, kind):
    """diffusers' config.json of image_unet (UNet2DConditionModel) or text_unet (UNetFlatConditionModel)."""
    flat = "Flat" if kind == "text" else "2D"
    down = [("CrossAttnDownBlock" if a else "DownBlock") + flat for a in cfg.attention_levels]
    up = [("CrossAttnUpBlock" if a else "UpBlock") + flat for a in reversed(cfg.attention_levels)]
    channels = cfg.image_channels if kind == "image" else [cfg.text_channels, 1, 1]
    return {"_class_name": "UNet2DConditionModel" if kind == "image" else "UNetFlatConditionModel",
            "_diffusers_version": DIFFUSERS_VERSION, "act_fn": "silu", "attention_head_dim": cfg.heads,
            "block_out_channels": list(cfg.block_out_channels), "center_input_sample": False,
            "cross_attention_dim": cfg.context_dim, "down_block_types": down, "downsample_padding": 1,
            "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": channels, "layers_per_block": cfg.layers_per_block,
            "mid_block_scale_factor": 1, "norm_eps": cfg.norm_eps, "norm_num_groups": cfg.norm_groups,
            "out_channels": channels, "sample_size": None if kind == "text" else 64, "up_block_types": up,
            "use_linear_projection": False}


def vae_config(cfg, image_size):
    n = len(cfg.block_out_channels)
    return {"_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION, "act_fn": "silu",
            "block_out_channels": list(cfg.block_out_channels), "down_block_types": ["DownEncoderBlock2D"] * n,
            "force_upcast": cfg.force_upcast, "in_channels": cfg.in_channels, "latent_channels": cfg.latent_channels,
            "layers_per_block": cfg.layers_per_block, "mid_block_add_attention": cfg.mid_block_attention,
            "norm_num_groups": cfg.norm_groups, "out_channels": cfg.out_channels, "sample_size": image_size,
            "scaling_factor": cfg.scaling_factor, "up_block_types": ["UpDecoderBlock2D"] * n,
            "use_post_quant_conv": cfg.use_post_quant_conv, "use_quant_conv": cfg.use_quant_conv}


def clip_text_config(cfg, tokenizer):
    return {"architectures": ["CLIPTextModelWithProjection"], "model_type": "clip_text_model",
            "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_position_embeddings,
            "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
            "projection_dim": cfg.projection_dim, "hidden_act": cfg.hidden_act, "layer_norm_eps": cfg.layer_norm_eps,
            "bos_token_id": tokenizer.bos_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": tokenizer.pad_id,
            "attention_dropout": 0.0, "initializer_factor": 1.0, "initializer_range": 0.02, "dtype": "float32"}


def clip_vision_config(cfg):
    return {"architectures": ["CLIPVisionModelWithProjection"], "model_type": "clip_vision_model",
            "image_size": cfg.image_size, "patch_size": cfg.patch_size, "num_channels": cfg.num_channels,
            "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
            "projection_dim": cfg.projection_dim, "hidden_act": cfg.hidden_act, "layer_norm_eps": cfg.layer_norm_eps,
            "attention_dropout": 0.0, "initializer_factor": 1.0, "initializer_range": 0.02, "dtype": "float32"}


def preprocessor_config(cfg):
    return {"crop_size": {"height": cfg.crop_size, "width": cfg.crop_size}, "do_center_crop": True,
            "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
            "image_mean": list(cfg.mean), "image_std": list(cfg.std), "image_processor_type": "CLIPImageProcessor",
            "resample": 3, "rescale_factor": 1 / 255, "size": {"shortest_edge": cfg.size}}


def scheduler_config(cfg):
    return {"_class_name": "DDIMScheduler", "_diffusers_version": DIFFUSERS_VERSION, "beta_start": cfg.beta_start,
            "beta_end": cfg.beta_end, "beta_schedule": "scaled_linear", "clip_sample": False,
            "num_train_timesteps": cfg.num_train_timesteps, "prediction_type": "epsilon",
            "set_alpha_to_one": cfg.set_alpha_to_one, "steps_offset": cfg.steps_offset, "thresholding": False,
            "timestep_spacing": "leading"}


MODEL_INDEX = {"_class_name": "VersatileDiffusionPipeline", "_diffusers_version": DIFFUSERS_VERSION,
               "image_unet": ["diffusers", "UNet2DConditionModel"],
               "text_unet": ["versatile_diffusion", "UNetFlatConditionModel"],
               "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "DDIMScheduler"],
               "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
               "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
               "tokenizer": ["transformers", "CLIPTokenizer"],
               "image_feature_extractor": ["transformers", "CLIPImageProcessor"]}


def write_json(path, value):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, ensure_ascii=False)


def exported(module, rules, dtype=None):
    """module's state dict under the official names (keys the rules drop are left out), contiguous CPU tensors."""
    state = {}
    for key, tensor in module.state_dict().items():
        name = weights_loader.rename(key, rules)
        if name is not None:
            tensor = tensor.detach().to("cpu")
            state[name] = (tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor).contiguous()
    return state


def write_clip_tokenizer(tokenizer, folder):
    """vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json of a minivd CLIPTokenizer."""
    os.makedirs(folder, exist_ok=True)
    write_json(os.path.join(folder, "vocab.json"), tokenizer.vocab)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(["#version: 0.2", *(" ".join(m) for m in tokenizer.merges)]) + "\n")
    id_to_token = {i: t for t, i in tokenizer.vocab.items()}
    special = {"bos_token": id_to_token[tokenizer.bos_id], "eos_token": id_to_token[tokenizer.eos_id],
               "unk_token": id_to_token[tokenizer.eos_id], "pad_token": id_to_token[tokenizer.pad_id]}
    write_json(os.path.join(folder, "special_tokens_map.json"), special)
    write_json(os.path.join(folder, "tokenizer_config.json"), {"tokenizer_class": "CLIPTokenizer",
               "model_max_length": tokenizer.max_length, "do_lower_case": True, **special})


def write_optimus(optimus, folder, dtype=None):
    """optimus/optimus-vae.safetensors (the original code's names), vocab.txt, vocab.json, merges.txt, config.json."""
    os.makedirs(folder, exist_ok=True)
    state = exported(optimus, weights_loader.export_rules("optimus"), dtype)
    state["decoder.lm_head.weight"] = state["decoder.transformer.wte.weight"].clone()  # tied, as the original saves it
    save_file(state, os.path.join(folder, "optimus-vae.safetensors"), metadata={"format": "pt"})
    optimus.bert_tok.model.save(folder)  # vocab.txt
    base = optimus.gpt2_tok.model  # the BPE model: its vocab.json and merges.txt, without the 3 added tokens
    base.save(folder)
    c = optimus.config  # the head counts, which no tensor shape tells (head_dim only has to divide both widths)
    write_json(os.path.join(folder, "config.json"), {"head_dim": math.gcd(c.encoder_hidden, c.decoder_hidden),
                                                     "encoder_heads": c.encoder_heads, "decoder_heads": c.decoder_heads})


def save(model, folder, base=None, dtype=None):
    """Write `model` as a diffusers-layout checkpoint folder; `base` (default: the checkpoint the model was read from)
    supplies what the model does not hold. dtype: cast floating weights (e.g. torch.float16). Returns the folder."""
    base = base if base is not None else model.checkpoint
    if isinstance(base, (str, os.PathLike)):
        base = Checkpoint(base)
    if base is not None and base.layout != "diffusers":
        raise ValueError("only a diffusers-layout checkpoint can fill in the parts a model does not hold")
    os.makedirs(folder, exist_ok=True)
    c = model.config
    for kind in ("image", "text"):
        name = f"{kind}_unet"
        state = {}
        if base is not None and os.path.isdir(os.path.join(base.folder, name)):
            tf = weights_loader.TensorFile(base.weights_path(name))
            state = {k: tf.get(k, dtype=dtype).contiguous() for k in tf.keys()}
        if model.unet is not None:
            state.update(exported(model.unet, weights_loader.export_rules(name, c.unet), dtype))
        if not any(k.startswith("conv_in.") for k in state):
            raise ValueError(f"the model holds no {kind} data layers and no base checkpoint has them: cannot write {name}")
        write_json(os.path.join(folder, name, "config.json"), unet_config(c.unet, kind))
        save_file(state, os.path.join(folder, name, "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    networks = {"vae": (model.vae, lambda: vae_config(c.vae, c.defaults.height)),
                "text_encoder": (model.text_encoder, lambda: clip_text_config(c.text, model.tokenizer)),
                "image_encoder": (model.image_encoder, lambda: clip_vision_config(c.vision))}
    for name, (network, config) in networks.items():
        target = os.path.join(folder, name)
        complete = network is not None and (name != "vae" or network.encoder is not None)
        if complete:
            state = exported(network, weights_loader.export_rules(name), dtype)
            file = "diffusion_pytorch_model.safetensors" if name == "vae" else "model.safetensors"
            write_json(os.path.join(target, "config.json"), config())
            save_file(state, os.path.join(target, file), metadata={"format": "pt"})
        elif base is not None:
            copy_tree(os.path.join(base.folder, name), target)
        else:
            raise ValueError(f"the model holds no complete {name} and no base checkpoint has one")
    write_clip_tokenizer(model.tokenizer, os.path.join(folder, "tokenizer"))
    write_json(os.path.join(folder, "image_feature_extractor", "preprocessor_config.json"),
               preprocessor_config(c.image_preprocess))
    write_json(os.path.join(folder, "scheduler", "scheduler_config.json"), scheduler_config(c.scheduler))
    if model.optimus is not None:
        write_optimus(model.optimus, os.path.join(folder, "optimus"), dtype)
    elif base is not None and os.path.isdir(os.path.join(base.folder, "optimus")):
        copy_tree(os.path.join(base.folder, "optimus"), os.path.join(folder, "optimus"))
    write_json(os.path.join(folder, "minivd.json"), {"description": c.description, "defaults": vars(c.defaults)})
    write_json(os.path.join(folder, "model_index.json"), MODEL_INDEX)  # last: its presence marks a complete folder
    return folder


def copy_tree(src, dst):
    if os.path.abspath(src) != os.path.abspath(dst):
        shutil.copytree(src, dst, dirs_exist_ok=True)
