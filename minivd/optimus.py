"""Optimus: the text VAE that gives Versatile Diffusion's text flows (image-to-text, text-variation) a 768-d latent.

The text UNet denoises a single 768-d vector. Optimus turns a sentence into that vector and back:

    encoder  BERT-base-cased. Lowercased text -> [CLS] word pieces [SEP] -> post-LN transformer ->
             pooler tanh(dense(h[CLS])) -> `linear` -> (mu, logvar). The latent is mu.
    decoder  GPT-2 small that reads the latent z twice:
             (1) memory: `linear` maps z to one 768-d vector per layer; each is used as the key AND the value of one
                 extra attention slot placed before the tokens (so token positions start at 1);
             (2) embedding: `linear_emb` maps z to 768 values added to the token + position embedding of every token.
             Text is sampled from <BOS> until <EOS> or 30 tokens (counting <BOS> and <EOS>).

Legend for shape comments:
    B batch, N encoder word pieces, T decoder tokens, C hidden width, nh heads, hd head dim (C = nh * hd),
    L decoder layers, Z latent dim (768), V vocabulary.

The modules have no dropout, so train() and eval() compute the same thing (the original never called eval()).
"""

import math
import os
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

from . import checks

GPT2_ADDED_TOKENS = ("<PAD>", "<BOS>", "<EOS>")  # ids 50257, 50258, 50259 after GPT-2's 50257 byte-level BPE tokens


@dataclass
class OptimusConfig:
    # encoder: BERT-base-cased
    encoder_vocab_size: int = 28996
    encoder_hidden: int = 768
    encoder_layers: int = 12
    encoder_heads: int = 12
    encoder_mlp: int = 3072
    encoder_positions: int = 512
    encoder_type_vocab: int = 2
    encoder_eps: float = 1e-12
    max_word_pieces: int = 77  # the original keeps at most 77 word pieces, then adds [CLS] and [SEP]
    # decoder: GPT-2 small with 3 added tokens
    decoder_vocab_size: int = 50260
    decoder_hidden: int = 768
    decoder_layers: int = 12
    decoder_heads: int = 12
    decoder_mlp: int = 3072
    decoder_positions: int = 1024
    decoder_eps: float = 1e-5
    latent_dim: int = 768

    def __post_init__(self):
        for key, value in vars(self).items():
            checks.real(value, key, positive=True) if key.endswith("_eps") else checks.integer(value, key)
        checks.integer(self.max_word_pieces, "max_word_pieces", high=self.encoder_positions - 2)  # + [CLS], [SEP]
        for part in ("encoder", "decoder"):
            hidden, heads = getattr(self, f"{part}_hidden"), getattr(self, f"{part}_heads")
            if hidden % heads:
                raise ValueError(f"{part}_hidden ({hidden}) must be a multiple of {part}_heads ({heads})")

    @classmethod
    def tiny(cls):
        """Sizes for tests; the vocab sizes match the files `minivd.tools.vocab.write_tiny_vocabs` writes (160 word
        pieces; 320 GPT-2 tokens, plus the 3 added ones)."""
        return cls(encoder_vocab_size=160, encoder_hidden=32, encoder_layers=2, encoder_heads=4,
                   encoder_mlp=64, encoder_positions=96, decoder_vocab_size=320 + len(GPT2_ADDED_TOKENS),
                   decoder_hidden=48, decoder_layers=3, decoder_heads=6, decoder_mlp=192, decoder_positions=64,
                   latent_dim=16)

    @classmethod
    def from_state_dict(cls, sd, head_dim=64):
        """Read every size from tensor shapes. Accepts the `optimus-vae.pth` names or minivd's names.

        Head counts are not stored in any shape: they are width // head_dim (64 in BERT-base and GPT-2 small).
        """
        def find(*suffixes):
            keys = [k for k in sd if k.endswith(suffixes)]
            if len(keys) != 1:
                raise ValueError(f"expected one key ending in {suffixes} in the Optimus state dict, found {keys}")
            return sd[keys[0]].shape

        def count(pattern):
            return 1 + max((int(m.group(1)) for k in sd if (m := re.match(pattern, k))), default=-1)

        enc_vocab, enc_hidden = find("encoder.embeddings.word_embeddings.weight")
        dec_vocab, dec_hidden = find("wte.weight")
        if enc_hidden % head_dim or dec_hidden % head_dim:
            raise ValueError(f"widths {enc_hidden}, {dec_hidden} are not multiples of head_dim={head_dim}")
        two_latent = find("encoder.linear.weight")[0]
        encoder_layers = count(r"^encoder\.(?:encoder\.layer|layers)\.(\d+)\.")
        decoder_layers = count(r"^decoder\.(?:transformer\.)?h\.(\d+)\.")  # 0 if none: refused by __post_init__
        return cls(
            encoder_vocab_size=enc_vocab, encoder_hidden=enc_hidden, encoder_layers=encoder_layers,
            encoder_heads=enc_hidden // head_dim,
            encoder_mlp=find(".0.intermediate.dense.weight", ".0.mlp_in.weight")[0],
            encoder_positions=find("position_embeddings.weight")[0],
            encoder_type_vocab=find("token_type_embeddings.weight")[0],
            decoder_vocab_size=dec_vocab, decoder_hidden=dec_hidden, decoder_layers=decoder_layers,
            decoder_heads=dec_hidden // head_dim, decoder_mlp=find("h.0.mlp.c_fc.weight")[1],
            decoder_positions=find("wpe.weight")[0], latent_dim=two_latent // 2,
            max_word_pieces=min(77, find("position_embeddings.weight")[0] - 2),  # room for [CLS] and [SEP]
        )


# ----------------------------------------------------------------------------------------------------------------
# Encoder: BERT (post-LayerNorm, exact GELU) + pooler + latent head
# ----------------------------------------------------------------------------------------------------------------

class BertEmbeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.encoder_vocab_size, cfg.encoder_hidden)
        self.position_embeddings = nn.Embedding(cfg.encoder_positions, cfg.encoder_hidden)
        self.token_type_embeddings = nn.Embedding(cfg.encoder_type_vocab, cfg.encoder_hidden)
        self.norm = nn.LayerNorm(cfg.encoder_hidden, eps=cfg.encoder_eps)

    def forward(self, input_ids):
        """input_ids: (B, N) -> (B, N, C). One sentence, so every token type is 0."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        return self.norm(x + self.token_type_embeddings.weight[0])


class BertSelfAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x, keep):
        """x: (B, N, C), keep: (B, N) bool, False at padding -> (B, N, C)."""
        B, N, C = x.shape
        q, k, v = (proj(x).view(B, N, self.heads, C // self.heads).transpose(1, 2)  # (B, nh, N, hd)
                   for proj in (self.query, self.key, self.value))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])  # keys masked at padding
        return self.out(out.transpose(1, 2).reshape(B, N, C))  # (B, nh, N, hd) -> (B, N, C)


class BertLayer(nn.Module):
    """Post-LN: x = LN(x + attn(x)); x = LN(x + W2 gelu(W1 x))."""

    def __init__(self, cfg):
        super().__init__()
        self.attn = BertSelfAttention(cfg.encoder_hidden, cfg.encoder_heads)
        self.attn_norm = nn.LayerNorm(cfg.encoder_hidden, eps=cfg.encoder_eps)
        self.mlp_in = nn.Linear(cfg.encoder_hidden, cfg.encoder_mlp)
        self.mlp_out = nn.Linear(cfg.encoder_mlp, cfg.encoder_hidden)
        self.mlp_norm = nn.LayerNorm(cfg.encoder_hidden, eps=cfg.encoder_eps)

    def forward(self, x, keep):
        """x: (B, N, C), keep: (B, N) bool -> (B, N, C)."""
        x = self.attn_norm(x + self.attn(x, keep))
        return self.mlp_norm(x + self.mlp_out(F.gelu(self.mlp_in(x))))


class BertEncoder(nn.Module):
    """Text -> Gaussian posterior (mu, logvar) over the latent."""

    def __init__(self, cfg):
        super().__init__()
        self.embeddings = BertEmbeddings(cfg)
        self.layers = nn.ModuleList([BertLayer(cfg) for _ in range(cfg.encoder_layers)])
        self.pooler = nn.Linear(cfg.encoder_hidden, cfg.encoder_hidden)
        self.linear = nn.Linear(cfg.encoder_hidden, 2 * cfg.latent_dim, bias=False)

    def features(self, input_ids, keep):
        """input_ids, keep: (B, N) -> last hidden state (B, N, C), pooled (B, C) = tanh(dense(h[CLS]))."""
        h = self.embeddings(input_ids)
        for layer in self.layers:
            h = layer(h, keep)
        return h, torch.tanh(self.pooler(h[:, 0]))

    def forward(self, input_ids, keep):
        """input_ids, keep: (B, N) -> mu (B, Z), logvar (B, Z)."""
        _, pooled = self.features(input_ids, keep)
        mu, logvar = self.linear(pooled).chunk(2, dim=-1)
        return mu, logvar


# ----------------------------------------------------------------------------------------------------------------
# Decoder: GPT-2 (pre-LayerNorm, tanh GELU) with the latent as a one-slot memory and as an extra embedding
# ----------------------------------------------------------------------------------------------------------------

class Conv1D(nn.Module):
    """GPT-2's linear layer, weight stored transposed: (in, out). y = x @ W + b."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(nn.init.normal_(torch.empty(n_in, n_out), std=0.02))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):
        return x @ self.weight + self.bias


class GPT2Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.c_attn = Conv1D(dim, 3 * dim)  # q, k, v side by side
        self.c_proj = Conv1D(dim, dim)

    def forward(self, x, memory):
        """x: (B, T, C), memory: (B, C) this layer's latent slot -> (B, T, C).

        Causal attention over [memory, token 0..T-1]: token i sees the memory and tokens 0..i.
        """
        B, T, C = x.shape
        hd = C // self.heads
        q, k, v = (t.view(B, T, self.heads, hd).transpose(1, 2)  # (B, T, C) -> (B, nh, T, hd)
                   for t in self.c_attn(x).split(C, dim=-1))
        slot = memory.view(B, self.heads, 1, hd)  # (B, C) -> (B, nh, 1, hd): the same vector is key and value
        k, v = torch.cat([slot, k], dim=2), torch.cat([slot, v], dim=2)  # (B, nh, 1+T, hd)
        visible = torch.ones(T, T + 1, dtype=torch.bool, device=x.device).tril(diagonal=1)  # (T, 1+T)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
        return self.c_proj(out.transpose(1, 2).reshape(B, T, C))  # (B, nh, T, hd) -> (B, T, C)


class GPT2MLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.c_fc = Conv1D(dim, hidden)
        self.c_proj = Conv1D(hidden, dim)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class GPT2Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.decoder_hidden, eps=cfg.decoder_eps)
        self.attn = GPT2Attention(cfg.decoder_hidden, cfg.decoder_heads)
        self.ln_2 = nn.LayerNorm(cfg.decoder_hidden, eps=cfg.decoder_eps)
        self.mlp = GPT2MLP(cfg.decoder_hidden, cfg.decoder_mlp)

    def forward(self, x, memory):
        """x: (B, T, C), memory: (B, C) -> (B, T, C)."""
        x = x + self.attn(self.ln_1(x), memory)
        return x + self.mlp(self.ln_2(x))


class GPT2Decoder(nn.Module):
    """(latent z, token ids) -> next-token logits. The language-model head is tied to `wte`."""

    def __init__(self, cfg):
        super().__init__()
        self.wte = nn.Embedding(cfg.decoder_vocab_size, cfg.decoder_hidden)
        self.wpe = nn.Embedding(cfg.decoder_positions, cfg.decoder_hidden)
        self.h = nn.ModuleList([GPT2Block(cfg) for _ in range(cfg.decoder_layers)])
        self.ln_f = nn.LayerNorm(cfg.decoder_hidden, eps=cfg.decoder_eps)
        self.linear = nn.Linear(cfg.latent_dim, cfg.decoder_layers * cfg.decoder_hidden, bias=False)  # memory
        self.linear_emb = nn.Linear(cfg.latent_dim, cfg.decoder_hidden, bias=False)  # extra embedding

    def hidden_states(self, z, input_ids):
        """z: (B, Z), input_ids: (B, T) -> final hidden states (B, T, C), after ln_f."""
        B, T = input_ids.shape
        memory = self.linear(z).view(B, len(self.h), -1)  # (B, Z) -> (B, L, C): layer l reads memory[:, l]
        positions = torch.arange(1, T + 1, device=input_ids.device)  # position 0 is the memory slot
        x = self.wte(input_ids) + self.wpe(positions) + self.linear_emb(z)[:, None, :]  # (B, T, C)
        for layer, block in enumerate(self.h):
            x = block(x, memory[:, layer])
        return self.ln_f(x)

    def forward(self, z, input_ids):
        """z: (B, Z), input_ids: (B, T) -> logits (B, T, V)."""
        return self.hidden_states(z, input_ids) @ self.wte.weight.T  # (B, T, C) -> (B, T, V)


# ----------------------------------------------------------------------------------------------------------------
# Tokenizers (the `tokenizers` library, built from the original vocab files)
# ----------------------------------------------------------------------------------------------------------------

def bert_tokenizer(vocab_file):
    """bert-base-cased WordPiece. No lowercasing here: Optimus lowercases the text itself before tokenizing."""
    tok = Tokenizer(models.WordPiece.from_file(vocab_file, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=False,
                                                lowercase=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def gpt2_tokenizer(vocab_file, merges_file):
    """GPT-2 byte-level BPE plus Optimus' three added tokens <PAD>, <BOS>, <EOS> (ids right after the BPE vocab)."""
    tok = Tokenizer(models.BPE.from_file(vocab_file, merges_file))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    base = tok.get_vocab_size()
    tok.add_special_tokens(list(GPT2_ADDED_TOKENS))
    if [tok.token_to_id(t) for t in GPT2_ADDED_TOKENS] != [base, base + 1, base + 2]:
        raise ValueError(f"{vocab_file}: {GPT2_ADDED_TOKENS} must get ids {base}..{base + 2}; is one already in it?")
    return tok


def load_tokenizers(folder):
    """(bert, gpt2) tokenizers from `folder`/vocab.txt, vocab.json, merges.txt."""
    return (bert_tokenizer(os.path.join(folder, "vocab.txt")),
            gpt2_tokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")))


# ----------------------------------------------------------------------------------------------------------------
# The VAE
# ----------------------------------------------------------------------------------------------------------------

# the original decodes with clean_up_tokenization_spaces=True: these replacements, in this order
_CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" do not", " don't"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


class Optimus(nn.Module):
    """The text VAE: `encode` texts -> latents (B, Z), `decode` latents -> texts. Tokenizers come from
    `load_tokenizers` (bert-base-cased vocab.txt, GPT-2 vocab.json + merges.txt)."""

    def __init__(self, config, bert_tok, gpt2_tok):
        super().__init__()
        self.config = config
        self.encoder = BertEncoder(config)
        self.decoder = GPT2Decoder(config)
        self.bert_tok, self.gpt2_tok = bert_tok, gpt2_tok
        self.apply(_init_weights)
        if bert_tok is None or gpt2_tok is None:  # weights only (e.g. to check a file); encode/decode need both
            return
        if bert_tok.get_vocab_size() > config.encoder_vocab_size:
            raise ValueError(f"BERT tokenizer has {bert_tok.get_vocab_size()} tokens, encoder {config.encoder_vocab_size}")
        if gpt2_tok.get_vocab_size() != config.decoder_vocab_size:
            raise ValueError(f"GPT-2 tokenizer has {gpt2_tok.get_vocab_size()} tokens (with {GPT2_ADDED_TOKENS}), "
                             f"decoder has {config.decoder_vocab_size}")
        self.cls_id, self.sep_id, self.pad_id = (bert_tok.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]"))
        self.bos_id, self.eos_id = gpt2_tok.token_to_id("<BOS>"), gpt2_tok.token_to_id("<EOS>")
        self.special_ids = {gpt2_tok.token_to_id(t) for t in GPT2_ADDED_TOKENS}

    def tokenize(self, texts):
        """list of B strings -> input_ids (B, N), keep (B, N) bool. Lowercased, <= 77 word pieces, [CLS] .. [SEP]."""
        if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
            raise TypeError(f"texts must be a list of strings, got {type(texts).__name__}")
        if not texts:
            raise ValueError("texts is empty")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts must be a list of strings; texts[{i}] is {type(t).__name__}")
        rows = [[self.cls_id] + self.bert_tok.encode(t.lower(), add_special_tokens=False).ids[
            :self.config.max_word_pieces] + [self.sep_id] for t in texts]
        N = max(len(r) for r in rows)
        input_ids = torch.tensor([r + [self.pad_id] * (N - len(r)) for r in rows])
        keep = torch.arange(N)[None, :] < torch.tensor([len(r) for r in rows])[:, None]
        return input_ids, keep

    def encode(self, texts):
        """list of B strings -> latent mu (B, Z)."""
        input_ids, keep = self.tokenize(texts)
        device = self.encoder.linear.weight.device
        mu, _ = self.encoder(input_ids.to(device), keep.to(device))
        return mu

    def _check_latent(self, z):
        """-> z in the decoder's dtype (on its own device: the decoder's, or the one it will run on when offloaded)."""
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"z must be a torch.Tensor, got {type(z).__name__}")
        if z.ndim != 2 or z.shape[1] != self.config.latent_dim:
            raise ValueError(f"z must have shape (B, {self.config.latent_dim}), got {tuple(z.shape)}")
        return z.to(dtype=self.decoder.linear.weight.dtype)

    def logits(self, z, input_ids):
        """z: (B, Z), input_ids: (B, T) decoder token ids (usually starting with <BOS>) -> logits (B, T, V)."""
        z = self._check_latent(z)
        if input_ids.ndim != 2 or input_ids.shape[0] != z.shape[0] or input_ids.dtype != torch.long:
            raise ValueError(f"input_ids must be a long tensor (B={z.shape[0]}, T), got {tuple(input_ids.shape)} "
                             f"{input_ids.dtype}")
        if input_ids.shape[1] >= self.config.decoder_positions:
            raise ValueError(f"at most {self.config.decoder_positions - 1} decoder tokens, got {input_ids.shape[1]}")
        return self.decoder(z, input_ids.to(z.device))

    def generate(self, z, max_length=30, temperature=1.0, top_k=0, top_p=1.0, greedy=False, generator=None):
        """z: (B, Z) -> list of B lists of token ids, without <BOS> / <EOS>.

        Starts from <BOS>; each step samples softmax(logits / temperature) restricted to the top_k tokens and to the
        smallest set whose probability reaches top_p (0 and 1.0 switch these off), or takes the argmax if greedy.
        Stops at <EOS>; max_length counts <BOS> and <EOS> as in the original (30 -> at most 28 text tokens).
        """
        z = self._check_latent(z)
        if not 2 <= max_length <= self.config.decoder_positions:
            raise ValueError(f"max_length must be in [2, {self.config.decoder_positions}], got {max_length}")
        if temperature <= 0 or top_k < 0 or not 0 < top_p <= 1:
            raise ValueError(f"need temperature > 0, top_k >= 0, 0 < top_p <= 1; got {temperature}, {top_k}, {top_p}")
        with torch.no_grad():  # a block, not a decorator: no torch wrapper frame to step through
            B = z.shape[0]
            ids = torch.full((B, 1), self.bos_id, dtype=torch.long, device=z.device)
            done = torch.zeros(B, dtype=torch.bool, device=z.device)
            for _ in range(max_length - 2):
                h = self.decoder.hidden_states(z, ids)[:, -1]  # (B, C) at the last token
                logits = (h @ self.decoder.wte.weight.T).float()  # (B, V) for the next token
                if not torch.isfinite(logits).all():
                    raise FloatingPointError("non-finite values (NaN or inf) in the Optimus decoder's logits")
                if greedy:
                    token = logits.argmax(dim=-1)
                else:
                    token = _sample(logits / temperature, top_k, top_p, generator)
                ids = torch.cat([ids, token[:, None]], dim=1)  # (B, t) -> (B, t+1); a row is cut at its first <EOS>
                done |= token == self.eos_id
                if done.all():
                    break
        rows = []
        for row in ids[:, 1:].tolist():
            rows.append(row[:row.index(self.eos_id)] if self.eos_id in row else row)
        return rows

    def decode(self, z, max_length=30, temperature=1.0, top_k=0, top_p=1.0, greedy=False, generator=None):
        """z: (B, Z) -> list of B sentences (special tokens removed, the original's clean-up applied)."""
        return [self.ids_to_text(row) for row in self.generate(z, max_length, temperature, top_k, top_p, greedy,
                                                                generator)]

    def ids_to_text(self, ids):
        """list of decoder token ids -> str: <PAD>/<BOS>/<EOS> dropped, the original's clean-up, single spaces."""
        text = self.gpt2_tok.decode([i for i in ids if i not in self.special_ids], skip_special_tokens=False)
        for old, new in _CLEAN_UP:
            text = text.replace(old, new)
        return " ".join(text.split())


def _init_weights(module):
    """The original's random init (N(0, 0.02) weights, zero biases); only the random-weight demo sees it."""
    if isinstance(module, (nn.Linear, nn.Embedding, Conv1D)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, (nn.Linear, Conv1D)) and module.bias is not None:
        nn.init.zeros_(module.bias)


def _sample(logits, top_k, top_p, generator):
    """logits: (B, V) -> sampled ids (B,). Drawn on the generator's device, so a CPU generator works everywhere."""
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative > top_p
        drop_sorted[:, 1:] = drop_sorted[:, :-1].clone()  # keep the token that crosses top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, -math.inf)
    probs = logits.softmax(dim=-1)
    device = generator.device if generator is not None else probs.device
    return torch.multinomial(probs.to(device), 1, generator=generator).squeeze(1).to(logits.device)
