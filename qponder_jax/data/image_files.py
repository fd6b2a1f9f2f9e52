"""The images a user points at: files, folders (recursive) and CSV manifests, with the MOS when a manifest gives it.

    found = find_images(["photo.jpg", "shots/", "labels.csv"])
    found.images   # [ImageInput(path, mos)] in the order given; a folder's files sorted by path
    found.skipped  # [(path, reason)]: inputs that are not there, manifest rows without an image, ...

A folder contributes the files below it whose extension is an image's (`IMAGE_EXTENSIONS`, any case); other files
are ignored. A `.csv` file is a manifest: a header with an `image` column (paths relative to the manifest's folder,
or absolute) and optionally `mos`; a `.jsonl` file is one too, an object per line with the same keys (the demo's
split indexes, `2_data/test.jsonl`, are such files). Any other file is taken as an image; whether it decodes is found
out when it is read. Nothing here raises for a bad input: it is skipped with its reason, so one bad line never stops
a long run.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from collections.abc import Iterable
from pathlib import Path

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
MANIFESTS = (".csv", ".jsonl")


@dataclasses.dataclass(frozen=True)
class ImageInput:
    path: Path
    mos: float | None = None  # from a manifest's `mos` column


@dataclasses.dataclass
class FoundImages:
    images: list[ImageInput]
    skipped: list[tuple[str, str]]  # (input, why it was skipped)


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _walk(folder: Path) -> list[Path]:
    files = []
    for root, dirs, names in os.walk(folder, followlinks=True):
        dirs.sort()
        files += [Path(root) / n for n in names if is_image_file(Path(n))]
    return sorted(files)


def _manifest_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, {column: text}) of a CSV or JSONL manifest; raises ValueError for one it cannot use."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        if path.suffix.lower() == ".jsonl":
            rows = []
            for line, text in enumerate(f, start=1):
                if text.strip():
                    try:
                        row = json.loads(text)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"line {line} is not JSON ({e})") from None
                    if not isinstance(row, dict):
                        raise ValueError(f"line {line} is not a JSON object")
                    rows.append((line, {k.lower(): "" if v is None else str(v) for k, v in row.items()}))
            return rows
        reader = csv.DictReader(f)
        columns = [(c or "").strip().lower() for c in reader.fieldnames or []]
        if "image" not in columns:
            raise ValueError(f"no 'image' column (columns: {columns})")
        return [(line, {k.lower(): v or "" for k, v in row.items() if k}) for line, row in enumerate(reader, 2)]


def read_manifest(path: Path) -> FoundImages:
    """The rows of a CSV or JSONL manifest (see the module docstring)."""
    found = FoundImages([], [])
    try:
        rows = _manifest_rows(path)
    except (OSError, UnicodeDecodeError, csv.Error, ValueError) as e:
        return FoundImages([], [(str(path), f"cannot use the manifest: {e}")])
    for line, row in rows:
        row = {k.strip(): v.strip() for k, v in row.items()}
        where = f"{path}:{line}"
        if not row.get("image"):
            found.skipped.append((where, "no image path in the 'image' column"))
            continue
        image = Path(row["image"]).expanduser()
        image = image if image.is_absolute() else path.parent / image
        mos = None
        if row.get("mos"):
            try:
                mos = float(row["mos"])
            except ValueError:
                mos = math.nan
            if not math.isfinite(mos):
                found.skipped.append((f"{where} {image}", f"MOS {row['mos']!r} is not a finite number"))
                continue
        found.images.append(ImageInput(image, mos))
    return found


def find_images(inputs: Iterable[str | os.PathLike]) -> FoundImages:
    """Every image named by `inputs` (see the module docstring)."""
    found = FoundImages([], [])
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            files = _walk(path)
            if not files:
                found.skipped.append((str(path), f"folder holds no image files ({', '.join(IMAGE_EXTENSIONS)})"))
            found.images += [ImageInput(p) for p in files]
        elif path.suffix.lower() in MANIFESTS and path.is_file():
            manifest = read_manifest(path)
            found.images += manifest.images
            found.skipped += manifest.skipped
        elif path.exists():
            found.images.append(ImageInput(path))
        else:
            found.skipped.append((str(path), "no such file or folder"))
    return found
