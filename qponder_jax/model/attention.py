"""The one attention function: vision window layers, vision full layers and text layers all call it.

Masking is expressed with segment ids and positions only: a query attends to a key when both carry the
same non-zero segment id and, if causal, the key's position is not after the query's. Padding carries
segment id 0 and is never attended to; a query row with nothing to attend to returns finite values
(its output is ignored downstream).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "cudnn")
_MASKED = -1e30  # finite, so a fully masked row gives a uniform (not NaN) softmax


def attention_mask(
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    *,
    causal: bool,
    q_positions: jax.Array | None = None,
    kv_positions: jax.Array | None = None,
) -> jax.Array:
    """Boolean mask [B, Tq, Tk]: True where query i may attend to key j."""
    mask = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]) & (kv_segment_ids[:, None, :] != 0)
    if causal:
        tq, tk = q_segment_ids.shape[1], kv_segment_ids.shape[1]
        if q_positions is None:
            q_positions = jnp.broadcast_to(jnp.arange(tq), q_segment_ids.shape)
        if kv_positions is None:
            kv_positions = jnp.broadcast_to(jnp.arange(tk), kv_segment_ids.shape)
        mask &= kv_positions[:, None, :] <= q_positions[:, :, None]
    return mask


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    causal: bool,
    q_positions: jax.Array | None = None,
    kv_positions: jax.Array | None = None,
    impl: str = "xla",
    kv_heads_major: bool = False,
) -> jax.Array:
    """Scaled dot-product attention with grouped key/value heads.

    q: [B, Tq, H, Dh]; k, v: [B, Tk, Hkv, Dh] with H a multiple of Hkv ([B, Hkv, Tk, Dh] with `kv_heads_major`,
    the KV cache's layout, which the matmuls read without a transpose); segment ids [B, Tq] / [B, Tk]
    int32 (0 = padding); positions (for `causal`) are slot indices, [B, Tq] / [B, Tk], defaulting to
    arange. Returns [B, Tq, H, Dh] in q's dtype. Softmax runs in float32.
    """
    b, tq, h, dh = q.shape
    hkv = k.shape[1 if kv_heads_major else 2]
    if h % hkv:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({hkv})")
    mask = attention_mask(
        q_segment_ids, kv_segment_ids, causal=causal, q_positions=q_positions, kv_positions=kv_positions
    )  # [B, Tq, Tk]
    if impl == "cudnn":
        # cuDNN flash attention on NVIDIA GPUs; jax handles GQA (H a multiple of Hkv) itself.
        if kv_heads_major:
            k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation="cudnn")
    if impl != "xla":
        raise ValueError(f"unknown attention implementation {impl!r}; choose one of {IMPLEMENTATIONS}")
    groups = h // hkv
    q = q.reshape(b, tq, hkv, groups, dh)
    kv = "bksd" if kv_heads_major else "bskd"
    logits = jnp.einsum(f"bqkgd,{kv}->bkgqs", q, k, preferred_element_type=jnp.float32)
    logits = logits * (dh**-0.5)  # [B, Hkv, G, Tq, Tk]
    logits = jnp.where(mask[:, None, None], logits, _MASKED)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    if kv_heads_major and tq == 1:
        # decode: a plain batched GEMM per (b, k), [G, Tk] x [Tk, Dh], then the small output transposed. Not for
        # Tq > 1: differentiated (the GRPO update's shared prompts), that form plans 0.12 GiB more per 7B layer.
        out = jnp.einsum("bkgqs,bksd->bkgqd", probs, v).transpose(0, 3, 1, 2, 4)  # [B, Tq, Hkv, G, Dh]
    else:
        out = jnp.einsum(f"bkgqs,{kv}->bqkgd", probs, v)  # [B, Tq, Hkv, G, Dh]
    return out.reshape(b, tq, h, dh)
