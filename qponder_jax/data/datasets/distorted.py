"""Builders for the synthetic-distortion sets (a reference image times distortion types and levels):
KADID-10k, PIPAL, CSIQ, TID2013.

Distortion type and level come from the official file names (KADID, PIPAL, TID2013) or columns (CSIQ).
Only KADID-10k is split (by reference image, 6:2:2, seed 42, as PreResQ-R1 trains on it); the others have
one split, "test" ("all" is tfds' union of all splits).
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from qponder_jax.data.datasets.builder import Annotation, IQABuilder
from qponder_jax.data.datasets.common import (
    cell_text,
    find_annotation_file,
    parse_int,
    parse_score,
    read_csv,
    read_text_lines,
    read_xlsx,
)

KADID_TYPES = (
    "gaussian_blur", "lens_blur", "motion_blur", "color_diffusion", "color_shift", "color_quantization",
    "color_saturation_1", "color_saturation_2", "jpeg2000", "jpeg", "white_noise", "white_noise_color_component",
    "impulse_noise", "multiplicative_noise", "denoise", "brighten", "darken", "mean_shift", "jitter",
    "non_eccentricity_patch", "pixelate", "quantization", "color_block", "high_sharpen", "contrast_change",
)  # fmt: skip
TID2013_TYPES = (
    "additive_gaussian_noise", "additive_noise_color_components", "spatially_correlated_noise", "masked_noise",
    "high_frequency_noise", "impulse_noise", "quantization_noise", "gaussian_blur", "image_denoising", "jpeg",
    "jpeg2000", "jpeg_transmission_errors", "jpeg2000_transmission_errors", "non_eccentricity_pattern_noise",
    "local_block_wise_distortions", "mean_shift", "contrast_change", "change_of_color_saturation",
    "multiplicative_gaussian_noise", "comfort_noise", "lossy_compression_of_noisy_images",
    "color_quantization_with_dither", "chromatic_aberrations", "sparse_sampling_and_reconstruction",
)  # fmt: skip


def split_by_reference(refs: list[str], seed: int = 42, fractions=(0.6, 0.2, 0.2)) -> dict[str, str]:
    """Reference image -> "train" / "validation" / "test": a seeded shuffle of the sorted references.

    Validation and test get floor(fraction * n) references each and train the rest; for KADID's 81
    references that is 49/16/16, i.e. 6,125 training images, the size PreResQ-R1 reports (their exact
    membership is not published).
    """
    order = sorted(set(refs))
    random.Random(seed).shuffle(order)
    n = len(order)
    n_val, n_test = int(fractions[1] * n), int(fractions[2] * n)
    n_train = n - n_val - n_test
    split = {r: "train" for r in order[:n_train]}
    split.update({r: "validation" for r in order[n_train : n_train + n_val]})
    split.update({r: "test" for r in order[n_train + n_val :]})
    return split


def _type_name(table: tuple[str, ...], number: int, where: str) -> str:
    if not 1 <= number <= len(table):
        raise ValueError(f"{where}: distortion type {number} is outside 1..{len(table)}")
    return table[number - 1]


class Kadid10k(IQABuilder):
    """KADID-10k: 81 references x 25 distortion types x 5 levels; `dmos` is 1-5, higher is better."""

    name = "kadid10k"
    SCORE_RANGE = (1.0, 5.0)
    HOMEPAGE = "https://database.mmsp-kn.de/kadid-10k-database.html"
    DESCRIPTION = "KADID-10k synthetic distortions; split by reference image 6:2:2 (seed 42)."
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Put dmos.csv and the images/ folder of kadid10k.zip in manual_dir."
    SCORES_FILE = "dmos.csv"
    SPLIT_SEED = 42
    NAME_PATTERN = re.compile(r"^(I\d+)_(\d+)_(\d+)\.png$", re.IGNORECASE)

    def read_annotations(self, root: Path) -> list[Annotation]:
        rows = []
        for where, row in read_csv(find_annotation_file(root, self.SCORES_FILE), ["dist_img", "ref_img", "dmos"]):
            match = self.NAME_PATTERN.match(row["dist_img"])
            if match is None:
                raise ValueError(f"{where}: image name {row['dist_img']!r} is not of the form I01_01_01.png")
            rows.append((where, row, match))
        split_of = split_by_reference([m.group(1).upper() for _, _, m in rows], self.SPLIT_SEED)
        annotations = []
        for where, row, match in rows:
            ref = match.group(1).upper()
            annotations.append(
                Annotation(
                    (f"images/{row['dist_img']}",),
                    parse_score(row["dmos"], where, self.SCORE_RANGE),
                    where,
                    distortion_type=_type_name(KADID_TYPES, int(match.group(2)), where),
                    distortion_level=int(match.group(3)),
                    ref_name=ref,
                    split=split_of[ref],
                )
            )
        return annotations


class Pipal(IQABuilder):
    """PIPAL (public training part): Elo scores from Train_Label/*.txt.

    Names are `A0001_10_02.bmp`: reference, distortion type code, sub-type index. The sub-type index is
    stored as `distortion_level`, but it is a variant index within the type, not a severity.
    """

    name = "pipal"
    SCORE_RANGE = (0.0, 5000.0)
    HOMEPAGE = "https://www.jasongt.com/projectpages/pipal.html"
    DESCRIPTION = "PIPAL perceptual image restoration quality; the 23,200 public training images."
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Put Train_Label/ and the distorted image folder(s) in manual_dir."
    LABEL_DIR = "Train_Label"
    NAME_PATTERN = re.compile(r"^(A\d+)_(\d+)_(\d+)\.bmp$", re.IGNORECASE)

    def read_annotations(self, root: Path) -> list[Annotation]:
        label_files = sorted((root / self.LABEL_DIR).glob("*.txt"))
        if not label_files:
            raise FileNotFoundError(f"no label files {root / self.LABEL_DIR}/*.txt")
        annotations = []
        for path in label_files:
            for where, (name, elo) in read_text_lines(path, 2, ","):
                match = self.NAME_PATTERN.match(name)
                if match is None:
                    raise ValueError(f"{where}: image name {name!r} is not of the form A0001_00_00.bmp")
                annotations.append(
                    Annotation(
                        (f"Train_Dis/{name}", name),  # other folder names are found by file name
                        parse_score(elo, where, self.SCORE_RANGE),
                        where,
                        distortion_type=f"type_{int(match.group(2)):02d}",
                        distortion_level=int(match.group(3)),
                        ref_name=match.group(1),
                    )
                )
        return annotations


# CSIQ distortion: name -> (folder in dst_imgs/, token in the file name); the sheet's dst_idx is 1..6 in order.
CSIQ_TYPES = {
    "awgn": ("awgn", "AWGN"),
    "jpeg": ("jpeg", "JPEG"),
    "jpeg2000": ("jpeg2000", "jpeg2000"),
    "fnoise": ("fnoise", "fnoise"),
    "blur": ("blur", "BLUR"),
    "contrast": ("contrast", "contrast"),
}
CSIQ_ALIASES = {"noise": "awgn", "jpeg 2000": "jpeg2000", "pink noise": "fnoise", "fnoise": "fnoise"}


class Csiq(IQABuilder):
    """CSIQ: DMOS 0-1 from `csiq.DMOS.xlsx` (sheet all_by_image, header on row 4), lower is better: flipped."""

    name = "csiq"
    SCORE_RANGE = (0.0, 1.0)
    LOWER_IS_BETTER = True
    HOMEPAGE = "https://s2.smu.edu/~eclarson/csiq.html"
    DESCRIPTION = "CSIQ: 30 references x 6 distortion types x 4-5 levels; DMOS flipped so higher is better."
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Put csiq.DMOS.xlsx and the dst_imgs/ folder in manual_dir."
    SCORES_FILE = "csiq.DMOS.xlsx"
    SHEET = "all_by_image"
    HEADER_ROW = 4

    def read_annotations(self, root: Path) -> list[Annotation]:
        path = find_annotation_file(root, self.SCORES_FILE)
        required = ["image", "dst_idx", "dst_type", "dst_lev", "dmos"]
        annotations = []
        for where, row in read_xlsx(path, self.SHEET, self.HEADER_ROW, required):
            kind = cell_text(row["dst_type"]).lower()
            kind = CSIQ_ALIASES.get(kind, kind)
            if kind not in CSIQ_TYPES:
                index = parse_int(row["dst_idx"], where, "dst_idx")
                if not 1 <= index <= len(CSIQ_TYPES):
                    raise ValueError(f"{where}: unknown distortion {row['dst_type']!r} (dst_idx {index})")
                kind = list(CSIQ_TYPES)[index - 1]
            folder, token = CSIQ_TYPES[kind]
            ref = cell_text(row["image"])
            level = parse_int(row["dst_lev"], where, "dst_lev")
            annotations.append(
                Annotation(
                    (f"dst_imgs/{folder}/{ref}.{token}.{level}.png",),
                    parse_score(row["dmos"], where, self.SCORE_RANGE),
                    where,
                    distortion_type=kind,
                    distortion_level=level,
                    ref_name=ref,
                )
            )
        return annotations


class Tid2013(IQABuilder):
    """TID2013: MOS 0-9 from `mos_with_names.txt`; the case of file names on disk varies (matched case-blind)."""

    name = "tid2013"
    SCORE_RANGE = (0.0, 9.0)
    HOMEPAGE = "https://www.ponomarenko.info/tid2013.htm"
    DESCRIPTION = "TID2013: 25 references x 24 distortion types x 5 levels."
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Put mos_with_names.txt and the distorted_images/ folder in manual_dir."
    SCORES_FILE = "mos_with_names.txt"
    NAME_PATTERN = re.compile(r"^(i\d\d)_(\d\d)_(\d)\.bmp$", re.IGNORECASE)

    def read_annotations(self, root: Path) -> list[Annotation]:
        annotations = []
        for where, (score, name) in read_text_lines(find_annotation_file(root, self.SCORES_FILE), 2, None):
            match = self.NAME_PATTERN.match(name)
            if match is None:
                raise ValueError(f"{where}: image name {name!r} is not of the form i01_01_1.bmp")
            annotations.append(
                Annotation(
                    (f"distorted_images/{name}",),
                    parse_score(score, where, self.SCORE_RANGE),
                    where,
                    distortion_type=_type_name(TID2013_TYPES, int(match.group(2)), where),
                    distortion_level=int(match.group(3)),
                    ref_name=match.group(1).lower(),
                )
            )
        return annotations
