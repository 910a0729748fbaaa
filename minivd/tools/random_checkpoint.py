"""A random Versatile Diffusion checkpoint at full (or tiny) size, written in the official diffusers layout.

The real weights are over 10 GB and this is what the benchmark measures instead: the same files, tensor names, dtypes
and sizes, filled with small random values (timings and memory are real, the images are noise). The networks are built
by diffusers and transformers on the meta device and saved with their own config writers, so the folder is exactly
what their from_pretrained reads. diffusers and transformers are imported inside the functions that need them.

    from minivd.tools.random_checkpoint import build_checkpoint, random_model
    build_checkpoint("bench_checkpoint")             # about 13 GB in float32
    build_checkpoint("tiny_checkpoint", tiny=True)   # seconds
    model = random_model()                           # in memory, minivd only: every network at toy size
"""

import json
import os

import torch
import torch.nn as nn

from minivd.export import MODEL_INDEX

MARKER = "bench_checkpoint.json"  # written into folders built here

# diffusers / transformers constructor arguments. FULL = shi-labs/versatile-diffusion, TINY = tests/tiny_vd.py
FULL = dict(
    unet=dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
              attention_head_dim=8, norm_num_groups=32),
    text_latent=768,
    vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, sample_size=256),
    clip_text=dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, projection_dim=768),
    clip_vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                     image_size=224, patch_size=14, projection_dim=768),
    bert=dict(vocab_size=28996, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
              max_position_embeddings=512, layer_norm_eps=1e-12),  # bert-base-cased
    gpt2=dict(vocab_size=50260, n_embd=768, n_layer=12, n_head=12, n_inner=3072, n_positions=1024),  # + 3 tokens
    head_dim=64,
)
TINY = dict(
    unet=dict(block_out_channels=(32, 32, 64, 64), layers_per_block=2, cross_attention_dim=32, attention_head_dim=2,
              norm_num_groups=8),
    text_latent=32,
    vae=dict(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=64),
    clip_text=dict(vocab_size=None, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                   projection_dim=32),  # vocab_size None: the tokenizer's
    clip_vision=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2, image_size=224,
                     patch_size=14, projection_dim=32),
    bert=dict(vocab_size=160, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              max_position_embeddings=96, layer_norm_eps=1e-12),  # the vocab of minivd.tools.vocab.write_tiny_vocabs
    gpt2=dict(vocab_size=323, n_embd=48, n_layer=3, n_head=6, n_inner=192, n_positions=64),
    head_dim=8,
)


def reference_libraries():
    """Import diffusers and transformers, or explain how to get them."""
    try:
        import diffusers
        import transformers
    except ImportError as e:
        raise SystemExit(f"the benchmark and its checkpoint need diffusers and transformers ({e}); install them with "
                         "`pip install diffusers==0.42.1 transformers` (or `pip install -e .[test]`)") from e
    return diffusers, transformers


def reference_modules(sizes, vocab_size):
    """The five networks of VD as diffusers/transformers modules, on the meta device (no memory)."""
    reference_libraries()
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.pipelines.deprecated.versatile_diffusion.modeling_text_unet import UNetFlatConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionConfig, CLIPVisionModelWithProjection

    n = sizes["text_latent"]
    text = dict(sizes["clip_text"], vocab_size=sizes["clip_text"]["vocab_size"] or vocab_size)
    with torch.device("meta"):
        return {
            "image_unet": UNet2DConditionModel(
                in_channels=4, out_channels=4, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, **sizes["unet"]),
            "text_unet": UNetFlatConditionModel(
                sample_size=None, in_channels=(n, 1, 1), out_channels=(n, 1, 1),
                down_block_types=("CrossAttnDownBlockFlat",) * 3 + ("DownBlockFlat",),
                up_block_types=("UpBlockFlat",) + ("CrossAttnUpBlockFlat",) * 3, **sizes["unet"]),
            "vae": AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                                 down_block_types=("DownEncoderBlock2D",) * len(sizes["vae"]["block_out_channels"]),
                                 up_block_types=("UpDecoderBlock2D",) * len(sizes["vae"]["block_out_channels"]),
                                 **sizes["vae"]),
            # eos_token_id 2: the legacy value of the VD config, "pool the highest id" (<|endoftext|> is the last id)
            "text_encoder": CLIPTextModelWithProjection(CLIPTextConfig(
                max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1,
                **text)),
            "image_encoder": CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_act="quick_gelu",
                                                                            **sizes["clip_vision"])),
        }


def random_state_dict(module, generator, dtype, buffers=True):
    """Materialise `module`'s state dict with cheap random values: norms weight 1 / bias 0, other biases 0, every
    other weight N(0, 0.02^2) (small enough that nothing overflows in float16). buffers=False: parameters only."""
    state = {}
    for prefix, m in module.named_modules(remove_duplicate=False):
        for name, p in m.named_parameters(recurse=False):
            t = torch.empty(p.shape, dtype=torch.float32)
            if isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
                t.fill_(1.0 if name == "weight" else 0.0)
            elif name == "bias":
                t.zero_()
            else:
                t.normal_(0.0, 0.02, generator=generator)
            state[f"{prefix}.{name}" if prefix else name] = t.to(dtype)
    for key, b in module.state_dict().items() if buffers else ():  # persistent buffers (e.g. CLIP position_ids)
        if key not in state:  # integer buffers are position ids (0 .. n-1); float ones start at zero
            arange = torch.arange(b.shape[-1]).expand(b.shape).clone() if b.shape else torch.tensor(0)
            state[key] = torch.zeros(b.shape, dtype=dtype) if b.is_floating_point() else arange
    return state


def write_optimus(folder, sizes, latent_dim, generator, dtype):
    """A random Optimus text VAE as the original optimus-vae file names it (encoder.* = BERT + latent head,
    decoder.transformer.* = GPT-2 + latent projections). At the released vocabulary sizes (BERT 28996, GPT-2 50257 + 3)
    it writes no vocabularies, so minivd.load uses its copies of the released ones; otherwise stand-ins."""
    from safetensors.torch import save_file
    from transformers import BertConfig, BertModel, GPT2Config, GPT2Model

    from minivd.tools.vocab import write_tiny_vocabs

    os.makedirs(folder, exist_ok=True)
    if (sizes["bert"]["vocab_size"], sizes["gpt2"]["vocab_size"]) != (FULL["bert"]["vocab_size"],
                                                                      FULL["gpt2"]["vocab_size"]):
        write_tiny_vocabs(folder)  # stand-ins trained on a few sentences; BERT's may be smaller than its embedding,
        vocab_json = os.path.join(folder, "vocab.json")  # but GPT-2's must fill its embedding (less the 3 added):
        with open(vocab_json, encoding="utf-8") as f:  # pad it with tokens no text produces
            vocab = json.load(f)
        for i in range(len(vocab), sizes["gpt2"]["vocab_size"] - 3):
            vocab[f"<|unused{i}|>"] = i
        with open(vocab_json, "w", encoding="utf-8") as f:
            json.dump(vocab, f, ensure_ascii=False)
    with torch.device("meta"):
        bert = BertModel(BertConfig(hidden_act="gelu", **sizes["bert"]))
        gpt2 = GPT2Model(GPT2Config(activation_function="gelu_new", **sizes["gpt2"]))
    state = {"encoder." + k: v for k, v in random_state_dict(bert, generator, dtype, buffers=False).items()}
    gpt2_state = random_state_dict(gpt2, generator, dtype, buffers=False)
    state.update({"decoder.transformer." + k: v for k, v in gpt2_state.items()})
    width, layers = sizes["gpt2"]["n_embd"], sizes["gpt2"]["n_layer"]
    for key, shape in [("encoder.linear.weight", (2 * latent_dim, sizes["bert"]["hidden_size"])),
                       ("decoder.transformer.linear.weight", (layers * width, latent_dim)),
                       ("decoder.transformer.linear_emb.weight", (width, latent_dim))]:
        state[key] = torch.empty(shape).normal_(0.0, 0.02, generator=generator).to(dtype)
    save_file(state, os.path.join(folder, "optimus-vae.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"head_dim": sizes["head_dim"]}, f)
    return sum(t.numel() for t in state.values())


def build_checkpoint(folder, tiny=False, dtype=torch.float32, seed=0):
    """Write a random VD checkpoint in the official diffusers layout (model_index.json last: its presence marks a
    complete folder). Returns the folder."""
    from safetensors.torch import save_file

    from minivd.tools.vocab import write_clip_vocab

    reference_libraries()
    vocab_size = write_clip_vocab(os.path.join(folder, "tokenizer"))
    generator = torch.Generator().manual_seed(seed)
    for name, module in reference_modules(TINY if tiny else FULL, vocab_size).items():
        sub = os.path.join(folder, name)
        os.makedirs(sub, exist_ok=True)
        if name.endswith("encoder"):  # transformers
            module.config.architectures = [type(module).__name__]
            module.config.save_pretrained(sub)
            path = os.path.join(sub, "model.safetensors")
        else:  # diffusers
            module.save_config(sub)
            path = os.path.join(sub, "diffusion_pytorch_model.safetensors")
        state = random_state_dict(module, generator, dtype)
        save_file(state, path, metadata={"format": "pt"})
        print(f"  {name}: {sum(t.numel() for t in state.values()) / 1e6:.1f} M parameters -> {path}", flush=True)
        del state
    try:
        import minivd.optimus  # noqa: F401  (the text flows' VAE; older minivd versions have none)
    except ImportError:
        print("  optimus: minivd has no minivd.optimus, skipped (no text flows)", flush=True)
    else:
        sizes = TINY if tiny else FULL
        count = write_optimus(os.path.join(folder, "optimus"), sizes, sizes["text_latent"], generator, dtype)
        print(f"  optimus: {count / 1e6:.1f} M parameters", flush=True)
    with open(os.path.join(folder, MARKER), "w") as f:
        json.dump({"tiny": tiny, "dtype": str(dtype).removeprefix("torch."), "seed": seed}, f)
    with open(os.path.join(folder, "minivd.json"), "w") as f:  # what minivd.load says the folder is
        json.dump({"description": "RANDOM weights in the official layout (minivd.tools.random_checkpoint): timings and "
                                  "memory are real, the outputs are noise"}, f)
    return write_pipeline_files(folder)


def write_pipeline_files(folder):
    """The weight-free parts of the official folder: image_feature_extractor/, scheduler/ (VD's DDIM settings), and
    model_index.json last (its presence marks a complete folder). Returns the folder."""
    from diffusers import DDIMScheduler
    from transformers import CLIPImageProcessor

    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(
        os.path.join(folder, "image_feature_extractor"))
    DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1).save_pretrained(os.path.join(folder, "scheduler"))
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump({**MODEL_INDEX, "_diffusers_version": "0.8.0.dev0"}, f, indent=2)  # the Hub upload's version
    return folder


def random_model(seed=0):
    """A complete, tiny, randomly initialised VersatileDiffusion held in memory (every network at toy size, the
    VAE with VD's 8x factor), with tokenizers trained on a built-in corpus. No file, no download; outputs are noise."""
    from minivd.clip import CLIPTextConfig, CLIPVisionConfig, ImagePreprocessConfig
    from minivd.model import Defaults, VDConfig, VersatileDiffusion
    from minivd.optimus import OptimusConfig, bert_tokenizer, gpt2_tokenizer
    from minivd.tools.vocab import demo_tokenizer, write_tiny_vocabs
    from minivd.unet import UNetConfig
    from minivd.vae import VAEConfig
    import tempfile

    unet = UNetConfig.tiny()
    text, vision = CLIPTextConfig.tiny(), CLIPVisionConfig.tiny()
    text.projection_dim = vision.projection_dim = unet.context_dim
    optimus = OptimusConfig.tiny()
    optimus.latent_dim = unet.text_channels
    config = VDConfig(unet=unet, vae=VAEConfig(block_out_channels=[16, 16, 32, 32], layers_per_block=1, norm_groups=8),
                      text=text, vision=vision, image_preprocess=ImagePreprocessConfig(size=vision.image_size),
                      optimus=optimus, defaults=Defaults(height=64, width=64, steps=10, guidance_scale=7.5),
                      description="a tiny model with RANDOM weights (outputs are noise)")
    with tempfile.TemporaryDirectory() as folder:
        files = write_tiny_vocabs(folder)
        optimus_tokenizers = bert_tokenizer(files["vocab.txt"]), gpt2_tokenizer(files["vocab.json"], files["merges.txt"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return VersatileDiffusion(config, demo_tokenizer(), optimus_tokenizers).build().eval()
