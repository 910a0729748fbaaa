"""The toy Optimus: minivd's text VAE (BERT encoder, GPT-2 decoder reading the latent twice) at toy sizes,
trained on the caption language.

    (mu, logvar) = encoder(caption),  z = mu + exp(logvar / 2) * eps
    loss = sum_tokens CE(decoder(z, <BOS> w_1 .. w_n), w_1 .. w_n <EOS>) + beta * sum_d max(KL_d, free_bits)

Text VAEs tend to collapse: a strong decoder learns the language and ignores z (KL -> 0). Four guards:
    latent paths   the layers that carry z start at unit scale (`init_latent_paths`), so z is heard at once;
    KL annealing   beta, and the share of the posterior noise in z, grow linearly from 0 to their full value
                   over the first `anneal` of the steps: an autoencoder first, a VAE after;
    free bits      a latent dimension's KL (averaged over the batch) is not penalised below `free_bits` nats
                   (0.5 x 32 dimensions = 16 nats; telling the 1200 sentences apart takes ln 1200 = 7.1);
    word dropout   a `word_dropout` share of the decoder's input tokens is replaced by <PAD>, so the decoder
                   cannot copy the next word from the previous ones and must read z.
VD's text data layers diffuse mu itself, unscaled; the KL term keeps mu near unit scale and the sampled z
teaches the decoder to read latents a little off mu (diffusion samples are never exact).

A share of the sentences (`holdout`) is never trained on; `measure_optimus` gates on them: greedy decoding of
their mu must give the sentence back exactly. Every scene keeps most of its templates in training.
Legend for shape comments: B batch, N encoder tokens, T decoder tokens, Z latent dim, V decoder vocabulary.
"""

import numpy as np
import torch
import torch.nn.functional as F

from minivd.optimus import Optimus, OptimusConfig
from minivd.toy import world
from minivd.toy.common import Progress, learning_rate, set_learning_rate

RECONSTRUCTION_GATE = 99.0  # % of held-out captions greedy decoding must give back exactly


def toy_optimus_config(bert_tok, gpt2_tok, latent_dim=32):
    """BERT and GPT-2 of 2 layers, width 64, one 64-wide head each (head_dim 64, as in the full-size models,
    so `OptimusConfig.from_state_dict` reads the sizes back), 32 positions."""
    return OptimusConfig(encoder_vocab_size=bert_tok.get_vocab_size(), encoder_hidden=64, encoder_layers=2,
                         encoder_heads=1, encoder_mlp=256, encoder_positions=32, max_word_pieces=30,
                         decoder_vocab_size=gpt2_tok.get_vocab_size(), decoder_hidden=64, decoder_layers=2,
                         decoder_heads=1, decoder_mlp=256, decoder_positions=32, latent_dim=latent_dim)


def split_sentences(holdout=0.1, seed=0):
    """-> (training, held_out): lists of (caption, scene). round(holdout x 1200) scenes (at most all 240) each give
    one random template to the held-out list, so every scene keeps at least 4 of its 5 templates in training."""
    rng = np.random.default_rng(seed)
    scenes = world.all_scenes()
    n_out = min(len(scenes), round(holdout * len(scenes) * len(world.TEMPLATES)))
    losing = set(rng.permutation(len(scenes))[:n_out].tolist())
    training, held_out = [], []
    for i, scene in enumerate(scenes):
        out = int(rng.integers(len(world.TEMPLATES))) if i in losing else None
        for t in range(len(world.TEMPLATES)):
            (held_out if t == out else training).append((world.caption(scene, t), scene))
    return training, held_out


def init_latent_paths(model):
    """Re-initialise the layers between the encoder's [CLS] state and the decoder (pooler, latent head, memory
    and embedding projections) with std 1/sqrt(fan_in). Optimus' N(0, 0.02) init suits 768-wide layers; at width
    64 it makes z, and what the decoder hears of z, about 100x smaller, and learning to use z takes thousands of
    steps. With unit-scale paths the decoder reads z from the first step."""
    for layer in (model.encoder.pooler, model.encoder.linear, model.decoder.linear, model.decoder.linear_emb):
        torch.nn.init.normal_(layer.weight, std=layer.weight.shape[1] ** -0.5)


def decoder_tensors(model, texts):
    """texts -> (inputs, targets), each (B, T) long: <BOS> w_1 .. w_n and w_1 .. w_n <EOS>, padded with <PAD>
    (inputs) and -100 (targets, ignored by the loss)."""
    rows = [model.gpt2_tok.encode(t).ids for t in texts]
    T = max(len(r) for r in rows) + 1
    pad = model.gpt2_tok.token_to_id("<PAD>")
    inputs = torch.full((len(rows), T), pad, dtype=torch.long)
    targets = torch.full((len(rows), T), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        inputs[i, : len(r) + 1] = torch.tensor([model.bos_id, *r])
        targets[i, : len(r) + 1] = torch.tensor([*r, model.eos_id])
    return inputs, targets


def optimus_loss(model, enc_ids, keep, dec_inputs, targets, beta, free_bits, word_dropout, noise=1.0):
    """-> (loss, reconstruction per sentence, KL per sentence). enc_ids, keep (B, N); dec_inputs, targets (B, T).
    noise: the share of the posterior's std used when sampling z (1: the true posterior sample)."""
    mu, logvar = model.encoder(enc_ids, keep)  # (B, Z) each
    z = mu + noise * torch.randn_like(mu) * (0.5 * logvar).exp()
    if word_dropout:
        drop = torch.rand(dec_inputs.shape) < word_dropout
        drop[:, 0] = False  # always keep <BOS>
        dec_inputs = dec_inputs.masked_fill(drop, model.gpt2_tok.token_to_id("<PAD>"))
    logits = model.decoder(z, dec_inputs)  # (B, T, V)
    B = enc_ids.shape[0]
    reconstruction = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100,
                                     reduction="sum") / B
    kl_per_dim = 0.5 * (mu**2 + logvar.exp() - 1 - logvar).mean(dim=0)  # (Z,), batch mean
    kl = kl_per_dim.sum()
    return reconstruction + beta * kl_per_dim.clamp(min=free_bits).sum(), reconstruction, kl


def train_optimus(bert_tok, gpt2_tok, steps=2000, batch_size=128, lr=2e-3, beta=1.0, anneal=0.3, free_bits=0.5,
                  word_dropout=0.25, holdout=0.1, latent_dim=32, seed=0, cfg=None, log_every=100, quiet=False):
    """Train the text VAE on the training sentences. -> (model in eval mode, loss log)."""
    torch.manual_seed(seed)
    model = Optimus(cfg or toy_optimus_config(bert_tok, gpt2_tok, latent_dim), bert_tok, gpt2_tok)
    init_latent_paths(model)
    training, _ = split_sentences(holdout, seed)
    texts = [text for text, _ in training]
    enc_ids, keep = model.tokenize(texts)  # (S, N): every training sentence, tokenized once
    dec_inputs, targets = decoder_tensors(model, texts)  # (S, T)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    rng = np.random.default_rng(seed + 1)
    progress = Progress("optimus", steps, log_every, quiet)
    model.train()
    for step in range(steps):
        set_learning_rate(optimizer, learning_rate(step, steps, lr, warmup=100))
        b = torch.from_numpy(rng.integers(len(texts), size=batch_size))
        ramp = min(1.0, step / max(1, anneal * steps))
        beta_now = beta * ramp
        loss, reconstruction, kl = optimus_loss(model, enc_ids[b], keep[b], dec_inputs[b], targets[b], beta_now,
                                                free_bits, word_dropout, noise=ramp)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        progress.step(step, loss=loss.item(), rec=reconstruction.item(), kl=kl.item(), beta=beta_now)
    return model.eval(), progress.log


def _scores(decoded, texts, scenes):
    """% exact, % in the caption language, % with the scene's attributes."""
    parsed = [world.parse_caption(d) for d in decoded]
    return {"exact": 100 * float(np.mean([d == t for d, t in zip(decoded, texts)])),
            "in_language": 100 * float(np.mean([p is not None for p in parsed])),
            "attributes_kept": 100 * float(np.mean([p == s for p, s in zip(parsed, scenes)]))}


@torch.no_grad()
def measure_optimus(model, holdout=0.1, seed=0, noise_levels=(0.1, 0.2, 0.3, 0.5)):
    """Greedy decoding of mu for held-out and training sentences; of mu + Gaussian noise (std = level x the std of
    mu over all sentences, the same for every dimension) for every sentence; the statistics of mu.
    `gate_passed`: exact reconstruction of held-out sentences >= RECONSTRUCTION_GATE %."""
    training, held_out = split_sentences(holdout, seed)
    every = training + held_out
    texts, scenes = [t for t, _ in every], [s for _, s in every]
    mu = model.encode(texts)  # (S, Z)
    decoded = model.decode(mu, greedy=True)
    n_train = len(training)
    results = {"held_out": _scores(decoded[n_train:], texts[n_train:], scenes[n_train:]),
               "training": _scores(decoded[:n_train], texts[:n_train], scenes[:n_train]),
               "held_out_sentences": len(held_out)}
    mu_std = mu.std().item()
    generator = torch.Generator().manual_seed(seed + 50_000)
    for level in noise_levels:
        noisy = mu + level * mu_std * torch.randn(mu.shape, generator=generator)
        results[f"latent_noise_{level}"] = _scores(model.decode(noisy, greedy=True), texts, scenes)
    # latents that belong to no sentence: Gaussian with mu's mean and per-dimension std
    fake = mu.mean(dim=0) + torch.randn(mu.shape, generator=generator) * mu.std(dim=0)
    results["gaussian_latents_in_language"] = _scores(model.decode(fake, greedy=True), texts, scenes)["in_language"]
    per_dim = mu.std(dim=0)
    results["mu"] = {"std": mu_std, "mean_abs": mu.mean(dim=0).abs().mean().item(),
                     "per_dim_std_min": per_dim.min().item(), "per_dim_std_median": per_dim.median().item(),
                     "per_dim_std_max": per_dim.max().item(), "latent_dim": mu.shape[1]}
    results["gate_passed"] = bool(results["held_out"]["exact"] >= RECONSTRUCTION_GATE)
    return results

