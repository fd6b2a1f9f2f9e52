"""Video preprocessing for Qwen2.5-VL on the host: a sampled `VideoClip` -> normalized patches, grid, seconds per grid.

The rules are transformers' `Qwen2VLVideoProcessor` (its defaults are qwen-vl-utils' video defaults), step by step:
1. per-frame pixel cap: with a total budget, `max_pixels = max(min(max_pixels, total_pixels * temporal_patch //
   frames), int(1.05 * min_pixels))` (transformers' `cap_pixels_per_frame`, qwen-vl-utils' `total_pixels`);
2. resize every frame to `smart_resize(h, w)` (sides multiples of patch * merge, pixels in [min, max]), BICUBIC;
3. rescale and normalize fused in float32, `(x - mean / rescale) / (std / rescale)`, as transformers' video
   processor does;
4. pad the frames to a multiple of `temporal_patch_size` by repeating the last frame;
5. cut into patches in processor order: each 2x2 merge block's patches consecutive, and within a patch row the
   `temporal_patch_size` frames of one temporal patch: `[t * h * w, C * temporal_patch * patch * patch]`.

One unavoidable difference: transformers resizes video frames with torchvision (not installed here); we resize with
PIL, whose antialiased bicubic filter torchvision's emulates, so resized pixels can differ by a rounding step.
`second_per_grid_t = temporal_patch_size / clip.fps` is what transformers' Qwen2.5-VL processor passes to M-RoPE.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import einops
import numpy as np
from PIL import Image

from qponder_jax.data.image import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, smart_resize
from qponder_jax.data.video import VideoClip

VIDEO_MIN_PIXELS = 128 * 28 * 28  # transformers' Qwen2VLVideoProcessor size["shortest_edge"]
VIDEO_MAX_PIXELS = 768 * 28 * 28  # size["longest_edge"]
MAX_VIDEO_TOKENS = 128000  # transformers' max_video_tokens: the total budget is 90% of this many tokens' pixels
VIDEO_TOTAL_PIXELS = int(MAX_VIDEO_TOKENS * 28 * 28 * 0.9)  # qwen-vl-utils' VIDEO_TOTAL_PIXELS


@dataclasses.dataclass(frozen=True)
class VideoConfig:
    """The video processor settings of a `video_preprocessor_config.json`."""

    min_pixels: int = VIDEO_MIN_PIXELS  # per frame, after resize
    max_pixels: int = VIDEO_MAX_PIXELS  # per frame, before the total budget
    total_pixels: int | None = VIDEO_TOTAL_PIXELS  # pixel budget of a whole video (None: no budget)
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = int(Image.Resampling.BICUBIC)
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True

    @property
    def factor(self) -> int:
        """Both resized sides are multiples of this many pixels (one merge block)."""
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        """Length of one patch row: 3 * temporal_patch * patch * patch."""
        return 3 * self.temporal_patch_size * self.patch_size**2

    def frame_max_pixels(self, num_frames: int) -> int:
        """The per-frame pixel cap of a clip of `num_frames` frames under the total budget."""
        if self.total_pixels is None:
            return self.max_pixels
        share = self.total_pixels * self.temporal_patch_size // num_frames
        return max(min(self.max_pixels, share), int(self.min_pixels * 1.05))

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "video_preprocessor_config.json") -> VideoConfig:
        """Reads a video processor config; `min_pixels`/`max_pixels` win over `size` as in transformers.

        The total budget: `total_pixels` (qwen-vl-utils' name) if given, else transformers' `cap_pixels_per_frame`
        (false: no budget) with `max_video_tokens`.
        """
        size = d.get("size") or {}
        kwargs: dict[str, Any] = {}
        min_pixels = d.get("min_pixels", size.get("shortest_edge", size.get("min_pixels")))
        max_pixels = d.get("max_pixels", size.get("longest_edge", size.get("max_pixels")))
        if min_pixels is not None:
            kwargs["min_pixels"] = int(min_pixels)
        if max_pixels is not None:
            kwargs["max_pixels"] = int(max_pixels)
        for key in ("patch_size", "temporal_patch_size", "merge_size", "resample"):
            if d.get(key) is not None:
                kwargs[key] = int(d[key])
        for key in ("image_mean", "image_std"):
            if d.get(key) is not None:
                value = d[key]
                kwargs[key] = tuple(float(v) for v in (value if isinstance(value, list | tuple) else [value] * 3))
        if d.get("rescale_factor") is not None:
            kwargs["rescale_factor"] = float(d["rescale_factor"])
        for key in ("do_resize", "do_rescale", "do_normalize"):
            if d.get(key) is not None:
                kwargs[key] = bool(d[key])
        factor = kwargs.get("patch_size", cls.patch_size) * kwargs.get("merge_size", cls.merge_size)
        if d.get("total_pixels") is not None:
            kwargs["total_pixels"] = int(d["total_pixels"])
        elif d.get("cap_pixels_per_frame") is False:
            kwargs["total_pixels"] = None
        elif d.get("max_video_tokens") is not None:
            kwargs["total_pixels"] = int(int(d["max_video_tokens"]) * factor * factor * 0.9)
        if d.get("do_convert_rgb") is False:
            raise ValueError(f"{source}: do_convert_rgb=false is not supported (frames are RGB)")
        config = cls(**kwargs)
        if config.min_pixels > config.max_pixels or config.min_pixels <= 0:
            raise ValueError(
                f"{source}: need 0 < min_pixels <= max_pixels, got {config.min_pixels}, {config.max_pixels}"
            )
        if config.total_pixels is not None and config.total_pixels <= 0:
            raise ValueError(f"{source}: total_pixels must be positive, got {config.total_pixels}")
        if len(config.image_mean) != 3 or len(config.image_std) != 3:
            raise ValueError(f"{source}: image_mean and image_std need 3 values (RGB)")
        return config


def check_clip(clip: Any) -> VideoClip:
    """`clip` if it is a well-formed `VideoClip`; raises naming the problem and the clip's path otherwise."""
    if not isinstance(clip, VideoClip):
        raise TypeError(f"expected a VideoClip, got {type(clip).__name__}")
    name = f"video {clip.path!r}: " if clip.path else ""
    frames = clip.frames
    if not isinstance(frames, np.ndarray):
        raise TypeError(f"{name}frames must be a numpy array, got {type(frames).__name__}")
    if frames.dtype != np.uint8:
        raise TypeError(f"{name}frames must be uint8 RGB, got dtype {frames.dtype}")
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"{name}frames must have shape [F, H, W, 3], got {frames.shape}")
    if frames.shape[0] == 0:
        raise ValueError(f"{name}the clip has 0 frames")
    if not np.isfinite(clip.fps) or clip.fps <= 0:
        raise ValueError(f"{name}fps must be positive, got {clip.fps}")
    return clip


def resized_size(num_frames: int, height: int, width: int, config: VideoConfig) -> tuple[int, int]:
    """The (height, width) every frame of a clip of this size is resized to."""
    if not config.do_resize:
        return height, width
    return smart_resize(
        height,
        width,
        factor=config.factor,
        min_pixels=config.min_pixels,
        max_pixels=config.frame_max_pixels(num_frames),
    )


def normalize_frames(frames: np.ndarray, config: VideoConfig) -> np.ndarray:
    """uint8 [F, H, W, 3] -> float32 [F, 3, H, W], rescaled and normalized as transformers' video processor (fused)."""
    video = np.moveaxis(frames, -1, 1).astype(np.float32)  # [F, 3, H, W]
    mean = np.asarray(config.image_mean, np.float32)
    std = np.asarray(config.image_std, np.float32)
    if config.do_rescale and config.do_normalize:
        scale = np.float32(1.0 / config.rescale_factor)
        mean, std = mean * scale, std * scale
    elif config.do_rescale:
        return video * np.float32(config.rescale_factor)
    if config.do_normalize:
        video = (video - mean[:, None, None]) / std[:, None, None]
    return video


def patchify_frames(video: np.ndarray, config: VideoConfig) -> tuple[np.ndarray, np.ndarray]:
    """float32 [F, 3, H, W] -> (patches [t * h * w, patch_dim], grid_thw [3]), padding F by repeating the last frame."""
    num_frames, _, height, width = video.shape
    p, m, tp = config.patch_size, config.merge_size, config.temporal_patch_size
    if height % (p * m) or width % (p * m):
        raise ValueError(f"frames {height}x{width} are not a multiple of patch_size * merge_size = {p * m}")
    if pad := -num_frames % tp:
        video = np.concatenate([video, np.repeat(video[-1:], pad, axis=0)])  # [F + pad, 3, H, W]
    grid = np.array([video.shape[0] // tp, height // p, width // p], np.int32)
    patches = einops.rearrange(
        video,
        "(t tp) c (bh mh ph) (bw mw pw) -> (t bh bw mh mw) (c tp ph pw)",
        tp=tp,
        mh=m,
        mw=m,
        ph=p,
        pw=p,
    )  # [t * h * w, patch_dim], each 2x2 merge block's patches consecutive
    return np.ascontiguousarray(patches, np.float32), grid


def preprocess_video(clip: VideoClip, config: VideoConfig) -> tuple[np.ndarray, np.ndarray, float]:
    """A sampled clip -> (patches [t*h*w, patch_dim] float32, grid_thw [3] int32, second_per_grid_t)."""
    clip = check_clip(clip)
    num_frames, height, width, _ = clip.frames.shape
    try:
        new_h, new_w = resized_size(num_frames, height, width, config)
    except ValueError as e:
        raise ValueError(f"video {clip.path!r}: {e}" if clip.path else str(e)) from e
    frames = clip.frames
    if (new_h, new_w) != (height, width):
        resample = Image.Resampling(config.resample)
        frames = np.stack([np.asarray(Image.fromarray(f).resize((new_w, new_h), resample=resample)) for f in frames])
    patches, grid = patchify_frames(normalize_frames(frames, config), config)
    return patches, grid, config.temporal_patch_size / float(clip.fps)


def num_video_patches(num_frames: int, height: int, width: int, config: VideoConfig) -> int:
    """Patch rows a clip of this size becomes (merged video tokens = this // merge_size**2)."""
    new_h, new_w = resized_size(num_frames, height, width, config)
    grid_t = -(-num_frames // config.temporal_patch_size)
    return grid_t * (new_h // config.patch_size) * (new_w // config.patch_size)
