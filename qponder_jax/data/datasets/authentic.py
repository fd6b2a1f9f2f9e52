"""Builders for the authentic-distortion and AI-generated sets: KonIQ-10k, SPAQ, LIVE Challenge, AGIQA-3K.

Each reads the official release, in its official layout, from `manual_dir` (see REFERENCES.md,
"Datasets: official files and normalization"). Only KonIQ-10k has an official split; the others have one
split, "test", and are used whole for cross-dataset evaluation ("all" is tfds' union of all splits).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qponder_jax.data.datasets.builder import Annotation, IQABuilder, IQAConfig
from qponder_jax.data.datasets.common import (
    cell_text,
    find_annotation_file,
    parse_score,
    read_csv,
    read_xlsx,
)
from qponder_jax.data.datasets.provenance import note_read


class Koniq10k(IQABuilder):
    """KonIQ-10k: MOS (1-5) from the scores CSV; the official 7058/1000/2015 split from the sets CSV."""

    name = "koniq10k"
    SCORE_RANGE = (1.0, 5.0)
    HOMEPAGE = "https://database.mmsp-kn.de/koniq-10k-database.html"
    DESCRIPTION = "KonIQ-10k in-the-wild IQA; official train/validation/test split."
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put koniq10k_scores_and_distributions.csv, koniq10k_distributions_sets.csv and the image folder "
        "1024x768/ (from koniq10k_1024x768.zip) in manual_dir."
    )
    SCORES_FILE = "koniq10k_scores_and_distributions.csv"
    SETS_FILE = "koniq10k_distributions_sets.csv"
    IMAGE_DIR = "1024x768"
    SET_NAMES = {"training": "train", "train": "train", "validation": "validation", "val": "validation", "test": "test"}

    def read_annotations(self, root: Path) -> list[Annotation]:
        split_of: dict[str, str] = {}
        for where, row in read_csv(find_annotation_file(root, self.SETS_FILE), ["image_name", "set"]):
            split = self.SET_NAMES.get(row["set"].lower())
            if split is None:
                raise ValueError(f"{where}: unknown set {row['set']!r}, expected one of {sorted(self.SET_NAMES)}")
            split_of[row["image_name"]] = split
        annotations = []
        for where, row in read_csv(find_annotation_file(root, self.SCORES_FILE), ["image_name", "MOS"]):
            name = row["image_name"]
            if name not in split_of:
                raise ValueError(f"{where}: image {name!r} has no row in {self.SETS_FILE}")
            score = parse_score(row["MOS"], where, self.SCORE_RANGE)
            annotations.append(Annotation((f"{self.IMAGE_DIR}/{name}",), score, where, split=split_of[name]))
        return annotations


class Spaq(IQABuilder):
    """SPAQ: smartphone photos (~4000x3000) with MOS 0-100; resized at build time to a 512 short side."""

    name = "spaq"
    SCORE_RANGE = (0.0, 100.0)
    BUILDER_CONFIGS = [IQAConfig(name="default", max_short_side=512)]
    HOMEPAGE = "https://github.com/h4nwei/SPAQ"
    DESCRIPTION = "SPAQ smartphone photo quality; images downscaled to a 512-pixel short side by default."
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put 'Annotations/MOS and Image attribute scores.xlsx' and the TestImage/ folder in manual_dir."
    )
    SCORES_FILE = "Annotations/MOS and Image attribute scores.xlsx"
    IMAGE_DIR = "TestImage"

    def read_annotations(self, root: Path) -> list[Annotation]:
        path = find_annotation_file(root, self.SCORES_FILE)
        annotations = []
        for where, row in read_xlsx(path, sheet=None, header_row=1, required=["Image name", "MOS"]):
            name = cell_text(row["Image name"])
            score = parse_score(row["MOS"], where, self.SCORE_RANGE)
            annotations.append(Annotation((f"{self.IMAGE_DIR}/{name}",), score, where))
        return annotations


class LiveChallenge(IQABuilder):
    """LIVE In the Wild Image Quality Challenge: MOS 0-100 from .mat files; the 7 practice images dropped."""

    name = "live_challenge"
    SCORE_RANGE = (0.0, 100.0)
    HOMEPAGE = "https://live.ece.utexas.edu/research/ChallengeDB/index.html"
    DESCRIPTION = "LIVE Challenge (LIVE-itW / CLIVE): 1162 authentically distorted photos."
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Put the release folders Data/ and Images/ in manual_dir."
    NAMES_FILE = "Data/AllImages_release.mat"
    SCORES_FILE = "Data/AllMOS_release.mat"
    NUM_PRACTICE = 7  # the first 7 entries are the practice (training) images shown to the raters

    def read_annotations(self, root: Path) -> list[Annotation]:
        names_path = find_annotation_file(root, self.NAMES_FILE)
        scores_path = find_annotation_file(root, self.SCORES_FILE)
        names = [_mat_text(v) for v in _load_mat(names_path, "AllImages_release").ravel()]
        scores = _load_mat(scores_path, "AllMOS_release").ravel()
        if len(names) != len(scores):
            raise ValueError(f"{names_path} lists {len(names)} images but {scores_path} has {len(scores)} scores")
        if len(names) <= self.NUM_PRACTICE:
            raise ValueError(f"{names_path}: only {len(names)} entries, expected more than the 7 practice images")
        annotations = []
        for i in range(self.NUM_PRACTICE, len(names)):
            where = f"{scores_path}:entry {i + 1}"
            score = parse_score(scores[i], where, self.SCORE_RANGE)
            annotations.append(Annotation((f"Images/{names[i]}",), score, where))
        return annotations


def _load_mat(path: Path, key: str) -> np.ndarray:
    import scipy.io

    note_read(path)
    try:
        contents = scipy.io.loadmat(path)
    except Exception as e:
        raise ValueError(f"{path}: cannot read MATLAB file ({type(e).__name__}: {e})") from e
    if key not in contents:
        raise ValueError(f"{path}: no variable {key!r} (found {[k for k in contents if not k.startswith('__')]})")
    return np.asarray(contents[key])


def _mat_text(value) -> str:
    """A MATLAB cell entry (nested object/str arrays) as a Python string."""
    while isinstance(value, np.ndarray):
        value = value.item() if value.size == 1 else value.ravel()[0]
    return str(value).strip()


class Agiqa3k(IQABuilder):
    """AGIQA-3K: AI-generated images; the perceptual-quality MOS (`mos_quality`, 0-5)."""

    name = "agiqa3k"
    SCORE_RANGE = (0.0, 5.0)
    HOMEPAGE = "https://github.com/lcysyzxdxc/AGIQA-3k-Database"
    DESCRIPTION = "AGIQA-3K AI-generated image quality (mos_quality)."
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Put data.csv and the image folder in manual_dir."
    SCORES_FILE = "data.csv"

    def read_annotations(self, root: Path) -> list[Annotation]:
        annotations = []
        for where, row in read_csv(find_annotation_file(root, self.SCORES_FILE), ["name", "mos_quality"]):
            name = row["name"]
            score = parse_score(row["mos_quality"], where, self.SCORE_RANGE)
            paths = (f"AGIQA-3K/{name}", f"images/{name}", name)  # any other folder: found by file name
            annotations.append(Annotation(paths, score, where))
        return annotations
