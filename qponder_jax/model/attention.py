"""The one attention function: vision window layers, vision full layers and text layers all call it.

Masking is expressed with segment ids and positions only: a query attends to a key when both carry the
same non-zero segment id and, if causal, the key's position is not after the query's. Padding carries
segment id 0 and is never attended to; a query row with nothing to attend to is ignored downstream: "xla" and
"splash" return the mean of all values there (a uniform softmax); "cudnn"'s value there is unspecified.

Implementations: "xla" (dense [B, H, Tq, Tk] scores, everywhere), "cudnn" (cuDNN flash attention, NVIDIA GPUs),
"splash" (the Pallas splash-attention kernel, TPUs; `SPLASH_INTERPRET` runs it on a CPU) and "auto" (splash on a
TPU, cuDNN on an NVIDIA GPU where the dtype and head size suit it, XLA otherwise). One-query decode steps run on
XLA under "splash" and "auto": they read the head-major KV cache in place, which the kernels would pad or transpose.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash

from qponder_jax.model import sharding

IMPLEMENTATIONS = ("xla", "cudnn", "splash", "auto")
_MASKED = -1e30  # finite, so a fully masked row gives a uniform (not NaN) softmax
# Run the splash kernel through the Pallas interpreter (any backend, slow: for the CPU tests). Read when a function
# is traced, so set it (or QPONDER_SPLASH_INTERPRET=1 in the environment) before the first jit call.
SPLASH_INTERPRET = os.environ.get("QPONDER_SPLASH_INTERPRET", "") == "1"
_LANES = 128  # the kernel's sequence blocks and (padded) head size are multiples of the TPU's 128 lanes
_SPLASH_BLOCKS = (512, 256, 128)  # candidate sequence block sizes (largest first), not tuned on a TPU


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


def resolve_impl(impl: str, q: jax.Array) -> str:
    """The implementation `impl` runs for queries `q` [B, Tq, H, Dh]: "auto" picks by backend, dtype and shape."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {impl!r}; choose one of {IMPLEMENTATIONS}")
    if impl in ("splash", "auto") and q.shape[1] == 1:  # decode (see the module docstring)
        return "xla"
    if impl != "auto":
        return impl
    backend = jax.default_backend()
    if backend == "tpu":
        return "splash"
    if backend == "gpu" and _cudnn_suits(q):
        return "cudnn"
    return "xla"


def _cudnn_suits(q: jax.Array) -> bool:
    """cuDNN flash attention's own limits: an NVIDIA GPU of compute capability >= 8.0, bf16/fp16, head size a multiple
    of 8 up to 128 (256 from 9.0)."""
    device = jax.devices()[0]
    if "cuda" not in device.client.platform_version.lower():
        return False
    capability = tuple(int(x) for x in device.compute_capability.split("."))
    dh = q.shape[-1]
    max_dh = 256 if capability >= (9, 0) else 128
    return capability >= (8, 0) and q.dtype in (jnp.bfloat16, jnp.float16) and dh % 8 == 0 and dh <= max_dh


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
    arange. Returns [B, Tq, H, Dh] in q's dtype. Softmax runs in float32. `impl` is one of IMPLEMENTATIONS.
    """
    b, tq, h, dh = q.shape
    hkv = k.shape[1 if kv_heads_major else 2]
    if h % hkv:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({hkv})")
    impl = resolve_impl(impl, q)
    if impl == "splash":
        return splash_attention(
            q,
            k if kv_heads_major else jnp.swapaxes(k, 1, 2),
            v if kv_heads_major else jnp.swapaxes(v, 1, 2),
            q_segment_ids=q_segment_ids,
            kv_segment_ids=kv_segment_ids,
            causal=causal,
            q_positions=q_positions,
            kv_positions=kv_positions,
        )
    mask = attention_mask(
        q_segment_ids, kv_segment_ids, causal=causal, q_positions=q_positions, kv_positions=kv_positions
    )  # [B, Tq, Tk]
    if impl == "cudnn":
        # cuDNN flash attention on NVIDIA GPUs; jax handles GQA (H a multiple of Hkv) itself.
        if kv_heads_major:
            k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation="cudnn")
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


def splash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    causal: bool,
    q_positions: jax.Array | None = None,
    kv_positions: jax.Array | None = None,
) -> jax.Array:
    """`attention` through the Pallas splash kernel: q [B, Tq, H, Dh], k / v head-major [B, Hkv, Tk, Dh].

    The mask is `attention_mask` (segment ids, causal positions, any offsets, so KV-cache prefill works too) given
    to the kernel as a dynamic boolean mask: [Tq, Tk] bytes per row, never the [H, Tq, Tk] fp32 scores. The kernel
    skips the blocks it leaves empty (the vision windows' off-diagonal blocks, padding, the causal upper triangle).
    Sequences are padded to the block size and the head size to 128 lanes inside. Under a mesh the kernel runs in a
    shard_map: rows over the batch axes, heads over the tensor axis when the key/value heads divide it.
    """
    if not SPLASH_INTERPRET and jax.default_backend() != "tpu":
        raise ValueError(
            f"attn_impl 'splash' runs a TPU kernel and this backend is {jax.default_backend()!r}: use a TPU, "
            "'auto' / 'xla', or set QPONDER_SPLASH_INTERPRET=1 (Pallas interpret mode, slow; for tests)"
        )
    b, tq, h, dh = q.shape
    tk = k.shape[2]
    if q_positions is None:
        q_positions = jnp.broadcast_to(jnp.arange(tq, dtype=jnp.int32), (b, tq))
    if kv_positions is None:
        kv_positions = jnp.broadcast_to(jnp.arange(tk, dtype=jnp.int32), (b, tk))
    body = functools.partial(_splash_local, causal=causal, interpret=SPLASH_INTERPRET)
    args = (q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or mesh.size == 1:
        return body(*args)
    kv_spec = sharding.logical_to_spec(("batch", "act_kv_heads", "length", "head_dim"), k.shape, mesh)
    rows, heads = kv_spec[0], kv_spec[1]  # q's heads follow k's, so each shard keeps whole GQA groups
    q_spec = jax.P(rows, None, heads, None)
    ids_spec = jax.P(rows, None)
    in_specs = (q_spec, kv_spec, kv_spec, ids_spec, ids_spec, ids_spec, ids_spec)
    return jax.shard_map(body, in_specs=in_specs, out_specs=q_spec, check_vma=False)(*args)


def _splash_local(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions, *, causal, interpret):
    """One device's rows and heads of `splash_attention` (same arguments, positions given)."""
    b, tq, h, dh = q.shape
    tk = k.shape[2]
    mask = attention_mask(
        q_segment_ids, kv_segment_ids, causal=causal, q_positions=q_positions, kv_positions=kv_positions
    )  # [B, Tq, Tk]
    visible = jnp.any(mask, axis=-1)  # [B, Tq]; False rows return the mean of v, as the XLA path
    # the kernel needs a key in every row (its softmax divides by the row's sum): fully masked rows see key 0
    mask |= ~visible[:, :, None] & (jnp.arange(tk) == 0)
    bq, bkv = _block(tq), _block(tk)
    tq_pad, tk_pad, dh_pad = _round_up(tq, bq), _round_up(tk, bkv), _round_up(dh, _LANES)
    mask = jnp.pad(mask, ((0, 0), (0, tq_pad - tq), (0, tk_pad - tk)))
    mask = mask.at[:, tq:, 0].set(True)  # padded query rows too
    # the kernel does not scale the logits; zero head-size padding leaves q.k and the first Dh output columns exact
    qh = jnp.swapaxes(q * jnp.asarray(dh**-0.5, q.dtype), 1, 2)  # [B, H, Tq, Dh]
    qh = jnp.pad(qh, ((0, 0), (0, 0), (0, tq_pad - tq), (0, dh_pad - dh)))
    kh = jnp.pad(k, ((0, 0), (0, 0), (0, tk_pad - tk), (0, dh_pad - dh)))  # [B, Hkv, Tk', Dh']
    vh = jnp.pad(v, ((0, 0), (0, 0), (0, tk_pad - tk), (0, dh_pad - dh)))
    blocks = splash.BlockSizes(
        block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
        block_kv_dkv_compute=bkv, use_fused_bwd_kernel=True,
    )  # fmt: skip

    def one_row(mask, q, k, v):  # [Tq', Tk'], [H, Tq', Dh'], [Hkv, Tk', Dh'] x 2 -> [H, Tq', Dh']
        kernel = splash.make_splash_mha(
            mask[None], block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret
        )
        # jax 0.10 turns the mask info's `is_dynamic_mask` flag into an array, which __call__ then tests as a bool
        fwd = kernel.fwd_mask_info._replace(is_dynamic_mask=True)
        kernel = splash.SplashAttentionKernel(fwd, kernel.dq_mask_info, kernel.dkv_mask_info, **kernel.kwargs)
        return kernel(q, k, v)

    # rows' masks differ, so Pallas runs the batch as a loop of kernel launches (each over heads x blocks)
    out = jax.vmap(one_row)(mask, qh, kh, vh)[:, :, :tq, :dh]  # [B, H, Tq, Dh]
    out = jnp.swapaxes(out, 1, 2)  # [B, Tq, H, Dh]
    mean_v = jnp.mean(v.astype(jnp.float32), axis=2)  # [B, Hkv, Dh]
    mean_v = jnp.repeat(mean_v, h // k.shape[1], axis=1)[:, None]  # [B, 1, H, Dh]
    return jnp.where(visible[:, :, None, None], out, mean_v.astype(out.dtype)).astype(q.dtype)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _block(length: int) -> int:
    """The largest candidate block that pads `length` no further than a multiple of 128 does."""
    padded = _round_up(length, _LANES)
    return next(blk for blk in _SPLASH_BLOCKS if _round_up(length, blk) == padded)
