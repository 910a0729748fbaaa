"""Optimus text VAE vs independent references: transformers BertModel (encoder), GPT2LMHeadModel fed the latent as a
one-slot DynamicCache + extra input embedding (decoder), transformers tokenizers (vocab files).

The checkpoint is built in the `optimus-vae.pth` layout of the original code (encoder.* = BertForLatentConnector_XX,
decoder.* = GPT2ForLatentConnector_XX, with its causal-mask buffers and the tied lm_head) and loaded through RULES.
"""

import dataclasses
import os
import re
import shutil

import pytest
import torch
import torch.nn.functional as F
from transformers import BertTokenizer, GPT2LMHeadModel, GPT2Tokenizer
from transformers.cache_utils import DynamicCache
from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

import weights_loader
from tiny_vd import bert_and_gpt2
from minivd.optimus import GPT2_ADDED_TOKENS, Optimus, OptimusConfig, load_tokenizers
from minivd.tools.vocab import write_tiny_vocabs

ATOL = 1e-5  # fp32 hidden states / logits
RULES = weights_loader.OPTIMUS_RULES  # optimus-vae.pth key -> minivd name; None drops the key
TEXTS = ["A cat sitting on a red couch.", "two dogs run across the GREEN grass in the park, isn't it lovely?"]


def rename(sd):
    return {name: value for key, value in sd.items() if (name := weights_loader.rename(key, RULES)) is not None}


def randomize(model, seed):
    """Every weight random (no zero biases, no unit LayerNorms), so a swapped or missing tensor shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm_scale = re.search(r"(LayerNorm|ln_\w+)\.weight$", name) is not None
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1 + (1.0 if is_norm_scale else 0.0))
    return model


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("optimus_vocab")
    write_tiny_vocabs(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def setup(vocab_dir):
    """(cfg, reference BertModel, reference GPT2LMHeadModel, official-layout state dict)."""
    cfg = OptimusConfig.tiny()
    bert, gpt2 = bert_and_gpt2(cfg)
    randomize(bert, 1), randomize(gpt2, 2)
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight
    gen = torch.Generator().manual_seed(3)
    n = cfg.decoder_positions
    sd = {"encoder." + k: v.clone() for k, v in bert.state_dict().items()}
    sd["encoder.linear.weight"] = torch.randn(2 * cfg.latent_dim, cfg.encoder_hidden, generator=gen) * 0.3
    sd.update({"decoder." + k: v.clone() for k, v in gpt2.state_dict().items()})
    sd["decoder.transformer.linear.weight"] = torch.randn(
        cfg.decoder_layers * cfg.decoder_hidden, cfg.latent_dim, generator=gen) * 0.3
    sd["decoder.transformer.linear_emb.weight"] = torch.randn(cfg.decoder_hidden, cfg.latent_dim, generator=gen) * 0.3
    for i in range(cfg.decoder_layers):
        sd[f"decoder.transformer.h.{i}.attn.bias"] = torch.ones(n, n).tril().view(1, 1, n, n)
    return cfg, bert, gpt2, sd


def build(setup, vocab_dir, sd=None):
    cfg, _, _, official = setup
    model = Optimus(cfg, *load_tokenizers(vocab_dir))
    model.load_state_dict(rename(official if sd is None else sd), strict=True)
    return model.eval()


def reference_logits(gpt2, sd, z, input_ids):
    """GPT2LMHeadModel with the latent as a one-slot past key = past value per layer and an extra input embedding."""
    B, T = input_ids.shape
    cfg = gpt2.config
    memory = F.linear(z, sd["decoder.transformer.linear.weight"])  # (B, L*C)
    per_layer = memory.split(cfg.n_embd, dim=1)  # L x (B, C), as torch.split in the original
    slots = [m.view(B, 1, cfg.n_head, cfg.n_embd // cfg.n_head).transpose(1, 2) for m in per_layer]  # (B, nh, 1, hd)
    cache = DynamicCache(ddp_cache_data=[(s, s) for s in slots])
    embeds = gpt2.transformer.wte(input_ids) + F.linear(z, sd["decoder.transformer.linear_emb.weight"])[:, None]
    out = gpt2(inputs_embeds=embeds, past_key_values=cache, attention_mask=torch.ones(B, 1 + T, dtype=torch.long),
               position_ids=torch.arange(1, T + 1).expand(B, T), use_cache=False)
    return out.logits


def test_rules_cover_the_official_layout(setup, vocab_dir):
    model = build(setup, vocab_dir)  # strict: no missing or unexpected key after the rules
    assert not any(k.startswith("decoder.lm_head") for k in model.state_dict())


def test_config_from_state_dict(setup):
    cfg, _, _, sd = setup
    assert OptimusConfig.from_state_dict(sd, head_dim=8) == cfg
    assert OptimusConfig.from_state_dict(rename(sd), head_dim=8) == cfg
    full = OptimusConfig()
    assert (full.encoder_heads, full.decoder_heads, full.latent_dim, full.decoder_vocab_size) == (12, 12, 768, 50260)


def test_encoder_matches_transformers_bert(setup, vocab_dir):
    cfg, bert, _, sd = setup
    model = build(setup, vocab_dir)
    input_ids, keep = model.tokenize(TEXTS)
    assert not keep.all()  # the batch has padding
    with torch.no_grad():
        ref = bert(input_ids=input_ids, attention_mask=keep.long())
        hidden, pooled = model.encoder.features(input_ids, keep)
        mu, logvar = model.encoder(input_ids, keep)
        ref_mu, ref_logvar = F.linear(ref.pooler_output, sd["encoder.linear.weight"]).chunk(2, dim=-1)
        latent = model.encode(TEXTS)
    print(f"encoder maxdiff hidden={(hidden - ref.last_hidden_state).abs().max():.2e} "
          f"pooler={(pooled - ref.pooler_output).abs().max():.2e} mu={(mu - ref_mu).abs().max():.2e}")
    torch.testing.assert_close(hidden, ref.last_hidden_state, atol=ATOL, rtol=0)
    torch.testing.assert_close(pooled, ref.pooler_output, atol=ATOL, rtol=0)
    torch.testing.assert_close(mu, ref_mu, atol=ATOL, rtol=0)
    torch.testing.assert_close(logvar, ref_logvar, atol=ATOL, rtol=0)
    torch.testing.assert_close(latent, ref_mu, atol=ATOL, rtol=0)
    assert latent.shape == (2, cfg.latent_dim)


def test_decoder_logits_match_gpt2_with_latent_memory(setup, vocab_dir):
    cfg, _, gpt2, sd = setup
    model = build(setup, vocab_dir)
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(2, cfg.latent_dim, generator=gen)
    input_ids = torch.randint(0, cfg.decoder_vocab_size, (2, 9), generator=gen)
    input_ids[:, 0] = model.bos_id
    with torch.no_grad():
        ours, ref = model.logits(z, input_ids), reference_logits(gpt2, sd, z, input_ids)
        no_latent = reference_logits(gpt2, {**sd, "decoder.transformer.linear_emb.weight": torch.zeros_like(
            sd["decoder.transformer.linear_emb.weight"])}, z, input_ids)
    print(f"decoder logits maxdiff={(ours - ref).abs().max():.2e}")
    assert ours.shape == (2, 9, cfg.decoder_vocab_size)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)
    assert (ref - no_latent).abs().max() > 1e-2  # the extra embedding matters, so the check above can fail


def test_greedy_ids_match_gpt2(setup, vocab_dir):
    cfg, _, gpt2, sd = setup
    sd = dict(sd)
    eos = cfg.decoder_vocab_size - 1
    wte = sd["decoder.transformer.wte.weight"].clone()
    wte[eos] = 0  # logit 0 for <EOS>: random weights then run every step instead of stopping early
    sd["decoder.transformer.wte.weight"] = sd["decoder.lm_head.weight"] = wte
    model = build(setup, vocab_dir, sd)
    assert model.eos_id == eos
    gpt2 = GPT2LMHeadModel(gpt2.config).eval()
    gpt2.load_state_dict({k[len("decoder."):]: v for k, v in sd.items() if k.startswith("decoder.") and
                          "linear" not in k and not k.endswith(".attn.bias")})
    z = torch.randn(2, cfg.latent_dim, generator=torch.Generator().manual_seed(5))
    steps = 24
    ids = torch.full((2, 1), model.bos_id)
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, reference_logits(gpt2, sd, z, ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    ours = model.generate(z, max_length=steps + 2, greedy=True)
    assert ours == ids[:, 1:].tolist()
    assert all(len(row) == steps for row in ours) and len(set(ours[0])) > 1

    # <EOS> made a hair more likely than one token of row 0: each row now stops where that token first came
    stop = next(t for i, t in enumerate(ours[0]) if i >= 3 and t not in ours[0][:i])
    sd["decoder.transformer.wte.weight"] = sd["decoder.lm_head.weight"] = wte.index_copy(0, torch.tensor([eos]),
                                                                                         1.001 * wte[stop][None])
    stopped = build(setup, vocab_dir, sd).generate(z, max_length=steps + 2, greedy=True)
    assert stopped == [row[:row.index(stop)] if stop in row else row for row in ours]
    assert len(stopped[0]) < steps and len(stopped[1]) > len(stopped[0])  # one row ended, the other ran on


def test_load_on_meta_device(setup, vocab_dir):
    cfg, _, _, sd = setup
    with torch.device("meta"):
        model = Optimus(cfg, *load_tokenizers(vocab_dir))
    model.load_state_dict(rename(sd), strict=True, assign=True)
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    torch.testing.assert_close(model.encode(TEXTS), build(setup, vocab_dir).encode(TEXTS), atol=0, rtol=0)


def test_bert_tokenization_matches_transformers(setup, vocab_dir):
    model = build(setup, vocab_dir)
    texts = TEXTS + ["Café  au\tlait ... 東京 ñ", "x\u0000y\u200bz  ", "", "unseen qqq zzz words!!"]
    long_text = " ".join(["cat"] * 100)
    refs = [BertTokenizer.from_pretrained(vocab_dir, do_lower_case=False),
            BertTokenizerLegacy(vocab_file=f"{vocab_dir}/vocab.txt", do_lower_case=False)]
    input_ids, keep = model.tokenize(texts + [long_text])
    for row, (ids, k) in enumerate(zip(input_ids.tolist(), keep.tolist())):
        ours = [i for i, kk in zip(ids, k) if kk]
        text = (texts + [long_text])[row].lower()  # the original lowercases before the cased tokenizer
        for ref in refs:
            expected = ref(text)["input_ids"]
            expected = expected[:1] + expected[1:-1][:77] + expected[-1:]  # <= 77 word pieces, then [SEP]
            assert ours == expected, (row, type(ref).__name__)
    assert keep[-1].sum() == 79 and input_ids[0, 0] == model.cls_id


def test_gpt2_tokenization_matches_transformers(vocab_dir):
    _, ours = load_tokenizers(vocab_dir)
    ref = GPT2Tokenizer.from_pretrained(vocab_dir)
    ref.add_special_tokens({"pad_token": "<PAD>", "bos_token": "<BOS>", "eos_token": "<EOS>"})  # as the original
    base = len(ref) - 3
    assert [ours.token_to_id(t) for t in GPT2_ADDED_TOKENS] == ref.convert_tokens_to_ids(list(GPT2_ADDED_TOKENS)) \
        == [base, base + 1, base + 2]
    for text in [" a cat sitting on a red couch.", "<BOS> two dogs<EOS>", " Café 東京 isn't it?", "  spaces\n"]:
        ids = ours.encode(text).ids
        assert ids == ref(text)["input_ids"]
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)


def test_decode_text_and_seeded_sampling(setup, vocab_dir):
    cfg, _, _, _ = setup
    model = build(setup, vocab_dir)
    z = model.encode(TEXTS)
    a = model.decode(z, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(123)  # the global RNG plays no part
    b = model.decode(z, generator=torch.Generator().manual_seed(0))
    assert a == b and all(isinstance(t, str) for t in a)
    rows = model.generate(z, generator=torch.Generator().manual_seed(0))
    assert all(len(r) <= 28 and model.eos_id not in r for r in rows)  # 30 tokens count <BOS> and <EOS>
    ref = GPT2Tokenizer.from_pretrained(vocab_dir)
    ref.add_special_tokens({"pad_token": "<PAD>", "bos_token": "<BOS>", "eos_token": "<EOS>"})
    added = set(ref.convert_tokens_to_ids(list(GPT2_ADDED_TOKENS)))
    for text, row in zip(a, rows):
        row = [i for i in row if i not in added]
        assert text == " ".join(ref.clean_up_tokenization(ref.decode(row)).split())
        assert not any(t in text for t in GPT2_ADDED_TOKENS)
    sentence = " a cat, isn't it . yes !  two dogs ' re here"
    ids = [model.bos_id] + ref(sentence)["input_ids"] + [model.eos_id]
    assert model.ids_to_text(ids) == " ".join(ref.clean_up_tokenization(ref.decode(ids[1:-1])).split())
    assert model.ids_to_text(ids) != " ".join(ref.decode(ids[1:-1]).split())  # the clean-up changed something
    greedy = model.generate(z, max_length=12, greedy=True)
    assert model.generate(z, max_length=12, top_k=1, generator=torch.Generator().manual_seed(1)) == greedy
    assert model.generate(z, max_length=12, top_p=1e-6, generator=torch.Generator().manual_seed(2)) == greedy
    assert model.generate(z, max_length=12, generator=torch.Generator().manual_seed(1)) != greedy


def test_bad_input_raises(setup, vocab_dir):
    cfg, _, _, _ = setup
    model = build(setup, vocab_dir)
    with pytest.raises(TypeError, match="list of strings"):
        model.encode("a single string")
    with pytest.raises(TypeError, match="list of strings"):
        model.encode(["ok", 3])
    with pytest.raises(ValueError, match="empty"):
        model.encode([])
    with pytest.raises(TypeError, match="torch.Tensor"):
        model.decode([[0.0] * cfg.latent_dim])
    with pytest.raises(ValueError, match="shape"):
        model.decode(torch.zeros(2, cfg.latent_dim + 1))
    with pytest.raises(ValueError, match="shape"):
        model.decode(torch.zeros(cfg.latent_dim))
    with pytest.raises(ValueError, match="temperature"):
        model.decode(torch.zeros(1, cfg.latent_dim), temperature=0)
    with pytest.raises(ValueError, match="max_length"):
        model.decode(torch.zeros(1, cfg.latent_dim), max_length=cfg.decoder_positions + 1)
    with pytest.raises(ValueError, match="input_ids"):
        model.logits(torch.zeros(1, cfg.latent_dim), torch.zeros(1, 4))
    with pytest.raises(ValueError, match="head_dim"):
        OptimusConfig.from_state_dict(rename(setup[3]))  # tiny widths are not multiples of 64
    with pytest.raises(ValueError, match="multiple of"):
        OptimusConfig(decoder_heads=5)
    with pytest.raises(ValueError, match="GPT-2 tokenizer"):
        Optimus(dataclasses.replace(cfg, decoder_vocab_size=999), *load_tokenizers(vocab_dir))


# ---- the released vocabularies minivd ships (minivd/optimus_vocab/) ----

@pytest.fixture(scope="module")
def released_vocab_dir(tmp_path_factory):
    """minivd's copies of the released Optimus vocabularies, under the names transformers' tokenizers read."""
    from minivd.checkpoint import BUILT_IN_VOCABS, OPTIMUS_VOCABS

    folder = tmp_path_factory.mktemp("released_vocab")
    for name, original in OPTIMUS_VOCABS.items():
        shutil.copy(os.path.join(BUILT_IN_VOCABS, original), folder / name)
    return folder


RELEASED_TEXTS = [" a cat sitting on a red couch.", "Two dogs run across the GREEN grass, isn't it lovely?",
                  " Café au lait ... 東京 ñ", "hello world", "unbelievable tokenization!!", ""]


def test_released_vocabularies_are_bert_base_cased_and_gpt2(released_vocab_dir):
    bert, gpt2 = load_tokenizers(str(released_vocab_dir))
    defaults = OptimusConfig()  # the released optimus-vae.pth's sizes
    assert bert.get_vocab_size() == defaults.encoder_vocab_size == 28996
    assert gpt2.get_vocab_size() == defaults.decoder_vocab_size == 50257 + 3
    # ids every GPT-2 and bert-base-cased user knows
    assert gpt2.encode("Hello world").ids == [15496, 995] and gpt2.token_to_id("<|endoftext|>") == 50256
    assert [bert.token_to_id(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")] == [0, 100, 101, 102, 103]


def test_released_vocabularies_tokenize_like_transformers(released_vocab_dir):
    bert, gpt2 = load_tokenizers(str(released_vocab_dir))
    bert_refs = [BertTokenizer.from_pretrained(str(released_vocab_dir), do_lower_case=False),
                 BertTokenizerLegacy(vocab_file=str(released_vocab_dir / "vocab.txt"), do_lower_case=False)]
    gpt2_ref = GPT2Tokenizer.from_pretrained(str(released_vocab_dir))
    gpt2_ref.add_special_tokens({"pad_token": "<PAD>", "bos_token": "<BOS>", "eos_token": "<EOS>"})
    assert [gpt2.token_to_id(t) for t in GPT2_ADDED_TOKENS] == gpt2_ref.convert_tokens_to_ids(list(GPT2_ADDED_TOKENS))
    for text in RELEASED_TEXTS:
        for ref in bert_refs:
            assert bert.encode(text.lower()).ids == ref(text.lower())["input_ids"][1:-1], (text, type(ref).__name__)
        ids = gpt2.encode(text).ids
        assert ids == gpt2_ref(text)["input_ids"], text
        assert gpt2.decode(ids) == gpt2_ref.decode(ids) == text
