"""`Processor`: chat messages + PIL images + video clips -> token ids, loss mask, M-RoPE positions, patches;
bucketed collate.

    proc = Processor.from_pretrained(path)                   # tokenizer, chat template, preprocessor configs
    ex = proc.encode(messages, images, add_generation_prompt=False, videos=[clip])   # one unpadded `Example`
    batch = proc.collate([ex, ...], padding_side="right")    # a `Batch` padded to bucket sizes

Tokens: the chat template renders the messages (one `<|image_pad|>` per image, one `<|video_pad|>` per video), the
tokenizer encodes the text, and each placeholder is repeated to its merged patch count `t * h * w / merge**2`,
exactly what transformers' Qwen2.5-VL processor produces. Videos get M-RoPE temporal positions spaced by
`tokens_per_second * second_per_grid_t`. Images and videos share the vision slots of a sample: their patch rows,
grids and features are in order of appearance in the text.

Loss mask rule: a token is a training target iff its characters overlap an assistant span and it is not a vision
token (the overlap rule of transformers' `return_assistant_tokens_mask`). The span of assistant message k runs
from the end of the rendering of `messages[:k]` + generation prompt (just after `<|im_start|>assistant\\n`) to
the end of the last `<|im_end|>` in the rendering of `messages[:k+1]`: the assistant content and its closing
`<|im_end|>`, not the header and not the newline after `<|im_end|>`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qponder_jax.data.batch import Batch
from qponder_jax.data.example import Buckets, Example
from qponder_jax.data.image import ImageConfig, preprocess_image
from qponder_jax.data.mrope import rope_index
from qponder_jax.data.video import VideoClip
from qponder_jax.data.video_frames import VideoConfig, preprocess_video
from qponder_jax.model.vision_layout import sample_layout

IMAGE_TOKEN, VIDEO_TOKEN = "<|image_pad|>", "<|video_pad|>"
VISION_START, VISION_END, END_OF_TURN = "<|vision_start|>", "<|vision_end|>", "<|im_end|>"
VISION_KEYS = ("window_index", "window_segment_ids", "full_segment_ids")  # [B, P] int32 Batch fields


class Processor:
    """Tokenizer + chat template + image processor + M-RoPE + bucketed collate for Qwen2.5-VL."""

    def __init__(
        self,
        tokenizer,
        image_config: ImageConfig | None = None,
        buckets: Buckets | None = None,
        *,
        window_size: int = 112,
        truncation: bool = False,
        video_config: VideoConfig | None = None,
        tokens_per_second: int = 2,
    ):
        self.tokenizer = tokenizer
        self.image_config = image_config or ImageConfig()
        self.video_config = video_config or VideoConfig()
        self.buckets = buckets or Buckets()
        self.window_size = window_size
        self.truncation = truncation  # cut too-long examples (never inside an image or video) instead of raising
        self.tokens_per_second = tokens_per_second  # M-RoPE temporal positions per second of video
        geometry = lambda c: (c.patch_size, c.temporal_patch_size, c.merge_size)
        if geometry(self.image_config) != geometry(self.video_config):
            raise ValueError(
                f"image and video processor configs disagree on (patch_size, temporal_patch_size, merge_size): "
                f"{geometry(self.image_config)} vs {geometry(self.video_config)}"
            )
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template (tokenizer_config.json or chat_template.jinja)")
        self.image_token_id = self._token_id(IMAGE_TOKEN, required=True)
        self.video_token_id = self._token_id(VIDEO_TOKEN, required=False)
        self.vision_start_token_id = self._token_id(VISION_START, required=True)
        self.vision_end_token_id = self._token_id(VISION_END, required=True)
        self.end_of_turn_id = self._token_id(END_OF_TURN, required=True)
        pad = tokenizer.pad_token_id
        self.pad_token_id = int(pad) if pad is not None else self._token_id("<|endoftext|>", required=True)
        self.vision_token_ids = tuple(i for i in (self.image_token_id, self.video_token_id) if i is not None)

    def _token_id(self, token: str, *, required: bool) -> int | None:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or (token_id == self.tokenizer.unk_token_id and self.tokenizer.unk_token != token):
            if required:
                raise ValueError(f"the tokenizer has no {token} token")
            return None
        return int(token_id)

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> Processor:
        """Loads tokenizer.json, the chat template, preprocessor_config.json and, if present, the video processor
        config (processor_config.json's "video_processor", else video_preprocessor_config.json; defaults otherwise,
        with the image config's patch geometry) and config.json (window size, tokens_per_second, token ids)."""
        from transformers import AutoTokenizer

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"no processor folder at {path}")
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        if not getattr(tokenizer, "chat_template", None):
            if (path / "chat_template.jinja").is_file():
                tokenizer.chat_template = (path / "chat_template.jinja").read_text(encoding="utf-8")
            elif (path / "chat_template.json").is_file():
                tokenizer.chat_template = _read_json(path / "chat_template.json").get("chat_template")
        pre_path = path / "preprocessor_config.json"
        if not pre_path.is_file():
            raise FileNotFoundError(f"no preprocessor_config.json in {path}")
        image_config = ImageConfig.from_dict(_read_json(pre_path), source=str(pre_path))
        kwargs.setdefault("video_config", _video_config(path, image_config))
        model_config = None
        if (path / "config.json").is_file():
            from qponder_jax.model.config import Qwen25VLConfig

            model_config = Qwen25VLConfig.from_json_file(path / "config.json")
            kwargs.setdefault("window_size", model_config.vision.window_size)
            kwargs.setdefault("tokens_per_second", model_config.vision.tokens_per_second)
            if (model_config.vision.patch_size, model_config.vision.spatial_merge_size) != (
                image_config.patch_size,
                image_config.merge_size,
            ):
                raise ValueError(f"{path}: config.json patch/merge sizes differ from preprocessor_config.json")
        proc = cls(tokenizer, image_config, **kwargs)
        for field in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
            if field == "video_token_id" and proc.video_token_id is None:
                continue
            if model_config is not None and getattr(model_config, field) != getattr(proc, field):
                raise ValueError(
                    f"{path}: config.json {field}={getattr(model_config, field)} but the tokenizer has "
                    f"{getattr(proc, field)}"
                )
        return proc

    # ---- encode ----
    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        """The chat template's text for `messages`."""
        return self.tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _assistant_spans(self, messages: Sequence[dict[str, Any]], text: str) -> list[tuple[int, int]]:
        """Character spans [start, end) of each assistant message's content + closing <|im_end|> in `text`."""
        spans = []
        for k, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            if k == 0:
                raise ValueError("messages[0] is an assistant message; a conversation must start with a prompt")
            before = self.render(messages[:k], add_generation_prompt=True)
            through = self.render(messages[: k + 1])
            if not (through.startswith(before) and text.startswith(through)):
                raise ValueError(
                    f"messages[{k}]: the chat template does not render conversation prefixes as text prefixes, "
                    "so the assistant tokens cannot be located"
                )
            end = through.rfind(END_OF_TURN)
            end = end + len(END_OF_TURN) if end >= len(before) else len(through.rstrip())
            spans.append((len(before), end))
        return spans

    def encode(
        self,
        messages: Sequence[dict[str, Any]],
        images: Sequence[Any] | None = None,
        add_generation_prompt: bool = False,
        *,
        videos: Sequence[VideoClip] | None = None,
        example_id: str = "",
    ) -> Example:
        """Encodes one conversation; `images` (PIL) and `videos` (`VideoClip`) fill the {"type": "image"} and
        {"type": "video"} entries in order."""
        images, videos = list(images or []), list(videos or [])
        where = f"example {example_id!r}: " if example_id else ""
        text = self.render(messages, add_generation_prompt)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], np.int32)  # [T0], one placeholder per image / video
        offsets = np.asarray(enc["offset_mapping"], np.int64).reshape(-1, 2)  # [T0, 2] character span of each token
        target = np.zeros(ids.shape, bool)
        for begin, end in self._assistant_spans(messages, text):
            target |= (offsets[:, 1] > begin) & (offsets[:, 0] < end)

        if videos and self.video_token_id is None:
            raise ValueError(f"{where}{len(videos)} videos given but the tokenizer has no {VIDEO_TOKEN} token")
        slots = np.flatnonzero(np.isin(ids, self.vision_token_ids))  # [N + V] placeholder of each vision slot
        slot_is_video = np.isin(ids[slots], self.vision_token_ids[1:])  # [N + V], True at <|video_pad|>
        for name, given, held in (("image", images, ~slot_is_video), ("video", videos, slot_is_video)):
            if int(held.sum()) != len(given):
                raise ValueError(
                    f"{where}the messages hold {int(held.sum())} {name} placeholders but {len(given)} {name}s "
                    "were given"
                )
        patches, grids, seconds = [], [], []
        next_input = {False: iter(enumerate(images)), True: iter(enumerate(videos))}
        for is_video in slot_is_video.tolist():
            i, item = next(next_input[is_video])
            try:
                if is_video:
                    p, g, s = preprocess_video(item, self.video_config)
                    seconds.append(s)
                else:
                    p, g = preprocess_image(item, self.image_config)
            except (ValueError, TypeError, OSError) as e:
                raise ValueError(f"{where}{'video' if is_video else 'image'} {i}: {e}") from e
            patches.append(p)
            grids.append(g)
        grid_thw = np.asarray(grids, np.int32).reshape(-1, 3)  # [N + V, 3] in text order
        counts = (np.prod(grid_thw, axis=1) // self.image_config.merge_size**2).astype(np.int32)  # [N + V]
        repeats = np.ones(ids.shape, np.int64)
        repeats[slots] = counts
        input_ids = np.repeat(ids, repeats)  # [T]
        loss_mask = np.repeat(target, repeats) & ~np.isin(input_ids, self.vision_token_ids)
        second_per_grid_ts = np.asarray(seconds, np.float32)  # [V]
        position_ids, delta = rope_index(
            input_ids,
            image_token_id=self.image_token_id,
            image_grid_thw=grid_thw[~slot_is_video],
            video_token_id=self.video_token_id,
            video_grid_thw=grid_thw[slot_is_video],
            second_per_grid_ts=second_per_grid_ts,
            spatial_merge_size=self.image_config.merge_size,
            tokens_per_second=self.tokens_per_second,
        )
        pixel_values = (
            np.concatenate(patches) if patches else np.zeros((0, self.image_config.patch_dim), np.float32)
        )  # [n_patch, D_patch]
        return Example(
            input_ids, loss_mask, position_ids, delta, pixel_values, grid_thw, counts, slot_is_video,
            second_per_grid_ts, example_id,
        )  # fmt: skip

    def decode(self, token_ids, skip_special_tokens: bool = False) -> str | list[str]:
        """Text of a token id sequence (a list of texts for a 2-D array), for logging."""
        ids = np.asarray(token_ids)
        if ids.ndim == 2:
            return [self.decode(row, skip_special_tokens) for row in ids]
        return self.tokenizer.decode(ids.astype(np.int64).tolist(), skip_special_tokens=skip_special_tokens)

    # ---- collate ----
    def truncate(self, ex: Example, max_tokens: int) -> Example:
        """The first <= `max_tokens` tokens of `ex`, cut before any image or video (with its vision markers) it would
        split."""
        if len(ex) <= max_tokens:
            return ex
        cut = max_tokens
        counts = ex.vision_token_counts  # [N + V], text order
        pad_at = np.flatnonzero(np.isin(ex.input_ids, self.vision_token_ids))
        first = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        kept = 0  # vision slots kept
        for i, count in enumerate(counts.tolist()):
            start, end = int(pad_at[first[i]]), int(pad_at[first[i]]) + count
            if start > 0 and ex.input_ids[start - 1] == self.vision_start_token_id:
                start -= 1
            if end < len(ex) and ex.input_ids[end] == self.vision_end_token_id:
                end += 1
            if end <= cut:
                kept = i + 1
            elif start < cut:
                cut = start
        if cut == 0:
            raise ValueError(
                f"example {ex.example_id!r}: no tokens before its first image or video fit in {max_tokens}"
            )
        n_patch = int(np.prod(ex.vision_grid_thw[:kept], axis=1).sum()) if kept else 0
        positions = ex.position_ids[:, :cut]
        return dataclasses.replace(
            ex,
            input_ids=ex.input_ids[:cut],
            loss_mask=ex.loss_mask[:cut],
            position_ids=positions,
            rope_delta=int(positions.max()) + 1 - cut,
            pixel_values=ex.pixel_values[:n_patch],
            vision_grid_thw=ex.vision_grid_thw[:kept],
            vision_token_counts=ex.vision_token_counts[:kept],
            slot_is_video=ex.slot_is_video[:kept],
            second_per_grid_ts=ex.second_per_grid_ts[: int(ex.slot_is_video[:kept].sum())],
        )

    def _fit(self, ex: Example, index: int, buckets: Buckets) -> Example:
        max_tokens = max(buckets.tokens)
        if len(ex) <= max_tokens:
            return ex
        if self.truncation:
            return self.truncate(ex, max_tokens)
        raise ValueError(
            f"example {index} ({ex.example_id or 'no id'}) has {len(ex)} tokens, more than the largest token bucket "
            f"{max_tokens}; add a larger bucket or enable truncation"
        )

    def collate(
        self,
        examples: Sequence[Example],
        *,
        padding_side: str = "right",
        buckets: Buckets | None = None,
        batch_size: int | None = None,
    ) -> Batch:
        """Pads examples into a `Batch` of bucket sizes; rows past len(examples) up to `batch_size` are all padding.

        Right padding is for training; left padding (every prompt ending at index T-1) for generation. Images and
        videos share the vision slots: `image_grid_thw` [B, M, 3] and `image_feature_index` cover both, in text order.
        """
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        buckets = buckets or self.buckets
        if not examples:
            raise ValueError("collate needs at least one example")
        examples = [self._fit(ex, i, buckets) for i, ex in enumerate(examples)]
        size = batch_size or len(examples)
        if len(examples) > size:
            raise ValueError(f"{len(examples)} examples exceed batch_size={size}")
        merge = self.image_config.merge_size
        seq = self._pick(buckets, "tokens", [len(ex) for ex in examples], examples)
        rows = self._pick(buckets, "patches", [ex.num_patches for ex in examples], examples)
        slots = self._pick(buckets, "images", [len(ex.vision_grid_thw) for ex in examples], examples)
        if rows % merge**2:
            raise ValueError(f"patch bucket {rows} is not a multiple of merge_size**2 = {merge**2}")

        input_ids = np.full((size, seq), self.pad_token_id, np.int32)
        attention_mask = np.zeros((size, seq), bool)
        loss_mask = np.zeros((size, seq), bool)
        position_ids = np.zeros((3, size, seq), np.int32)
        rope_deltas = np.zeros(size, np.int32)
        image_feature_index = np.full((size, seq), -1, np.int32)
        pixel_values = np.zeros((size, rows, self.image_config.patch_dim), np.float32)
        image_grid_thw = np.zeros((size, slots, 3), np.int32)
        vision = {k: np.zeros((size, rows), np.int32) for k in VISION_KEYS}
        vision_pos_ids = np.zeros((size, rows, 2), np.int32)
        for b in range(size):
            ex = examples[b] if b < len(examples) else None
            grids = ex.vision_grid_thw if ex is not None else np.zeros((0, 3), np.int32)  # [N + V, 3] text order
            layout = sample_layout(
                grids,
                rows,
                spatial_merge_size=merge,
                window_size=self.window_size,
                patch_size=self.image_config.patch_size,
            )
            vision_pos_ids[b] = layout.vision_pos_ids
            for key, value in vision.items():
                value[b] = getattr(layout, key)
            if ex is None:
                continue
            n = len(ex)
            start = 0 if padding_side == "right" else seq - n
            span = slice(start, start + n)
            input_ids[b, span] = ex.input_ids
            attention_mask[b, span] = True
            loss_mask[b, span] = ex.loss_mask
            position_ids[:, b, span] = ex.position_ids
            rope_deltas[b] = ex.rope_delta
            pixel_values[b, : ex.num_patches] = ex.pixel_values
            image_grid_thw[b, : len(grids)] = grids
            pad_at = start + np.flatnonzero(np.isin(ex.input_ids, self.vision_token_ids))
            merged = np.concatenate(layout.merged_rows) if layout.merged_rows else np.zeros(0, np.int32)
            if merged.shape[0] != pad_at.shape[0]:
                raise ValueError(
                    f"example {b} ({ex.example_id or 'no id'}): {pad_at.shape[0]} vision tokens but its grids "
                    f"{grids.tolist()} give {merged.shape[0]} merged features"
                )
            image_feature_index[b, pad_at] = merged
        return Batch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            rope_deltas=rope_deltas,
            loss_mask=loss_mask,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            vision_pos_ids=vision_pos_ids,
            window_index=vision["window_index"],
            window_segment_ids=vision["window_segment_ids"],
            full_segment_ids=vision["full_segment_ids"],
            image_feature_index=image_feature_index,
        )

    @staticmethod
    def _pick(buckets: Buckets, axis: str, sizes: list[int], examples: Sequence[Example]) -> int:
        try:
            return buckets.pick(axis, max(sizes))
        except ValueError as e:
            worst = int(np.argmax(sizes))
            raise ValueError(f"example {worst} ({examples[worst].example_id or 'no id'}): {e}") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def _video_config(path: Path, image: ImageConfig) -> VideoConfig:
    """processor_config.json's "video_processor", else video_preprocessor_config.json, else the defaults with the
    image config's patch geometry."""
    nested = path / "processor_config.json"
    if nested.is_file() and (d := _read_json(nested).get("video_processor")) is not None:
        return VideoConfig.from_dict(d, source=f"{nested} video_processor")
    if (file := path / "video_preprocessor_config.json").is_file():
        return VideoConfig.from_dict(_read_json(file), source=str(file))
    return VideoConfig(
        patch_size=image.patch_size, temporal_patch_size=image.temporal_patch_size, merge_size=image.merge_size
    )
