"""What a dataset build was made from, so that a build is never silently reused after its release changed.

A build records, under the key "source" of its metadata.json:
    builder            "<name> <version>" of the tfds builder
    options            the build options of its config (e.g. max_short_side, image_dir)
    manual_dir         the release folder it was built from
    annotation_files   {path relative to manual_dir: sha256 of the content} of every annotation file read
    media              {"found": N, "missing": M, "sha256": hash of the sorted "name<TAB>size" lines}: the image or
                       video files the annotations resolved to (a missing file is listed with size "-")
    stores_paths       True when records hold absolute file paths (videos): then manual_dir must not move either
`source_changes` compares a recorded source with the release as it is now; `builder.prepare` refuses to reuse a
build whose source changed (or rebuilds it when asked).

Media files are compared by name and byte size, not content: hashing a release's every image on each check would
read all of it. An image replaced by another of exactly the same size goes unnoticed; an edited annotation file, an
added, removed or renamed image, and a re-encoded image (a new size) are all caught.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

SOURCE_KEY = "source"  # builder.info.metadata key of the record
_READS: contextvars.ContextVar[list[Path] | None] = contextvars.ContextVar("annotation_reads", default=None)


def note_read(path: str | os.PathLike) -> None:
    """Called by every annotation reader with the file it opens; recorded while `recording_reads` is active."""
    reads = _READS.get()
    if reads is not None and Path(path) not in reads:
        reads.append(Path(path))


@contextlib.contextmanager
def recording_reads() -> Iterator[list[Path]]:
    """Collects the annotation files read inside the `with` block (in the order they were first read)."""
    token = _READS.set([])
    try:
        yield _READS.get()
    finally:
        _READS.reset(token)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)


def source_record(
    *,
    builder: str,
    options: dict,
    root: Path,
    annotation_files: Sequence[Path],
    media: Sequence[tuple[str, Path | None]],
    stores_paths: bool,
) -> dict:
    """The record of a build (see the module docstring). `media`: (official name, resolved file or None if missing)
    for each annotated image or video."""
    lines = sorted(
        f"{_relative(path, root)}\t{path.stat().st_size}" if path is not None else f"{name}\t-" for name, path in media
    )
    found = sum(path is not None for _, path in media)
    return {
        "builder": builder,
        "options": options,
        "manual_dir": str(root.absolute()),
        "annotation_files": {_relative(p, root): file_sha256(p) for p in annotation_files},
        "media": {
            "found": found,
            "missing": len(media) - found,
            "sha256": hashlib.sha256("\n".join(lines).encode()).hexdigest(),
        },
        "stores_paths": stores_paths,
    }


def source_changes(recorded: dict, current: dict) -> list[str]:
    """What differs between the source a build recorded and the source now, as short phrases ([] = the same)."""
    changes = []
    if recorded.get("builder") != current["builder"]:
        changes.append(f"builder {recorded.get('builder')} -> {current['builder']}")
    if recorded.get("options") != current["options"]:
        changes.append(f"options {recorded.get('options')} -> {current['options']}")
    if current["stores_paths"] and recorded.get("manual_dir") != current["manual_dir"]:
        changes.append(f"manual_dir {recorded.get('manual_dir')} -> {current['manual_dir']} (records store paths)")
    old_files, new_files = recorded.get("annotation_files", {}), current["annotation_files"]
    for name in sorted(set(old_files) | set(new_files)):
        if name not in new_files:
            changes.append(f"annotation file {name} no longer read")
        elif name not in old_files:
            changes.append(f"annotation file {name} newly read")
        elif old_files[name] != new_files[name]:
            changes.append(f"annotation file {name} changed")
    old, new = recorded.get("media", {}), current["media"]
    if old.get("sha256") != new["sha256"]:
        counts = lambda m: f"{m.get('found')} found, {m.get('missing')} missing"
        if (old.get("found"), old.get("missing")) != (new["found"], new["missing"]):
            changes.append(f"media files: {counts(old)} at the build, {counts(new)} now")
        else:
            changes.append(f"media files: the same counts ({counts(new)}) but a name or a file size differs")
    return changes


def describe(record: dict) -> list[str]:
    """Lines for `datasets info`: what the build was made from."""
    media = record.get("media", {})
    lines = [
        f"built from: {record.get('manual_dir')} (builder {record.get('builder')}, options {record.get('options')})",
        f"media files: {media.get('found')} found, {media.get('missing')} missing (list sha256 "
        f"{str(media.get('sha256'))[:16]})",
    ]
    lines += [f"annotation file: {name} (sha256 {digest[:16]})" for name, digest in record["annotation_files"].items()]
    return lines
