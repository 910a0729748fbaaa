"""The toy's three tokenizers, trained on the caption language, in the file layouts of the real ones.

    CLIP       byte-level BPE with "</w>" word ends: vocab.json + merges.txt (+ tokenizer_config.json with
               model_max_length, special_tokens_map.json). Layout: 256 byte characters, the same 256 with "</w>",
               one entry per merge, then <|startoftext|> and <|endoftext|> as the last two ids.
               Read by `minivd.tokenizer.CLIPTokenizer.from_folder` and transformers' CLIPTokenizer.
    BERT       WordPiece vocab.txt: [PAD] [UNK] [CLS] [SEP] [MASK], every character alone and as "##" continuation,
               then every word of the language. Read by `minivd.optimus.bert_tokenizer`.
    GPT-2      byte-level BPE (a leading space is part of a word, written "Ġ"): vocab.json + merges.txt, with
               <|endoftext|> last. `minivd.optimus.gpt2_tokenizer` adds <PAD> <BOS> <EOS> after it.

Both BPEs come from `train_bpe`, classic BPE with a fixed tie-break, so the files are the same on every run. The
caption language has 24 words, so the merges go on until every word is a single token: a caption is one token per
word (and one per comma).
"""

import json
import os
from collections import Counter

from tokenizers import Regex, pre_tokenizers

from minivd.toy.world import all_captions

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
BERT_SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# CLIP's word pattern (minivd.tokenizer): words are runs of letters, single digits, or runs of other characters
CLIP_WORD_PATTERN = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
CLIP_MAX_LENGTH = 16  # tokens per prompt, <|startoftext|> and <|endoftext|> included (the longest caption has 12)


def byte_alphabet():
    """The 256 characters that stand for the bytes 0..255, in the vocab order of GPT-2 and CLIP: the printable
    Latin-1 bytes stand for themselves, the other 68 (space, control characters, ...) get U+0100, U+0101, ..."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]


def clip_words(text):
    """CLIP's word split: lowercase, the word pattern, each word's bytes as byte characters (no spaces kept)."""
    split = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(CLIP_WORD_PATTERN), behavior="removed", invert=True),
                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    return [word for word, _ in split.pre_tokenize_str(" ".join(text.lower().split()))]


def gpt2_words(text):
    """GPT-2's word split: its pattern with the leading space kept in the word ("Ġsmall"), as byte characters."""
    return [word for word, _ in pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str(text)]


def merge_steps(words):
    """words: Counter of words, each a tuple of symbols -> yields merges (left, right), most frequent pair first.

    Repeatedly merge the most frequent adjacent pair (ties: the smallest pair in string order) until every word is
    one symbol."""
    while True:
        pairs = Counter()
        for symbols, count in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += count
        if not pairs:
            return
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        yield best
        merged = Counter()
        for symbols, count in words.items():
            out, i = [], 0
            while i < len(symbols):
                if symbols[i : i + 2] == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged


def train_bpe(words):
    """words: Counter of words, each a tuple of symbols -> the list of all merges `merge_steps` makes."""
    return list(merge_steps(words))


def _vocab(base, merges, tail):
    """base tokens, one token per merge (a string two merges both build is listed once), then the `tail` tokens
    -> {token: id}."""
    tokens, seen = list(base), set(base)
    for left, right in merges:
        if left + right not in seen:
            tokens.append(left + right)
            seen.add(left + right)
    return {token: i for i, token in enumerate([*tokens, *tail])}


def train_clip(corpus):
    """-> (vocab, merges) of a CLIP BPE on `corpus` (a list of str)."""
    words = Counter()
    for text in corpus:
        for word in clip_words(text):
            words[(*word[:-1], word[-1] + END_OF_WORD)] += 1  # the last symbol carries the word end
    merges = train_bpe(words)
    alphabet = byte_alphabet()
    return _vocab(alphabet + [c + END_OF_WORD for c in alphabet], merges, [BOS, EOS]), merges


def train_gpt2(corpus):
    """-> (vocab, merges) of a GPT-2 byte-level BPE on `corpus` (a list of str)."""
    words = Counter(tuple(word) for text in corpus for word in gpt2_words(text))
    merges = train_bpe(words)
    return _vocab(byte_alphabet(), merges, [EOS]), merges


def train_bert(corpus):
    """-> list of WordPiece tokens: the special tokens, the characters, "##" + the characters, the words by
    frequency (ties alphabetical)."""
    split = pre_tokenizers.BertPreTokenizer().pre_tokenize_str
    words = Counter(word for text in corpus for word, _ in split(text.lower()))
    chars = sorted({c for word in words for c in word})
    ranked = sorted((w for w in words if len(w) > 1), key=lambda w: (-words[w], w))
    return [*BERT_SPECIAL, *chars, *("##" + c for c in chars), *ranked]


def _write_json(path, data):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=None if len(data) > 20 else 2)


def _write_bpe(folder, vocab, merges):
    _write_json(os.path.join(folder, "vocab.json"), vocab)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(["#version: 0.2", *(f"{left} {right}" for left, right in merges)]) + "\n")


def write_tokenizers(out_dir, corpus=None):
    """Train the three tokenizers on `corpus` (default: every caption of the language) and write
        out_dir/clip_tokenizer/    vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json
        out_dir/optimus_tokenizer/ vocab.txt (BERT), vocab.json + merges.txt (GPT-2)
    -> {"clip_vocab": n, "bert_vocab": n, "gpt2_vocab": n (without the 3 added tokens), "clip_max_length": n}."""
    corpus = all_captions() if corpus is None else corpus
    clip_dir, optimus_dir = os.path.join(out_dir, "clip_tokenizer"), os.path.join(out_dir, "optimus_tokenizer")
    os.makedirs(clip_dir, exist_ok=True)
    os.makedirs(optimus_dir, exist_ok=True)

    clip_vocab, clip_merges = train_clip(corpus)
    longest = max(len(clip_words(text)) for text in corpus) + 2  # + <|startoftext|>, <|endoftext|>
    if longest > CLIP_MAX_LENGTH:
        raise ValueError(f"the longest caption needs {longest} CLIP tokens, more than CLIP_MAX_LENGTH")
    _write_bpe(clip_dir, clip_vocab, clip_merges)
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    _write_json(os.path.join(clip_dir, "special_tokens_map.json"), special)
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": CLIP_MAX_LENGTH, "do_lower_case": True,
              **special}
    _write_json(os.path.join(clip_dir, "tokenizer_config.json"), config)

    gpt2_vocab, gpt2_merges = train_gpt2(corpus)
    _write_bpe(optimus_dir, gpt2_vocab, gpt2_merges)
    bert_vocab = train_bert(corpus)
    with open(os.path.join(optimus_dir, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(bert_vocab) + "\n")
    return {"clip_vocab": len(clip_vocab), "bert_vocab": len(bert_vocab), "gpt2_vocab": len(gpt2_vocab),
            "clip_max_length": CLIP_MAX_LENGTH, "longest_caption_clip_tokens": longest}
