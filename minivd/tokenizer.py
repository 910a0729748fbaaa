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

from . import checks

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


def _read_merges(path, vocab):
    """merges.txt: an optional "#version: ..." header, then one merge "left right" per line, both halves and the
    merged token in the vocabulary. Errors name the file and the line."""
    with open(path, encoding="utf-8") as f:
        try:
            lines = f.read().split("\n")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not UTF-8 text: {e}") from None
    merges = []
    for number, line in enumerate(lines, start=1):
        if not line.strip() or (number == 1 and line.startswith("#version")):
            continue
        pair = tuple(line.split(" "))
        if len(pair) != 2 or not all(pair):
            raise ValueError(f"{path}, line {number}: a merge is two tokens separated by one space, got {line!r}")
        missing = [t for t in (*pair, "".join(pair)) if t not in vocab]
        if missing:
            raise ValueError(f"{path}, line {number}: {' and '.join(map(repr, missing))} not in vocab.json")
        merges.append(pair)
    return merges


def _read_json(path, required=True):
    """A JSON object from `path` ({} if the file is absent and not required); errors name the file."""
    if not os.path.isfile(path):
        if required:
            raise FileNotFoundError(f"missing tokenizer file {path}")
        return {}
    with open(path, encoding="utf-8") as f:
        try:
            value = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


def _token_content(token):
    """special_tokens_map / tokenizer_config store a token as a string or as {"content": ...}."""
    return token.get("content") if isinstance(token, dict) else token


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
        model_max_length) and special_tokens_map.json (for pad_token), e.g. versatile-diffusion/tokenizer/.
        Every file is checked; an error names the file."""
        vocab_path = os.path.join(path, "vocab.json")
        vocab = _read_json(vocab_path)
        ids = list(vocab.values())
        if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 2**31 for i in ids) \
                or len(set(ids)) != len(ids):
            raise ValueError(f"{vocab_path} must map each token to its own id (an integer >= 0)")
        merges = _read_merges(os.path.join(path, "merges.txt"), vocab)
        settings = {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):  # a key in both: the second one's value
            settings.update({key: (name, value) for key, value in _read_json(os.path.join(path, name), False).items()})
        where, max_length = settings.get("model_max_length", (None, 77))
        if isinstance(max_length, (int, float)) and not isinstance(max_length, bool) and max_length > 10**6:
            max_length = 77  # transformers writes a huge sentinel when the length is unknown
        try:
            checks.integer(max_length, "model_max_length", low=2)  # room for <|startoftext|> and <|endoftext|>
        except ValueError as e:
            raise ValueError(f"{os.path.join(path, where)}: {e}") from None
        where, pad_token = settings.get("pad_token", (None, EOS))
        pad_token = _token_content(pad_token) or EOS
        if not isinstance(pad_token, str):
            raise ValueError(f"{os.path.join(path, where)}: pad_token must be a string, got {pad_token!r}")
        try:
            return cls(vocab, merges, max_length=max_length, pad_token=pad_token)
        except ValueError as e:  # a special token missing from the vocabulary
            raise ValueError(f"{vocab_path}: {e}") from None

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
