"""Tiny copies of each IQA release, in its official layout and file formats, with generated images.

Each `write_<set>(root)` writes a handful of small images plus the annotation files, and returns the raw
scores it wrote keyed by the image path relative to `root` (what the records' `image_name` should be).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import openpyxl
import scipy.io
from PIL import Image


def write_image(path: Path, seed: int, size: tuple[int, int] = (12, 10), fmt: str | None = None) -> Path:
    """A small random RGB image (width, height = size) in the format implied by the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def write_koniq(root: Path) -> dict[str, float]:
    """6 images: 3 training, 1 validation, 2 test; MOS 1.5 .. 4.5."""
    names = [f"{1000 + i}.jpg" for i in range(6)]
    mos = [1.5, 2.0, 3.0, 3.5, 4.0, 4.5]
    sets = ["training", "test", "training", "validation", "training", "test"]
    header = ["image_name", "c1", "c2", "c3", "c4", "c5", "c_total", "MOS", "SD", "MOS_zscore"]
    _write_csv(root / "koniq10k_scores_and_distributions.csv", header, [
        [n, 1, 2, 3, 2, 1, 9, m, 0.5, (m - 1) * 25] for n, m in zip(names, mos)
    ])  # fmt: skip
    _write_csv(root / "koniq10k_distributions_sets.csv", header + ["set"], [
        [n, 1, 2, 3, 2, 1, 9, m, 0.5, (m - 1) * 25, s] for n, m, s in zip(names, mos, sets)
    ])  # fmt: skip
    for i, n in enumerate(names):
        write_image(root / "1024x768" / n, i)
    return {f"1024x768/{n}": m for n, m in zip(names, mos)}


def write_spaq(root: Path) -> dict[str, float]:
    """4 JPEGs, one of them 40x30 (larger than the test's resize short side of 16); MOS 0-100."""
    book = openpyxl.Workbook()
    sheet = book.active
    sheet.append(["Image name", "MOS", "Brightness", "Colorfulness", "Contrast", "Noisiness", "Sharpness"])
    scores = {"00001.jpg": 20.0, "00002.jpg": 45.5, "00003.jpg": 70.0, "00004.jpg": 80.0}
    for i, (name, mos) in enumerate(scores.items()):
        sheet.append([name, mos, 50, 50, 50, 50, 50])
        write_image(root / "TestImage" / name, i, size=(40, 30) if i == 0 else (12, 10))
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    book.save(root / "Annotations" / "MOS and Image attribute scores.xlsx")
    return {f"TestImage/{n}": m for n, m in scores.items()}


def write_kadid(root: Path, num_refs: int = 10) -> dict[str, float]:
    """`num_refs` references x 2 distortions (type 01 level 1, type 11 level 3); dmos 1-5."""
    rows, scores = [], {}
    for r in range(1, num_refs + 1):
        for t, lev, dmos in ((1, 1, 1.0 + 0.3 * r), (11, 3, 1.2 + 0.2 * r)):
            name = f"I{r:02d}_{t:02d}_{lev:02d}.png"
            rows.append([name, f"I{r:02d}.png", round(dmos, 4), 0.1])
            scores[f"images/{name}"] = round(dmos, 4)
            write_image(root / "images" / name, 100 * r + t, size=(8, 8))
    _write_csv(root / "dmos.csv", ["dist_img", "ref_img", "dmos", "var"], rows)
    return scores


def write_pipal(root: Path) -> dict[str, float]:
    """2 reference label files x 2 distorted BMPs; Elo scores."""
    scores = {
        "A0001_00_00.bmp": 1100.5,
        "A0001_10_02.bmp": 1500.0,
        "A0002_00_01.bmp": 1300.25,
        "A0002_01_05.bmp": 1700.0,
    }
    (root / "Train_Label").mkdir(parents=True, exist_ok=True)
    for ref in ("A0001", "A0002"):
        lines = [f"{n},{s}\n" for n, s in scores.items() if n.startswith(ref)]
        (root / "Train_Label" / f"{ref}.txt").write_text("".join(lines))
    for i, name in enumerate(scores):
        write_image(root / "Train_Dis" / name, 200 + i, fmt="BMP")
    return {f"Train_Dis/{n}": s for n, s in scores.items()}


def write_live_challenge(root: Path) -> dict[str, float]:
    """7 practice images (to be dropped) + 3 real ones, names and MOS in .mat files."""
    names = [f"t{i}.bmp" for i in range(1, 8)] + ["10.bmp", "100.bmp", "1000.JPG"]
    mos = [50.0] * 7 + [12.5, 55.0, 90.25]
    (root / "Data").mkdir(parents=True, exist_ok=True)
    cell = np.empty((len(names), 1), dtype=object)
    for i, n in enumerate(names):
        cell[i, 0] = np.array([n])
    scipy.io.savemat(root / "Data" / "AllImages_release.mat", {"AllImages_release": cell})
    scipy.io.savemat(root / "Data" / "AllMOS_release.mat", {"AllMOS_release": np.array([mos])})
    for i, n in enumerate(names[:7]):
        write_image(root / "Images" / "trainingImages" / n, 300 + i, fmt="BMP")
    for i, n in enumerate(names[7:]):
        write_image(root / "Images" / n, 310 + i, fmt="JPEG" if n.endswith("JPG") else "BMP")
    return {f"Images/{n}": m for n, m in zip(names[7:], mos[7:])}


def write_agiqa(root: Path) -> dict[str, float]:
    """3 generated images; mos_quality 0-5 (mos_align is a different score and must be ignored)."""
    rows = [
        ["AttnGAN_normal_000.jpg", "a cat", "", "", "normal", 1.25, 0.5, 4.0, 0.4],
        ["midjourney_lowstep_001.jpg", "a dog", "", "", "lowstep", 3.5, 0.5, 1.0, 0.4],
        ["sd1.5_highcorr_002.jpg", "a car", "", "", "highcorr", 4.75, 0.5, 2.0, 0.4],
    ]
    header = ["name", "prompt", "adj1", "adj2", "style", "mos_quality", "std_quality", "mos_align", "std_align"]
    _write_csv(root / "data.csv", header, rows)
    for i, row in enumerate(rows):
        write_image(root / "AGIQA-3K" / row[0], 400 + i)
    return {f"AGIQA-3K/{r[0]}": r[5] for r in rows}


def write_csiq(root: Path) -> dict[str, float]:
    """4 distorted images of 2 references (one named by a number, as CSIQ's 1600); DMOS 0-1."""
    book = openpyxl.Workbook()
    sheet = book.active
    sheet.title = "all_by_image"
    sheet.append(["CSIQ DMOS"])
    sheet.append([])
    sheet.append(["by image"])
    sheet.append(["image", "dst_idx", "dst_type", "dst_lev", "dmos_std", "dmos"])
    rows = [
        (1600, 1, "noise", 1, 0.02, 0.1, "dst_imgs/awgn/1600.AWGN.1.png"),
        (1600, 5, "blur", 4, 0.03, 0.9, "dst_imgs/blur/1600.BLUR.4.png"),
        ("shroom", 3, "jpeg 2000", 2, 0.02, 0.3, "dst_imgs/jpeg2000/shroom.jpeg2000.2.png"),
        ("shroom", 6, "contrast", 3, 0.01, 0.5, "dst_imgs/contrast/shroom.contrast.3.png"),
    ]
    for i, (image, idx, kind, lev, std, dmos, path) in enumerate(rows):
        sheet.append([image, idx, kind, lev, std, dmos])
        write_image(root / path, 500 + i)
    book.save(root / "csiq.DMOS.xlsx")
    return {r[6]: r[5] for r in rows}


def write_tid2013(root: Path) -> dict[str, float]:
    """4 BMPs whose file-name case on disk differs from mos_with_names.txt for some; MOS 0-9."""
    listed = ["i01_01_1.bmp", "i01_08_5.bmp", "i25_17_3.bmp", "i02_24_2.bmp"]
    on_disk = ["i01_01_1.bmp", "I01_08_5.BMP", "I25_17_3.bmp", "i02_24_2.bmp"]
    mos = [5.51429, 1.25, 6.0, 3.375]
    root.mkdir(parents=True, exist_ok=True)
    (root / "mos_with_names.txt").write_text("".join(f"{m} {n}\n" for m, n in zip(mos, listed)))
    for i, name in enumerate(on_disk):
        write_image(root / "distorted_images" / name, 600 + i, fmt="BMP")
    return {f"distorted_images/{d}": m for d, m in zip(on_disk, mos)}


WRITERS = {
    "koniq10k": write_koniq,
    "spaq": write_spaq,
    "kadid10k": write_kadid,
    "pipal": write_pipal,
    "live_challenge": write_live_challenge,
    "agiqa3k": write_agiqa,
    "csiq": write_csiq,
    "tid2013": write_tid2013,
}
