"""The whole Qwen2.5-VL model: vision tower + Qwen2 decoder + LM head, on the `Batch` contract.

`model(batch)` gives logits for training; `init_cache` / `prefill` / `decode_step` are the pieces the jitted
sampler drives. Image and video features are placed host-free: every token with `image_feature_index >= 0` (the
`<|image_pad|>` and `<|video_pad|>` tokens) takes that row of its own sample's merged, window-ordered vision features;
every other token takes its embedding. A video is one vision slot whose grid has t > 1 temporal patches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from qponder_jax.data.batch import Batch
from qponder_jax.model import sharding
from qponder_jax.model.attention import IMPLEMENTATIONS
from qponder_jax.model.config import Qwen25VLConfig
from qponder_jax.model.layers import linear
from qponder_jax.model.text import KVCache, TextModel
from qponder_jax.model.vision import VisionTower


class Qwen25VL(nnx.Module):
    """Qwen2.5-VL for conditional generation. Attributes mirror transformers: `visual`, `language_model`, `lm_head`
    (absent with `tie_word_embeddings`: the logits then use the embedding matrix)."""

    def __init__(
        self,
        config: Qwen25VLConfig,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        remat: bool = False,
        attn_impl: str = "xla",
    ):
        if attn_impl not in IMPLEMENTATIONS:
            raise ValueError(f"unknown attn_impl {attn_impl!r}; choose one of {IMPLEMENTATIONS}")
        self.config = config
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, remat=remat, attn_impl=attn_impl, rngs=rngs)
        self.visual = VisionTower(config.vision, **kw)
        self.language_model = TextModel(config.text, **kw)
        if not config.tie_word_embeddings:
            d, v = config.text.hidden_size, config.text.vocab_size
            self.lm_head = linear(d, v, ("embed", "vocab"), bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.hf_meta = None  # set by qponder_jax.hf.load_hf: the on-disk key layout and dtypes, for save_hf

    # ---- training / scoring ----
    def __call__(self, batch: Batch) -> jax.Array:
        """Logits [B, T, vocab] (float32), aligned with batch.input_ids."""
        logits, _ = self._forward(batch, None)
        return logits

    # ---- generation (the sampler's API) ----
    def init_cache(self, batch_size: int, max_length: int, dtype=None) -> KVCache:
        """An empty KV cache of `max_length` slots (prompt + generated tokens), in `dtype` (default: compute dtype)."""
        return KVCache.create(self.config.text, batch_size, max_length, dtype or self.dtype)

    def prefill(
        self, batch: Batch, cache: KVCache, *, last_only: bool = False, features: jax.Array | None = None
    ) -> tuple[jax.Array, KVCache]:
        """Runs the prompt batch (left-padded, vision included) and writes its T tokens into `cache` at `cache.index`;
        `features` are the batch's `vision_features` when computed already (the sampler runs them in another layout).

        Returns (logits [B, T, V] float32, or [B, 1, V] for the last position when `last_only`; the updated cache).
        """
        return self._forward(batch, cache, last_only=last_only, features=features)

    def decode_step(self, token_ids: jax.Array, position_ids: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """One generation step: token_ids [B, 1] and their M-RoPE position_ids [3, B, 1] -> (logits [B, 1, V] float32,
        the cache advanced by one slot). A generated text token has the same position on all three rows: one past the
        sample's largest prompt position (`batch.position_ids.max((0, 2))`, i.e. real length + rope_deltas) plus the
        step number."""
        x = self.language_model.embed(token_ids)
        segment_ids = jnp.ones(token_ids.shape, jnp.int32)
        hidden, cache = self.language_model(x, position_ids, segment_ids, cache)
        return self._logits(hidden, vocab_parallel=True), cache

    # ---- internals ----
    def _forward(self, batch: Batch, cache: KVCache | None, last_only: bool = False, features=None):
        check_shapes(batch, self.config)
        if isinstance(batch.input_ids, np.ndarray):
            check_batch(batch, self.config)
        x = self.embed_inputs(batch, features)
        segment_ids = jnp.asarray(batch.attention_mask).astype(jnp.int32)
        hidden, cache = self.language_model(x, jnp.asarray(batch.position_ids), segment_ids, cache)
        if last_only:
            return self._logits(hidden[:, -1:], vocab_parallel=True), cache
        return self._logits(hidden), cache

    def vision_features(self, batch: Batch) -> jax.Array | None:
        """The batch's merged vision features [B, P // merge_unit, D] in window order (None for a text-only bucket)."""
        if batch.pixel_values.shape[1] == 0:  # text-only bucket: no vision tower
            return None
        features = self.visual(
            jnp.asarray(batch.pixel_values),
            jnp.asarray(batch.vision_pos_ids),
            jnp.asarray(batch.window_index),
            jnp.asarray(batch.window_segment_ids),
            jnp.asarray(batch.full_segment_ids),
        )
        return sharding.constrain(features, ("batch", None, "act_embed"))

    def embed_inputs(self, batch: Batch, features: jax.Array | None = None) -> jax.Array:
        """Input embeddings [B, T, D]: vision features (`features`, or the vision tower's) at the `<|image_pad|>` /
        `<|video_pad|>` tokens, token embeddings elsewhere."""
        x = self.language_model.embed(jnp.asarray(batch.input_ids))  # [B, T, D]
        if batch.pixel_values.shape[1] == 0:  # text-only bucket: no vision tower
            return x
        if features is None:
            features = self.vision_features(batch)
        features = sharding.constrain(features, ("batch", None, "act_embed"))
        index = jnp.asarray(batch.image_feature_index)  # [B, T]
        rows = jnp.take_along_axis(features.astype(x.dtype), jnp.maximum(index, 0)[..., None], axis=1)  # [B, T, D]
        x = jnp.where((index >= 0)[..., None], rows, x)
        return sharding.constrain(x, ("batch", "length", "act_embed"))

    def _logits(self, hidden: jax.Array, vocab_parallel: bool = False) -> jax.Array:
        """hidden [B, T, D] -> float32 logits [B, T, V], sharded ("batch", "length", "act_vocab").

        vocab_parallel (the sampler's prefill and decode steps: few rows, a head reused every step): the head is
        resharded once to vocabulary columns over every model axis and the few hidden rows are gathered instead, so no
        device holds the whole [D, V] head (2 GiB fp32 for 7B, live for the whole decode loop when all-gathered over
        an FSDP-sharded D). Training passes keep the default: there the rows, not the head, are the large operand.
        """
        if self.config.tie_word_embeddings:
            w = self.language_model.embed_tokens.embedding[...].T  # [D, V]
        else:
            w = self.lm_head.kernel[...]  # [D, V]
        if vocab_parallel:
            w = sharding.constrain(w, (None, "vocab_parallel"))
            hidden = sharding.constrain(hidden, ("batch_replica", None, None))
        logits = jnp.einsum("btd,dv->btv", hidden, w.astype(hidden.dtype), preferred_element_type=jnp.float32)
        if vocab_parallel:
            logits = sharding.constrain(logits, ("batch_replica", None, "vocab_parallel"))
        return sharding.constrain(logits, ("batch", "length", "act_vocab"))


def check_shapes(batch: Batch, config: Qwen25VLConfig) -> None:
    """Static shape checks (work on tracers too); raises ValueError naming the field."""
    b, t = batch.input_ids.shape
    v = config.vision
    expected = {
        "attention_mask": (b, t),
        "position_ids": (3, b, t),
        "image_feature_index": (b, t),
    }
    p = batch.pixel_values.shape[1] if batch.pixel_values.ndim == 3 else -1
    expected["pixel_values"] = (b, p, v.patch_dim)
    expected["vision_pos_ids"] = (b, p, 2)
    for name in ("window_index", "window_segment_ids", "full_segment_ids"):
        expected[name] = (b, p)
    for name, shape in expected.items():
        got = tuple(getattr(batch, name).shape)
        if got != shape:
            raise ValueError(f"batch.{name} has shape {got}, expected {shape} (input_ids {(b, t)})")
    if p % v.merge_unit:
        raise ValueError(f"batch.pixel_values has {p} patch rows, not a multiple of merge unit {v.merge_unit}")


def check_batch(batch: Batch, config: Qwen25VLConfig) -> None:
    """Host-side (numpy) consistency checks of the vision tokens (`<|image_pad|>` and `<|video_pad|>`); raises
    ValueError naming the sample and counts."""
    check_shapes(batch, config)
    ids = np.asarray(batch.input_ids)
    index = np.asarray(batch.image_feature_index)
    grids = np.asarray(batch.image_grid_thw).reshape(ids.shape[0], -1, 3)
    p = batch.pixel_values.shape[1]
    unit = config.vision.merge_unit
    is_image, is_video = ids == config.image_token_id, ids == config.video_token_id  # [B, T]
    for b in range(ids.shape[0]):
        n_image, n_video = int(is_image[b].sum()), int(is_video[b].sum())
        tokens = f"{n_image} <|image_pad|> + {n_video} <|video_pad|>" if n_video else f"{n_image} <|image_pad|>"
        is_vision_token = is_image[b] | is_video[b]
        has_feature = index[b] >= 0
        n_tokens, n_indexed = n_image + n_video, int(has_feature.sum())
        n_patches = int(np.prod(grids[b], axis=-1).sum())
        if n_tokens != n_indexed:
            raise ValueError(
                f"sample {b}: {tokens} tokens (ids {config.image_token_id}, {config.video_token_id}) but {n_indexed} "
                "tokens with image_feature_index >= 0"
            )
        if (is_vision_token != has_feature).any():
            raise ValueError(
                f"sample {b}: image_feature_index >= 0 is not exactly on the <|image_pad|> / <|video_pad|> tokens"
            )
        if n_indexed != n_patches // unit:
            raise ValueError(
                f"sample {b}: {tokens} tokens but image_grid_thw {grids[b].tolist()} gives "
                f"{n_patches // unit} merged patches"
            )
        if n_patches > p:
            raise ValueError(f"sample {b}: image_grid_thw needs {n_patches} patch rows, the batch has {p}")
        if n_indexed and index[b].max() >= n_patches // unit:
            raise ValueError(
                f"sample {b}: image_feature_index {int(index[b].max())} is past its {n_patches // unit} merged patches"
            )


def create_model(
    config: Qwen25VLConfig,
    *,
    mesh: Mesh | None = None,
    rngs_seed: int = 0,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    remat: bool = False,
    attn_impl: str = "xla",
) -> Qwen25VL:
    """A randomly initialized model, created directly on its shardings when `mesh` is given."""
    make = lambda: Qwen25VL(
        config, rngs=nnx.Rngs(rngs_seed), dtype=dtype, param_dtype=param_dtype, remat=remat, attn_impl=attn_impl
    )
    if mesh is None:
        return make()
    return sharding.create_sharded(make, mesh)
