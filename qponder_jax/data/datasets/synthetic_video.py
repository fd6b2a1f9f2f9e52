"""The synthetic VQA set: moving-pattern clips with known distortions and a MOS derived from them.

`write_synthetic_vqa(root, ...)` writes a release (videos/<split>_<i>.mkv + labels.csv) that the
`synthetic_vqa` tfds builder reads like any official layout; `datasets.build("synthetic_vqa", None, data_dir)`
writes it under data_dir first. Clip `i` of a split is made from (seed, split, i), deterministically, and
stored losslessly (FFV1, RGB), so the decoded frames are exactly the distorted frames.

Content: a drifting background (grating, checkerboard, gradient or smooth color field) with one or two
hard-edged shapes moving across it. Distortions, at levels 1..5 or "none" (level 0): spatial (blur, noise,
compression = per-frame JPEG) and temporal (stutter = frames held, flicker = brightness oscillation, shake =
random global jitter). MOS (raw, already on 1-5; the builder then normalizes it like every set):
    mos_raw = 1 + 4 * q * (1 - MAX_SEVERITY[type] * (level / 5) ** 0.8),   q ~ U[0.92, 1] per clip
so a stronger distortion always means a lower score for the same content.
"""

from __future__ import annotations

import csv
import fractions
import io
import json
from collections.abc import Sequence
from pathlib import Path

import av
import numpy as np
from PIL import Image
from scipy import ndimage

DISTORTIONS = ("none", "blur", "noise", "compression", "stutter", "flicker", "shake")
MAX_SEVERITY = {"none": 0.0, "blur": 0.8, "noise": 0.75, "compression": 0.7, "stutter": 0.6, "flicker": 0.55,
                "shake": 0.5}  # fmt: skip
SPLITS = {"train": 0, "validation": 1, "test": 2}
LABELS_FILE = "labels.csv"
LABEL_COLUMNS = ("name", "mos", "split", "distortion_type", "distortion_level", "ref_name")

_BLUR_SIGMA = (0.6, 1.0, 1.5, 2.2, 3.0)
_NOISE_STD = (0.03, 0.06, 0.1, 0.15, 0.22)
_JPEG_QUALITY = (40, 25, 15, 9, 5)
_STUTTER_HOLD = (2, 3, 4, 6, 8)
_FLICKER_AMPLITUDE = (0.08, 0.15, 0.22, 0.3, 0.4)
_SHAKE_PIXELS = (1, 2, 3, 4, 6)


def write_video(
    path: str | Path,
    frames: np.ndarray,
    fps: float = 8.0,
    *,
    timestamps: Sequence[float] | None = None,
    codec: str = "ffv1",
) -> Path:
    """Encodes frames [F, H, W, 3] uint8 RGB into `path` (container from the suffix).

    `timestamps` (seconds, ascending) give a variable frame rate; else frame i is at i / fps. "ffv1" is lossless
    RGB (any size); other codecs ("mpeg4", "libx264") use yuv420p and need even sides.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = np.asarray(frames, np.uint8)
    height, width = frames.shape[1:3]
    times = np.arange(len(frames)) / fps if timestamps is None else np.asarray(timestamps, np.float64)
    time_base = fractions.Fraction(1, 1000)
    container = av.open(str(path), "w")
    try:
        stream = container.add_stream(codec, rate=fractions.Fraction(fps).limit_denominator(1000))
        stream.width, stream.height = width, height
        stream.pix_fmt = "rgb32" if codec == "ffv1" else "yuv420p"
        stream.codec_context.time_base = stream.time_base = time_base
        for frame_rgb, time in zip(frames, times):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame_rgb), format="rgb24")
            frame.pts, frame.time_base = round(time * 1000), time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    finally:
        container.close()
    return path


# ---- content and distortions -------------------------------------------------------------------------------


def _background(rng: np.random.Generator, h: int, w: int, num_frames: int) -> np.ndarray:
    """[F, h, w, 3] float in [0, 1]: a pattern drifting by a constant velocity."""
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    c0, c1 = rng.uniform(0.05, 0.95, size=(2, 3))
    vy, vx = rng.uniform(-1.5, 1.5, size=2)  # pixels per frame
    kind = int(rng.integers(4))
    angle, period, cell = rng.uniform(0, np.pi), rng.uniform(6, 16), int(rng.integers(4, 9))
    field = ndimage.zoom(rng.uniform(0, 1, size=(4, 4)), (2 * h / 4, 2 * w / 4), order=3)  # [2h, 2w]
    out = np.empty((num_frames, h, w, 3))
    for f in range(num_frames):
        y, x = yy + vy * f, xx + vx * f
        if kind == 0:  # grating
            t = 0.5 + 0.5 * np.sin(2 * np.pi * (np.cos(angle) * x + np.sin(angle) * y) / period)
        elif kind == 1:  # checkerboard
            t = ((np.floor(y / cell) + np.floor(x / cell)) % 2).astype(np.float64)
        elif kind == 2:  # linear gradient
            t = np.clip((np.cos(angle) * x + np.sin(angle) * y) / (h + w) + 0.5, 0, 1)
        else:  # smooth field, panned
            oy, ox = int(abs(vy * f)) % h, int(abs(vx * f)) % w
            t = np.clip(field[oy : oy + h, ox : ox + w], 0, 1)
        out[f] = c0 + (c1 - c0) * t[..., None]
    return out


def _add_shapes(rng: np.random.Generator, clip: np.ndarray) -> None:
    """Draws 1-2 hard-edged moving rectangles or discs into clip [F, h, w, 3] in place."""
    num_frames, h, w = clip.shape[:3]
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(int(rng.integers(1, 3))):
        color = rng.uniform(0, 1, size=3)
        size = rng.uniform(0.15, 0.35) * min(h, w)
        y0, x0 = rng.uniform(0, h), rng.uniform(0, w)
        vy, vx = rng.uniform(-2, 2, size=2)
        disc = bool(rng.integers(2))
        for f in range(num_frames):
            cy, cx = (y0 + vy * f) % h, (x0 + vx * f) % w
            if disc:
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 < (size / 2) ** 2
            else:
                mask = (abs(yy - cy) < size / 2) & (abs(xx - cx) < size / 2)
            clip[f][mask] = color


def _jpeg(frame: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))


def distort(clip: np.ndarray, kind: str, level: int, rng: np.random.Generator) -> np.ndarray:
    """clip [F, h, w, 3] float in [0, 1] -> distorted uint8 clip [F, h, w, 3]."""
    if kind == "none" or level == 0:
        out = clip
    elif kind == "blur":
        out = ndimage.gaussian_filter(clip, sigma=(0, _BLUR_SIGMA[level - 1], _BLUR_SIGMA[level - 1], 0))
    elif kind == "noise":
        out = clip + rng.normal(0, _NOISE_STD[level - 1], size=clip.shape)
    elif kind == "stutter":
        hold = _STUTTER_HOLD[level - 1]
        out = clip[(np.arange(len(clip)) // hold) * hold]  # each shown frame is held `hold` frames
    elif kind == "flicker":
        phase = rng.uniform(0, 2 * np.pi)
        gain = 1 + _FLICKER_AMPLITUDE[level - 1] * np.sin(np.pi * np.arange(len(clip)) * 0.9 + phase)  # [F]
        out = clip * gain[:, None, None, None]
    elif kind == "shake":
        amplitude = _SHAKE_PIXELS[level - 1]
        shifts = rng.integers(-amplitude, amplitude + 1, size=(len(clip), 2))  # [F, 2]
        out = np.stack([np.roll(frame, tuple(s), axis=(0, 1)) for frame, s in zip(clip, shifts)])
    elif kind == "compression":
        frames = np.round(np.clip(clip, 0, 1) * 255).astype(np.uint8)
        return np.stack([_jpeg(frame, _JPEG_QUALITY[level - 1]) for frame in frames])
    else:
        raise ValueError(f"unknown distortion {kind!r}; known: {DISTORTIONS}")
    return np.round(np.clip(out, 0, 1) * 255).astype(np.uint8)


def clip_params(seed: int, split: str, index: int) -> dict:
    """The random choices of clip `index` of `split` (content seed, distortion, level, base quality)."""
    rng = np.random.default_rng([seed, SPLITS[split], index])
    kind = DISTORTIONS[int(rng.integers(len(DISTORTIONS)))]
    level = 0 if kind == "none" else int(rng.integers(1, 6))
    base_quality = float(rng.uniform(0.92, 1.0))
    mos = 1.0 + 4.0 * base_quality * (1.0 - MAX_SEVERITY[kind] * (level / 5) ** 0.8)
    return {"content_seed": int(rng.integers(2**31)), "distortion_type": kind, "distortion_level": level,
            "mos": mos}  # fmt: skip


def make_clip(params: dict, min_side: int, max_side: int, num_frames: int) -> np.ndarray:
    """[F, h, w, 3] uint8 distorted clip of `clip_params`."""
    rng = np.random.default_rng(params["content_seed"])
    h, w = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
    clip = _background(rng, h, w, num_frames)
    _add_shapes(rng, clip)
    return distort(clip, params["distortion_type"], params["distortion_level"], rng)


def write_synthetic_vqa(
    root: str | Path,
    sizes: dict[str, int],
    *,
    seed: int = 0,
    min_side: int = 32,
    max_side: int = 48,
    num_frames: int = 16,
    fps: float = 8.0,
) -> Path:
    """Writes the release (videos/*.mkv + labels.csv) under root; a no-op when the same release is there."""
    root = Path(root)
    settings = dict(sizes=sizes, seed=seed, min_side=min_side, max_side=max_side, num_frames=num_frames, fps=fps)
    settings_file = root / "synthetic_vqa.json"
    if (root / LABELS_FILE).is_file() and settings_file.is_file():
        if json.loads(settings_file.read_text()) == json.loads(json.dumps(settings)):
            return root
    rows = []
    for split, size in sizes.items():
        if split not in SPLITS:
            raise ValueError(f"synthetic VQA: unknown split {split!r}; known: {sorted(SPLITS)}")
        for i in range(size):
            params = clip_params(seed, split, i)
            name = f"videos/{split}_{i:05d}.mkv"
            write_video(root / name, make_clip(params, min_side, max_side, num_frames), fps)
            rows.append([name, f"{params['mos']:.6f}", split, params["distortion_type"],
                         params["distortion_level"], f"content_{params['content_seed']}"])  # fmt: skip
    with open(root / LABELS_FILE, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(LABEL_COLUMNS)
        writer.writerows(rows)
    settings_file.write_text(json.dumps(settings))
    return root
