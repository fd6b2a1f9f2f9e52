"""The transformers (torch) Qwen2.5-VL reference for parity tests, built from our configs.

- `make_torch_model(config, seed)`: a tiny random `Qwen2_5_VLForConditionalGeneration` (eager attention, fp32) whose
  weights are all random (norm weights and biases included, scaled to keep activations O(1)), so that no term of the
  forward pass is trivially zero or one.
- `torch_logits(...)`: its logits (numpy float32) with explicit M-RoPE positions (`rope_deltas` reset first).
- `torch_rope_index(...)`: transformers' `get_rope_index` positions for a token sequence with images.
- `our_model_from_torch(torch_model, tmp_path)`: our model via `save_pretrained` + `load_hf`.
- `make_batch(...)`: our `Batch` from token ids, mask, positions and each sample's images (grids + patch rows),
  with the vision fields from `vision_layout.sample_layout`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from qponder_jax.data.batch import Batch
from qponder_jax.hf import load_hf
from qponder_jax.model.config import Qwen25VLConfig
from qponder_jax.model.vision_layout import num_patches, sample_layout


def hf_config(config: Qwen25VLConfig) -> Qwen2_5_VLConfig:
    hf = Qwen2_5_VLConfig(**config.to_hf_dict())
    hf._attn_implementation = "eager"
    hf.text_config._attn_implementation = "eager"
    hf.vision_config._attn_implementation = "eager"
    return hf


@torch.no_grad()
def make_torch_model(config: Qwen25VLConfig, seed: int = 0) -> Qwen2_5_VLForConditionalGeneration:
    """A random fp32 transformers model with our config's shapes, every parameter drawn from `seed`."""
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(hf_config(config)).eval()
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if p.ndim == 1 and ("norm" in name or "ln_q" in name):
            p.copy_(1.0 + 0.1 * noise)
        elif p.ndim == 1:  # biases
            p.copy_(0.1 * noise)
        elif "embed_tokens" in name:
            p.copy_(noise)
        else:  # linear / conv weights: unit-variance outputs
            p.copy_(noise / math.sqrt(p[0].numel()))
    if config.tie_word_embeddings:
        model.tie_weights()
    return model


@torch.no_grad()
def torch_logits(
    torch_model,
    input_ids,
    attention_mask,
    position_ids,
    pixel_values=None,
    image_grid_thw=None,
) -> np.ndarray:
    """Logits [B, T, V] float32. position_ids [3, B, T]; pixel_values [N_patches, patch_dim] (all images of the
    batch, in order) with image_grid_thw [N_images, 3], as transformers' processor gives them."""
    torch_model.model.rope_deltas = None
    kwargs = {}
    if pixel_values is not None:
        kwargs["pixel_values"] = torch.as_tensor(np.array(pixel_values, np.float32))
        kwargs["image_grid_thw"] = torch.as_tensor(np.array(image_grid_thw, np.int64))
    out = torch_model(
        input_ids=torch.as_tensor(np.array(input_ids, np.int64)),
        attention_mask=torch.as_tensor(np.array(attention_mask, np.int64)),
        position_ids=torch.as_tensor(np.array(position_ids, np.int64)),
        use_cache=False,
        **kwargs,
    )
    torch_model.model.rope_deltas = None
    return out.logits.float().numpy()


@torch.no_grad()
def torch_rope_index(torch_model, input_ids, attention_mask, image_grid_thw) -> tuple[np.ndarray, np.ndarray]:
    """transformers' M-RoPE positions [3, B, T] and rope deltas [B] for token sequences whose images have
    `image_grid_thw` [N_images, 3] (in order over the batch)."""
    ids = torch.as_tensor(np.array(input_ids, np.int64))
    image_token_id = torch_model.config.image_token_id
    positions, deltas = torch_model.model.get_rope_index(
        ids,
        mm_token_type_ids=(ids == image_token_id).int(),
        image_grid_thw=torch.as_tensor(np.array(image_grid_thw, np.int64)),
        attention_mask=torch.as_tensor(np.array(attention_mask, np.int64)),
    )
    return positions.numpy().astype(np.int32), deltas.numpy().reshape(-1).astype(np.int32)


def our_model_from_torch(torch_model, tmp_path, **load_kwargs):
    """(model, config) loaded by our `load_hf` from the torch model's `save_pretrained` folder."""
    folder = Path(tmp_path) / "hf_model"
    torch_model.save_pretrained(folder)
    return load_hf(folder, **load_kwargs)


def make_batch(
    config: Qwen25VLConfig,
    input_ids,
    attention_mask,
    position_ids,
    *,
    grids=None,
    pixel_values=None,
    num_patch_rows: int = 0,
) -> Batch:
    """Our numpy `Batch`. grids[b]: sample b's image grids [N_b, 3] (may be empty); pixel_values[b]: its patch rows
    [sum of t*h*w, patch_dim] in processor order; both padded to `num_patch_rows` rows and max(N_b) image slots."""
    input_ids = np.asarray(input_ids, np.int32)
    b, t = input_ids.shape
    v = config.vision
    grids = [np.zeros((0, 3), np.int64) for _ in range(b)] if grids is None else [np.reshape(g, (-1, 3)) for g in grids]
    slots = max(1, max(len(g) for g in grids))
    p = num_patch_rows
    fields = {
        "pixel_values": np.zeros((b, p, v.patch_dim), np.float32),
        "image_grid_thw": np.zeros((b, slots, 3), np.int32),
        "vision_pos_ids": np.zeros((b, p, 2), np.int32),
        "window_index": np.zeros((b, p), np.int32),
        "window_segment_ids": np.zeros((b, p), np.int32),
        "full_segment_ids": np.zeros((b, p), np.int32),
        "image_feature_index": np.full((b, t), -1, np.int32),
    }
    for i, grid in enumerate(grids):
        if p == 0:
            continue
        layout = sample_layout(
            grid, p, spatial_merge_size=v.spatial_merge_size, window_size=v.window_size, patch_size=v.patch_size
        )
        fields["vision_pos_ids"][i] = layout.vision_pos_ids
        fields["window_index"][i] = layout.window_index
        fields["window_segment_ids"][i] = layout.window_segment_ids
        fields["full_segment_ids"][i] = layout.full_segment_ids
        if len(grid):
            fields["image_grid_thw"][i, : len(grid)] = grid
            fields["pixel_values"][i, : num_patches(grid)] = pixel_values[i]
            rows = np.concatenate(layout.merged_rows)
            fields["image_feature_index"][i, input_ids[i] == config.image_token_id] = rows
    attention_mask = np.asarray(attention_mask, bool)
    position_ids = np.asarray(position_ids, np.int32)
    deltas = (position_ids.max(axis=(0, 2)) + 1 - attention_mask.sum(1)).astype(np.int32)
    return Batch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        rope_deltas=deltas,
        loss_mask=attention_mask.copy(),
        **fields,
    )
