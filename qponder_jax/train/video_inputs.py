"""Video records in the jobs: decode and sample them as `data.video` says, encode them as video prompts, skip the
undecodable ones, and build the synthetic VQA set when a tiny run needs it.

A VQA record (`data/datasets/videos.py`) names a video file; its pixels are read here, on the host:

    sampling = sampling_from(config.data)                            # data.video -> VideoSampling
    clip, crops = load_video_inputs(record["video_path"], sampling)  # [F, h, w, 3] clip + key-frame crops
    ex = encode_video_prompt(proc, text, clip, crops, example_id=record["video_name"])
    # one video slot (F / 2 * h * w / 4 <|video_pad|> tokens) then one image slot per crop, then the text

GRPO reads its prompts through `DecodedVideos`, a source wrapper that decodes each record and puts a decodable
neighbour in place of an undecodable video (logged with its path and counted), so a corrupt file never stops a run
and every batch keeps its size. The eval job decodes record by record and lists the videos it skipped instead.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from qponder_jax import prompts
from qponder_jax.data.video import VideoClip, VideoError, VideoSampling, load_video_inputs
from qponder_jax.errors import ConfigError

log = logging.getLogger(__name__)

SKIP_FILE = "skipped_videos.jsonl"  # under the GRPO workdir: one JSON line per skipped video


def is_video_record(record: Mapping) -> bool:
    """Whether `record` is a VQA record (a video path) rather than an IQA record (image bytes)."""
    return "video_path" in record


def record_name(record: Mapping) -> str:
    """The record's name for messages and predictions: its video or image name."""
    return str(record.get("video_name") or record.get("image_name") or "")


def sampling_from(data: Mapping) -> VideoSampling:
    """The `VideoSampling` of a config's data section: its `video` section, else the defaults (uniform, 2 fps)."""
    section = data.get("video") if hasattr(data, "get") else None
    try:
        return VideoSampling() if section is None else VideoSampling.from_config(section)
    except ValueError as e:
        raise ConfigError(f"config section data.video: {e}") from e


def encode_video_prompt(processor, text: str, clip: VideoClip, crops, *, example_id: str = ""):
    """The generation prompt of one video: the clip, then its key-frame crops ([c, c, 3] uint8) as images, then
    `text` (`Processor.encode` with add_generation_prompt=True)."""
    images = [Image.fromarray(np.asarray(c, np.uint8)) for c in crops]
    messages = prompts.video_messages(text, num_images=len(images))
    return processor.encode(messages, images, add_generation_prompt=True, videos=[clip], example_id=example_id)


def encode_record(processor, text: str, record: Mapping, sampling: VideoSampling | None = None):
    """`encode_video_prompt` of a VQA record: its decoded inputs (`DecodedVideos` puts them under "video_inputs"),
    else the video decoded now with `sampling` (VideoError when it cannot be)."""
    inputs = record.get("video_inputs")
    if inputs is None:
        if sampling is None:
            raise ValueError(
                f"video record {record_name(record)!r} has no decoded inputs: read it through "
                "train.video_inputs.DecodedVideos, or pass the VideoSampling to decode it with"
            )
        inputs = load_video_inputs(record["video_path"], sampling)
    clip, crops = inputs
    return encode_video_prompt(processor, text, clip, crops, example_id=record_name(record))


class DecodedVideos:
    """Random access over VQA records, each with its decoded, sampled `video_inputs` = (clip, crops).

    An undecodable video (VideoError) is skipped: logged with its path, counted (`skipped` in this process, and one
    JSON line in `skip_file` when given, appended by every worker process) and the next record (index + 1, + 2, ...
    cyclically) takes its place. So every index yields a record, batches keep their size, and the batch sequence
    is still a pure function of the index (resumable). More than `max_skips` undecodable videos in a row raise.
    """

    def __init__(
        self,
        source,
        sampling: VideoSampling,
        *,
        skip_file: str | os.PathLike | None = None,
        max_skips: int = 16,
        where: str = "",
    ):
        self.source, self.sampling, self.max_skips, self.where = source, sampling, int(max_skips), where
        self.skip_file = None if skip_file is None else str(skip_file)
        self.skipped: list[str] = []  # paths skipped by this process, in order (repeats when met again)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self.source)
        errors = []
        for offset in range(min(self.max_skips + 1, n)):
            record = dict(self.source[(int(index) + offset) % n])
            try:
                record["video_inputs"] = load_video_inputs(record["video_path"], self.sampling)
            except VideoError as e:
                self._skip(record, e)
                errors.append(str(e))
                continue
            record["videos_skipped"] = offset  # undecodable videos passed over to reach this one
            return record
        raise VideoError(
            self.source[int(index) % n]["video_path"],
            f"{self.where or 'video source'}: {len(errors)} undecodable videos in a row from record {index}; "
            f"last: {errors[-1]}",
        )

    def _skip(self, record: Mapping, error: VideoError) -> None:
        self.skipped.append(error.path)
        log.warning(
            "%s: skipping undecodable video %s (record %r): %s (%d skipped so far in this process)",
            self.where or "videos", error.path, record_name(record), error.reason, len(self.skipped),
        )  # fmt: skip
        if self.skip_file is not None:
            line = {"path": error.path, "name": record_name(record), "reason": error.reason, "where": self.where}
            with open(self.skip_file, "a", encoding="utf-8") as f:  # one short append: atomic across workers
                f.write(json.dumps(line) + "\n")

    def __getstate__(self):
        return {**self.__dict__, "skipped": []}  # a worker process counts its own skips


def read_skipped(path: str | os.PathLike) -> list[dict]:
    """The lines of a skip file (empty when no video was skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def skip_file_path(workdir: str | os.PathLike) -> Path:
    """This process's skip file under `workdir` (`skipped_videos.jsonl`, or `skipped_videos.<p>.jsonl` on process p
    of a multi-process run)."""
    import jax

    name = SKIP_FILE if jax.process_count() == 1 else SKIP_FILE.replace(".jsonl", f".{jax.process_index()}.jsonl")
    return Path(workdir) / name


def open_training_source(spec: str, data: Mapping, workdir: str | os.PathLike):
    """The GRPO source of "name:split": `sources.open_source`'s, with VQA records decoded by `DecodedVideos` (skips
    logged to this process's skip file under `workdir`)."""
    from qponder_jax.data.datasets import VIDEO_DATASETS
    from qponder_jax.data.sources import open_source

    source = open_source(spec, data, workdir=workdir)
    if spec.partition(":")[0] not in VIDEO_DATASETS:
        return source
    return DecodedVideos(source, sampling_from(data), skip_file=skip_file_path(workdir), where=spec)
