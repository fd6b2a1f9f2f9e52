"""The whole model on a (2, 2, 2) mesh of the 8 simulated devices: parameters really sharded, same logits."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from torch_ref import make_batch

from qponder_jax.hf import load_hf, save_hf
from qponder_jax.model import sharding
from qponder_jax.model.config import tiny_config
from qponder_jax.model.qwen2_5_vl import create_model


def _batch(config):
    """Four samples: two with an image (different grids), two text-only, right-padded."""
    rng = np.random.default_rng(0)
    t, p = 20, 24
    grids = [[(1, 4, 6)], [(1, 4, 4)], [], []]
    ids = rng.integers(0, 400, (4, t)).astype(np.int32)
    mask = np.ones((4, t), bool)
    mask[2, 15:] = False
    pixels = []
    for b, g in enumerate(grids):
        if g:
            n = int(np.prod(g[0])) // config.vision.merge_unit
            ids[b, 1], ids[b, 2 : 2 + n], ids[b, 2 + n] = 502, config.image_token_id, 503
            pixels.append(rng.standard_normal((int(np.prod(g[0])), config.vision.patch_dim)).astype(np.float32))
        else:
            pixels.append(None)
    positions = np.broadcast_to(np.arange(t), (3, 4, t)).copy()
    positions[1:, :2, 3:8] += 1  # some non-trivial M-RoPE rows
    return make_batch(config, ids, mask, positions, grids=grids, pixel_values=pixels, num_patch_rows=p)


def _place(batch, mesh):
    """The batch as global arrays sharded over ('data', 'fsdp') along its batch axis."""

    def put(x, axis=0):
        spec = [None] * x.ndim
        spec[axis] = ("data", "fsdp")
        return jax.device_put(x, NamedSharding(mesh, PartitionSpec(*spec)))

    fields = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    return type(batch)(**{k: put(v, axis=1 if k == "position_ids" else 0) for k, v in fields.items()})


@pytest.fixture(scope="module")
def models():
    """(config, mesh, the model created on the (2, 2, 2) mesh, the same model created on one device)."""
    config = tiny_config()
    mesh = sharding.make_mesh((2, 2, 2))
    return config, mesh, create_model(config, mesh=mesh, rngs_seed=4), create_model(config, rngs_seed=4)


def test_sharded_model_matches_single_device(models, tmp_path):
    config, mesh, model, single = models
    batch = _batch(config)
    expected = np.asarray(single(batch))

    mlp = model.language_model.layers[0].mlp
    assert mlp.gate_proj.kernel[...].sharding.spec == PartitionSpec("fsdp", "tensor")
    assert mlp.down_proj.kernel[...].sharding.spec == PartitionSpec("tensor", "fsdp")
    assert model.language_model.embed_tokens.embedding[...].sharding.spec == PartitionSpec("tensor", "fsdp")
    assert model.lm_head.kernel[...].sharding.spec == PartitionSpec("fsdp", "tensor")
    q = model.language_model.layers[1].self_attn.q_proj
    assert q.kernel[...].sharding.spec == PartitionSpec("fsdp", "tensor")
    assert q.bias[...].sharding.spec == PartitionSpec("tensor")
    shard_shape = mlp.gate_proj.kernel[...].addressable_shards[0].data.shape
    assert shard_shape == (config.text.hidden_size // 2, config.text.intermediate_size // 2)

    forward = nnx.jit(lambda m, b: m(b))
    with jax.set_mesh(mesh):
        logits = forward(model, _place(batch, mesh))
    assert logits.sharding.spec[0] == ("data", "fsdp")
    diff = float(np.abs(np.asarray(logits) - expected).max())
    print(f"(2,2,2) mesh vs single device: max abs diff {diff:.2e}")
    assert diff <= 1e-5

    # save_hf gathers the sharded parameters; load_hf places them back onto the mesh
    save_hf(model, config, tmp_path / "hf")
    loaded, _ = load_hf(tmp_path / "hf", mesh=mesh)
    kernel = loaded.language_model.layers[0].mlp.gate_proj.kernel[...]
    assert kernel.sharding.spec == PartitionSpec("fsdp", "tensor")
    np.testing.assert_array_equal(np.asarray(kernel), np.asarray(mlp.gate_proj.kernel[...]))
    with jax.set_mesh(mesh):
        again = forward(loaded, _place(batch, mesh))
    np.testing.assert_array_equal(np.asarray(again), np.asarray(logits))


def test_sharded_generation_cache(models):
    config, mesh, model, single = models
    batch = _batch(config)
    with jax.set_mesh(mesh):
        cache = model.init_cache(4, 24)
        logits, cache = nnx.jit(lambda m, b, c: m.prefill(b, c, last_only=True))(model, _place(batch, mesh), cache)
    assert logits.shape == (4, 1, config.text.vocab_size)
    assert cache.k[0].sharding.spec[0] == ("data", "fsdp")
    full = np.asarray(single(batch))
    real_last = batch.attention_mask[:, -1]  # prefill expects left padding: row 2 ends in padding
    assert real_last.sum() == 3
    np.testing.assert_allclose(np.asarray(logits[real_last, 0]), full[real_last, -1], atol=1e-5)


@pytest.mark.parametrize("tie", [False, True])
def test_sampler_keeps_the_lm_head_vocab_sharded(tie):
    """On an FSDP mesh, in the training layout, the sampler's logits come from the head resharded over the vocabulary
    (each device multiplies the gathered [rows, D] hidden states by its own [D, V / N] columns): no device ever holds
    the whole [D, V] head, which an all-gather over D would give it for the whole decode loop (2 GiB for 7B). Same
    tokens as one device."""
    import re

    from qponder_jax import sampling

    config = tiny_config(vocab_size=1024)
    config = dataclasses.replace(config, tie_word_embeddings=tie)
    d, v = config.text.hidden_size, config.text.vocab_size
    mesh = sharding.make_mesh((1, 8, 1))
    model = create_model(config, mesh=mesh, rngs_seed=5)
    single = create_model(config, rngs_seed=5)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 400, (8, 6)).astype(np.int32)
    batch = make_batch(config, ids, np.ones((8, 6), bool), np.broadcast_to(np.arange(6), (3, 8, 6)).copy())

    graphdef, params = sampling.cached_split(model)
    sconfig = sampling.SamplingConfig(max_new_tokens=4, temperature=0.0, top_k=0, top_p=1.0, num_samples=2, pad_id=0)
    stop = jnp.full((1,), -1, jnp.int32)
    with jax.set_mesh(mesh):
        placed = sampling._place(batch, mesh)
        # the training layout (FSDP); the decode layout keeps the head whole over 'fsdp' on purpose
        lowered = sampling._generate.lower(graphdef, params, placed, None, stop, config=sconfig, layout="train")
        hlo = lowered.compile().as_text()
    whole = [line for line in hlo.splitlines() if re.search(rf"\[({d},{v}|{v},{d})\]", line.split("=", 1)[-1][:80])]
    assert not whole, "a device holds the whole LM head:\n" + "\n".join(whole[:3])
    assert re.search(rf"\[{d},{v // 8}\]", hlo), "the head should be resharded to [D, V / 8] columns per device"

    ours = sampling.generate(model, batch, max_new_tokens=4, num_samples=2, stop_ids=())
    ref = sampling.generate(single, batch, max_new_tokens=4, num_samples=2, stop_ids=())
    np.testing.assert_array_equal(np.asarray(ours.tokens), np.asarray(ref.tokens))
    np.testing.assert_allclose(np.asarray(ours.logprobs), np.asarray(ref.logprobs), atol=1e-5)
