"""Tiny byte-level BPE tokenizers trained inside the tests (nothing downloaded), and a generator of messy
model-like completions that exercises every corner of the answer parser."""

from __future__ import annotations

import functools

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

QWEN2_SPLIT = (  # Qwen2's pre-tokenizer: each digit its own piece
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ADDED = [  # not special: decode keeps them (byte-level mapped when they can be, raw UTF-8 otherwise)
    AddedToken("<tool_call>", special=False, normalized=False),
    AddedToken(" raw text é", special=False, normalized=False),
    AddedToken("<think>", special=False, normalized=False),
]
RUNS = ["..........", "----------", "          ", "__________", "<<<<<<", "goooood", "1111111111111111111111"]
ADDED += [AddedToken(run, special=False, normalized=False) for run in RUNS]  # long one-class runs (squeezed)

WORDS = ["the", "image", "quality", "is", "sharp", "noise", "blur", "color", "overall", "score", "rating", "so"]
LEVELS = ["bad", "poor", "fair", "good", "excellent"]
UNICODE = [
    "é",
    "ü",
    "ß",
    "中文",
    "質",
    "😀",
    "🙂",
    "Ω",
    "ñ",
    "İ",
    "ı",
    "٣",
    "１",
    "\u00a0",
    "\u3000",
    "\u0301",
    "\ufffd",
]
SPACES = [" ", "  ", "\n", "\n\n", "\t", " \n", "\u3000", "\xa0", "\x85", ""]
TAGS = ["<think>", "</think>", "<answer>", "</answer>"]
BROKEN_TAGS = [
    "<thin",
    "</thin",
    "think>",
    "<answe",
    "</answ",
    "answer>",
    "<ANSWER>",
    "< answer>",
    "</think >",
    "<<",
    ">",
]


def _number(rng: np.random.Generator) -> str:
    kind = rng.integers(12)
    if kind < 4:
        return f"{rng.uniform(0, 5.5):.{rng.integers(0, 4)}f}"
    if kind == 4:
        return "-" + f"{rng.uniform(0, 5):.2f}"
    forms = ["1.", ".5", "1.2.3", "--3", "3-4", "0.000", "007", "-0", "1..2", "2.-5", "1e5", "+4"]
    if kind < 10:
        return forms[rng.integers(len(forms))]
    digits = "".join(map(str, rng.integers(0, 10, size=rng.integers(5, 22))))
    cut = rng.integers(0, len(digits))
    return digits[:cut] + ("." if cut and rng.random() < 0.6 else "") + digits[cut:]


def _level(rng: np.random.Generator) -> str:
    word = LEVELS[rng.integers(5)]
    case = rng.integers(5)
    word = [word, word.upper(), word.capitalize(), "".join(c.upper() if rng.random() < 0.5 else c for c in word)][
        min(case, 3)
    ]
    if "i" in word and rng.random() < 0.2:
        word = word.replace("i", "İ" if rng.random() < 0.5 else "ı")
    glue = ["", "", "", "x", "_", "1", "é", "中", "-", ".", "(", "s"]
    return glue[rng.integers(len(glue))] + word + glue[rng.integers(len(glue))]


def _piece(rng: np.random.Generator) -> str:
    kind = rng.integers(10)
    if kind < 3:
        return WORDS[rng.integers(len(WORDS))]
    if kind < 5:
        return _level(rng)
    if kind < 7:
        return _number(rng)
    if kind == 7:
        return UNICODE[rng.integers(len(UNICODE))]
    if kind == 8:
        return BROKEN_TAGS[rng.integers(len(BROKEN_TAGS))]
    return TAGS[rng.integers(len(TAGS))]


def _text(rng: np.random.Generator, n: int) -> str:
    return "".join(_piece(rng) + SPACES[rng.integers(len(SPACES))] for _ in range(n))


def completion(rng: np.random.Generator) -> str:
    """A completion: mostly the think/answer template, with its parts dropped, doubled, nested or garbled."""
    if rng.random() < 0.1:
        return _text(rng, rng.integers(0, 30))
    ws = lambda: SPACES[rng.integers(len(SPACES))]
    parts = [ws(), "<think>", _text(rng, rng.integers(0, 12)), "</think>", ws(), "<answer>"]
    parts += [ws(), " ".join(_number(rng) for _ in range(rng.integers(0, 7))), _text(rng, rng.integers(0, 3))]
    parts += ["</answer>", ws()]
    if rng.random() < 0.3:
        parts.insert(rng.integers(len(parts) + 1), TAGS[rng.integers(4)])
    if rng.random() < 0.2:
        parts += ["<answer>", _number(rng), "</answer>" if rng.random() < 0.5 else ""]
    if rng.random() < 0.15:
        del parts[rng.integers(len(parts))]
    if rng.random() < 0.15:
        parts.insert(rng.integers(len(parts) + 1), _text(rng, 2))
    return "".join(parts)


def corpus(seed: int, n: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [completion(rng) for _ in range(n)]


def train_bpe(texts: list[str], vocab_size: int, *, split: str) -> PreTrainedTokenizerFast:
    """Byte-level BPE. split="none": merges may cross any character (tag fragments, "3.5", "</answer>\\n");
    split="qwen2": Qwen2's pre-tokenizer (each digit its own piece)."""
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if split == "none":
        tok.pre_tokenizer = byte_level
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), "isolated"), byte_level])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=SPECIAL,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.add_tokens(ADDED)
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False)


@functools.cache
def many_merges() -> PreTrainedTokenizerFast:
    """~3000 tokens, merges across tags, numbers and words."""
    return train_bpe(corpus(1, 3000), 3000, split="none")


@functools.cache
def few_merges() -> PreTrainedTokenizerFast:
    """~320 tokens with Qwen2's split: mostly single bytes."""
    return train_bpe(corpus(2, 500), 320, split="qwen2")


def synthetic_vocab(size: int = 150_000, seed: int = 0) -> PreTrainedTokenizerFast:
    """A Qwen-sized byte-level BPE vocabulary of random byte strings (2-128 bytes), for table-size checks."""
    rng = np.random.default_rng(seed)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    pool = np.asarray(sorted(alphabet))
    for ch in "Ġ=-_.*#/Ċ":  # Qwen's longest tokens are runs like these
        for n in (2, 4, 8, 16, 32, 64, 128):
            vocab.setdefault(ch * n, len(vocab))
    while len(vocab) < size:
        n = 128 if rng.random() < 1e-3 else min(int(rng.geometric(0.2)) + 1, 128)
        vocab.setdefault("".join(pool[rng.integers(0, len(pool), size=n)]), len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL)
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False)
