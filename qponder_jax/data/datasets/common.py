"""The shared IQA record schema, score normalization, and validated readers for annotation files.

A record (what every source yields: the tfds builders, `SyntheticIQA`, and, with more keys,
`ColdStartSource`) is a dict with these keys:

    image             bytes   encoded 8-bit RGB image (PNG, or the original JPEG); `decode_image` reads it
    image_name        str     path of the image relative to the dataset root (its official name)
    mos_raw           float   the score as published (MOS, DMOS, Elo, ...)
    mos               float   normalized to [1, 5], higher is better (see `normalize_scores`)
    dataset           str     e.g. "koniq10k", "synthetic"
    distortion_type   str     where the dataset has it, else ""
    distortion_level  int     where the dataset has it, else -1
    ref_name          str     reference (pristine) image id for synthetic-distortion sets, else ""
    height, width     int     of the stored image
    orig_height, orig_width  int  of the original file
    resized           bool    True when the image was downscaled at build time

Bad-input policy:
- An annotation problem (malformed CSV/TXT/XLSX row, a score that is not a number, NaN, or outside the
  dataset's documented range, a duplicate image name) always raises ValueError naming the file and line.
  Annotations are read before any image, so this fails in seconds, not hours into a build, and a silently
  dropped row would also shift the normalization range. The normalization min/max are those of the
  annotation file (all splits), so an image skipped at build time does not change any other score.
- An image file that is missing or corrupt is skipped, counted and logged with its path (`SkipLog`), or
  raises ImageError in strict mode.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from qponder_jax.data.datasets.images import ImageError
from qponder_jax.data.datasets.provenance import note_read

log = logging.getLogger(__name__)

TEXT_FIELDS = ("image_name", "dataset", "distortion_type", "ref_name")
FLOAT_FIELDS = ("mos_raw", "mos")
INT_FIELDS = ("distortion_level", "height", "width", "orig_height", "orig_width")
RECORD_FIELDS = ("image",) + TEXT_FIELDS + FLOAT_FIELDS + INT_FIELDS + ("resized",)


def normalize_scores(scores: np.ndarray, lower_is_better: bool = False) -> tuple[np.ndarray, float, float]:
    """Maps raw scores onto [1, 5], higher is better: 1 + 4 (s - min) / (max - min).

    `min` and `max` are taken over all given scores: pass the whole dataset (every annotated image, all
    splits), so a score means the same in every split. DMOS-style scores (lower is better) are flipped
    first, s -> max + min - s, so the best image gets 5. Returns (normalized, min, max).
    """
    scores = np.asarray(scores, np.float64)
    lo, hi = float(scores.min()), float(scores.max())
    if hi <= lo:
        raise ValueError(f"cannot normalize scores: all {scores.size} scores equal {lo}")
    oriented = (hi + lo - scores) if lower_is_better else scores
    return 1.0 + 4.0 * (oriented - lo) / (hi - lo), lo, hi


def parse_score(value: object, where: str, valid_range: tuple[float, float]) -> float:
    """A finite score inside `valid_range`, or ValueError naming `where` (file:line)."""
    try:
        score = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{where}: score {value!r} is not a number") from None
    if math.isnan(score) or math.isinf(score):
        raise ValueError(f"{where}: score is {score}")
    lo, hi = valid_range
    if not lo <= score <= hi:
        raise ValueError(f"{where}: score {score} is outside the dataset's range [{lo}, {hi}]")
    return score


def parse_int(value: object, where: str, field: str) -> int:
    """An integer field (XLSX cells may hold 3.0), or ValueError naming `where` and `field`."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {field} {value!r} is not an integer") from None
    if not number.is_integer():
        raise ValueError(f"{where}: {field} {value!r} is not an integer")
    return int(number)


def find_annotation_file(root: Path, relpath: str) -> Path:
    """`root/relpath`, else the unique file of that name anywhere under `root` (any letter case)."""
    hit = FileIndex(root).resolve(relpath)
    if hit is None:
        raise FileNotFoundError(f"annotation file {relpath!r} not found under {root}")
    return hit


def read_csv(path: Path, required: Sequence[str], delimiter: str = ",") -> Iterator[tuple[str, dict[str, str]]]:
    """Yields ("file:line", row) for each data row, checking the header and every row's field count."""
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    note_read(path)
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}:1: empty file, expected a header with {list(required)}")
        header = [h.strip() for h in header]
        missing = [c for c in required if c not in header]
        if missing:
            raise ValueError(f"{path}:1: header {header} lacks column(s) {missing}")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != len(header):
                raise ValueError(f"{where}: malformed row, {len(row)} fields where the header has {len(header)}")
            yield where, {h: c.strip() for h, c in zip(header, row)}


def read_text_lines(path: Path, num_fields: int, separator: str | None) -> Iterator[tuple[str, list[str]]]:
    """Yields ("file:line", fields) for each non-empty line with exactly `num_fields` fields."""
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    note_read(path)
    with open(path, encoding="utf-8-sig") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            fields = [p.strip() for p in line.strip().split(separator)]
            if len(fields) != num_fields or not all(fields):
                raise ValueError(f"{path}:{number}: malformed line {line.strip()!r}, expected {num_fields} fields")
            yield f"{path}:{number}", fields


def read_xlsx(
    path: Path, sheet: str | None, header_row: int, required: Sequence[str]
) -> Iterator[tuple[str, dict[str, object]]]:
    """Yields ("file[sheet]:row", row) for the data rows below `header_row` (1-based) of an XLSX sheet."""
    import openpyxl

    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    note_read(path)
    book = openpyxl.load_workbook(path, read_only=True, data_only=True)
    try:
        if sheet is not None and sheet not in book.sheetnames:
            raise ValueError(f"{path}: no sheet {sheet!r} (sheets: {book.sheetnames})")
        ws = book[sheet] if sheet is not None else book.worksheets[0]
        name = ws.title
        rows = ws.iter_rows(min_row=header_row, values_only=True)
        header = [str(h).strip() if h is not None else "" for h in next(rows, ())]
        missing = [c for c in required if c not in header]
        if missing:
            raise ValueError(f"{path}[{name}]:{header_row}: header {header} lacks column(s) {missing}")
        for number, values in enumerate(rows, start=header_row + 1):
            if all(v is None or (isinstance(v, str) and not v.strip()) for v in values):
                continue
            row = {h: v for h, v in zip(header, values) if h}
            where = f"{path}[{name}]:{number}"
            empty = [c for c in required if row.get(c) is None or (isinstance(row[c], str) and not row[c].strip())]
            if empty:
                raise ValueError(f"{where}: malformed row, empty {empty}")
            yield where, row
    finally:
        book.close()


def cell_text(value: object) -> str:
    """An XLSX cell as text; whole floats (an image named 1600 read as 1600.0) lose the '.0'."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


class FileIndex:
    """Resolves annotation names to files under a root, tolerating case and folder differences.

    Tries the exact relative path first (no directory walk), then a case-insensitive match of the
    relative path, then a unique case-insensitive match of the file name anywhere under the root.
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self._by_relpath: dict[str, Path] | None = None
        self._by_name: dict[str, list[Path]] = {}

    def _build(self) -> None:
        self._by_relpath = {}
        for dirpath, _, files in os.walk(self.root):
            for file in files:
                path = Path(dirpath) / file
                self._by_relpath[path.relative_to(self.root).as_posix().lower()] = path
                self._by_name.setdefault(file.lower(), []).append(path)

    def resolve(self, *relpaths: str) -> Path | None:
        """The first of `relpaths` that exists (see class docstring), or None."""
        for rel in relpaths:
            if (self.root / rel).is_file():
                return self.root / rel
        if self._by_relpath is None:
            self._build()
        assert self._by_relpath is not None
        for rel in relpaths:
            hit = self._by_relpath.get(Path(rel).as_posix().lower())
            if hit is not None:
                return hit
        for rel in relpaths:
            hits = self._by_name.get(Path(rel).name.lower(), [])
            if len(hits) == 1:
                return hits[0]
        return None


class SkipLog:
    """Counts and logs images that were skipped, or raises for them in strict mode."""

    def __init__(self, dataset: str, strict: bool):
        self.dataset = dataset
        self.strict = strict
        self.skipped: list[dict[str, str]] = []

    def skip(self, path: str | os.PathLike, reason: str) -> None:
        if self.strict:
            raise ImageError(path, f"{reason} ({self.dataset}, strict mode; without strict it is skipped)")
        self.skipped.append({"path": str(path), "reason": reason})
        log.warning("%s: skipping %s: %s (%d skipped so far)", self.dataset, path, reason, len(self.skipped))

    @property
    def count(self) -> int:
        return len(self.skipped)
