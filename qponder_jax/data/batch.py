"""The model batch: the contract between data processing (host, numpy) and the model (device, jit).

Every field is an array with a static, bucketed shape; the host computes all index metadata in numpy so
that nothing inside a traced function depends on image sizes. Vision inputs are laid out per sample
(`[B, P, ...]`), so the whole batch shards over ('data', 'fsdp') along its first axis with no cross-sample
gather: sample b's image features come only from sample b's patch rows.

Shapes: B samples, T tokens, P patch rows per sample (a multiple of spatial_merge_size**2, possibly 0 for
a text-only bucket), M image slots per sample, D_patch = channels * temporal_patch * patch * patch.
"""

from __future__ import annotations

import flax.struct
import numpy as np


@flax.struct.dataclass
class Batch:
    """A padded, bucketed model batch. Arrays are numpy on the host and jax.Array once placed."""

    # --- text ---
    input_ids: np.ndarray  # [B, T] int32; pad_token_id where attention_mask is False
    attention_mask: np.ndarray  # [B, T] bool; True on real tokens (right padding for training, left for generation)
    position_ids: np.ndarray  # [3, B, T] int32; M-RoPE (temporal, height, width), as transformers' get_rope_index
    rope_deltas: np.ndarray  # [B] int32; max position + 1 - number of real tokens (the next token's offset)
    loss_mask: np.ndarray  # [B, T] bool; True where token t is a training target (assistant tokens)
    # --- vision, per sample, patches in transformers' processor order (2x2 merge blocks consecutive) ---
    pixel_values: np.ndarray  # [B, P, D_patch] float32; normalized patches, zero rows for padding
    image_grid_thw: np.ndarray  # [B, M, 3] int32; (t, h, w) in patches per image slot, zero rows for padding
    vision_pos_ids: np.ndarray  # [B, P, 2] int32; (row, col) of each patch for the 2-D rotary embedding
    window_index: np.ndarray  # [B, P] int32; gather index putting patches into window order
    window_segment_ids: np.ndarray  # [B, P] int32; in window order: one id per attention window, 0 = padding
    full_segment_ids: np.ndarray  # [B, P] int32; in window order: one id per image frame, 0 = padding
    # row of the merged, window-ordered features [B, P // merge**2, D_text] feeding each <|image_pad|>
    # token; -1 on every other token
    image_feature_index: np.ndarray  # [B, T] int32

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    @property
    def num_patches(self) -> int:
        return self.pixel_values.shape[1]
