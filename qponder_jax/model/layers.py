"""Building blocks shared by the vision tower and the language model: linear, RMSNorm, SwiGLU, rotary.

Every parameter carries logical axis names in its `axes` metadata; `model/sharding.py` maps them to the
mesh. Parameters live in `param_dtype` (float32 by default); matmuls run in `dtype` (the compute dtype).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

DEFAULT_INIT = nnx.initializers.normal(0.02)


def linear(
    d_in: int,
    d_out: int,
    axes: Sequence[str | None],
    *,
    bias: bool,
    dtype,
    param_dtype,
    rngs: nnx.Rngs,
) -> nnx.Linear:
    """nnx.Linear whose kernel [d_in, d_out] is named `axes` (its bias takes the second name)."""
    return nnx.Linear(
        d_in,
        d_out,
        use_bias=bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=DEFAULT_INIT,
        kernel_metadata={"axes": tuple(axes)},
        bias_metadata={"axes": (axes[1],)},
        rngs=rngs,
    )


class RMSNorm(nnx.Module):
    """RMS normalization computed in float32, scaled by a learned weight (as Qwen2 does)."""

    def __init__(self, dim: int, *, eps: float, param_dtype=jnp.float32):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), axes=("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(dtype) * x32.astype(dtype)


class GatedMLP(nnx.Module):
    """SwiGLU feed-forward: down(act(gate(x)) * up(x)). Biases on all three for the vision tower."""

    def __init__(self, dim: int, hidden: int, *, bias: bool, act: str, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = linear(dim, hidden, ("embed", "mlp"), **kw)
        self.up_proj = linear(dim, hidden, ("embed", "mlp"), **kw)
        self.down_proj = linear(hidden, dim, ("mlp", "embed"), **kw)
        self.act = activation(act)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def activation(name: str):
    """transformers' ACT2FN names used by Qwen2.5-VL."""
    table = {
        "silu": jax.nn.silu,
        "swish": jax.nn.silu,
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    }
    if name not in table:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(table)}")
    return table[name]


def rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates x [..., T, H, Dh] by angles given as cos/sin [..., T, Dh] (broadcast over heads), in float32."""
    x32 = x.astype(jnp.float32)
    out = x32 * cos[..., None, :] + rotate_half(x32) * sin[..., None, :]
    return out.astype(x.dtype)
