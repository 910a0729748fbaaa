"""Small vocabularies in the official file layouts, for random test and benchmark checkpoints (no download).

    write_clip_vocab(folder)     a CLIP BPE tokenizer folder (vocab.json, merges.txt, ...) trained on DEMO_CORPUS
    write_tiny_vocabs(folder)    stand-ins for Optimus' bert-base-cased vocab.txt and GPT-2 vocab.json / merges.txt

The trainers are plain and deterministic (ties broken alphabetically), so the same call always writes the same files.
"""

import json
import os
from collections import Counter

from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from minivd.tokenizer import BOS, END_OF_WORD, EOS, CLIPTokenizer, clip_pipeline, byte_alphabet
from minivd.toy.vocab import merge_steps

DEMO_CORPUS = [
    "a photo of a cat sitting on a wooden table",
    "a painting of a dog in the style of van gogh",
    "an astronaut riding a horse on the moon",
    "a red car parked on a street at night",
    "a bowl of fruit with apples, oranges and bananas",
    "a watercolor landscape with mountains and a lake",
    "a portrait of an old man with a white beard",
    "a small house in the forest, covered in snow",
    "two birds flying over the ocean at sunset",
    "a city skyline with tall buildings and blue sky",
    "a close-up photo of a flower in the garden",
    "a child's drawing of a rocket ship",
    "a bicycle leaning against a brick wall",
    "the cat's eyes are green and the dog's fur is brown",
    "it's a sunny day; we're walking to the beach",
    "they've painted the door yellow, haven't they?",
    "i'm sure you'll like the new blue chair",
    "a train crossing a bridge over a river",
    "a cup of coffee and a book on a desk",
    "a black and white photograph of a street in paris",
    "an oil painting of a ship in a storm",
    "a cartoon of a happy robot holding balloons",
    "a plate of pasta with tomato sauce and basil",
    "a field of sunflowers under a cloudy sky",
    "a glass of water on a kitchen counter",
    "3 apples, 2 pears and 10 grapes on a plate",
    "a futuristic city at night with neon lights",
    "a lion resting in the tall grass of the savanna",
    "a snowy mountain peak at sunrise, 4k, highly detailed",
    "a teddy bear wearing a red hat and a scarf",
    "an abstract painting with circles and squares",
    "a man and a woman walking in the rain with an umbrella",
    "a wooden boat on a calm lake in the morning",
    "a castle on a hill surrounded by green fields",
    "a plate of sushi on a black table",
    "a fox in the snow, digital art",
    "a vase of roses next to a window",
    "a busy market street with people and colorful stalls",
    "a photo of a horse running on the beach",
    "an elephant walking through the jungle",
    "a steaming bowl of ramen with chopsticks",
    "a lighthouse on a rocky coast during a thunderstorm",
    "a knight in shining armor standing in front of a dragon",
    "a cozy library with leather armchairs and a fireplace",
]


def _train_merges(corpus):
    """Yield BPE merges learned from `corpus`, splitting words exactly as the tokenizer does.

    Classic BPE: start from byte characters (the last one of each word carries "</w>"), then repeatedly merge the
    most frequent adjacent pair (ties: the alphabetically smallest pair, so the result is reproducible). Stops when
    every word is a single symbol.
    """
    splitter = clip_pipeline({BOS: 0, EOS: 1}, [])
    words = Counter()
    for text in corpus:
        normalized = splitter.normalizer.normalize_str(text)
        for word, _ in splitter.pre_tokenizer.pre_tokenize_str(normalized):
            words[(*word[:-1], word[-1] + END_OF_WORD)] += 1
    yield from merge_steps(words)


def train_clip_vocab(corpus=None, vocab_size=1000):
    """Train a small BPE on `corpus` (a list of str; default DEMO_CORPUS) -> (vocab dict, merges list) in the CLIP
    layout: 256 byte characters, the same with "</w>", one entry per merge, <|startoftext|>, <|endoftext|>.

    The vocabulary has at most `vocab_size` entries (fewer when the corpus runs out of pairs to merge);
    <|endoftext|> is always the last id.
    """
    base = byte_alphabet()
    base = base + [char + END_OF_WORD for char in base]  # 512 single-byte tokens
    if vocab_size < len(base) + 2:
        raise ValueError(f"vocab_size must be at least {len(base) + 2} (512 byte tokens + 2 special), got {vocab_size}")
    corpus = DEMO_CORPUS if corpus is None else corpus
    if isinstance(corpus, str) or not all(isinstance(t, str) for t in corpus):
        raise TypeError(f"corpus must be a list of str, got {type(corpus).__name__}")

    merges, tokens, seen = [], list(base), set(base)
    for left, right in _train_merges(corpus):
        if len(tokens) == vocab_size - 2:
            break
        merges.append(f"{left} {right}")
        if left + right not in seen:  # two different merges can build the same string; it gets one entry
            tokens.append(left + right)
            seen.add(left + right)
    tokens += [BOS, EOS]
    return {token: i for i, token in enumerate(tokens)}, merges


def write_clip_vocab(folder, corpus=None, vocab_size=1000, max_length=77):
    """Train a small BPE (see `train_clip_vocab`) and write it as a CLIP tokenizer folder: vocab.json, merges.txt
    (with the "#version: 0.2" header), tokenizer_config.json and special_tokens_map.json, loadable by
    `CLIPTokenizer.from_folder` and by transformers' `CLIPTokenizer.from_pretrained`. Returns the vocabulary size.
    """
    vocab, merges = train_clip_vocab(corpus, vocab_size)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(["#version: 0.2", *merges]) + "\n")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    with open(os.path.join(folder, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special, f, indent=2)
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "do_lower_case": True, **special}
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return len(vocab)


def demo_tokenizer(max_length=77):
    """The tokenizer of the no-download demo model: a 1000-entry vocabulary trained on DEMO_CORPUS, in memory
    (the vocabulary of `CLIPTextConfig.tiny()`)."""
    vocab, merges = train_clip_vocab()
    return CLIPTokenizer(vocab, merges, max_length=max_length)


TINY_CORPUS = [
    "a cat sitting on a red couch next to a window.", "two dogs run across the green grass in the park.",
    "a man riding a bicycle down a city street.", "a bowl of fruit on a wooden kitchen table.",
    "a small boat floating on a calm blue lake.", "a woman holding an umbrella in the rain.",
    "the sun sets behind the mountains and the sky turns orange.", "a train crossing a bridge over a river.",
    "three birds sitting on a power line at dawn.", "a plate of pasta with tomato sauce and basil.",
    "children playing football on a sandy beach.", "an old church with a tall stone tower.",
    "a yellow taxi waiting at a traffic light.", "a painting of a horse standing in a field of flowers.",
    "A Person Walks Their Dog, Isn't It Lovely? Yes!", "snow covers the roofs of the quiet village at night.",
]
TINY_BERT_VOCAB = 160  # word pieces in the tiny vocab.txt
TINY_GPT2_VOCAB = 320  # tokens in the tiny vocab.json: 256 bytes, 63 merges, <|endoftext|>


def write_tiny_vocabs(folder):
    """Train tiny stand-ins for bert-base-cased vocab.txt and GPT-2 vocab.json / merges.txt on TINY_CORPUS."""
    os.makedirs(folder, exist_ok=True)
    # WordPiece vocab built by counting (the tokenizers trainer breaks ties differently from run to run):
    # special tokens, every character alone and as a "##" continuation, the most frequent words, [unused] padding
    split = pre_tokenizers.BertPreTokenizer().pre_tokenize_str
    words = Counter(word for line in TINY_CORPUS for word, _ in split(line.lower()))
    chars = sorted({c for word in words for c in word})
    bert_vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *("##" + c for c in chars)]
    ranked = [w for w, _ in sorted(words.items(), key=lambda item: (-item[1], item[0])) if len(w) > 1]
    bert_vocab += ranked[: TINY_BERT_VOCAB - len(bert_vocab)]
    bert_vocab += [f"[unused{i}]" for i in range(TINY_BERT_VOCAB - len(bert_vocab))]  # as BERT's own vocab has
    bert = Tokenizer(models.WordPiece({token: i for i, token in enumerate(bert_vocab)}, unk_token="[UNK]"))
    gpt2 = Tokenizer(models.BPE())
    gpt2.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    gpt2.train_from_iterator(TINY_CORPUS, trainers.BpeTrainer(
        vocab_size=TINY_GPT2_VOCAB - 1, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    gpt2_vocab = gpt2.get_vocab()
    gpt2_vocab["<|endoftext|>"] = len(gpt2_vocab)  # last, as in GPT-2's vocab.json (id 50256)
    sizes = bert.get_vocab_size(), len(gpt2_vocab)
    if sizes != (TINY_BERT_VOCAB, TINY_GPT2_VOCAB):
        raise RuntimeError(f"tiny vocab sizes {sizes} differ from {(TINY_BERT_VOCAB, TINY_GPT2_VOCAB)}")
    bert.model.save(folder)  # vocab.txt
    gpt2.model.save(folder)  # merges.txt (and a vocab.json, rewritten below)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(dict(sorted(gpt2_vocab.items(), key=lambda item: item[1])), f, ensure_ascii=False)
    return {name: os.path.join(folder, name) for name in ("vocab.txt", "vocab.json", "merges.txt")}
