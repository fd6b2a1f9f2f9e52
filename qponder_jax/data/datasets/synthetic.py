"""The synthetic IQA set: procedural images with known distortions and a MOS derived from them.

Nothing is downloaded: record `i` of a split is made on the fly from (seed, split, i), deterministically,
so `SyntheticIQA` is a random-access source like a built tfds split, with the same record schema
(dataset "synthetic"). Content is varied (linear/radial gradients, gratings, smooth color fields,
checkerboards, stripes) and always carries hard-edged shapes, so every distortion has edges and flat
regions to act on. Distortions: blur, noise, jpeg, contrast, brightness, saturation, pixelate, at levels
1..5, or "none" (level 0).

MOS (already on the 1-5 scale, so `mos == mos_raw`):
    mos = 1 + 4 * q * (1 - severity)
where q in [0.92, 1] is a per-content base quality, and severity = S[type] * (level / 5) ** 0.8 *
m(type, detail), with detail in [0, 1] the mean gradient magnitude of the clean image: blur, pixelation
and JPEG hurt detailed content more (m = 0.85 + 0.3 detail), noise hurts flat content more
(m = 1.15 - 0.3 detail). Stronger distortion always means a lower MOS for the same content.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from qponder_jax.data.datasets.images import encode_png

DISTORTIONS = ("none", "blur", "noise", "jpeg", "contrast", "brightness", "saturation", "pixelate")
MAX_SEVERITY = {
    "none": 0.0,
    "blur": 0.80,
    "noise": 0.80,
    "jpeg": 0.70,
    "contrast": 0.60,
    "brightness": 0.55,
    "saturation": 0.45,
    "pixelate": 0.80,
}
SPLITS = {"train": 0, "validation": 1, "test": 2}
DEFAULT_SIZES = {"train": 2048, "validation": 256, "test": 256}

_BLUR_SIGMA = (0.7, 1.2, 1.8, 2.5, 3.3)
_NOISE_STD = (0.02, 0.04, 0.07, 0.11, 0.16)
_JPEG_QUALITY = (50, 30, 18, 10, 5)
_CONTRAST = (0.75, 0.55, 0.4, 0.28, 0.18)
_BRIGHTNESS = (0.1, 0.18, 0.27, 0.36, 0.45)
_SATURATION = (0.7, 0.5, 0.3, 0.15, 0.0)
_PIXEL_BLOCK = (2, 3, 4, 6, 8)


# ---- content ---------------------------------------------------------------------------------------------


def _colors(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.uniform(0.05, 0.95, size=(n, 3))  # [n, 3]


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A [h, w, 3] float background in [0, 1]."""
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")  # [h, w]
    c0, c1 = _colors(rng, 2)
    kind = rng.integers(6)
    if kind == 0:  # linear gradient
        angle = rng.uniform(0, 2 * np.pi)
        t = (np.cos(angle) * xx + np.sin(angle) * yy + 1.5) / 3.0
    elif kind == 1:  # radial gradient
        cy, cx = rng.uniform(0.2, 0.8, size=2)
        t = np.clip(np.hypot(yy - cy, xx - cx) / 0.8, 0, 1)
    elif kind == 2:  # sinusoidal grating
        angle, freq = rng.uniform(0, np.pi), rng.uniform(2, 6)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy))
    elif kind == 3:  # smooth random color field
        coarse = rng.uniform(0, 1, size=(4, 4, 3))
        field = ndimage.zoom(coarse, (h / 4, w / 4, 1), order=3)[:h, :w]
        return np.clip(field, 0, 1)
    elif kind == 4:  # checkerboard
        cell = int(rng.integers(6, 17))
        t = ((np.arange(h)[:, None] // cell + np.arange(w)[None, :] // cell) % 2).astype(np.float64)
    else:  # stripes
        period = int(rng.integers(8, 20))
        axis = np.arange(w)[None, :] if rng.integers(2) else np.arange(h)[:, None]
        t = np.broadcast_to(((axis // (period // 2)) % 2).astype(np.float64), (h, w))
    return c0 * (1 - t[..., None]) + c1 * t[..., None]


def _add_shapes(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Pastes 2-5 hard-edged rectangles, ellipses and triangles."""
    h, w, _ = image.shape
    yy, xx = np.mgrid[0:h, 0:w]
    for color in _colors(rng, int(rng.integers(2, 6))):
        cy, cx = rng.uniform(0.15, 0.85) * h, rng.uniform(0.15, 0.85) * w
        ry, rx = rng.uniform(0.1, 0.3) * h, rng.uniform(0.1, 0.3) * w
        kind = rng.integers(3)
        if kind == 0:
            mask = (np.abs(yy - cy) < ry) & (np.abs(xx - cx) < rx)
        elif kind == 1:
            mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
        else:
            mask = (yy > cy - ry) & (yy < cy + ry) & (np.abs(xx - cx) < rx * (yy - cy + ry) / (2 * ry))
        image = np.where(mask[..., None], color, image)
    return image


def make_content(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A clean [height, width, 3] float image in [0, 1]."""
    return _add_shapes(rng, _background(rng, height, width))


def detail_level(image: np.ndarray) -> float:
    """Mean gradient magnitude of the luminance, mapped to [0, 1]."""
    gray = image.mean(axis=-1)
    gy, gx = np.gradient(gray)
    return float(np.clip(np.hypot(gy, gx).mean() / 0.08, 0.0, 1.0))


# ---- distortions -----------------------------------------------------------------------------------------


def apply_distortion(image: np.ndarray, kind: str, level: int, rng: np.random.Generator) -> np.ndarray:
    """Distorts a float [H, W, 3] image in [0, 1]; level 1 (mild) .. 5 (severe); level 0 = unchanged."""
    if not 0 <= level <= 5:
        raise ValueError(f"distortion level must be in 0..5, got {level}")
    if kind == "none" or level == 0:
        return image
    i = level - 1
    if kind == "blur":
        out = ndimage.gaussian_filter(image, sigma=(_BLUR_SIGMA[i], _BLUR_SIGMA[i], 0), mode="reflect")
    elif kind == "noise":
        out = image + rng.normal(0.0, _NOISE_STD[i], size=image.shape)
    elif kind == "jpeg":
        buffer = io.BytesIO()
        Image.fromarray(to_uint8(image)).save(buffer, format="JPEG", quality=_JPEG_QUALITY[i])
        out = np.asarray(Image.open(buffer).convert("RGB"), np.float64) / 255.0
    elif kind == "contrast":
        mean = image.mean(axis=(0, 1), keepdims=True)
        out = mean + (image - mean) * _CONTRAST[i]
    elif kind == "brightness":
        out = image + (_BRIGHTNESS[i] if rng.integers(2) else -_BRIGHTNESS[i])
    elif kind == "saturation":
        gray = image.mean(axis=-1, keepdims=True)
        out = gray + (image - gray) * _SATURATION[i]
    elif kind == "pixelate":
        h, w, _ = image.shape
        block = _PIXEL_BLOCK[i]
        small = Image.fromarray(to_uint8(image)).resize((max(1, w // block), max(1, h // block)), Image.BOX)
        out = np.asarray(small.resize((w, h), Image.NEAREST), np.float64) / 255.0
    else:
        raise ValueError(f"unknown distortion {kind!r}; known: {DISTORTIONS}")
    return np.clip(out, 0.0, 1.0)


def synthetic_mos(kind: str, level: int, detail: float, base_quality: float) -> float:
    """The MOS on 1..5 of content with `detail` and `base_quality` under distortion (`kind`, `level`)."""
    if kind == "none" or level <= 0:
        return 1.0 + 4.0 * base_quality
    if kind in ("blur", "pixelate", "jpeg"):
        modulation = 0.85 + 0.3 * detail
    elif kind == "noise":
        modulation = 1.15 - 0.3 * detail
    else:
        modulation = 1.0
    severity = min(1.0, MAX_SEVERITY[kind] * (level / 5.0) ** 0.8 * modulation)
    return 1.0 + 4.0 * base_quality * (1.0 - severity)


def to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)


def parse_distortions(spec: str | Sequence[str]) -> tuple[str, ...]:
    """A distortion list from a config field: comma-separated names ("" = all of DISTORTIONS), or a sequence."""
    names = [n.strip() for n in spec.split(",")] if isinstance(spec, str) else [str(n).strip() for n in spec]
    names = [n for n in names if n]
    if not names:
        return DISTORTIONS
    unknown = [n for n in names if n not in DISTORTIONS]
    if unknown:
        raise ValueError(f"unknown synthetic distortions {unknown}; known: {', '.join(DISTORTIONS)}")
    return tuple(dict.fromkeys(names))


# ---- the source ------------------------------------------------------------------------------------------


class SyntheticIQA:
    """Random-access synthetic IQA records; record `i` depends only on (seed, split, i)."""

    def __init__(
        self,
        split: str = "train",
        size: int | None = None,
        *,
        seed: int = 0,
        min_side: int = 56,
        max_side: int = 112,
        distortions: str | Sequence[str] = DISTORTIONS,
    ):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
        if not 8 <= min_side <= max_side:
            raise ValueError(f"need 8 <= min_side <= max_side, got {min_side}, {max_side}")
        self.split = split
        self.size = DEFAULT_SIZES[split] if size is None else int(size)
        self.seed = int(seed)
        self.min_side, self.max_side = int(min_side), int(max_side)
        self.distortions = parse_distortions(distortions)

    @property
    def build_info(self) -> tuple[str, list[dict]]:
        """(description, files skipped at build time): generated on the fly, nothing is skipped."""
        return "The synthetic IQA set (procedural distortions, known MOS), generated on the fly.", []

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for SyntheticIQA[{self.split}] of size {self.size}")
        rng = np.random.default_rng([self.seed, SPLITS[self.split], index])
        kind = self.distortions[int(rng.integers(len(self.distortions)))]
        level = 0 if kind == "none" else int(rng.integers(1, 6))
        return self.render(rng, kind, level, name=f"synthetic/{self.split}/{index:07d}.png")

    def __getitems__(self, indices) -> list[dict]:
        return [self[i] for i in indices]

    def render(self, rng: np.random.Generator, kind: str, level: int, name: str = "") -> dict:
        """A record for content drawn from `rng` under distortion (`kind`, `level`)."""
        height, width = (int(v) for v in rng.integers(self.min_side, self.max_side + 1, size=2))
        clean = make_content(rng, height, width)
        base_quality = float(rng.uniform(0.92, 1.0))
        distorted = apply_distortion(clean, kind, level, rng)
        mos = synthetic_mos(kind, level, detail_level(clean), base_quality)
        return {
            "image": encode_png(Image.fromarray(to_uint8(distorted))),
            "image_name": name,
            "mos_raw": mos,
            "mos": mos,
            "dataset": "synthetic",
            "distortion_type": kind,  # "none" for a pristine image
            "distortion_level": level,  # 0 for a pristine image
            "ref_name": "",
            "height": height,
            "width": width,
            "orig_height": height,
            "orig_width": width,
            "resized": False,
        }
