"""Cold-start (distilled reasoning) records: a JSONL writer, a validating reader and a random-access source.

One JSON object per line:
    {"image": "imgs/a.png", "prompt": "...", "response": "<think>...</think><answer>3.2</answer>",
     "mos": 3.41, "dataset": "koniq10k", "distortion_type": "", "distortion_level": -1, "teacher_score": 3.3}
`image` is relative to the JSONL file's folder, or absolute. `mos` is the normalized MOS (1-5).
`dataset`, `distortion_type`, `distortion_level` and `teacher_score` are optional.

The reader checks every line up front: a line that is not UTF-8 or not JSON, a missing or mistyped field, or a NaN
or out-of-range MOS raise DataError (a ValueError) naming the file and line (and the column, for JSON). A record
whose response is empty or not `<think>...</think><answer>...</answer>` (the format the rewards score) would teach
the student the wrong format: it is skipped and counted like a missing or unreadable image, or raises with
`strict=True` (DataError for a response, ImageError for an image). A file whose every record is skipped raises
DataError; otherwise the skipped total is logged once at the end.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path

from PIL import Image

from qponder_jax.data.datasets.common import SkipLog
from qponder_jax.errors import DataError

log = logging.getLogger(__name__)

_NUMBER = (int, float)
RESPONSE_PATTERN = r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*"  # = rewards.parse.FORMAT_PATTERN (re.S)


@dataclasses.dataclass(frozen=True)
class ColdStartRecord:
    image: str  # image path: relative to the JSONL file's folder, or absolute
    prompt: str  # the user prompt (text after the image)
    response: str  # the teacher's answer: reasoning and score
    mos: float  # normalized MOS, 1-5
    dataset: str = ""
    distortion_type: str = ""
    distortion_level: int = -1
    teacher_score: float | None = None  # the score parsed from the teacher's response, if any


_REQUIRED = {"image": str, "prompt": str, "response": str, "mos": _NUMBER}
_OPTIONAL = {"dataset": str, "distortion_type": str, "distortion_level": int, "teacher_score": _NUMBER}


def _parse_line(line: str, where: str, mos_range: tuple[float, float]) -> ColdStartRecord:
    try:
        obj = json.loads(line.rstrip())  # without the newline, an error at the end of the line keeps its column
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    fields = {}
    for key, kind in {**_REQUIRED, **_OPTIONAL}.items():
        if key not in obj or (key == "teacher_score" and obj[key] is None):
            if key in _REQUIRED:
                raise DataError(f"{where}: missing field {key!r}")
            continue
        value = obj[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise DataError(f"{where}: field {key!r} must be {_kind_name(kind)}, got {type(value).__name__}")
        fields[key] = value
    if not fields["image"]:
        raise DataError(f"{where}: field 'image' is empty")
    mos = float(fields["mos"])
    lo, hi = mos_range
    if math.isnan(mos) or not lo <= mos <= hi:
        raise DataError(f"{where}: mos {mos} is NaN or outside [{lo}, {hi}]")
    if "teacher_score" in fields and not math.isfinite(fields["teacher_score"]):
        raise DataError(f"{where}: teacher_score {fields['teacher_score']} is not finite")
    return ColdStartRecord(**fields)


def _response_problem(response: str) -> str | None:
    """None if the response has the trained format, else what is wrong with it."""
    if not response.strip():
        return "empty response" if not response else "response is only whitespace"
    if not re.fullmatch(RESPONSE_PATTERN, response, re.S):
        return "response is not <think>...</think><answer>...</answer>"
    return None


def _kind_name(kind) -> str:
    return "a number" if kind is _NUMBER else ("a string" if kind is str else "an integer")


def _check_image(path: Path, verify: str) -> str | None:
    """None if the image is usable, else the reason it is not."""
    if not path.is_file():
        return "missing image file"
    if verify == "none":
        return None
    try:
        with Image.open(path) as image:
            if verify == "decode":
                image.load()
            else:
                image.verify()
    except Exception as e:  # Pillow raises many exception types for bad files
        return f"corrupt image ({type(e).__name__}: {e})"
    return None


class ColdStartSource:
    """Random-access cold-start records from a JSONL file, validated when constructed.

    `verify`: "header" (default) checks that each image opens and its structure is sound (Pillow
    `verify`, cheap), "decode" fully decodes every image (slow, catches truncated pixel data), "none"
    only checks that the file exists.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        strict: bool = False,
        verify: str = "header",
        mos_range: tuple[float, float] = (1.0, 5.0),
    ):
        if verify not in ("none", "header", "decode"):
            raise ValueError(f"verify must be 'none', 'header' or 'decode', got {verify!r}")
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"cold-start file not found: {self.path}")
        self.skip_log = SkipLog(f"cold_start({self.path})", strict)
        self.records: list[ColdStartRecord] = []
        self._image_paths: list[Path] = []
        total = 0
        with open(self.path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                where = f"{self.path}:{number}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{where}: not UTF-8 text (byte {raw[e.start : e.start + 1]!r} at column "
                                    f"{e.start + 1})") from None  # fmt: skip
                if not line.strip():
                    continue
                total += 1
                record = _parse_line(line, where, mos_range)
                problem = _response_problem(record.response)
                if problem is not None:
                    if strict:
                        raise DataError(f"{where}: {problem} (strict mode; without strict the record is skipped)")
                    self.skip_log.skip(where, problem)
                    continue
                image_path = self.path.parent / record.image  # an absolute `image` replaces the folder
                reason = _check_image(image_path, verify)
                if reason is not None:
                    self.skip_log.skip(image_path, f"{reason} (record {where})")
                    continue
                self.records.append(record)
                self._image_paths.append(image_path)
        if total and not self.records:
            first = self.skip_log.skipped[0]
            raise DataError(
                f"{self.path}: every one of its {total} records was skipped (first: {first['path']}: {first['reason']})"
            )
        if self.num_skipped:
            log.warning("%s: skipped %d of %d records (listed above)", self.path, self.num_skipped, total)

    @property
    def num_skipped(self) -> int:
        return self.skip_log.count

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        with open(self._image_paths[index], "rb") as f:
            data = f.read()
        score = record.teacher_score
        return {
            "image": data,  # the file's bytes; `decode_image` gives 8-bit RGB
            "image_name": record.image,
            "prompt": record.prompt,
            "response": record.response,
            "mos": float(record.mos),
            "mos_raw": float(record.mos),
            "dataset": record.dataset,
            "distortion_type": record.distortion_type,
            "distortion_level": record.distortion_level,
            "teacher_score": float("nan") if score is None else float(score),
        }

    def __getitems__(self, indices) -> list[dict]:
        return [self[i] for i in indices]


class ColdStartWriter:
    """Appends records to a JSONL file, one flushed line each (a crashed distillation run loses nothing).

    An image path is stored relative to the JSONL file's folder when the image lies inside that folder,
    else absolute; a relative `image` given to `write` is taken relative to the current directory.
    """

    def __init__(self, path: str | os.PathLike, *, append: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a" if append else "w", encoding="utf-8")  # noqa: SIM115
        self.count = 0

    def write(self, record: ColdStartRecord) -> None:
        image = Path(record.image).resolve()
        folder = self.path.parent.resolve()
        stored = image.relative_to(folder).as_posix() if image.is_relative_to(folder) else str(image)
        obj = {k: v for k, v in dataclasses.asdict(record).items() if v is not None}
        obj["image"] = stored
        self._file.write(json.dumps(obj, ensure_ascii=False, allow_nan=False) + "\n")
        self._file.flush()
        self.count += 1

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> ColdStartWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_cold_start(path: str | os.PathLike, records: Iterable[ColdStartRecord], *, append: bool = False) -> int:
    """Writes `records` to a JSONL file; returns how many were written."""
    with ColdStartWriter(path, append=append) as writer:
        for record in records:
            writer.write(record)
        return writer.count
