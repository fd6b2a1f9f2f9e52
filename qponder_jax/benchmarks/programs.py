"""The SFT step, the GRPO step and `generate`, compiled for a mesh from abstract arrays: nothing is allocated.

The model is `nnx.eval_shape`d, the train state and the batch are ShapeDtypeStructs carrying their NamedShardings,
and the jitted function is `.lower(...).compile()`d. `bench memory` reads the executables' `memory_analysis()`,
`bench plan` and the tests their HLO (`benchmarks.hlo`). Everything is abstract, so a 7B model compiles for 64
simulated devices on a laptop-sized CPU.
"""

from __future__ import annotations

import dataclasses
import tempfile

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qponder_jax import sampling
from qponder_jax.data.batch import Batch
from qponder_jax.model import sharding
from qponder_jax.model.config import Qwen25VLConfig
from qponder_jax.model.qwen2_5_vl import Qwen25VL
from qponder_jax.train import optim
from qponder_jax.train import state as state_lib


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """How the model is built: compute and parameter dtypes, remat, attention implementation."""

    dtype: str = "bfloat16"
    param_dtype: str = "float32"
    remat: bool = True
    attn_impl: str = "xla"

    def make(self, config: Qwen25VLConfig):
        return lambda: Qwen25VL(
            config, rngs=nnx.Rngs(0), dtype=jnp.dtype(self.dtype), param_dtype=jnp.dtype(self.param_dtype),
            remat=self.remat, attn_impl=self.attn_impl,
        )  # fmt: skip


def abstract_batch(config: Qwen25VLConfig, b: int, t: int, p: int, mesh: Mesh) -> tuple[Batch, Batch]:
    """(a [b, t] batch with p patch rows per sample as ShapeDtypeStructs on `mesh`, its shardings)."""
    from qponder_jax.train.sft import batch_shardings

    sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype)
    i32, dim = jnp.int32, config.vision.patch_dim
    batch = Batch(
        input_ids=sds((b, t), i32), attention_mask=sds((b, t), jnp.bool_), position_ids=sds((3, b, t), i32),
        rope_deltas=sds((b,), i32), loss_mask=sds((b, t), jnp.bool_), pixel_values=sds((b, p, dim), jnp.float32),
        image_grid_thw=sds((b, 1, 3), i32), vision_pos_ids=sds((b, p, 2), i32), window_index=sds((b, p), i32),
        window_segment_ids=sds((b, p), i32), full_segment_ids=sds((b, p), i32), image_feature_index=sds((b, t), i32),
    )  # fmt: skip
    shards = batch_shardings(batch, mesh)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), batch, shards), shards


_PARSER_CACHE: dict = {}


def abstract_parser(vocab_size: int, placement: NamedSharding):
    """The reward parser's tables for the demo tokenizer padded to `vocab_size` (built once), as ShapeDtypeStructs."""
    if vocab_size not in _PARSER_CACHE:
        from transformers import AutoTokenizer

        from qponder_jax.data.tokenizer import build_demo_tokenizer
        from qponder_jax.rewards.parse import build_parser

        with tempfile.TemporaryDirectory() as tmp:
            tok = AutoTokenizer.from_pretrained(str(build_demo_tokenizer(tmp + "/tok")))
        _PARSER_CACHE[vocab_size] = build_parser(tok, max_numbers=5, vocab_size=vocab_size, check=0)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=placement), _PARSER_CACHE[vocab_size])


def _train_state(config: Qwen25VLConfig, model: ModelSettings, mesh: Mesh):
    abstract_model = nnx.eval_shape(model.make(config))
    graphdef, params, rest = state_lib.split_model(abstract_model)
    labels = jax.tree.map(lambda _: optim.TRAIN, params)
    tx = optim.adamw(labels, learning_rate=1e-6, clip_norm=1.0)
    abstract = state_lib.abstract_train_state(params, tx, state_lib.param_shardings(abstract_model, mesh), mesh)
    return graphdef, rest, tx, labels, abstract


def sft_step(
    config: Qwen25VLConfig, mesh: Mesh, model: ModelSettings, *, rows: int, tokens: int, patches: int,
    grad_accum: int, logprob_chunk: int,
) -> jax.stages.Compiled:  # fmt: skip
    """The SFT step (`SFTStep`, state donated) compiled for `mesh`."""
    from qponder_jax.train.sft import SFTStep

    graphdef, rest, tx, labels, abstract = _train_state(config, model, mesh)
    shards = state_lib.shardings_of(abstract)
    rep = NamedSharding(mesh, PartitionSpec())
    fn = SFTStep(graphdef, rest, tx, optax.constant_schedule(1e-6), labels, grad_accum=grad_accum,
                 logprob_chunk=logprob_chunk)  # fmt: skip
    batch, batch_shards = abstract_batch(config, rows, tokens, patches, mesh)
    jitted = jax.jit(fn.__call__, in_shardings=(shards, batch_shards), out_shardings=(shards, rep), donate_argnums=0)
    with jax.set_mesh(mesh):
        return jitted.lower(abstract, batch).compile()


def grpo_step(
    config: Qwen25VLConfig, mesh: Mesh, model: ModelSettings, settings, *, prompts: int, tokens: int, patches: int
) -> jax.stages.Compiled:
    """The whole GRPO step (`GRPOStep` with `settings`, state donated, a reference copy of the parameters when beta
    > 0) compiled for `mesh`, as `grpo.jit_grpo_step` shards it."""
    from qponder_jax.train import grpo as grpo_lib

    graphdef, rest, tx, labels, abstract = _train_state(config, model, mesh)
    shards = state_lib.shardings_of(abstract)
    rep = NamedSharding(mesh, PartitionSpec())
    fn = grpo_lib.GRPOStep(graphdef, rest, tx, optax.constant_schedule(1e-6), labels, settings)
    batch, batch_shards = abstract_batch(config, prompts, tokens, patches, mesh)
    mos = jax.ShapeDtypeStruct((prompts,), jnp.float32, sharding=batch_shards.rope_deltas)
    parser = abstract_parser(config.text.vocab_size, rep)
    ref = abstract.params if settings.loss.beta > 0 else None
    jitted = jax.jit(
        fn.__call__,
        in_shardings=(shards, batch_shards, batch_shards.rope_deltas, jax.tree.map(lambda x: x.sharding, parser),
                      None if ref is None else shards.params),
        out_shardings=(shards, rep),
        donate_argnums=0,
    )  # fmt: skip
    with jax.set_mesh(mesh):
        return jitted.lower(abstract, batch, mos, parser, ref).compile()


def generate(
    config: Qwen25VLConfig, mesh: Mesh, model: ModelSettings, sampling_config: sampling.SamplingConfig, *,
    prompts: int, tokens: int, patches: int, layout: str = "auto",
) -> jax.stages.Compiled:  # fmt: skip
    """`sampling.generate`'s executable (`sampling._generate`) for a [prompts, tokens] batch and the model's
    parameters on their training shardings, compiled for `mesh`."""
    abstract_model = nnx.eval_shape(model.make(config))
    graphdef, state = nnx.split(abstract_model)
    shards = nnx.to_pure_dict(sharding.state_shardings(state, mesh))
    params = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nnx.to_pure_dict(state), shards
    )
    nnx.replace_by_pure_dict(state, params)
    batch, _ = abstract_batch(config, prompts, tokens, patches, mesh)
    stop = jax.ShapeDtypeStruct((8,), jnp.int32, sharding=NamedSharding(mesh, PartitionSpec()))
    rng = None if sampling_config.greedy else jax.random.key(0)
    with jax.set_mesh(mesh):
        lowered = sampling._generate.lower(graphdef, state, batch, rng, stop, config=sampling_config, layout=layout)
        return lowered.compile()


def resolve_layout(config: Qwen25VLConfig, mesh, model: ModelSettings, layout: str) -> str:
    """The sampler's layout ("train" or "decode:T") for the full model `config` on `mesh`, as `sampling.generate` and
    the GRPO rollout resolve `layout` (by the decoder's compute-dtype bytes per device): compile reduced depths with
    the answer, or "auto" would judge the smaller model."""
    state = nnx.state(nnx.eval_shape(model.make(config)))
    decoder = nnx.State({k: v for k, v in state.items() if k != "visual"})
    return sharding.choose_layout(layout, decoder, mesh, jnp.dtype(model.dtype)).spec


def text_weight_bytes(config: Qwen25VLConfig, model: ModelSettings) -> int:
    """Bytes of the decoder's weights (embedding, layers, final norm, LM head) in the parameter dtype: what an FSDP
    decode step all-gathers when it gathers everything."""
    state = nnx.state(nnx.eval_shape(model.make(config)))
    return sum(x.size * x.dtype.itemsize for k, v in state.items() if k != "visual" for x in jax.tree.leaves(v))
