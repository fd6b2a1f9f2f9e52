"""The Qwen2 language model of Qwen2.5-VL: decoder layers with GQA, M-RoPE and a fixed-size KV cache.

Module and attribute names mirror transformers' `Qwen2_5_VLTextModel` (`embed_tokens`, `layers[i].self_attn.q_proj`,
`mlp.gate_proj`, `input_layernorm`, ..., `norm`) so the name table in `qponder_jax/hf.py` stays readable.

Masking is by segment ids: 1 on real tokens, 0 on padding (from the attention mask). The cache is written at one
shared slot index for the whole batch, so generation batches are left-padded; positions for M-RoPE are always
passed in explicitly (`position_ids` [3, B, T]: temporal, height, width), never derived from the cache.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qponder_jax.model import sharding
from qponder_jax.model.attention import attention
from qponder_jax.model.config import TextConfig
from qponder_jax.model.layers import DEFAULT_INIT, GatedMLP, RMSNorm, apply_rotary, linear

_KV_AXES = ("batch", "length", "act_kv_heads", "head_dim")  # this call's keys/values [B, T, Hkv, Dh]
_CACHE_AXES = ("batch", "act_kv_heads", "length", "head_dim")  # cached keys/values [B, Hkv, S, Dh]


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer, in fixed-size slots written at a shared index.

    Slot s of row b holds a token when `segment_ids[b, s] != 0`; padding and unwritten slots are 0 and are never
    attended to. `index` is the next slot to write (the same for all rows). Callers keep `index + T <= S`:
    `lax.dynamic_update_slice` clamps out-of-range writes instead of failing.
    """

    k: tuple[jax.Array, ...]  # per layer [B, Hkv, S, Dh]: head-major, the layout the attention matmuls read
    v: tuple[jax.Array, ...]  # per layer [B, Hkv, S, Dh]
    segment_ids: jax.Array  # [B, S] int32; 1 on written real tokens, 0 elsewhere
    index: jax.Array  # [] int32

    @property
    def max_length(self) -> int:
        return self.segment_ids.shape[1]

    @classmethod
    def create(cls, config: TextConfig, batch_size: int, max_length: int, dtype=jnp.float32) -> KVCache:
        """An empty cache of `max_length` slots for `batch_size` rows."""
        shape = (batch_size, config.num_key_value_heads, max_length, config.head_dim)
        zeros = lambda: sharding.constrain(jnp.zeros(shape, dtype), _CACHE_AXES)
        layers = range(config.num_hidden_layers)
        return cls(
            k=tuple(zeros() for _ in layers),
            v=tuple(zeros() for _ in layers),
            segment_ids=sharding.constrain(jnp.zeros((batch_size, max_length), jnp.int32), ("batch", "length")),
            index=jnp.zeros((), jnp.int32),
        )

    def repeat(self, n: int) -> KVCache:
        """Each row repeated `n` times in place (row b -> rows b*n .. b*n+n-1), e.g. for sampling n completions;
        kept on the cache's sharding (rows over the batch axes)."""
        rep = lambda x: sharding.constrain(jnp.repeat(x, n, axis=0), _CACHE_AXES)
        return self.replace(
            k=tuple(rep(x) for x in self.k),
            v=tuple(rep(x) for x in self.v),
            segment_ids=sharding.constrain(jnp.repeat(self.segment_ids, n, axis=0), ("batch", "length")),
        )


def mrope_cos_sin(position_ids: jax.Array, config: TextConfig) -> tuple[jax.Array, jax.Array]:
    """Multimodal rotary angles: cos, sin [B, T, Dh] (float32) from position_ids [3, B, T].

    The head_dim/2 frequency pairs are split into `mrope_section` (temporal, height, width) groups; group r takes
    its angle from row r of `position_ids`. Both rotate-half halves repeat the same layout.
    """
    dh = config.head_dim
    exponents = np.arange(0, dh, 2, dtype=np.float32) / np.float32(dh)
    inv_freq = (np.float32(1.0) / np.power(np.float32(config.rope_theta), exponents)).astype(np.float32)  # [Dh/2]
    row_of_pair = np.repeat(np.arange(3), config.mrope_section)  # [Dh/2] in {0, 1, 2}
    pos = jnp.moveaxis(position_ids[row_of_pair], 0, -1).astype(jnp.float32)  # [B, T, Dh/2]
    angles = pos * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)  # [B, T, Dh]
    return jnp.cos(angles), jnp.sin(angles)


class Attention(nnx.Module):
    """Grouped-query self-attention with q/k/v biases and M-RoPE, optionally reading/writing a KV cache layer."""

    def __init__(self, config: TextConfig, *, dtype, param_dtype, attn_impl: str, rngs: nnx.Rngs):
        d, h, hkv, dh = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        if h * dh != d:
            raise ValueError(f"hidden_size {d} is not divisible by num_attention_heads {h}")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = linear(d, h * dh, ("embed", "heads"), bias=True, **kw)
        self.k_proj = linear(d, hkv * dh, ("embed", "kv_heads"), bias=True, **kw)
        self.v_proj = linear(d, hkv * dh, ("embed", "kv_heads"), bias=True, **kw)
        self.o_proj = linear(h * dh, d, ("heads", "embed"), bias=False, **kw)
        self.num_heads, self.num_kv_heads, self.head_dim = h, hkv, dh
        self.attn_impl = attn_impl

    def __call__(self, x, cos, sin, segment_ids, cache_kv=None, kv_segment_ids=None, index=None):
        """x [B, T, D] -> ([B, T, D], (k, v) cache layer or None).

        Without a cache, tokens attend causally within the batch. With `cache_kv` = (k, v) [B, Hkv, S, Dh], this
        step's keys/values are written at slot `index` and the queries attend to every valid slot up to their own;
        `kv_segment_ids` [B, S] must already include this step's tokens.
        """
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)  # [B, T, H, Dh]
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)  # [B, T, Hkv, Dh]
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        q = sharding.constrain(apply_rotary(q, cos, sin), ("batch", "length", "act_heads", "head_dim"))
        k = sharding.constrain(apply_rotary(k, cos, sin), _KV_AXES)
        v = sharding.constrain(v, _KV_AXES)
        if cache_kv is None:
            out = attention(
                q, k, v, q_segment_ids=segment_ids, kv_segment_ids=segment_ids, causal=True, impl=self.attn_impl
            )
            new_cache = None
        else:
            cache_k, cache_v = cache_kv
            start = (0, 0, index, 0)
            cache_k = _write_slots(cache_k, k, start)
            cache_v = _write_slots(cache_v, v, start)
            s = cache_k.shape[2]
            q_positions = jnp.broadcast_to(index + jnp.arange(t, dtype=jnp.int32), (b, t))
            kv_positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
            out = attention(
                q,
                cache_k.astype(q.dtype),
                cache_v.astype(q.dtype),
                q_segment_ids=segment_ids,
                kv_segment_ids=kv_segment_ids,
                causal=True,
                q_positions=q_positions,
                kv_positions=kv_positions,
                impl=self.attn_impl,
                kv_heads_major=True,
            )
            new_cache = (cache_k, cache_v)
        out = out.reshape(b, t, self.num_heads * self.head_dim)  # [B, T, H*Dh]
        return self.o_proj(out), new_cache


def _write_slots(buffer: jax.Array, update: jax.Array, start) -> jax.Array:
    """`buffer` [B, Hkv, S, Dh] with `update` [B, T, Hkv, Dh] written at `start` (cast to the buffer's dtype), kept
    on the cache sharding. Only the T new tokens are transposed; a token-major cache would be transposed whole by
    the attention matmuls at every decode step."""
    update = jnp.swapaxes(update, 1, 2).astype(buffer.dtype)
    out = jax.lax.dynamic_update_slice(buffer, update, start)
    return sharding.constrain(out, _CACHE_AXES)


class DecoderLayer(nnx.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: TextConfig, *, dtype, param_dtype, attn_impl: str, rngs: nnx.Rngs):
        self.self_attn = Attention(config, dtype=dtype, param_dtype=param_dtype, attn_impl=attn_impl, rngs=rngs)
        self.mlp = GatedMLP(
            config.hidden_size,
            config.intermediate_size,
            bias=False,
            act=config.hidden_act,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=param_dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=param_dtype)

    def __call__(self, x, cos, sin, segment_ids, cache_kv=None, kv_segment_ids=None, index=None):
        attn_out, new_cache = self.self_attn(
            self.input_layernorm(x), cos, sin, segment_ids, cache_kv, kv_segment_ids, index
        )
        x = sharding.constrain(x + attn_out, ("batch", "length", "act_embed"))
        x = x + self.mlp(self.post_attention_layernorm(x))
        return sharding.constrain(x, ("batch", "length", "act_embed")), new_cache


def _run_layer(layer: DecoderLayer, x: jax.Array, *args):
    """layer(x, *args) with the layer's parameters tied to `x` by an optimization barrier.

    Under FSDP each layer all-gathers its weights. Without the tie, those all-gathers depend on the parameters only,
    and XLA's loop-invariant code motion hoists them out of any loop that runs the model with invariant weights (the
    decode loop, the reference log-prob map, gradient accumulation): every layer's unsharded weights then stay live
    for the whole loop (~3 unsharded copies of each layer per device in a 7B GRPO step). Tied to the layer's input,
    they stay in the loop body (test_bench.py::test_layer_weight_all_gathers_stay_inside_a_loop).
    """
    graphdef, state = nnx.split(layer)
    state, x = jax.lax.optimization_barrier((state, x))
    return nnx.merge(graphdef, state)(x, *args)


class TextModel(nnx.Module):
    """Token embedding, `num_hidden_layers` decoder layers and the final norm (no LM head)."""

    def __init__(
        self,
        config: TextConfig,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        remat: bool = False,
        attn_impl: str = "xla",
        rngs: nnx.Rngs,
    ):
        self.config = config
        self.dtype = dtype
        self.remat = remat
        self.embed_tokens = nnx.Embed(
            config.vocab_size,
            config.hidden_size,
            dtype=dtype,
            param_dtype=param_dtype,
            embedding_init=DEFAULT_INIT,
            embedding_metadata={"axes": ("vocab", "embed")},
            rngs=rngs,
        )
        self.layers = nnx.List(
            [
                DecoderLayer(config, dtype=dtype, param_dtype=param_dtype, attn_impl=attn_impl, rngs=rngs)
                for _ in range(config.num_hidden_layers)
            ]
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=param_dtype)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """Token embeddings [B, T, D] in the compute dtype for input_ids [B, T]."""
        # The table stays sharded as stored ([V, D] over ("vocab", "embed")): in training every device looks up its
        # own embed columns for all (replicated, small) ids, then one all-to-all gives batch-sharded rows. Gathering
        # the table instead costs a full fp32 [V, D] copy per device (2 GiB for 7B), and its gradient another one.
        # In the sampler's decode layout the table is whole over the row axes, so the rows stay split
        # ("lookup_batch"; see model/sharding.py).
        ids = sharding.constrain(input_ids.astype(jnp.int32), ("lookup_batch", None))  # [B, T]
        x = jnp.take(self.embed_tokens.embedding[...], ids, axis=0)  # [B, T, D]
        x = sharding.constrain(x, ("lookup_batch", None, "embed")).astype(self.dtype)
        return sharding.constrain(x, ("batch", "length", "act_embed"))

    def __call__(
        self,
        inputs_embeds: jax.Array,
        position_ids: jax.Array,
        segment_ids: jax.Array,
        cache: KVCache | None = None,
        *,
        remat: bool | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Runs the decoder: inputs_embeds [B, T, D], position_ids [3, B, T], segment_ids [B, T] (0 = padding).

        Returns the normed hidden states [B, T, D] and, when `cache` is given, the cache with this step's T tokens
        written at `cache.index` and the index advanced by T. `remat` (default: the model's setting, for uncached
        calls only) rematerializes each layer in the backward pass; a differentiated cached call (the GRPO update's
        shared prompts) passes it explicitly.
        """
        t = inputs_embeds.shape[1]
        if position_ids.shape != (3, *inputs_embeds.shape[:2]):
            raise ValueError(f"position_ids shape {position_ids.shape} != (3, B, T) = (3, {inputs_embeds.shape[:2]})")
        if cache is not None and t > cache.max_length:
            raise ValueError(f"{t} tokens do not fit in a KV cache of {cache.max_length} slots")
        segment_ids = segment_ids.astype(jnp.int32)
        cos, sin = mrope_cos_sin(position_ids, self.config)  # [B, T, Dh]
        kv_segment_ids = index = None
        if cache is not None:
            index = cache.index
            kv_segment_ids = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids, (0, index))
        # by default remat only the training forward: the sampler's cached calls (prefill, decode) are never
        # differentiated, and nnx.remat inside its while_loop (the GRPO rollout) would touch the params from another
        # trace level
        if remat is None:
            remat = self.remat and cache is None
        run = nnx.remat(_run_layer) if remat else _run_layer
        x = sharding.constrain(inputs_embeds.astype(self.dtype), ("batch", "length", "act_embed"))
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            cache_kv = None if cache is None else (cache.k[i], cache.v[i])
            x, layer_cache = run(layer, x, cos, sin, segment_ids, cache_kv, kv_segment_ids, index)
            if cache is not None:
                new_k.append(layer_cache[0])
                new_v.append(layer_cache[1])
        x = self.norm(x)
        if cache is None:
            return x, None
        return x, KVCache(k=tuple(new_k), v=tuple(new_v), segment_ids=kv_segment_ids, index=index + t)
