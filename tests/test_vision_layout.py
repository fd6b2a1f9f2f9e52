"""Host-side vision metadata against transformers' own index functions."""

import numpy as np
import pytest
import torch
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

from qponder_jax.model.vision_layout import num_image_tokens, sample_layout

GRIDS = [
    [[1, 4, 4]],  # one 56x56 image: a single partial window
    [[1, 10, 14]],  # non-multiple of the window
    [[1, 16, 8], [1, 4, 22]],  # two images in one sample, a full-window multiple and a wide one
    [[2, 6, 6]],  # two temporal frames
]


def _segments_from_cu(cu, n):
    seg = np.zeros(n, np.int32)
    for i, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
        seg[a:b] = i + 1
    return seg


@pytest.mark.parametrize("grids", GRIDS)
@pytest.mark.parametrize("window_size", [112, 56])
def test_layout_matches_transformers(grids, window_size):
    grid = torch.tensor(grids)
    used = int(grid.prod(-1).sum())
    padded = used + 8
    lay = sample_layout(grids, padded, spatial_merge_size=2, window_size=window_size, patch_size=14)

    pos = get_vision_position_ids(grid, 2).numpy()
    np.testing.assert_array_equal(lay.vision_pos_ids[:used], pos)
    assert (lay.vision_pos_ids[used:] == 0).all()

    win_index, cu_win = get_vision_window_index(grid, 2, window_size, 14)
    patch_index = (win_index.numpy()[:, None] * 4 + np.arange(4)).reshape(-1)
    np.testing.assert_array_equal(lay.window_index[:used], patch_index)
    np.testing.assert_array_equal(lay.window_index[used:], np.arange(used, padded))
    np.testing.assert_array_equal(lay.window_segment_ids[:used], _segments_from_cu(cu_win.numpy(), used))
    assert (lay.window_segment_ids[used:] == 0).all()

    # full attention: one segment per frame; in window order, the frame of each permuted patch
    frame_seg = _segments_from_cu(get_vision_cu_seqlens(grid).numpy(), used)
    np.testing.assert_array_equal(lay.full_segment_ids[:used], frame_seg[patch_index])
    assert (lay.full_segment_ids[used:] == 0).all()

    # merged rows undo the window permutation: token j of image i reads the row holding its merged unit
    reverse = torch.argsort(win_index).numpy()
    counts = num_image_tokens(grids, 2)
    np.testing.assert_array_equal(np.concatenate(lay.merged_rows), reverse)
    assert [len(r) for r in lay.merged_rows] == counts.tolist()


def test_layout_errors():
    with pytest.raises(ValueError, match="padded_patches"):
        sample_layout([[1, 4, 4]], 12, spatial_merge_size=2, window_size=112, patch_size=14)
    with pytest.raises(ValueError, match="divisible"):
        sample_layout([[1, 5, 4]], 32, spatial_merge_size=2, window_size=112, patch_size=14)


def test_empty_sample_is_all_padding():
    lay = sample_layout(np.zeros((0, 3)), 8, spatial_merge_size=2, window_size=112, patch_size=14)
    assert (lay.window_segment_ids == 0).all() and (lay.full_segment_ids == 0).all()
    np.testing.assert_array_equal(lay.window_index, np.arange(8))
    assert lay.merged_rows == ()
