"""The logical-axis rules table and the shared attention function."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from qponder_jax.model.attention import attention
from qponder_jax.model.sharding import constrain, create_sharded, logical_to_spec, make_mesh


def test_rules_drop_axes_that_do_not_divide():
    mesh = make_mesh((2, 2, 2))
    assert logical_to_spec(("embed", "mlp"), (8, 6), mesh) == P("fsdp", "tensor")
    assert logical_to_spec(("embed", "kv_heads"), (8, 3), mesh) == P("fsdp", None)  # 3 kv heads, tensor=2
    assert logical_to_spec(("batch", "length"), (4, 5), mesh) == P(("data", "fsdp"), None)
    assert logical_to_spec(("batch", "length"), (2, 5), mesh) == P("data", None)
    with pytest.raises(KeyError, match="no rule"):
        logical_to_spec(("not_an_axis",), (4,), mesh)


def test_make_mesh_errors():
    with pytest.raises(ValueError, match="needs 16 devices"):
        make_mesh((4, 4, 1))
    assert make_mesh((2, -1, 1)).shape == {"data": 2, "fsdp": 4, "tensor": 1}


def test_create_sharded_places_params():
    class M(nnx.Module):
        def __init__(self, rngs):
            self.w = nnx.Param(jax.random.normal(rngs.params(), (4, 8)), axes=("embed", "mlp"))

    mesh = make_mesh((2, 2, 2))
    m = create_sharded(lambda: M(nnx.Rngs(0)), mesh)
    assert m.w[...].sharding.spec == P("fsdp", "tensor")
    ref = M(nnx.Rngs(0))
    np.testing.assert_array_equal(np.asarray(m.w[...]), np.asarray(ref.w[...]))

    @jax.jit
    def f(x):
        return constrain(x * 2, ("batch", "act_embed"))

    with jax.set_mesh(mesh):
        assert f(jnp.ones((8, 4))).sharding.spec == P(("data", "fsdp"))


def _reference(q, k, v, qs, ks, causal):
    b, tq, h, d = q.shape
    g = h // k.shape[2]
    k = np.repeat(k, g, axis=2)
    v = np.repeat(v, g, axis=2)
    out = np.zeros_like(q)
    for bi in range(b):
        for i in range(tq):
            ok = (ks[bi] == qs[bi, i]) & (ks[bi] != 0)
            if causal:
                ok &= np.arange(k.shape[1]) <= i
            if not ok.any():
                continue
            for hi in range(h):
                s = k[bi, :, hi] @ q[bi, i, hi] / np.sqrt(d)
                s = np.where(ok, s, -np.inf)
                p = np.exp(s - s.max())
                out[bi, i, hi] = (p / p.sum()) @ v[bi, :, hi]
    return out


@pytest.mark.parametrize("causal", [False, True])
def test_attention_matches_reference(causal):
    rng = np.random.default_rng(0)
    q = rng.normal(size=(2, 6, 4, 8)).astype(np.float32)
    k = rng.normal(size=(2, 6, 2, 8)).astype(np.float32)
    v = rng.normal(size=(2, 6, 2, 8)).astype(np.float32)
    seg = np.array([[1, 1, 2, 2, 2, 0], [0, 0, 1, 1, 1, 1]], np.int32)
    out = np.asarray(attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=causal))
    ref = _reference(q, k, v, seg, seg, causal)
    valid = seg != 0
    np.testing.assert_allclose(out[valid], ref[valid], atol=1e-5)
    assert np.isfinite(out).all()
    # the KV cache's head-major layout [B, Hkv, Tk, Dh] gives the same result
    heads_major = attention(
        q,
        np.swapaxes(k, 1, 2),
        np.swapaxes(v, 1, 2),
        q_segment_ids=seg,
        kv_segment_ids=seg,
        causal=causal,
        kv_heads_major=True,
    )
    np.testing.assert_allclose(np.asarray(heads_major)[valid], ref[valid], atol=1e-5)
