"""The processor's data contracts: `Example`, one encoded conversation before padding, and `Buckets`, the padded
sizes `Processor.collate` may pick from."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Buckets:
    """Allowed padded sizes; a batch takes the smallest bucket that fits its largest sample on each axis."""

    tokens: tuple[int, ...] = (128, 256, 512, 1024, 2048, 4096, 8192, 16384)  # T
    patches: tuple[int, ...] = (0, 256, 1024, 4096, 16384)  # P, patch rows per sample (multiples of merge**2)
    images: tuple[int, ...] = (0, 1, 2, 4, 8)  # M, vision slots (images + videos) per sample

    def pick(self, axis: str, needed: int) -> int:
        """The smallest bucket of `axis` holding `needed`; raises if none does."""
        sizes = sorted(getattr(self, axis))
        for size in sizes:
            if size >= needed:
                return size
        raise ValueError(f"{needed} {axis} exceed the largest {axis} bucket {sizes[-1]}")


@dataclasses.dataclass(frozen=True)
class Example:
    """One encoded conversation, unpadded. Its images and videos fill S vision slots, in text order."""

    input_ids: np.ndarray  # [T] int32
    loss_mask: np.ndarray  # [T] bool, True on assistant content + its <|im_end|>
    position_ids: np.ndarray  # [3, T] int32, M-RoPE
    rope_delta: int  # max position + 1 - T
    pixel_values: np.ndarray  # [n_patch, D_patch] float32, processor order, slot after slot
    vision_grid_thw: np.ndarray  # [S, 3] int32, the (t, h, w) patch grid of each slot
    vision_token_counts: np.ndarray  # [S] int32, <|image_pad|> / <|video_pad|> tokens per slot
    slot_is_video: np.ndarray  # [S] bool
    second_per_grid_ts: np.ndarray  # [V] float32, seconds per temporal patch of each video
    example_id: str = ""  # names the record in error messages

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_patches(self) -> int:
        return int(self.pixel_values.shape[0])

    @property
    def image_grid_thw(self) -> np.ndarray:
        """[N, 3] int32: the images' grids (transformers' `image_grid_thw`)."""
        return self.vision_grid_thw[~self.slot_is_video]

    @property
    def image_token_counts(self) -> np.ndarray:
        return self.vision_token_counts[~self.slot_is_video]  # [N]

    @property
    def video_grid_thw(self) -> np.ndarray:
        """[V, 3] int32: the videos' grids (transformers' `video_grid_thw`)."""
        return self.vision_grid_thw[self.slot_is_video]

    def split_pixel_values(self) -> tuple[np.ndarray, np.ndarray]:
        """(image patch rows, video patch rows): transformers' `pixel_values` and `pixel_values_videos`."""
        rows = np.repeat(self.slot_is_video, np.prod(self.vision_grid_thw, axis=1))  # [n_patch] True on video rows
        return self.pixel_values[~rows], self.pixel_values[rows]
