"""The text flows (image-to-text, text-variation) end to end on a tiny official-layout folder.

diffusers never implemented these flows, so the reference is assembled from independent parts: transformers CLIP
for the contexts, diffusers' UNetFlatConditionModel (with image_unet's attention blocks for image context) and
DDIMScheduler for the denoising loop with classifier-free guidance, and transformers GPT2LMHeadModel fed the latent
as a one-slot memory for greedy decoding.
"""

import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import minivd
from minivd.tools.random_checkpoint import random_model
from tiny_vd import reference_components, tiny_optimus_references

LATENT_ATOL = 1e-4


def picture(seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)).resize((70, 50))


@torch.no_grad()
def reference_text_latents(folder, mode, cond, x_T, steps, guidance_scale):
    c = reference_components(folder)
    unet = c["text_unet"]
    if mode == "image-to-text":
        for name, module in list(unet.named_modules()):
            if type(module).__name__ == "Transformer2DModel":
                parent, index = name.rsplit(".", 1)
                unet.get_submodule(parent)[int(index)] = c["image_unet"].get_submodule(parent)[int(index)]
        enc = c["image_encoder"]

        def context(images):
            pixels = c["image_feature_extractor"](images=images, return_tensors="pt").pixel_values
            h = enc.visual_projection(enc.vision_model.post_layernorm(enc(pixels).last_hidden_state))
            return h / h[:, :1].norm(dim=-1, keepdim=True)

        uncond = context([Image.new("RGB", (512, 512), (127, 127, 127))])
    else:
        enc = c["text_encoder"]

        def context(texts):
            ids = c["tokenizer"](texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
            out = enc(ids.input_ids)
            return enc.text_projection(out.last_hidden_state) / out.text_embeds.norm(dim=-1, keepdim=True)[:, None]

        uncond = context([""])
    contexts = torch.cat([uncond, context([cond])])
    scheduler = c["scheduler"]
    scheduler.set_timesteps(steps)
    x = x_T.clone()
    for t in scheduler.timesteps:
        eps_u, eps_c = unet(torch.cat([x, x]), t, encoder_hidden_states=contexts).sample.chunk(2)
        x = scheduler.step(eps_u + guidance_scale * (eps_c - eps_u), t, x).prev_sample
    return x.flatten(1)


@torch.no_grad()
def reference_greedy_ids(z, max_new):
    bert, gpt2, sd = tiny_optimus_references(latent_dim=32, seed=100)  # the same weights build_tiny_vd wrote
    B, cfg = z.shape[0], gpt2.config
    memory = F.linear(z, sd["decoder.transformer.linear.weight"]).split(cfg.n_embd, dim=1)
    ids = torch.full((B, 1), gpt2.config.vocab_size - 2)  # <BOS>
    from transformers.cache_utils import DynamicCache

    for _ in range(max_new):
        slots = [m.view(B, 1, cfg.n_head, -1).transpose(1, 2) for m in memory]
        embeds = gpt2.transformer.wte(ids) + F.linear(z, sd["decoder.transformer.linear_emb.weight"])[:, None]
        logits = gpt2(inputs_embeds=embeds, past_key_values=DynamicCache(ddp_cache_data=[(s, s) for s in slots]),
                      attention_mask=torch.ones(B, 1 + ids.shape[1], dtype=torch.long),
                      position_ids=torch.arange(1, ids.shape[1] + 1).expand(B, -1), use_cache=False).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[:, 1:].tolist()


@pytest.mark.parametrize("mode, cond", [("image-to-text", picture(0)), ("text-variation", "a red fox in the snow")])
def test_text_flow_equals_independent_reference(tiny_vd, mode, cond):
    x_T = torch.randn(1, 32, 1, 1, generator=torch.Generator().manual_seed(7))
    kwargs = {"image": cond} if mode == "image-to-text" else {"prompt": cond}
    model = minivd.load(tiny_vd)
    z = minivd.generate(mode, model=model, steps=4, latents=x_T, output="latent", **kwargs)
    expected = reference_text_latents(tiny_vd, mode, cond, x_T, steps=4, guidance_scale=7.5)
    assert z.shape == (1, 32) and (z - expected).abs().max() < LATENT_ATOL

    ids = model.optimus.generate(z, max_length=22, greedy=True)
    assert ids == reference_greedy_ids(z, max_new=20)
    text = model.optimus.decode(minivd.generate(mode, model=model, steps=4, latents=x_T, output="latent", **kwargs),
                                greedy=True, max_length=22)
    assert text == [model.optimus.ids_to_text(ids[0])]


def test_text_flows_are_seeded_and_batched(tiny_vd):
    model = minivd.load(tiny_vd)
    kwargs = dict(model=model, prompt="a cat on a couch", steps=3, seed=4, num_images=3)
    a, b = minivd.generate("text-variation", **kwargs), minivd.generate("text-variation", **kwargs)
    assert a == b and len(a) == 3 and all(isinstance(s, str) for s in a)
    assert minivd.generate("text-variation", **{**kwargs, "seed": 5}) != a
    texts = minivd.generate("image-to-text", model=model, image=[picture(1), picture(2)], steps=3, seed=0)
    assert len(texts) == 2


def test_demo_model_runs_the_text_flows():
    model = random_model()
    assert len(minivd.generate("image-to-text", model=model, image=picture(3), steps=2, seed=0)) == 1
    assert len(minivd.generate("text-variation", model=model, prompt="hello", steps=2, seed=0, num_images=2)) == 2


def test_optimus_encode_puts_text_in_the_latent_space(tiny_vd):
    model = minivd.load(tiny_vd).prepare("text-variation")
    z = model.optimus.encode(["a red fox", "a blue car"])
    assert z.shape == (2, 32)


def test_text_flow_errors(tiny_vd, tmp_path):
    model = minivd.load(tiny_vd)
    with pytest.raises(ValueError, match="needs an image"):
        minivd.generate("image-to-text", model=model, steps=1)
    with pytest.raises(TypeError, match="PIL"):
        minivd.generate("image-to-text", model=model, image="photo.png", steps=1)
    with pytest.raises(ValueError, match="needs a prompt"):
        minivd.generate("text-variation", model=model, steps=1)
    with pytest.raises(ValueError, match="output must be one of"):
        minivd.generate("text-variation", model=model, prompt="x", steps=1, output="np")
    no_optimus = shutil.copytree(tiny_vd, tmp_path / "no_optimus")
    shutil.rmtree(no_optimus / "optimus")
    with pytest.raises(FileNotFoundError, match="Optimus text VAE"):
        minivd.generate("text-variation", model=minivd.load(str(no_optimus)), prompt="x", steps=1)
    assert len(minivd.generate("text-to-image", model=minivd.load(str(no_optimus)), prompt="x", steps=1,
                               height=64, width=64)) == 1  # the image flows do not need it
    no_vocab = shutil.copytree(tiny_vd, tmp_path / "no_vocab")
    os.remove(no_vocab / "optimus" / "vocab.txt")
    with pytest.raises(FileNotFoundError, match="vocab.txt"):
        minivd.generate("image-to-text", model=minivd.load(str(no_vocab)), image=picture(0), steps=1)


def test_folder_without_vocabularies_uses_the_released_ones(tiny_vd, tmp_path):
    """The Hub repo has no Optimus vocabularies: a folder with none gets minivd's copies of the released ones, which
    fit an Optimus of the released vocabulary sizes and are refused, by name, for one of other sizes."""
    from minivd.checkpoint import BUILT_IN_VOCABS, find_optimus
    from minivd.tools.random_checkpoint import TINY, write_optimus

    folder = shutil.copytree(tiny_vd, tmp_path / "released_sizes")
    shutil.rmtree(folder / "optimus")
    sizes = dict(TINY, bert=dict(TINY["bert"], vocab_size=28996), gpt2=dict(TINY["gpt2"], vocab_size=50260))
    write_optimus(str(folder / "optimus"), sizes, TINY["text_latent"], torch.Generator().manual_seed(0), torch.float32)
    assert not any(name.endswith((".txt", "vocab.json")) for name in os.listdir(folder / "optimus"))
    model = minivd.load(str(folder))
    model.prepare("text-variation")
    assert {os.path.dirname(p) for p in find_optimus(str(folder))[1].values()} == {BUILT_IN_VOCABS}
    bert, gpt2 = model.optimus.bert_tok, model.optimus.gpt2_tok
    assert gpt2.encode("Hello world").ids == [15496, 995] and bert.token_to_id("[CLS]") == 101
    texts = minivd.generate("text-variation", model=model, prompt="a small red circle", steps=1, seed=0)
    assert len(texts) == 1 and isinstance(texts[0], str)

    tiny = shutil.copytree(tiny_vd, tmp_path / "tiny_sizes")
    for name in ("vocab.txt", "vocab.json", "merges.txt"):
        os.remove(tiny / "optimus" / name)
    with pytest.raises(ValueError, match="minivd's copies of the released ones: the folder has none"):
        minivd.generate("image-to-text", model=minivd.load(str(tiny)), image=picture(0), steps=1)
