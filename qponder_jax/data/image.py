"""Image preprocessing for Qwen2.5-VL on the host: RGB conversion, smart resize, normalization, patches.

The numerics follow transformers' `Qwen2VLImageProcessorPil` step for step, so the patches are bit-equal:
1. convert to RGB (an image with an alpha band or palette transparency is composited onto white);
2. resize with PIL to `smart_resize(h, w)` (both sides multiples of patch * merge, pixels within
   [min_pixels, max_pixels], aspect ratio kept), BICUBIC by default;
3. rescale in float64 (`uint8 * rescale_factor`) and cast to float32, then normalize in float32,
   `(x - mean) / std` per channel;
4. cut into patches in processor order (each 2x2 merge block's patches consecutive), repeating the still
   image `temporal_patch_size` times: `[grid_h * grid_w, C * temporal_patch * patch * patch]`.

One deliberate difference: 16-bit grayscale (`I;16*`, and `I` holding values above 255) is scaled to 8 bits
(`round(x / 257)`) before the RGB conversion. PIL's own `convert("RGB")`, which transformers uses, clips
such images at 255 and turns almost every pixel white.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
from PIL import Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200


@dataclasses.dataclass(frozen=True)
class ImageConfig:
    """The image processor settings of a `preprocessor_config.json`."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
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

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "preprocessor_config.json") -> ImageConfig:
        """Reads a preprocessor config; `min_pixels`/`max_pixels` win over `size` as in transformers."""
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
        if d.get("do_convert_rgb") is False:
            raise ValueError(f"{source}: do_convert_rgb=false is not supported (images are always converted to RGB)")
        config = cls(**kwargs)
        if config.min_pixels > config.max_pixels or config.min_pixels <= 0:
            raise ValueError(
                f"{source}: need 0 < min_pixels <= max_pixels, got {config.min_pixels}, {config.max_pixels}"
            )
        if len(config.image_mean) != 3 or len(config.image_std) != 3:
            raise ValueError(f"{source}: image_mean and image_std need 3 values (RGB)")
        return config

    def to_dict(self) -> dict[str, Any]:
        """A `preprocessor_config.json` dict that transformers' Qwen2-VL image processor reads."""
        return {
            "image_processor_type": "Qwen2VLImageProcessor",
            "processor_class": "Qwen2_5_VLProcessor",
            "do_convert_rgb": True,
            "do_resize": self.do_resize,
            "do_rescale": self.do_rescale,
            "do_normalize": self.do_normalize,
            "min_pixels": self.min_pixels,
            "max_pixels": self.max_pixels,
            "size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels},
            "patch_size": self.patch_size,
            "temporal_patch_size": self.temporal_patch_size,
            "merge_size": self.merge_size,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "rescale_factor": self.rescale_factor,
            "resample": self.resample,
        }


def smart_resize(height: int, width: int, *, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The (height, width) closest to the input with sides divisible by `factor` and pixels in range."""
    if min(height, width) <= 0:
        raise ValueError(f"image size {height}x{width} is empty")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"image size {height}x{width}: aspect ratio {max(height, width) / min(height, width):.1f} "
            f"exceeds {MAX_ASPECT_RATIO}"
        )
    new_h = round(height / factor) * factor
    new_w = round(width / factor) * factor
    if new_h * new_w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        new_h = max(factor, math.floor(height / scale / factor) * factor)
        new_w = max(factor, math.floor(width / scale / factor) * factor)
    elif new_h * new_w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        new_h = math.ceil(height * scale / factor) * factor
        new_w = math.ceil(width * scale / factor) * factor
    return new_h, new_w


def _sixteen_bit_to_8bit(image: Image.Image) -> Image.Image:
    """Scales a 16-bit grayscale image to `L` (0..65535 -> 0..255); other images pass through."""
    if image.mode.startswith("I;16") or (image.mode == "I" and image.getextrema()[1] > 255):
        values = np.asarray(image, dtype=np.float64)  # [H, W]
        return Image.fromarray(np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8), mode="L")
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """An RGB copy of a PIL image: alpha and palette transparency composited onto white, as transformers does."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(image).__name__}")
    image = _sixteen_bit_to_8bit(image)
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def normalize(pixels: np.ndarray, config: ImageConfig) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [3, H, W], rescaled and normalized in transformers' dtypes and order."""
    image = np.moveaxis(pixels, -1, 0)  # [3, H, W]
    if config.do_rescale:
        image = (image.astype(np.float64) * config.rescale_factor).astype(np.float32)
    image = image.astype(np.float32)
    if config.do_normalize:
        mean = np.asarray(config.image_mean, np.float32)[:, None, None]
        std = np.asarray(config.image_std, np.float32)[:, None, None]
        image = (image - mean) / std
    return image


def patchify(image: np.ndarray, config: ImageConfig) -> tuple[np.ndarray, np.ndarray]:
    """float32 [3, H, W] -> (patches [grid_h * grid_w, patch_dim], grid_thw [3]) in processor order."""
    channels, height, width = image.shape
    p, m, tp = config.patch_size, config.merge_size, config.temporal_patch_size
    if height % (p * m) or width % (p * m):
        raise ValueError(f"image {height}x{width} is not a multiple of patch_size * merge_size = {p * m}")
    grid_h, grid_w = height // p, width // p
    blocks = image.reshape(channels, grid_h // m, m, p, grid_w // m, m, p)
    # (block row, block col, row in block, col in block, channel, patch row, patch col)
    blocks = blocks.transpose(1, 4, 2, 5, 0, 3, 6)
    frames = np.broadcast_to(blocks[:, :, :, :, :, None], (*blocks.shape[:5], tp, p, p))  # still image x tp frames
    patches = np.ascontiguousarray(frames).reshape(grid_h * grid_w, channels * tp * p * p)
    return patches.astype(np.float32, copy=False), np.array([1, grid_h, grid_w], np.int32)


def preprocess_image(image: Image.Image, config: ImageConfig) -> tuple[np.ndarray, np.ndarray]:
    """A PIL image -> (patches [n_patch, patch_dim] float32, grid_thw [3] int32)."""
    rgb = to_rgb(image)
    if config.do_resize:
        height, width = smart_resize(
            rgb.height, rgb.width, factor=config.factor, min_pixels=config.min_pixels, max_pixels=config.max_pixels
        )
        rgb = rgb.resize((width, height), resample=Image.Resampling(config.resample))
    return patchify(normalize(np.asarray(rgb, dtype=np.uint8), config), config)


def num_patches_for_size(height: int, width: int, config: ImageConfig) -> int:
    """Patch rows an image of this size becomes (merged image tokens = this // merge_size**2)."""
    if config.do_resize:
        height, width = smart_resize(
            height, width, factor=config.factor, min_pixels=config.min_pixels, max_pixels=config.max_pixels
        )
    return (height // config.patch_size) * (width // config.patch_size)
