"""Host-side (numpy) index metadata for the vision tower of one sample.

Given the (t, h, w) patch grids of a sample's images, this computes everything the jitted vision tower
needs so that nothing inside a traced function depends on image sizes:
- `vision_pos_ids`: (row, col) of each patch for the 2-D rotary embedding, in processor order;
- `window_index`: the gather that puts patches into window order (windows of
  `window_size // patch_size` patches per side, whole 2x2 merge blocks, frame by frame, image by image);
- `window_segment_ids` / `full_segment_ids`: in window order, one id per window / per image frame, 0 for
  the padding rows; window layers attend within a window, full layers within a frame;
- `merged_rows`: for each image, the row of the merged, window-ordered feature matrix that feeds each of
  its `<|image_pad|>` tokens, in token order.
The semantics are transformers' Qwen2.5-VL (`get_vision_position_ids`, `get_vision_window_index`,
`get_vision_cu_seqlens`); the layout is ours (per-sample, padded to a bucket of P patch rows).
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class VisionLayout:
    vision_pos_ids: np.ndarray  # [P, 2] int32, processor order
    window_index: np.ndarray  # [P] int32, gather into window order
    window_segment_ids: np.ndarray  # [P] int32, window order, 0 = padding
    full_segment_ids: np.ndarray  # [P] int32, window order, 0 = padding
    merged_rows: tuple[np.ndarray, ...]  # per image: [t*h*w // merge**2] int32 rows, in token order


def num_patches(grid_thw: np.ndarray) -> int:
    """Patch rows used by the images with these grids."""
    grid_thw = np.asarray(grid_thw, np.int64).reshape(-1, 3)
    return int(np.prod(grid_thw, axis=1).sum())


def num_image_tokens(grid_thw, spatial_merge_size: int) -> np.ndarray:
    """Number of `<|image_pad|>` tokens (merged patches) for each image grid."""
    grid_thw = np.asarray(grid_thw, np.int64).reshape(-1, 3)
    return (np.prod(grid_thw, axis=1) // spatial_merge_size**2).astype(np.int64)


def sample_layout(
    grid_thw,
    padded_patches: int,
    *,
    spatial_merge_size: int,
    window_size: int,
    patch_size: int,
) -> VisionLayout:
    """The vision metadata of one sample whose images have `grid_thw` [N, 3], padded to `padded_patches` rows."""
    grid_thw = np.asarray(grid_thw, np.int64).reshape(-1, 3)
    merge = spatial_merge_size
    unit = merge * merge
    used = num_patches(grid_thw)
    if padded_patches < used or padded_patches % unit:
        raise ValueError(
            f"padded_patches={padded_patches} must be >= the {used} patches of grids {grid_thw.tolist()} "
            f"and a multiple of {unit}"
        )
    if (grid_thw[:, 1:] % merge).any() or (grid_thw <= 0).any():
        raise ValueError(f"image grids {grid_thw.tolist()} must be positive with h, w divisible by {merge}")
    win = window_size // merge // patch_size  # window side, in merged units
    if win <= 0:
        raise ValueError(f"window_size={window_size} is smaller than one merge block ({merge * patch_size} px)")

    pos_rows, window_units, window_seg, frame_of_unit, merged_rows = [], [], [], [], []
    unit_base = 0  # merged units before this image
    n_windows = 0
    n_frames = 0
    for t, h, w in grid_thw.tolist():
        # 2-D rotary positions in processor order: 2x2 merge blocks are consecutive rows.
        hpos, wpos = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        blocks = (h // merge, merge, w // merge, merge)
        hpos = hpos.reshape(blocks).transpose(0, 2, 1, 3).reshape(-1)
        wpos = wpos.reshape(blocks).transpose(0, 2, 1, 3).reshape(-1)
        pos_rows.append(np.tile(np.stack([hpos, wpos], axis=-1), (t, 1)))

        # Window order of merged units: frame by frame, windows row-major, units row-major inside a window.
        gh, gw = h // merge, w // merge
        nwh, nww = -(-gh // win), -(-gw // win)
        units = np.full((t, nwh * win, nww * win), -1, np.int64)
        units[:, :gh, :gw] = np.arange(t * gh * gw).reshape(t, gh, gw) + unit_base
        units = units.reshape(t, nwh, win, nww, win).transpose(0, 1, 3, 2, 4).reshape(t * nwh * nww, win * win)
        for window in units:
            members = window[window >= 0]
            if members.size:
                n_windows += 1
                window_units.append(members)
                window_seg.append(np.full(members.size, n_windows))
        frame_of_unit.append(np.repeat(np.arange(t) + n_frames + 1, gh * gw))
        n_frames += t
        unit_base += t * gh * gw

    total_units = unit_base
    order = np.concatenate(window_units) if window_units else np.zeros(0, np.int64)  # [U] unit per merged row
    inverse = np.argsort(order)  # unit -> merged row in window order
    start = 0
    for n in num_image_tokens(grid_thw, merge):
        merged_rows.append(inverse[start : start + n].astype(np.int32))
        start += n

    pad = padded_patches - used
    patch_order = (order[:, None] * unit + np.arange(unit)).reshape(-1)  # [used]
    window_index = np.concatenate([patch_order, np.arange(used, padded_patches)]).astype(np.int32)
    frames = np.concatenate(frame_of_unit) if frame_of_unit else np.zeros(0, np.int64)
    window_segment_ids = np.concatenate(
        [np.repeat(np.concatenate(window_seg) if window_seg else np.zeros(0), unit), np.zeros(pad)]
    ).astype(np.int32)
    full_segment_ids = np.concatenate([np.repeat(frames[order], unit), np.zeros(pad)]).astype(np.int32)
    vision_pos_ids = np.concatenate(pos_rows + [np.zeros((pad, 2), np.int64)]).astype(np.int32)
    assert total_units * unit == used
    return VisionLayout(
        vision_pos_ids=vision_pos_ids,
        window_index=window_index,
        window_segment_ids=window_segment_ids,
        full_segment_ids=full_segment_ids,
        merged_rows=tuple(merged_rows),
    )
