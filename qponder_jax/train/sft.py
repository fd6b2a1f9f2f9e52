"""Supervised fine-tuning (the cold start, Q-Ponder-CI): masked next-token cross-entropy and the jitted, sharded step.

Alignment: `logits[:, t]` is the model's prediction for token `t + 1`. Token `t + 1` is a target when
`loss_mask[:, t + 1]` is True (the assistant's tokens), so the loss pairs `logits[:, :-1]` with `input_ids[:, 1:]`
under `loss_mask[:, 1:]`. The loss is the sum of the target tokens' negative log-likelihoods divided by the number of
target tokens in the whole global batch (all devices and all accumulation micro-batches together), so a run with
gradient accumulation A and micro-batch b takes the same step as one batch of A * b.

Gradient accumulation runs inside the one jitted step as a `lax.scan` over micro-batches: global row i belongs to
micro-batch i % A, so every micro-batch stays evenly sharded over ('data', 'fsdp').
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from qponder_jax.data.batch import Batch
from qponder_jax.model import sharding
from qponder_jax.model.qwen2_5_vl import check_shapes
from qponder_jax.train import optim
from qponder_jax.train.grpo_loss import chunked_token_logprobs
from qponder_jax.train.state import TrainState

# Batch fields whose batch axis is not the first one.
_BATCH_AXIS = {"position_ids": 1}


def _batch_axes(name: str, ndim: int) -> list[str | None]:
    """Logical axes of a Batch field: "batch" on its batch axis, nothing elsewhere."""
    axes: list[str | None] = [None] * ndim
    axes[_BATCH_AXIS.get(name, 0)] = "batch"
    return axes


def _map_fields(batch: Batch, fn) -> Batch:
    return batch.replace(**{f.name: fn(f.name, getattr(batch, f.name)) for f in dataclasses.fields(batch)})


def batch_shardings(batch: Batch, mesh: Mesh) -> Batch:
    """NamedSharding per Batch field: the batch axis over ('data', 'fsdp'), everything else replicated (the same
    shardings `data.pipeline.to_global` gives). Raises if the batch does not divide over those mesh axes."""
    shards = int(np.prod([mesh.shape.get(a, 1) for a in sharding.LOGICAL_RULES["batch"] or ()]))

    def one(name, x):
        size = x.shape[_BATCH_AXIS.get(name, 0)]
        if size % shards:
            raise ValueError(
                f"batch field {name}: batch size {size} is not divisible by the {shards} devices of the mesh's "
                "('data', 'fsdp') axes"
            )
        return sharding.logical_sharding(_batch_axes(name, x.ndim), x.shape, mesh)

    return _map_fields(batch, one)


def next_token_loss(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of target-token NLLs, number of target tokens), both float32 scalars. logits [B, T, V]."""
    targets = input_ids[:, 1:]  # [B, T-1]
    mask = loss_mask[:, 1:].astype(jnp.float32)  # [B, T-1]
    nll = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32), targets)  # [B, T-1]
    return jnp.sum(nll * mask), jnp.sum(mask)


def hidden_and_head(model, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """(final hidden states [B, T, D] aligned with batch.input_ids, LM head [D, V]): `model(batch)` without the
    logits, for losses that apply the head in vocab chunks (`grpo_loss.chunked_token_logprobs`)."""
    check_shapes(batch, model.config)
    x = model.embed_inputs(batch)  # [B, T, D]
    segment_ids = jnp.asarray(batch.attention_mask).astype(jnp.int32)
    hidden, _ = model.language_model(x, jnp.asarray(batch.position_ids), segment_ids)
    return hidden, lm_head(model)


def lm_head(model) -> jax.Array:
    """The LM head [D, V] (the transposed embedding with tied word embeddings)."""
    if model.config.tie_word_embeddings:
        return model.language_model.embed_tokens.embedding[...].T
    return model.lm_head.kernel[...]


def chunked_next_token_loss(model, batch: Batch, chunk: int) -> tuple[jax.Array, jax.Array]:
    """`next_token_loss(model(batch), ...)` without the [B, T, V] fp32 logits: the head runs in vocab chunks."""
    hidden, head = hidden_and_head(model, batch)
    logp, _ = chunked_token_logprobs(hidden[:, :-1], head, batch.input_ids[:, 1:], 1.0, chunk)  # [B, T-1]
    mask = batch.loss_mask[:, 1:].astype(jnp.float32)
    return -jnp.sum(logp * mask), jnp.sum(mask)


def target_count(batch: Batch) -> jax.Array:
    return jnp.sum(batch.loss_mask[:, 1:].astype(jnp.float32))


def split_micro_batches(batch: Batch, num: int) -> Batch:
    """Batch with a leading micro-batch axis: [num, ...]; global row i goes to micro-batch i % num."""

    def one(name, x):
        axis = _BATCH_AXIS.get(name, 0)
        if x.shape[axis] % num:
            raise ValueError(f"batch field {name}: batch size {x.shape[axis]} is not divisible by grad_accum {num}")
        x = x.reshape(x.shape[:axis] + (x.shape[axis] // num, num) + x.shape[axis + 1 :])
        return jnp.moveaxis(x, axis + 1, 0)

    return _map_fields(batch, one)


def _constrain_batch(batch: Batch) -> Batch:
    return _map_fields(batch, lambda name, x: sharding.constrain(x, _batch_axes(name, x.ndim)))


@dataclasses.dataclass(frozen=True)
class SFTStep:
    """Static pieces of the SFT step: the model's graph, the optimizer and the parameter labels."""

    graphdef: nnx.GraphDef
    rest: nnx.State  # non-parameter model state (passed through unchanged)
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    labels: dict  # TRAIN / FROZEN per parameter
    grad_accum: int = 1
    logprob_chunk: int = 0  # > 0: the loss applies the LM head in vocab chunks of this size (no [B, T, V] logits)

    def loss_and_grads(self, params: dict, batch: Batch) -> tuple[jax.Array, jax.Array, dict]:
        """(mean loss over the global batch's target tokens, target-token count, gradients).

        Only the trainable parameters are differentiated (and accumulated); frozen ones get zero gradients that the
        optimizer ignores, so a frozen vision tower costs no backward weight-gradient work or accumulator memory.
        """
        total = jnp.maximum(target_count(batch), 1.0)
        leaves, treedef = jax.tree.flatten(params)
        trainable = [i for i, label in enumerate(jax.tree.leaves(self.labels)) if label == optim.TRAIN]

        def micro_loss(train_leaves, micro):
            full = list(leaves)
            for i, x in zip(trainable, train_leaves, strict=True):
                full[i] = x
            model = nnx.merge(self.graphdef, jax.tree.unflatten(treedef, full), self.rest)
            nll_sum, _ = self._nll(model, micro)
            return nll_sum / total

        grad_fn = jax.value_and_grad(micro_loss)
        train_leaves = [leaves[i] for i in trainable]
        if self.grad_accum == 1:
            loss, train_grads = grad_fn(train_leaves, batch)
        else:

            def body(carry, micro):
                loss_acc, grads_acc = carry
                # tied to the micro-batch, the weights' FSDP all-gathers stay inside the loop (else XLA hoists them
                # out of it and keeps an unsharded copy of the model live for the whole accumulation)
                tied, micro = jax.lax.optimization_barrier((train_leaves, micro))
                loss, grads = grad_fn(tied, _constrain_batch(micro))
                return (loss_acc + loss, jax.tree.map(jnp.add, grads_acc, grads)), None

            init = (jnp.zeros((), jnp.float32), [jnp.zeros_like(x) for x in train_leaves])
            (loss, train_grads), _ = jax.lax.scan(body, init, split_micro_batches(batch, self.grad_accum))
        grads = [jnp.zeros_like(x) for x in leaves]
        for i, g in zip(trainable, train_grads, strict=True):
            grads[i] = g
        return loss, target_count(batch), jax.tree.unflatten(treedef, grads)

    def __call__(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        """One optimizer update. A non-finite loss or gradient norm leaves the state untouched (metrics say so)."""
        loss, n_targets, grads = self.loss_and_grads(state.params, batch)
        grad_norm = optim.trainable_global_norm(grads, self.labels)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        params, opt_state = optim.update_if(finite, self.tx, state.params, state.opt_state, grads)
        new_state = state.replace(step=state.step + finite.astype(jnp.int32), params=params, opt_state=opt_state)
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "learning_rate": self.schedule(state.step),
            "target_tokens": n_targets,
            "tokens": jnp.sum(batch.attention_mask.astype(jnp.float32)),
            "patches": jnp.sum((batch.window_segment_ids != 0).astype(jnp.float32)),
            "finite": finite,
        }
        return new_state, metrics

    def eval_sums(self, params: dict, batch: Batch) -> dict:
        """Sums for a held-out loss: {'nll_sum', 'target_tokens'} over this batch."""
        model = nnx.merge(self.graphdef, params, self.rest)
        nll_sum, n = self._nll(model, batch)
        return {"nll_sum": nll_sum, "target_tokens": n}

    def _nll(self, model, batch: Batch) -> tuple[jax.Array, jax.Array]:
        if self.logprob_chunk > 0:
            return chunked_next_token_loss(model, batch, self.logprob_chunk)
        return next_token_loss(model(batch), batch.input_ids, batch.loss_mask)


def jit_train_step(step: SFTStep, state_shards: TrainState, mesh: Mesh) -> Callable:
    """`step` under one jax.jit with explicit in/out shardings over `mesh`; the input state is donated.

    The batch shardings come from the first batch (batch axis over ('data', 'fsdp')); a new bucket shape compiles
    once more, with the same shardings.
    """
    return _LazyJit(step.__call__, mesh, state_shards, donate=True, out=(state_shards, _replicated(mesh)))


def jit_eval_step(step: SFTStep, param_shards: dict, mesh: Mesh) -> Callable:
    """Jitted held-out sums `(params, batch) -> {'nll_sum', 'target_tokens'}`; params are not donated."""
    return _LazyJit(step.eval_sums, mesh, param_shards, donate=False, out=_replicated(mesh))


def _replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, jax.sharding.PartitionSpec())


class _LazyJit:
    """jax.jit(fn, in_shardings=(first_shards, batch shardings), ...) built on the first call."""

    def __init__(self, fn, mesh: Mesh, first_shards, *, donate: bool, out):
        self.fn, self.mesh, self.first_shards, self.donate, self.out = fn, mesh, first_shards, donate, out
        self.jitted = None

    def __call__(self, first, batch: Batch):
        if self.jitted is None:
            self.jitted = jax.jit(
                self.fn,
                in_shardings=(self.first_shards, batch_shardings(batch, self.mesh)),
                out_shardings=self.out,
                donate_argnums=(0,) if self.donate else (),
            )
        with jax.set_mesh(self.mesh):
            return self.jitted(first, batch)
