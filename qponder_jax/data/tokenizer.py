"""The demo tokenizer: a small byte-level BPE with Qwen2's pre-tokenizer, special tokens and chat template.

`build_demo_tokenizer(out_dir)` trains it offline and deterministically (same bytes every time) on an embedded
corpus of image-quality text, and writes a folder that `Processor.from_pretrained` and
`transformers.AutoTokenizer.from_pretrained` both load: tokenizer.json, tokenizer_config.json (with the chat
template), special_tokens_map.json and a preprocessor_config.json with small pixel limits.

Pipeline, as Qwen2's tokenizer.json: NFC normalizer; the Qwen2 split regex (each digit its own piece); byte-level
mapping with no prefix space; BPE without unk/byte fallback; byte-level decoder. The 22 Qwen2.5 added tokens
follow the learned vocabulary, in Qwen's order.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from qponder_jax import prompts
from qponder_jax.data.image import ImageConfig

QWEN2_SPLIT_REGEX = (  # contractions | letters with one leading non-letter | one digit | punctuation | spaces
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# Qwen2.5's added tokens in id order; the first 14 are special (skipped by decode(skip_special_tokens=True)).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
EXTRA_TOKENS = (
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Equivalent to Qwen2.5-VL-Instruct's chat template (same output for the same messages and flags).
CHAT_TEMPLATE = r"""{%- set image_count = namespace(value=0) -%}
{%- set video_count = namespace(value=0) -%}
{%- for message in messages -%}
    {%- if loop.first and message['role'] != 'system' -%}
        {{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' -}}
    {%- endif -%}
    {{- '<|im_start|>' + message['role'] + '\n' -}}
    {%- if message['content'] is string -%}
        {{- message['content'] + '<|im_end|>\n' -}}
    {%- else -%}
        {%- for content in message['content'] -%}
            {%- if content['type'] == 'image' or 'image' in content or 'image_url' in content -%}
                {%- set image_count.value = image_count.value + 1 -%}
                {%- if add_vision_id -%}{{- 'Picture ' + image_count.value | string + ': ' -}}{%- endif -%}
                {{- '<|vision_start|><|image_pad|><|vision_end|>' -}}
            {%- elif content['type'] == 'video' or 'video' in content -%}
                {%- set video_count.value = video_count.value + 1 -%}
                {%- if add_vision_id -%}{{- 'Video ' + video_count.value | string + ': ' -}}{%- endif -%}
                {{- '<|vision_start|><|video_pad|><|vision_end|>' -}}
            {%- elif 'text' in content -%}
                {{- content['text'] -}}
            {%- endif -%}
        {%- endfor -%}
        {{- '<|im_end|>\n' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' -}}
{%- endif -%}
"""

DEMO_VOCAB_SIZE = 1024  # learned tokens + the 22 added tokens
# Demo images become 4..16 merged tokens (56x56 .. 112x112 pixels).
DEMO_IMAGE_CONFIG = ImageConfig(min_pixels=56 * 56, max_pixels=112 * 112)

_SUBJECTS = (
    "a city street at night",
    "a portrait of a smiling woman",
    "a dog running on the grass",
    "a bowl of fruit on a wooden table",
    "mountains under a cloudy sky",
    "a red car parked near a building",
    "children playing on the beach",
    "a close-up of a flower",
    "a crowded market",
    "a cat sleeping on a sofa",
    "an old church with tall windows",
    "a plate of food in a restaurant",
)
_DISTORTIONS = (
    "gaussian blur",
    "lens blur",
    "motion blur",
    "color diffusion",
    "color shift",
    "color quantization",
    "color saturation",
    "JPEG2000 compression",
    "JPEG compression",
    "white noise",
    "white noise in the color components",
    "impulse noise",
    "multiplicative noise",
    "denoising artifacts",
    "over-brightening",
    "darkening",
    "mean shift",
    "jitter",
    "non-eccentricity patches",
    "pixelation",
    "quantization",
    "color blocks",
    "over-sharpening",
    "contrast change",
    "ringing",
    "banding",
    "chromatic aberration",
    "overexposure",
    "underexposure",
)
_ASPECTS = {
    "sharpness": ("the edges are crisp and fine details are clear", "the details are soft and slightly blurry"),
    "noise": ("there is almost no visible noise", "grain and noise are visible in the flat regions"),
    "exposure": ("the exposure is well balanced", "the highlights are clipped and the shadows are too dark"),
    "color": ("the colors are natural and vivid", "the colors look washed out with a slight cast"),
    "composition": ("the subject is well framed", "the framing is awkward and the horizon is tilted"),
    "artifacts": ("no compression artifacts are visible", "blocking and ringing artifacts are noticeable"),
}
_VOCABULARY = [
    "Quality words: blurry, sharp, crisp, noisy, grainy, vivid, dull, faded, saturated, desaturated, overexposed, "
    "underexposed, bright, dark, contrast, texture, detail, clarity, distortion, artifact, aliasing, moire, halo, "
    "resolution, focus, bokeh, lighting, shadow, highlight, dynamic range, white balance, tone, hue, aesthetic, "
    "pleasing, natural, unnatural, realistic, smooth, rough, clean, cluttered, balanced, harsh, soft, muddy.",
    "Scores: 1 2 3 4 5 6 7 8 9 0 1.5 2.5 3.5 4.5 0.25 0.75 MOS, DMOS, SRCC, PLCC, KRCC, KonIQ, SPAQ, KADID, PIPAL.",
]


def demo_corpus() -> list[str]:
    """The embedded training text: the prompts, chat-template words and synthetic IQA reasoning."""
    lines = [prompts.PROMPTS[name] for name in sorted(prompts.PROMPTS) if name != "teacher"]
    lines += [prompts.THINK_ANSWER_INSTRUCTION] + [f"system\n{DEFAULT_SYSTEM_PROMPT}\nuser\nassistant\n"] * 64
    lines += [prompts.prompt_text("teacher", mos=1.0 + 0.37 * i) for i in range(12)]
    aspect_names = list(_ASPECTS)
    for i, (subject, distortion) in enumerate(itertools.product(_SUBJECTS, _DISTORTIONS)):
        score = 1.0 + (i * 37 % 401) / 100.0  # 1.00 .. 5.00, deterministic
        level = prompts.level_of_score(score)
        good = score >= 3.0
        parts = [f"The image shows {subject}."]
        for j in range(3):
            aspect = aspect_names[(i + 2 * j) % len(aspect_names)]
            parts.append(f"For {aspect}, {_ASPECTS[aspect][0 if good else 1]}.")
        parts.append(f"The main distortion is {distortion}, which {'barely' if good else 'strongly'} affects it.")
        parts.append(f"Overall, the quality is {level}.")
        lines.append(f"<think>{' '.join(parts)}</think> <answer>{score:.2f}</answer>")
        lines.append(f"<think>\n{parts[0]} Its quality level is {level}.\n</think>\n<answer>{score:.1f}</answer>")
    lines += _VOCABULARY
    lines.append("Ratings: saturation 3.25; granularity 2.75; sharpness 4.10; foreground 3.90; background 2.60.")
    return lines


def _base_tokenizer() -> Tokenizer:
    """An untrained BPE tokenizer with Qwen2's normalizer, pre-tokenizer and decoder."""
    tok = Tokenizer(models.BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    return tok


def train_demo_tokenizer(vocab_size: int = DEMO_VOCAB_SIZE) -> Tokenizer:
    """Trains the demo BPE on the embedded corpus; exactly `vocab_size` tokens including the 22 added ones."""
    n_added = len(SPECIAL_TOKENS) + len(EXTRA_TOKENS)
    learned = vocab_size - n_added
    if learned < 256:
        raise ValueError(f"vocab_size={vocab_size} leaves {learned} < 256 learned tokens (the byte alphabet)")
    tok = _base_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=learned,
        min_frequency=0,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(demo_corpus(), trainer=trainer)
    if tok.get_vocab_size() != learned:
        raise RuntimeError(f"demo corpus yields {tok.get_vocab_size()} BPE tokens, fewer than the {learned} asked")
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in EXTRA_TOKENS])
    return tok


def _tokenizer_config(tok: Tokenizer) -> dict[str, Any]:
    added = {}
    for token in SPECIAL_TOKENS + EXTRA_TOKENS:
        added[str(tok.token_to_id(token))] = {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": token in SPECIAL_TOKENS,
        }
    return {
        "tokenizer_class": "Qwen2Tokenizer",
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": list(SPECIAL_TOKENS[1:]),
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "model_max_length": 32768,
        "chat_template": CHAT_TEMPLATE,
    }


def build_demo_tokenizer(out_dir: str | Path, vocab_size: int = DEMO_VOCAB_SIZE) -> Path:
    """Writes the demo tokenizer + preprocessor folder to `out_dir` (byte-identical on every call)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_demo_tokenizer(vocab_size)
    tok_json = json.loads(tok.to_str())
    _write_json(out / "tokenizer.json", tok_json)
    _write_json(out / "tokenizer_config.json", _tokenizer_config(tok))
    _write_json(
        out / "special_tokens_map.json",
        {
            "additional_special_tokens": list(SPECIAL_TOKENS[1:]),
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
        },
    )
    _write_json(out / "preprocessor_config.json", DEMO_IMAGE_CONFIG.to_dict())
    return out


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")


def special_token_ids(tokenizer) -> dict[str, int]:
    """The ids a model config must agree on, looked up in any Qwen-style tokenizer (transformers or `tokenizers`).

    Keys: image_token_id, video_token_id, vision_start_token_id, vision_end_token_id (the Qwen25VLConfig field
    names), im_start_id, im_end_id (the end-of-turn / eos id), endoftext_id (the pad id) and vocab_size.
    """
    lookup = tokenizer.token_to_id if isinstance(tokenizer, Tokenizer) else tokenizer.convert_tokens_to_ids
    names = {
        "image_token_id": "<|image_pad|>",
        "video_token_id": "<|video_pad|>",
        "vision_start_token_id": "<|vision_start|>",
        "vision_end_token_id": "<|vision_end|>",
        "im_start_id": "<|im_start|>",
        "im_end_id": "<|im_end|>",
        "endoftext_id": "<|endoftext|>",
    }
    ids = {}
    for key, token in names.items():
        value = lookup(token)
        unk = getattr(tokenizer, "unk_token_id", None)
        if value is None or (unk is not None and value == unk):
            raise ValueError(f"tokenizer has no {token} token (needed for {key})")
        ids[key] = int(value)
    ids["vocab_size"] = tokenizer.get_vocab_size() if isinstance(tokenizer, Tokenizer) else len(tokenizer)
    return ids
