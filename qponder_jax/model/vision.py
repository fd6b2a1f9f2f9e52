"""The Qwen2.5-VL vision tower: patch embedding, 2-D rotary, window/full attention blocks, patch merger.

All per-image structure arrives as host-computed index arrays (`model/vision_layout.py`): the tower
gathers rows into window order, attends within segment ids, and merges consecutive groups of
`merge_unit` rows. Nothing in the traced code depends on image sizes, so a bucket of P patch rows
compiles once. Semantics follow transformers' `Qwen2_5_VisionTransformerPretrainedModel`; the output
stays in window order (the text side reads it through `VisionLayout.merged_rows`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qponder_jax.model import layers, sharding
from qponder_jax.model.attention import attention
from qponder_jax.model.config import VisionConfig

NORM_EPS = 1e-6  # transformers hard-codes eps=1e-6 for the vision norms
RESIDUAL_AXES = ("batch", "patches", "act_embed")
HEAD_AXES = ("batch", "patches", "act_heads", None)


def rotary_angles(vision_pos_ids: jax.Array, head_dim: int, theta: float) -> jax.Array:
    """Axial 2-D rotary angles [B, P, head_dim] (float32) from (row, col) positions [B, P, 2].

    head_dim/4 frequencies; the first half of the angles is [row angles, col angles], duplicated for
    rotate-half.
    """
    if head_dim % 4:
        raise ValueError(f"vision head_dim {head_dim} must be a multiple of 4 for the 2-D rotary embedding")
    spatial_dim = head_dim // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, spatial_dim, 2, dtype=jnp.float32) / spatial_dim))  # [Dh/4]
    angles = vision_pos_ids.astype(jnp.float32)[..., None] * inv_freq  # [B, P, 2, Dh/4]
    angles = angles.reshape(*angles.shape[:-2], spatial_dim)  # [B, P, Dh/2]: rows then cols
    return jnp.concatenate([angles, angles], axis=-1)  # [B, P, Dh]


class PatchEmbed(nnx.Module):
    """Conv3d with stride == kernel, i.e. one matmul over flattened (C, t, p, p) patch rows."""

    def __init__(self, config: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.proj = layers.linear(
            config.patch_dim,
            config.hidden_size,
            ("patch_in", "embed"),
            bias=False,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        return self.proj(pixel_values)  # [B, P, patch_dim] -> [B, P, D]


class VisionAttention(nnx.Module):
    """Multi-head self-attention with a fused qkv projection and 2-D rotary on q and k."""

    def __init__(self, config: VisionConfig, *, dtype, param_dtype, attn_impl: str, rngs: nnx.Rngs):
        d = config.hidden_size
        kw = dict(bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_heads = config.num_heads
        self.attn_impl = attn_impl
        # output columns are [3, heads, head_dim]: a contiguous tensor split would not follow heads, so only the
        # input dimension is sharded (fsdp); q, k, v are constrained to heads-over-tensor right after.
        self.qkv = layers.linear(d, 3 * d, ("embed", "qkv"), **kw)
        self.proj = layers.linear(d, d, ("heads", "embed"), **kw)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, segment_ids: jax.Array) -> jax.Array:
        b, p, d = x.shape
        qkv = self.qkv(x).reshape(b, p, 3, self.num_heads, d // self.num_heads)  # [B, P, 3, H, Dh]
        q, k, v = (sharding.constrain(qkv[:, :, i], HEAD_AXES) for i in range(3))  # [B, P, H, Dh] each
        q = layers.apply_rotary(q, cos, sin)
        k = layers.apply_rotary(k, cos, sin)
        out = attention(
            q, k, v, q_segment_ids=segment_ids, kv_segment_ids=segment_ids, causal=False, impl=self.attn_impl
        )  # [B, P, H, Dh]
        return self.proj(out.reshape(b, p, d))


class VisionBlock(nnx.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, config: VisionConfig, *, dtype, param_dtype, attn_impl: str, rngs: nnx.Rngs):
        self.norm1 = layers.RMSNorm(config.hidden_size, eps=NORM_EPS, param_dtype=param_dtype)
        self.norm2 = layers.RMSNorm(config.hidden_size, eps=NORM_EPS, param_dtype=param_dtype)
        self.attn = VisionAttention(config, dtype=dtype, param_dtype=param_dtype, attn_impl=attn_impl, rngs=rngs)
        self.mlp = layers.GatedMLP(
            config.hidden_size,
            config.intermediate_size,
            bias=True,
            act=config.hidden_act,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, segment_ids: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x), cos, sin, segment_ids)
        x = sharding.constrain(x, RESIDUAL_AXES)
        x = x + self.mlp(self.norm2(x))
        return sharding.constrain(x, RESIDUAL_AXES)


class PatchMerger(nnx.Module):
    """RMSNorm, then each group of merge_unit consecutive rows -> one row, then fc1 -> GELU -> fc2."""

    def __init__(self, config: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        merged = config.hidden_size * config.merge_unit
        kw = dict(bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.merge_unit = config.merge_unit
        self.ln_q = layers.RMSNorm(config.hidden_size, eps=NORM_EPS, param_dtype=param_dtype)
        self.fc1 = layers.linear(merged, merged, ("embed", "mlp"), **kw)
        self.fc2 = layers.linear(merged, config.out_hidden_size, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, p, d = x.shape
        x = self.ln_q(x).reshape(b, p // self.merge_unit, self.merge_unit * d)  # [B, P/unit, unit*D]
        x = jax.nn.gelu(self.fc1(x), approximate=False)
        return self.fc2(x)  # [B, P/unit, out_hidden]


class VisionTower(nnx.Module):
    """Qwen2.5-VL vision encoder; the attribute tree mirrors transformers' `model.visual`."""

    def __init__(self, config: VisionConfig, *, dtype, param_dtype, remat: bool, attn_impl: str, rngs: nnx.Rngs):
        self.config = config
        self.remat = remat
        self.patch_embed = PatchEmbed(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.blocks = nnx.List(
            [
                VisionBlock(config, dtype=dtype, param_dtype=param_dtype, attn_impl=attn_impl, rngs=rngs)
                for _ in range(config.depth)
            ]
        )
        self.merger = PatchMerger(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(
        self,
        pixel_values: jax.Array,
        vision_pos_ids: jax.Array,
        window_index: jax.Array,
        window_segment_ids: jax.Array,
        full_segment_ids: jax.Array,
    ) -> jax.Array:
        """[B, P, patch_dim] / [B, P, 2] / [B, P] x3 -> merged features [B, P // merge_unit, out_hidden_size].

        `vision_pos_ids` are in processor order; `window_index` gathers processor rows into window order;
        both segment-id arrays are in window order (0 = padding). The result is in window order.
        """
        cfg = self.config
        b, p, patch_dim = pixel_values.shape
        if patch_dim != cfg.patch_dim or p % cfg.merge_unit:
            raise ValueError(
                f"vision.py: pixel_values {pixel_values.shape} must be [B, P, {cfg.patch_dim}] with P a "
                f"multiple of {cfg.merge_unit}"
            )
        for name, arr, shape in (
            ("vision_pos_ids", vision_pos_ids, (b, p, 2)),
            ("window_index", window_index, (b, p)),
            ("window_segment_ids", window_segment_ids, (b, p)),
            ("full_segment_ids", full_segment_ids, (b, p)),
        ):
            if tuple(arr.shape) != shape:
                raise ValueError(f"vision.py: {name} has shape {tuple(arr.shape)}, expected {shape}")

        window_index = sharding.constrain(window_index, ("batch", "patches"))
        x = self.patch_embed(sharding.constrain(pixel_values, ("batch", "patches", None)))  # [B, P, D]
        x = jnp.take_along_axis(x, window_index[..., None], axis=1)  # [B, P, D], window order
        x = sharding.constrain(x, RESIDUAL_AXES)
        pos = jnp.take_along_axis(vision_pos_ids, window_index[..., None], axis=1)  # [B, P, 2], window order
        angles = rotary_angles(pos, cfg.head_dim, cfg.rope_theta)  # [B, P, Dh]
        angles = sharding.constrain(angles, ("batch", "patches", None))
        cos, sin = jnp.cos(angles), jnp.sin(angles)

        def run_block(block: VisionBlock, x, cos, sin, segment_ids):
            return block(x, cos, sin, segment_ids)

        if self.remat:
            run_block = nnx.remat(run_block)
        full = set(cfg.fullatt_block_indexes)
        for i, block in enumerate(self.blocks):
            x = run_block(block, x, cos, sin, full_segment_ids if i in full else window_segment_ids)
        return self.merger(x)  # [B, P/unit, out_hidden], window order
