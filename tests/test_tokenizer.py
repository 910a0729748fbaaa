"""minivd.tokenizer against transformers' CLIPTokenizer (tokenizers-backed; transformers >= 5 has no slow one),
on vocabularies written by `write_clip_vocab` into a temporary folder."""

import json
import random

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers.convert_slow_tokenizer import bytes_to_unicode  # noqa: E402

from minivd.clip import CLIPTextConfig  # noqa: E402
from minivd.tokenizer import BOS, EOS, CLIPTokenizer  # noqa: E402
from minivd.tools.vocab import demo_tokenizer, train_clip_vocab, write_clip_vocab  # noqa: E402

PROMPTS = [
    "a photo of a cat",
    "A Photo Of A CAT",  # case
    "Hello, world!!! (really?) -- yes... #1 @home $5 & 50% off; a/b\\c",  # punctuation
    "it's the dog's bone, they're sure we've won, I'm here, you'll see, he'd go, don't",  # contractions
    "IT'S THEY'RE DON'T",  # contractions in capitals
    "12345 apples, 3.14 pears and 1,000,000 grapes in 2024",  # digits: one token each
    "Café naïve résumé ÅNGSTRÖM São Paulo",  # precomposed accents
    "Cafe\u0301 re\u0301sume\u0301",  # combining accents (NFC composes them)
    "猫咪在桌子上 and 東京タワー, 서울",  # CJK
    "😀 a happy 🐱 cat 🎉🎉, emoji👍",  # emoji
    "  many   spaces\n\nand\tnew\r\nlines  ",  # whitespace runs
    "",  # empty prompt
    " ",  # only a space
    "<|endoftext|> literal specials <|startoftext|>",  # typed special tokens
    "<|ENDOFTEXT|>",  # a special string that only matches after lowercasing
    "Hello—world… “quotes” ‘single’ «guillemets»",  # unicode punctuation
    "İstanbul ß ﬁ ǅ",  # unusual lowercasing
    "a\x00b\x07c \ufffd end",  # control characters
    " ".join(["a red fox in the snow"] * 30),  # over-long: truncated to 77
    "".join(["supercalifragilistic"] * 20),  # one over-long word
]


@pytest.fixture(scope="module")
def vocab_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip_vocab")
    write_clip_vocab(folder)
    return folder


def reference_ids(folder, prompts, max_length=77):
    ref = transformers.CLIPTokenizer.from_pretrained(folder)
    return ref(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt").input_ids


def test_ids_match_transformers(vocab_folder):
    expected = reference_ids(vocab_folder, PROMPTS)
    ids = CLIPTokenizer.from_folder(vocab_folder)(PROMPTS)
    assert ids.dtype == torch.long and ids.shape == (len(PROMPTS), 77)
    for prompt, want, got in zip(PROMPTS, expected, ids):
        assert torch.equal(got, want), f"{prompt!r}: {got.tolist()} != {want.tolist()}"


def test_random_strings_match_transformers(vocab_folder):
    rng = random.Random(0)
    alphabet = list("abcXYZ ''’sdtrevlm0123.,!?-_\n\t éÉñß猫咪😀🐱<|>endoftx")
    alphabet += ["\u0301", "  ", "'s", "'re"]
    prompts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80))) for _ in range(300)]
    assert torch.equal(CLIPTokenizer.from_folder(vocab_folder)(prompts), reference_ids(vocab_folder, prompts))


def test_bos_eos_padding_and_truncation(vocab_folder):
    vocab = json.loads((vocab_folder / "vocab.json").read_text())
    tok = CLIPTokenizer.from_folder(vocab_folder)
    short, long = tok(["a cat", " ".join(["cat"] * 200)])
    assert short[0] == vocab[BOS] and short[1] == vocab["a</w>"] and short[2] == vocab["cat</w>"]
    assert (short[3:] == vocab[EOS]).all()  # EOS, then EOS as padding
    assert long[0] == vocab[BOS] and long[-1] == vocab[EOS] and (long[1:-1] == vocab["cat</w>"]).all()
    assert tok("a cat").shape == (1, 77)


def test_decode_matches_transformers(vocab_folder):
    ref = transformers.CLIPTokenizer.from_pretrained(vocab_folder)
    tok = CLIPTokenizer.from_folder(vocab_folder)
    for row in tok(PROMPTS):
        assert tok.decode(row) == ref.decode(row, skip_special_tokens=True)
        assert tok.decode(row.tolist(), skip_special_tokens=False) == ref.decode(row)


def test_vocab_file_layout(vocab_folder):
    vocab = json.loads((vocab_folder / "vocab.json").read_text(encoding="utf-8"))
    tokens = sorted(vocab, key=vocab.get)
    assert sorted(vocab.values()) == list(range(len(vocab))) == list(range(1000))
    byte_chars = list(bytes_to_unicode().values())  # CLIP's byte alphabet in its vocab order
    assert tokens[:256] == byte_chars
    assert tokens[256:512] == [c + "</w>" for c in byte_chars]
    assert tokens[-2:] == [BOS, EOS]
    lines = (vocab_folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#version: 0.2"
    merged = ["".join(line.split(" ")) for line in lines[1:]]
    assert all(len(line.split(" ")) == 2 for line in lines[1:])
    assert list(dict.fromkeys(merged)) == tokens[512:-2]  # one entry per merge result, in merge order


def test_transformers_reads_the_written_settings(vocab_folder):
    ref = transformers.CLIPTokenizer.from_pretrained(vocab_folder)
    vocab = json.loads((vocab_folder / "vocab.json").read_text())
    assert ref.model_max_length == 77
    assert (ref.bos_token, ref.eos_token, ref.pad_token) == (BOS, EOS, EOS)
    assert (ref.bos_token_id, ref.eos_token_id) == (vocab[BOS], vocab[EOS])


def test_custom_corpus_small_vocab_and_max_length(tmp_path):
    corpus = ["the quick brown fox jumps over the lazy dog", "Pack my box with five dozen liquor jugs!"] * 3
    assert write_clip_vocab(tmp_path, corpus=corpus, vocab_size=540, max_length=16) == 540
    prompts = ["the lazy fox", "THE QUICK BROWN DOG'S BOX " * 5, "unseen words: zebra 42"]
    ids = CLIPTokenizer.from_folder(tmp_path)(prompts)
    assert ids.shape == (3, 16)
    assert torch.equal(ids, reference_ids(tmp_path, prompts, max_length=16))


def test_pad_token_from_special_tokens_map(vocab_folder, tmp_path):
    """Some CLIP folders (e.g. Stable Diffusion 2) pad with "!" instead of <|endoftext|>: both must agree."""
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        (tmp_path / name).write_bytes((vocab_folder / name).read_bytes())
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        settings = json.loads((tmp_path / name).read_text())
        settings["pad_token"] = "!"
        (tmp_path / name).write_text(json.dumps(settings))
    ids = CLIPTokenizer.from_folder(tmp_path)(PROMPTS[:3])
    assert torch.equal(ids, reference_ids(tmp_path, PROMPTS[:3]))
    assert ids[0, -1] == 0  # "!" is the first byte character


def test_demo_tokenizer_is_reproducible_and_fits_the_tiny_text_encoder():
    a, b = demo_tokenizer(), demo_tokenizer()
    assert a.vocab == b.vocab and len(a.vocab) == CLIPTextConfig.tiny().vocab_size
    assert a.eos_id == max(a.vocab.values())  # the tiny config pools at the highest id (legacy eos_token_id 2)
    assert torch.equal(a(PROMPTS), b(PROMPTS))


def test_bad_inputs():
    tok = demo_tokenizer()
    with pytest.raises(TypeError, match="int"):
        tok(123)
    with pytest.raises(TypeError, match="NoneType"):
        tok(["a cat", None])
    with pytest.raises(ValueError, match="vocab_size"):
        train_clip_vocab(vocab_size=100)
    with pytest.raises(TypeError, match="corpus"):
        train_clip_vocab(corpus="one string, not a list")
    with pytest.raises(ValueError, match="startoftext"):
        CLIPTokenizer({"a": 0}, [])
    with pytest.raises(ValueError, match="1-D"):
        tok.decode(tok(["a", "b"]))
