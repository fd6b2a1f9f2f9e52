"""Cold-start (distilled reasoning) records: a JSONL writer, a validating reader and a random-access source.

One JSON object per line:
    {"image": "imgs/a.png", "prompt": "...", "response": "<think>...</think><answer>3.2</answer>",
     "mos": 3.41, "dataset": "koniq10k", "distortion_type": "", "distortion_level": -1, "teacher_score": 3.3}
`image` is relative to the JSONL file's folder, or absolute. `mos` is the normalized MOS (1-5).
`dataset`, `distortion_type`, `distortion_level` and `teacher_score` are optional.

The reader checks every line up front: invalid JSON, a missing or mistyped field, or a NaN or
out-of-range MOS raise ValueError naming the file and line. A missing or unreadable image is skipped,
counted and logged with its path (or raises ImageError with `strict=True`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable
from pathlib import Path

from PIL import Image

from qponder_jax.data.datasets.common import SkipLog

_NUMBER = (int, float)


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
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    fields = {}
    for key, kind in {**_REQUIRED, **_OPTIONAL}.items():
        if key not in obj or (key == "teacher_score" and obj[key] is None):
            if key in _REQUIRED:
                raise ValueError(f"{where}: missing field {key!r}")
            continue
        value = obj[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(f"{where}: field {key!r} must be {_kind_name(kind)}, got {type(value).__name__}")
        fields[key] = value
    if not fields["image"]:
        raise ValueError(f"{where}: field 'image' is empty")
    mos = float(fields["mos"])
    lo, hi = mos_range
    if math.isnan(mos) or not lo <= mos <= hi:
        raise ValueError(f"{where}: mos {mos} is NaN or outside [{lo}, {hi}]")
    if "teacher_score" in fields and not math.isfinite(fields["teacher_score"]):
        raise ValueError(f"{where}: teacher_score {fields['teacher_score']} is not finite")
    return ColdStartRecord(**fields)


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
        with open(self.path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{self.path}:{number}"
                record = _parse_line(line, where, mos_range)
                image_path = self.path.parent / record.image  # an absolute `image` replaces the folder
                reason = _check_image(image_path, verify)
                if reason is not None:
                    self.skip_log.skip(image_path, f"{reason} (record {where})")
                    continue
                self.records.append(record)
                self._image_paths.append(image_path)

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
