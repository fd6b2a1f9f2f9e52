"""The demo tokenizer: determinism, Qwen2 pre-tokenization, special tokens, transformers loading, chat template."""

import hashlib
import subprocess
import sys

import pytest
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from qponder_jax import prompts
from qponder_jax.data.tokenizer import (
    CHAT_TEMPLATE,
    EXTRA_TOKENS,
    SPECIAL_TOKENS,
    build_demo_tokenizer,
    special_token_ids,
)

# Qwen2.5-VL-Instruct's chat template (tokenizer_config.json / chat_template.json), the reference for ours.
QWEN25_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)

TEXTS = [
    "<think>The image is sharp, with mild noise in the sky. Overall, the quality is good.</think><answer>3.87</answer>",
    "Café, naïve, Ångström, 日本語の画像, emoji 😀📷, tabs\tand\nnewlines\n\n  spaces  ",
    "Ratings: saturation 3.25; granularity 2.75; sharpness 4.10; foreground 3.90; background 2.60.",
    "Score 12345.6789 -0.5 1e-3 x²",
]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return build_demo_tokenizer(tmp_path_factory.mktemp("demo_tok"))


@pytest.fixture(scope="module")
def hf_tok(demo_dir):
    return AutoTokenizer.from_pretrained(str(demo_dir))


def _digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_build_is_deterministic_across_processes(demo_dir, tmp_path):
    again = build_demo_tokenizer(tmp_path / "again")
    assert _digests(again) == _digests(demo_dir)
    # a fresh interpreter (new hash seeds in Rust and Python) writes the same bytes too
    code = f"from qponder_jax.data.tokenizer import build_demo_tokenizer; build_demo_tokenizer({str(tmp_path / 'p')!r})"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert _digests(tmp_path / "p") == _digests(demo_dir)
    assert set(_digests(demo_dir)) == {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "preprocessor_config.json",
    }


def test_vocab_layout_and_special_ids(demo_dir, hf_tok):
    assert len(hf_tok) == 1024
    added = SPECIAL_TOKENS + EXTRA_TOKENS
    first = 1024 - len(added)
    assert [hf_tok.convert_tokens_to_ids(t) for t in added] == list(range(first, 1024))  # Qwen's order, at the end
    ids = special_token_ids(hf_tok)
    assert ids == special_token_ids(Tokenizer.from_file(str(demo_dir / "tokenizer.json")))
    assert ids["image_token_id"] == hf_tok.convert_tokens_to_ids("<|image_pad|>") == first + 12
    assert ids["vision_start_token_id"] == first + 9 and ids["vision_end_token_id"] == first + 10
    assert ids["vocab_size"] == 1024
    assert hf_tok.eos_token == "<|im_end|>" and hf_tok.pad_token == "<|endoftext|>" and hf_tok.bos_token is None
    assert hf_tok.pad_token_id == ids["endoftext_id"]


def test_special_tokens_are_single_tokens(hf_tok):
    for token in SPECIAL_TOKENS + EXTRA_TOKENS:
        text = f"good{token}bad"
        ids = hf_tok(text, add_special_tokens=False)["input_ids"]
        assert hf_tok.convert_tokens_to_ids(token) in ids
        assert hf_tok.decode(ids) == text
    # special tokens are dropped by skip_special_tokens; the tool/fim extras are not special (as in Qwen2.5)
    ids = hf_tok("<|im_start|>a<|image_pad|><tool_call>", add_special_tokens=False)["input_ids"]
    assert hf_tok.decode(ids, skip_special_tokens=True) == "a<tool_call>"


def test_digits_are_single_tokens(hf_tok):
    text = "MOS 4.25 and 1234567890 and 3.14159"
    ids = hf_tok(text, add_special_tokens=False)["input_ids"]
    pieces = [hf_tok.decode([i]) for i in ids]
    for piece in pieces:
        assert not any(c.isdigit() for c in piece) or len(piece.strip()) == 1, pieces
    assert sum(p.isdigit() for p in pieces) == sum(c.isdigit() for c in text)


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_and_same_as_tokenizers(demo_dir, hf_tok, text):
    ids = hf_tok(text, add_special_tokens=False)["input_ids"]
    assert hf_tok.decode(ids) == text
    raw = Tokenizer.from_file(str(demo_dir / "tokenizer.json"))
    assert raw.encode(text, add_special_tokens=False).ids == ids


def test_vocab_is_trained_on_iqa_text(hf_tok):
    # frequent IQA words of the embedded corpus are whole tokens, so demo sequences stay short
    for word in [" quality", " image", " sharpness", "<answer", "think", " excellent"]:
        assert len(hf_tok(word, add_special_tokens=False)["input_ids"]) == 1, word
    assert len(hf_tok(prompts.PROMPTS["qponder"], add_special_tokens=False)["input_ids"]) < 150


CONVERSATIONS = [
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Rate this."}]}],
    [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "plain string"},
        {"role": "assistant", "content": "<think>ok</think><answer>3</answer>"},
    ],
    [
        {"role": "system", "content": [{"type": "text", "text": "Sys."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A is better."}]},
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "And this?"}]},
    ],
    [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}, {"image": "y"}, {"type": "text"}]}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("add_vision_id", [False, True])
def test_chat_template_matches_qwen25_vl(hf_tok, messages, add_generation_prompt, add_vision_id):
    assert hf_tok.chat_template == CHAT_TEMPLATE
    kwargs = dict(tokenize=False, add_generation_prompt=add_generation_prompt, add_vision_id=add_vision_id)
    ours = hf_tok.apply_chat_template(messages, **kwargs)
    reference = hf_tok.apply_chat_template(messages, chat_template=QWEN25_VL_TEMPLATE, **kwargs)
    assert ours == reference
    if messages[0]["role"] != "system":
        assert ours.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")


def test_special_token_ids_errors_on_foreign_tokenizer():
    from tokenizers import models

    with pytest.raises(ValueError, match="image_pad"):
        special_token_ids(Tokenizer(models.BPE()))
