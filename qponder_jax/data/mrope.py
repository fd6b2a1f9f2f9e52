"""M-RoPE position ids on the host (numpy), with the semantics of transformers 5.23's Qwen2.5-VL `get_rope_index`.

For one sequence of real (unpadded) tokens:
- text tokens get 1-D positions, the same value on all three axes, counting up by one;
- each image's (or video's) run of `<|image_pad|>` tokens, `t * (h / merge) * (w / merge)` long, gets 3-D
  positions `start + (t_index * interval, row, col)` over its merged grid (interval 1 for images,
  `tokens_per_second * second_per_grid_t` for videos);
- the text after it continues at `start + max(h, w) / merge` (for an image: its largest position + 1).
`rope_delta = max position + 1 - number of tokens`: decoding token i (0-based, after the prompt) uses position
`i + rope_delta` on all three axes. In a padded batch, padding tokens get position 0, as transformers does.
"""

from __future__ import annotations

import numpy as np


def rope_index(
    input_ids,
    *,
    image_token_id: int,
    image_grid_thw=None,
    video_token_id: int | None = None,
    video_grid_thw=None,
    second_per_grid_ts=None,
    spatial_merge_size: int = 2,
    tokens_per_second: int = 2,
) -> tuple[np.ndarray, int]:
    """Positions of one unpadded sequence: (position_ids [3, T] int32, rope_delta).

    `image_grid_thw` [N_img, 3] / `video_grid_thw` [N_vid, 3] are the patch grids in order of appearance;
    every vision token must belong to exactly one of them.
    """
    ids = np.asarray(input_ids).reshape(-1)  # [T]
    length = ids.shape[0]
    if length == 0:
        raise ValueError("rope_index: empty sequence")
    grids = {
        1: np.asarray(image_grid_thw if image_grid_thw is not None else np.zeros((0, 3)), np.int64).reshape(-1, 3),
        2: np.asarray(video_grid_thw if video_grid_thw is not None else np.zeros((0, 3)), np.int64).reshape(-1, 3),
    }
    intervals = {
        1: np.ones(len(grids[1]), np.float32),
        2: (
            np.float32(tokens_per_second) * np.asarray(second_per_grid_ts, np.float32).reshape(-1)
            if second_per_grid_ts is not None
            else np.full(len(grids[2]), np.float32(tokens_per_second))
        ),
    }
    if len(intervals[2]) != len(grids[2]):
        raise ValueError(f"second_per_grid_ts has {len(intervals[2])} entries for {len(grids[2])} videos")
    modality = np.zeros(length, np.int8)  # 0 text, 1 image, 2 video
    modality[ids == image_token_id] = 1
    if video_token_id is not None:
        modality[ids == video_token_id] = 2
    vision_at = np.flatnonzero(modality)

    positions = np.zeros((3, length), np.int64)
    used = {1: 0, 2: 0}
    cursor, current = 0, 0  # next token index, next text position
    while cursor < length:
        later = vision_at[np.searchsorted(vision_at, cursor) :]
        stop = int(later[0]) if later.size else length
        positions[:, cursor:stop] = np.arange(stop - cursor) + current  # text run
        current += stop - cursor
        if stop == length:
            break
        kind = int(modality[stop])
        name = "image" if kind == 1 else "video"
        if used[kind] >= len(grids[kind]):
            raise ValueError(f"more {name} token runs than the {len(grids[kind])} {name} grids given")
        t, h, w = (int(v) for v in grids[kind][used[kind]])
        gh, gw = h // spatial_merge_size, w // spatial_merge_size
        count = t * gh * gw
        if stop + count > length or (modality[stop : stop + count] != kind).any():
            raise ValueError(
                f"{name} {used[kind]} (grid {t}x{h}x{w}) needs {count} consecutive {name} tokens at index {stop}"
            )
        temporal = (np.arange(t, dtype=np.float32) * intervals[kind][used[kind]]).astype(np.int64)
        tt, hh, ww = np.meshgrid(temporal, np.arange(gh), np.arange(gw), indexing="ij")
        positions[:, stop : stop + count] = np.stack([tt, hh, ww]).reshape(3, count) + current
        current += max(gh, gw)
        used[kind] += 1
        cursor = stop + count
    for kind, name in ((1, "image"), (2, "video")):
        if used[kind] != len(grids[kind]):
            raise ValueError(f"{len(grids[kind])} {name} grids given but only {used[kind]} {name} token runs found")
    delta = int(positions.max()) + 1 - length
    return positions.astype(np.int32), delta


def batch_rope_index(
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    image_grid_thw: list,
    *,
    image_token_id: int,
    spatial_merge_size: int = 2,
) -> tuple[np.ndarray, np.ndarray]:
    """Positions of a padded batch: (position_ids [3, B, T] int32, rope_deltas [B] int32); padding gets 0.

    `image_grid_thw[b]` holds sample b's image grids [N_b, 3]; `attention_mask` [B, T] marks real tokens.
    """
    input_ids = np.asarray(input_ids)
    mask = np.asarray(attention_mask).astype(bool)
    batch, length = input_ids.shape
    positions = np.zeros((3, batch, length), np.int32)
    deltas = np.zeros(batch, np.int32)
    for b in range(batch):
        pos, deltas[b] = rope_index(
            input_ids[b][mask[b]],
            image_token_id=image_token_id,
            image_grid_thw=image_grid_thw[b],
            spatial_merge_size=spatial_merge_size,
        )
        positions[:, b, mask[b]] = pos
    return positions, deltas
