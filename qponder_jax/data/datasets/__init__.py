"""IQA datasets: tfds builders for the public sets, the synthetic set, and cold-start JSONL records.

    from qponder_jax.data import datasets
    datasets.build("koniq10k", manual_dir="/data/koniq", data_dir="/data/tfds")   # once
    src = datasets.load("koniq10k", "train", data_dir="/data/tfds")             # random access
    src = datasets.SyntheticIQA("train", size=512, seed=0)                      # nothing downloaded
    src = datasets.ColdStartSource("/data/cold_start.jsonl")
    datasets.build("lsvq", manual_dir="/data/LSVQ", data_dir="/data/tfds")                   # VQA sets: videos
    src = datasets.load("lsvq", "train", data_dir="/data/tfds")                              #   stored by path

Every source yields dicts with the record schema in `common` (image bytes: `decode_image`); the VQA sets
(VIDEO_DATASETS) yield the video record schema in `videos` (decode with `data.video.load_video_inputs`).
tensorflow_datasets is imported only when a builder is used.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from qponder_jax.data.datasets.cold_start import ColdStartRecord, ColdStartSource, ColdStartWriter, write_cold_start
from qponder_jax.data.datasets.common import RECORD_FIELDS, normalize_scores
from qponder_jax.data.datasets.images import ImageError, decode_image
from qponder_jax.data.datasets.synthetic import SyntheticIQA

# dataset name -> builder class ("module:Class" under this package, imported on first use)
BUILDERS = {
    "koniq10k": "authentic:Koniq10k",
    "spaq": "authentic:Spaq",
    "live_challenge": "authentic:LiveChallenge",
    "agiqa3k": "authentic:Agiqa3k",
    "kadid10k": "distorted:Kadid10k",
    "pipal": "distorted:Pipal",
    "csiq": "distorted:Csiq",
    "tid2013": "distorted:Tid2013",
    "synthetic_iqa": "synthetic_tfds:SyntheticIqaBuilder",
    "konvid1k": "videos:Konvid1k",
    "live_vqc": "videos:LiveVqc",
    "youtube_ugc": "videos:YoutubeUgc",
    "lsvq": "videos:Lsvq",
    "synthetic_vqa": "videos:SyntheticVqa",
}
VIDEO_DATASETS = ("konvid1k", "live_vqc", "youtube_ugc", "lsvq", "synthetic_vqa")  # records hold video paths
NO_MANUAL_DIR = ("synthetic_iqa", "synthetic_vqa")  # generated, not read from an official release


def builder_class(name: str):
    if name not in BUILDERS:
        raise KeyError(f"unknown dataset {name!r}; known: {sorted(BUILDERS)}")
    module, cls = BUILDERS[name].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def get_builder(name: str, data_dir: str | Path, *, strict: bool = False, max_short_side: int | None = None):
    """The tfds builder of dataset `name` writing to / reading from `data_dir`."""
    from qponder_jax.data.datasets.builder import make_builder

    cls = builder_class(name)
    if name == "synthetic_iqa":
        return cls(data_dir=str(data_dir))
    if name in VIDEO_DATASETS and max_short_side:
        raise ValueError(f"{name}: max_short_side applies to images; videos are stored by path, never resized")
    return make_builder(cls, data_dir, strict=strict, max_short_side=max_short_side)


def build(
    name: str,
    manual_dir: str | Path | None,
    data_dir: str | Path,
    *,
    strict: bool = False,
    max_short_side: int | None = None,
    rebuild: bool = False,
):
    """Builds dataset `name` from its official release in `manual_dir` into array_record files. An existing build is
    reused when its source is unchanged, else SourceChangedError says what changed (`rebuild=True`: build it again)."""
    from qponder_jax.data.datasets.builder import prepare

    builder = get_builder(name, data_dir, strict=strict, max_short_side=max_short_side)
    if name == "synthetic_iqa":  # generated from its config alone: nothing to go stale
        builder.download_and_prepare(file_format="array_record")
        return builder
    if name in VIDEO_DATASETS:
        from qponder_jax.data.datasets.videos import prepare_video_builder

        return prepare_video_builder(builder, manual_dir, rebuild=rebuild)
    return prepare(builder, manual_dir, rebuild=rebuild)


def load(name: str, split: str = "all", *, data_dir: str | Path, max_short_side: int | None = None):
    """Random-access records of a built split; "all" = every image of the dataset."""
    from qponder_jax.data.datasets.builder import as_source

    if name in VIDEO_DATASETS:
        from qponder_jax.data.datasets.videos import VideoSource

        return VideoSource(get_builder(name, data_dir).as_data_source(split))
    return as_source(get_builder(name, data_dir, max_short_side=max_short_side), split)


__all__ = [
    "BUILDERS",
    "NO_MANUAL_DIR",
    "RECORD_FIELDS",
    "VIDEO_DATASETS",
    "ColdStartRecord",
    "ColdStartSource",
    "ColdStartWriter",
    "ImageError",
    "SyntheticIQA",
    "build",
    "builder_class",
    "decode_image",
    "get_builder",
    "load",
    "normalize_scores",
    "write_cold_start",
]
