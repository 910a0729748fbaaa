"""CLIP's byte-level BPE tokenizer: a prompt becomes the 77 token ids the CLIP text encoder reads.

Legend for shape comments:
    B batch of prompts, L max_length (77 for CLIP).

How a prompt is tokenized (the CLIP recipe, as transformers' CLIPTokenizer does it):
    1. normalize: Unicode NFC, every run of whitespace -> one space, lowercase;
    2. split into words with CLIP's pattern: contractions ('s 't 're 've 'm 'll 'd), runs of letters, single digits,
       runs of other non-space characters; spaces are dropped;
    3. write each word as its UTF-8 bytes, each byte shown as one printable character (the "byte-level alphabet"),
       and mark the word's last symbol with "</w>";
    4. merge adjacent symbols with the BPE merges, lowest rank first, until no merge applies;
    5. ids = <|startoftext|>, the tokens (at most L-2 of them), <|endoftext|>, then padding up to L.
The padding token is <|endoftext|> for VD (and the OpenAI CLIP files), so the EOS id fills the tail.

The vocabulary file layout is CLIP's: the 256 byte characters, the same 256 followed by "</w>", one entry per
merge (the two halves joined), then <|startoftext|> and <|endoftext|> (49406 and 49407 in the official vocab).

Differences between transformers' tokenizers (we match the fast one, the only one transformers >= 5 ships):
the old pure-Python ("slow") CLIPTokenizer, when ftfy is not installed, cleaned text with BERT's BasicTokenizer,
which (a) put spaces around every CJK ideograph, so "猫咪" became two words "猫</w>" "咪</w>" instead of one,
and (b) deleted control characters and U+FFFD. The fast tokenizer (and this one) keeps a run of CJK letters as one
word and byte-encodes control characters, and (c) lowercased before matching special strings, so a typed
"<|ENDOFTEXT|>" became the EOS id, where the fast one splits it into "<|", "endoftext", "|>".
Everything else (case, accents, punctuation, contractions, digits, emoji, whitespace) agrees.
"""

import json
import os

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
END_OF_WORD = "</w>"
# Step 2: CLIP's word pattern. The special strings come first so a literal "<|endoftext|>" stays one piece.
WORD_PATTERN = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"


def byte_alphabet():
    """The 256 characters that stand for the bytes 0..255, in CLIP's vocab order.

    Printable Latin-1 bytes ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves; the other 68 bytes (space, control
    characters, ...) are given the characters U+0100, U+0101, ... in byte order. The list is ordered printable
    bytes first, then the remapped ones, which is the order of the first 256 vocab entries.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    remapped = [chr(256 + i) for i in range(256 - len(printable))]
    return [chr(b) for b in printable] + remapped


def clip_pipeline(vocab, merges, special_tokens=(BOS, EOS)):
    """A `tokenizers.Tokenizer` doing steps 1-4 above (no special tokens added, no truncation, no padding)."""
    backend = Tokenizer(BPE(vocab=vocab, merges=merges, end_of_word_suffix=END_OF_WORD, unk_token=EOS, fuse_unk=False))
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            # keep the pattern's matches as the words and drop what lies between them (the spaces)
            pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="removed", invert=True),
            # bytes -> byte characters. Its GPT-2 pattern splits the words once more, which changes only a typed
            # special string that is not exact, e.g. "<|ENDOFTEXT|>" -> "<|", "endoftext", "|>" (as transformers does)
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    # A special token typed in the raw text maps to its id, as in transformers. That includes the padding token:
    # with pad_token "!" (Stable Diffusion 2's files) every "!" is cut out of the text before BPE.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens if t in vocab])
    return backend


def _read_merges(path):
    """merges.txt: an optional "#version: ..." header, then one merge "left right" per line."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    return [tuple(line.split(" ")) for line in lines if line.strip()]


def _token_content(token):
    """special_tokens_map / tokenizer_config store a token as a string or as {"content": ...}."""
    return token["content"] if isinstance(token, dict) else token


class CLIPTokenizer:
    """Text -> (B, max_length) token ids for the CLIP text encoder. See the module docstring for the recipe."""

    def __init__(self, vocab: dict, merges: list, max_length=77, pad_token=EOS):
        for token in (BOS, EOS, pad_token):
            if token not in vocab:
                raise ValueError(f"the vocabulary has no {token!r} token")
        if max_length < 2:
            raise ValueError(f"max_length must leave room for <|startoftext|> and <|endoftext|>, got {max_length}")
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
        self.vocab, self.merges = vocab, merges
        self.max_length = max_length
        self.bos_id, self.eos_id, self.pad_id = vocab[BOS], vocab[EOS], vocab[pad_token]
        self.backend = clip_pipeline(vocab, merges, special_tokens=(BOS, EOS, pad_token))

    @classmethod
    def from_folder(cls, path):
        """Read a CLIP tokenizer folder: vocab.json, merges.txt and, when present, tokenizer_config.json (for
        model_max_length) and special_tokens_map.json (for pad_token), e.g. versatile-diffusion/tokenizer/."""
        with open(os.path.join(path, "vocab.json"), encoding="utf-8") as f:
            vocab = json.load(f)
        merges = _read_merges(os.path.join(path, "merges.txt"))
        settings = {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):  # a key in both: the second one's value
            file = os.path.join(path, name)
            if os.path.exists(file):
                with open(file, encoding="utf-8") as f:
                    settings.update(json.load(f))
        max_length = int(settings.get("model_max_length", 77))
        if max_length > 10**6:  # transformers writes a huge sentinel when the length is unknown
            max_length = 77
        pad_token = _token_content(settings.get("pad_token") or EOS)
        return cls(vocab, merges, max_length=max_length, pad_token=pad_token)

    def __call__(self, texts):
        """texts: a str or a list of B str -> LongTensor (B, L): BOS, tokens (truncated to L-2), EOS, padding."""
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)):
            raise TypeError(f"texts must be a str or a list of str, got {type(texts).__name__}")
        if not all(isinstance(t, str) for t in texts):
            raise TypeError(f"texts must be a str or a list of str, got a list of {[type(t).__name__ for t in texts]}")
        ids = torch.full((len(texts), self.max_length), self.pad_id, dtype=torch.long)  # (B, L)
        for row, encoding in enumerate(self.backend.encode_batch(list(texts), add_special_tokens=False)):
            tokens = [self.bos_id, *encoding.ids[: self.max_length - 2], self.eos_id]
            ids[row, : len(tokens)] = torch.tensor(tokens)
        return ids

    def tokenize(self, text):
        """The BPE token strings of one text (no BOS/EOS), e.g. "a photo" -> ['a</w>', 'photo</w>']."""
        return self.backend.encode(text, add_special_tokens=False).tokens

    def decode(self, ids, skip_special_tokens=True):
        """ids: a 1-D sequence or tensor of token ids -> text, with words separated by single spaces."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode takes one sequence of ids (1-D), got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        text = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return text.replace(END_OF_WORD, " ").strip()
