"""Jitted sampling: prefill once per prompt, tile the KV cache over samples, decode in one `lax.while_loop`.

    out = generate(model, batch, max_new_tokens=64, temperature=0.0, top_k=0, top_p=1.0, num_samples=1, rng=None)
    out.tokens [N, L] int32 · out.logprobs [N, L] float32 · out.lengths [N] int32 · out.mask [N, L] bool

N = B * num_samples; rows b*n .. b*n+n-1 are prompt b's samples. `batch` is encoded with
`add_generation_prompt=True` and LEFT-padded (the cache write index is shared by all rows).

- Positions: generated token i of prompt b takes M-RoPE position `rope_deltas[b] + n_real[b] + i` on all three rows,
  i.e. the last prompt position + 1 + i, as transformers' `generate` does.
- Stop: a row is done after emitting a token of `stop_ids` (default: the config's eos_token_id); it then emits
  `pad_id` with mask False. `lengths` counts tokens up to and including the stop token. The loop exits early once
  every row is done.
- Log-probs: `log_softmax(logits / T)` of the chosen token over the FULL vocabulary (T = 1 when greedy), before
  top-k / top-p filtering. That is what a teacher-forced forward pass of the same model at temperature T gives, so
  GRPO's first importance ratio is exactly 1. With top-k / top-p the token was drawn from the renormalized nucleus,
  whose log-prob is higher by -log(kept mass).
- Draws: `categorical`, inverse transform sampling with two uniforms per row (not V Gumbel draws).
- Layout: the weights are cast to the compute dtype and resharded ONCE per call, before the prefill, into the layout
  `layout` names (`model.sharding.choose_layout`): "decode" keeps the decoder's weights stationary, split only over
  tensor groups of T consecutive devices and whole across groups, with the rows split over the groups, so a decode
  step moves only activations; "train" decodes on the training shardings (FSDP: every step all-gathers every
  layer's weights). "auto" (the default) picks T from the decoder's size; "decode:T" fixes it. The vision tower
  runs once per call, in the prefill, and stays where it is. Same tokens either way (tested).
- Compilation: `_prefill` and `_decode` are module-level jitted functions whose cache is keyed by the model's graphdef,
  the static `SamplingConfig`, the layout and the input shapes/shardings; prompts, weights, keys and stop ids are
  traced inputs, so repeated calls with the same shapes do not recompile (`TRACES` counts traces). Called alone,
  `_decode` takes the cache donated; `generate` runs both inside one executable (`_generate`), the GRPO step inside
  its own jit.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import weakref

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qponder_jax.data.batch import Batch
from qponder_jax.model import sharding
from qponder_jax.model.qwen2_5_vl import Qwen25VL, check_batch
from qponder_jax.model.text import KVCache

TRACES: collections.Counter = collections.Counter()  # traces (= compilations) of the jitted pieces, for tests
# where the once-per-call cast and reshard sit in the compiled program's op metadata (`benchmarks.hlo` reads it); the
# prefill and the decode loop appear there as jit(_prefill) and jit(_decode)
RESHARD_SCOPE = "sampler_reshard"
_TRAIN = sharding.SamplingLayout("train")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """The static settings of one `generate` call; a change of any of them compiles a new decode loop."""

    max_new_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    num_samples: int = 1  # completions per prompt
    pad_id: int = 0  # emitted after a row is done

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@flax.struct.dataclass
class DecodeState:
    """The while-loop carry."""

    step: jax.Array  # [] int32; tokens generated so far
    logits: jax.Array  # [N, V] float32; logits for the token of this step
    positions: jax.Array  # [N] int32; M-RoPE position of the token of this step (all three rows)
    cache: KVCache  # N rows, prompt + max_new_tokens slots
    tokens: jax.Array  # [N, L] int32; pad_id where not generated
    logprobs: jax.Array  # [N, L] float32; 0 where not generated
    lengths: jax.Array  # [N] int32; tokens generated up to and including the stop token
    done: jax.Array  # [N] bool
    rng: jax.Array  # PRNG key


@flax.struct.dataclass
class SampleOutput:
    tokens: jax.Array  # [N, L] int32
    logprobs: jax.Array  # [N, L] float32; see the module docstring
    lengths: jax.Array  # [N] int32
    mask: jax.Array  # [N, L] bool; True on generated tokens up to and including the stop token
    steps: jax.Array  # [] int32; decode iterations run (< L after an early exit)


def filter_logits(logits: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """logits [..., V] (already temperature-scaled) with -inf outside the top-k, then outside the top-p nucleus
    (the smallest set of most likely tokens whose mass reaches top_p, renormalized after top-k, as transformers)."""
    vocab = logits.shape[-1]
    use_k = 0 < top_k < vocab
    if not use_k and top_p >= 1.0:
        return logits
    desc = jax.lax.top_k(logits, top_k)[0] if use_k else -jnp.sort(-logits, axis=-1)  # [..., K] descending
    keep = jnp.ones(desc.shape, bool)
    if top_p < 1.0:
        probs = jax.nn.softmax(desc, axis=-1)
        keep = jnp.cumsum(probs, axis=-1) - probs < top_p  # mass of the more likely tokens; the first always kept
    threshold = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)  # [..., 1]
    return jnp.where(logits >= threshold, logits, -jnp.inf)


_BLOCK = 128  # vocabulary block of `categorical`'s two-level inverse transform


def categorical(rng: jax.Array, logits: jax.Array) -> jax.Array:
    """One draw per row from softmax(logits), logits [N, V] (-inf = never drawn) -> [N] int32.

    Inverse transform sampling in two levels, exact as a factorization: a block of `_BLOCK` consecutive tokens is
    drawn by its probability mass, then a token within it by its probability given the block, each from its own
    uniform. That takes 2 random numbers per row where `jax.random.categorical` (Gumbel-max) takes V, plus two logs
    of each: at [32, 32000] on a CPU, 0.85 ms against 13.6 ms per decode step. A zero-probability token (-inf
    logit, e.g. outside the top-k / top-p nucleus) is never returned; see `_inverse_cdf`.
    """
    n, v = logits.shape
    blocks = -(-v // _BLOCK)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)  # [N, V]
    probs = jnp.pad(probs, ((0, 0), (0, blocks * _BLOCK - v))).reshape(n, blocks, _BLOCK)
    uniform = jax.random.uniform(rng, (2, n))
    block = _inverse_cdf(jnp.sum(probs, axis=-1), uniform[0])  # [N]
    within = jnp.take_along_axis(probs, block[:, None, None], axis=1)[:, 0]  # [N, _BLOCK]
    return (block * _BLOCK + _inverse_cdf(within, uniform[1])).astype(jnp.int32)


def _inverse_cdf(p: jax.Array, u: jax.Array) -> jax.Array:
    """Index [N] drawn with probability p / sum(p) for p [N, K] >= 0 (unnormalized) and u [N] uniform in [0, 1):
    the first index whose cumulative mass exceeds u * sum(p). Leading zeros are skipped (their cumulative mass 0 is
    <= u * sum(p) even for u = 0), trailing ones too while u * sum(p) < sum(p), which holds in float32 for u < 1; the
    clamp to the last positive entry guards against a cumulative sum that a parallel scan rounds non-monotonically."""
    cum = jnp.cumsum(p, axis=-1)
    index = jnp.sum(cum <= (u * cum[:, -1])[:, None], axis=-1)
    last_positive = p.shape[-1] - 1 - jnp.argmax(p[:, ::-1] > 0, axis=-1)
    return jnp.minimum(index, last_positive)


def sample_token(logits: jax.Array, rng: jax.Array, config: SamplingConfig) -> tuple[jax.Array, jax.Array]:
    """logits [N, V] -> (token [N] int32, its log-prob [N] under log_softmax(logits / T), T = 1 when greedy).

    The log-prob is `scaled[token] - max - log(sum(exp(scaled - max)))`, log_softmax's own formula, read at one
    entry per row instead of written out at [N, V] and gathered; on a CPU the greedy step's argmax and log-prob
    took 3.3 ms at [32, 32000] that way and take 0.8 ms this way."""
    scaled = logits if config.greedy else logits / config.temperature
    top = jnp.max(scaled, axis=-1, keepdims=True)  # [N, 1]
    if config.greedy:
        token = first_argmax(scaled, top)
    else:
        token = categorical(rng, filter_logits(scaled, config.top_k, config.top_p))
    picked = jnp.take_along_axis(scaled, token[:, None], axis=-1)[:, 0]
    logprob = picked - top[:, 0] - jnp.log(jnp.sum(jnp.exp(scaled - top), axis=-1))
    return token.astype(jnp.int32), logprob


def first_argmax(x: jax.Array, top: jax.Array) -> jax.Array:
    """`jnp.argmax(x, axis=-1)` for x [N, V] given its row maxima `top` [N, 1]: the first index holding the maximum
    (or, as argmax, the first NaN). Two plain reductions, which XLA:CPU vectorizes; argmax's (value, index) pair
    reduction it does not (30 us against about 10 us per decode step at [8, 1024])."""
    index = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    hit = (x == top) | jnp.isnan(x)
    return jnp.min(jnp.where(hit, index, x.shape[-1]), axis=-1)


@functools.partial(jax.jit, static_argnames=("graphdef", "config", "layout"))
def _prefill(
    graphdef, params, batch: Batch, rng, *, config: SamplingConfig, layout: sharding.SamplingLayout = _TRAIN
) -> DecodeState:
    """Vision + prompt once per prompt, then the cache and last logits tiled `num_samples` times. The vision tower
    runs in the training layout (the decode layout's tensor groups would each compute all of it), the decoder in
    `layout` (the layout `params` are in)."""
    TRACES["prefill"] += 1
    features = nnx.merge(graphdef, params).vision_features(batch)  # [B, P', D]
    with sharding.layout_scope(layout):
        return _prefill_body(graphdef, params, batch, features, rng, config)


def _prefill_body(graphdef, params, batch: Batch, features, rng, config: SamplingConfig) -> DecodeState:
    model: Qwen25VL = nnx.merge(graphdef, params)
    b, t = batch.input_ids.shape
    n, steps = config.num_samples, config.max_new_tokens
    logits, cache = model.prefill(batch, model.init_cache(b, t + steps), last_only=True, features=features)  # [B, 1, V]
    start = batch.rope_deltas + jnp.sum(batch.attention_mask, axis=-1, dtype=jnp.int32)  # [B] first new position
    if n > 1:
        cache = cache.repeat(n)
    tiled = lambda x: jnp.repeat(x, n, axis=0)
    return DecodeState(
        step=jnp.zeros((), jnp.int32),
        logits=sharding.constrain(tiled(logits[:, 0]), ("batch", "act_vocab")),  # [N, V]
        positions=tiled(start.astype(jnp.int32)),
        cache=cache,
        tokens=jnp.full((b * n, steps), config.pad_id, jnp.int32),
        logprobs=jnp.zeros((b * n, steps), jnp.float32),
        lengths=jnp.zeros((b * n,), jnp.int32),
        done=jnp.zeros((b * n,), bool),
        rng=jax.random.key(0) if rng is None else rng,
    )


@functools.partial(jax.jit, static_argnames=("graphdef", "config", "layout"), donate_argnames=("state",))
def _decode(
    graphdef,
    params,
    state: DecodeState,
    stop_ids: jax.Array,
    *,
    config: SamplingConfig,
    layout: sharding.SamplingLayout = _TRAIN,
) -> tuple[DecodeState, jax.Array]:
    """The decode loop: sample a token per row, record it, feed it back; until max_new_tokens or all rows done.
    stop_ids [S] int32 (-1 entries match nothing); traced in `layout`. Returns the final state (its cache aliases the
    donated one) and the completion mask [N, L]."""
    TRACES["decode"] += 1
    with sharding.layout_scope(layout):
        return _decode_loop(graphdef, params, state, stop_ids, config)


def _decode_loop(graphdef, params, state: DecodeState, stop_ids: jax.Array, config: SamplingConfig):
    model: Qwen25VL = nnx.merge(graphdef, params)

    def cond(s: DecodeState):
        return (s.step < config.max_new_tokens) & ~jnp.all(s.done)

    def body(s: DecodeState) -> DecodeState:
        rng, key = (s.rng, s.rng) if config.greedy else jax.random.split(s.rng)  # greedy draws nothing
        token, logprob = sample_token(s.logits, key, config)  # [N], [N]
        token = jnp.where(s.done, config.pad_id, token)
        logprob = jnp.where(s.done, 0.0, logprob)
        done = s.done | jnp.any(token[:, None] == stop_ids[None, :], axis=-1)
        position_ids = jnp.broadcast_to(s.positions[None, :, None], (3, token.shape[0], 1))  # [3, N, 1]
        logits, cache = model.decode_step(token[:, None], position_ids, s.cache)  # [N, 1, V]
        return DecodeState(
            step=s.step + 1,
            logits=logits[:, 0],
            positions=s.positions + 1,
            cache=cache,
            tokens=jax.lax.dynamic_update_slice(s.tokens, token[:, None], (0, s.step)),
            logprobs=jax.lax.dynamic_update_slice(s.logprobs, logprob[:, None], (0, s.step)),
            lengths=s.lengths + (~s.done).astype(jnp.int32),
            done=done,
            rng=rng,
        )

    state = jax.lax.while_loop(cond, body, state)
    return state, jnp.arange(config.max_new_tokens)[None, :] < state.lengths[:, None]


def sample(
    graphdef, params, batch: Batch, rng, stop_ids: jax.Array, *, config: SamplingConfig, layout: str = "auto"
) -> tuple[DecodeState, jax.Array]:
    """Prefill then the decode loop, traceable: callable inside another jitted function (the GRPO step), where
    both pieces are inlined. rng is None for greedy; stop_ids [S] int32 (-1 matches nothing); layout "auto",
    "decode", "decode:T" or "train" (see the module docstring). Returns the final decode state (tokens, log-probs,
    lengths) and the completion mask [N, L]."""
    with jax.named_scope(RESHARD_SCOPE):
        params, layout = decode_params(graphdef, params, layout)
    state = _prefill(graphdef, params, batch, rng, config=config, layout=layout)
    return _decode(graphdef, params, state, stop_ids, config=config, layout=layout)


def decode_params(graphdef, params: nnx.State, layout: str = "auto") -> tuple[nnx.State, sharding.SamplingLayout]:
    """(params cast to the compute dtype and, in the decode layout, the decoder's weights resharded into it; the
    layout chosen), inside a traced function on the current mesh. The cast comes first, so with a bf16 compute dtype
    no weight moves in fp32. The vision tower (`visual`) keeps its layout: it runs once, in the prefill."""
    # pinned to the training layout right after the cast: the cast then runs on each device's shard, and whatever
    # gathers the weights (the decode reshard below, the vision tower's FSDP gathers) moves the compute dtype; XLA
    # would otherwise gather fp32 weights and cast the whole copy
    params = sharding.reshard_state(in_compute_dtype(params, nnx.merge(graphdef, params).dtype), sharding.LOGICAL_RULES)
    decoder = nnx.State({k: v for k, v in params.items() if k != "visual"})
    mesh = jax.sharding.get_abstract_mesh()
    chosen = sharding.choose_layout(layout, decoder, None if mesh.empty else mesh)
    if chosen.name == "decode":
        with sharding.layout_scope(chosen):
            decoder = sharding.reshard_state(decoder, sharding.DECODE_RULES)
        params = nnx.State({**params, **decoder})
    return params, chosen


def in_compute_dtype(params, dtype):
    """`params` with every floating leaf wider than the compute `dtype` cast to it, once per `sample` call.

    Every use of a weight casts it to the compute dtype first (the linears, the LM head, the norms' scales, the
    embedding rows), so the model computes the same bits from either copy. Inside the decode loop, though, fp32 weights
    would be converted on every step (XLA leaves the converts in the loop); cast once, each step reads half the bytes
    (3B widths, batch 64, bf16 on an H200: 64 new tokens in 570 ms before, 289 ms after). With the compute dtype
    equal to the weights' (fp32 everywhere, the default) nothing changes."""
    dtype = jnp.dtype(dtype)

    def cast(x):
        if jnp.issubdtype(x.dtype, jnp.floating) and jnp.dtype(x.dtype).itemsize > dtype.itemsize:
            return x.astype(dtype)
        return x

    return jax.tree.map(cast, params)


@functools.partial(jax.jit, static_argnames=("graphdef", "config", "layout"))
def _generate(
    graphdef, params, batch: Batch, rng, stop_ids: jax.Array, *, config: SamplingConfig, layout: str = "auto"
) -> SampleOutput:
    """`sample` as one executable: one dispatch per `generate` call, and only its outputs leave it."""
    state, mask = sample(graphdef, params, batch, rng, stop_ids, config=config, layout=layout)
    return SampleOutput(state.tokens, state.logprobs, state.lengths, mask, state.step)


def generate(
    model: Qwen25VL,
    batch: Batch,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    num_samples: int = 1,
    rng: jax.Array | int | None = None,
    *,
    stop_ids=None,
    pad_id: int | None = None,
    layout: str = "auto",
) -> SampleOutput:
    """Samples `num_samples` completions of every prompt of a left-padded `batch` (see the module docstring).

    stop_ids: token ids that end a row (default: the model config's eos_token_id; `()` for none). pad_id: the token
    emitted after a row is done (default: the config's pad_token_id, else 0). rng: a PRNG key or an int seed; needed
    when temperature > 0. layout: "auto", "decode", "decode:T" or "train", the weights' layout while decoding
    (module docstring). Runs on the mesh of the model's parameters; nothing is copied back to the host.
    """
    config = SamplingConfig(
        max_new_tokens=int(max_new_tokens),
        temperature=float(temperature),
        top_k=int(top_k),
        top_p=float(top_p),
        num_samples=int(num_samples),
        pad_id=int(pad_id if pad_id is not None else (model.config.text.pad_token_id or 0)),
    )
    _check_settings(config, rng)
    try:
        sharding.parse_layout(layout)
    except ValueError as e:
        raise ValueError(f"generate: {e}") from None
    if isinstance(batch.input_ids, np.ndarray):
        _check_left_padded(batch)
        check_batch(batch, model.config)
    if config.greedy:
        rng = None  # not used; the state's key is made on device
    elif isinstance(rng, int):
        rng = jax.random.key(rng)
    graphdef, params = cached_split(model)
    mesh = _mesh_of(params)
    batch = _place(batch, mesh)
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        return _generate(graphdef, params, batch, rng, _stop_ids(model, stop_ids), config=config, layout=layout)


def completion_batch(batch: Batch, out: SampleOutput, num_samples: int = 1) -> Batch:
    """The prompts (each repeated `num_samples` times) followed by their completions: a [N, T + L] batch for a
    teacher-forced pass. Completion tokens continue the positions; `loss_mask` marks exactly `out.mask`; logits at
    column T - 1 + i score completion token i."""
    n, steps = num_samples, out.tokens.shape[1]
    rep = lambda x, axis=0: jnp.repeat(jnp.asarray(x), n, axis=axis)
    prompt_mask = rep(batch.attention_mask)  # [N, T]
    start = rep(batch.rope_deltas) + jnp.sum(prompt_mask, axis=-1, dtype=jnp.int32)  # [N]
    new_positions = start[:, None] + jnp.arange(steps, dtype=jnp.int32)  # [N, L]
    cat = lambda a, b: jnp.concatenate([a, b.astype(a.dtype)], axis=-1)
    return batch.replace(
        input_ids=cat(rep(batch.input_ids), out.tokens),
        attention_mask=cat(prompt_mask, out.mask),
        position_ids=cat(rep(batch.position_ids, 1), jnp.broadcast_to(new_positions, (3, *new_positions.shape))),
        rope_deltas=rep(batch.rope_deltas),
        loss_mask=cat(jnp.zeros_like(prompt_mask), out.mask),
        pixel_values=rep(batch.pixel_values),
        image_grid_thw=rep(batch.image_grid_thw),
        vision_pos_ids=rep(batch.vision_pos_ids),
        window_index=rep(batch.window_index),
        window_segment_ids=rep(batch.window_segment_ids),
        full_segment_ids=rep(batch.full_segment_ids),
        image_feature_index=cat(rep(batch.image_feature_index), jnp.full(out.tokens.shape, -1, jnp.int32)),
    )


# ---- host-side helpers ----
_SPLITS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (treedef, graphdef, state def, order)


def cached_split(model) -> tuple[nnx.GraphDef, nnx.State]:
    """`nnx.split(model)`, with the graph traversal done once per model while its structure stays the same.

    `nnx.split` walks the module graph on every call (1.8 ms for the tiny bench model, 9 ms for the small one, more
    with more layers): a share of each `generate` call in an evaluation loop. The model is also a pytree, and its
    flattening is several times cheaper, so the first split records which pytree leaf is which state leaf; later
    calls with an equal pytree structure rebuild the state from the current leaves (the arrays the model holds now,
    after any in-place update) through that record. Nothing but the structure is kept, and only while the model
    lives; a model whose leaves are not distinct arrays is split the plain way every time. The graphdef is the jit
    cache key of the callers, so a fresh split checks that it hashes."""
    leaves, treedef = jax.tree.flatten(model)
    cached = _SPLITS.get(model)
    if cached is not None and cached[0] == treedef:
        _, graphdef, state_def, order = cached
        return graphdef, jax.tree.unflatten(state_def, [leaves[i] for i in order])
    graphdef, state = nnx.split(model)
    try:
        hash(graphdef)
    except TypeError as e:
        raise TypeError(
            f"the model's static attributes must be hashable ({e}); e.g. config.text.eos_token_id must be an int "
            "or a tuple, not a list"
        ) from e
    state_leaves, state_def = jax.tree.flatten(state)
    where = {id(x): i for i, x in enumerate(leaves)}
    order = [where.get(id(x)) for x in state_leaves]
    if len(where) == len(leaves) == len(order) and None not in order:
        _SPLITS[model] = (treedef, graphdef, state_def, order)
    return graphdef, state


def _stop_ids(model: Qwen25VL, stop_ids) -> jax.Array:
    """The stop set as a device array [S], padded with -1 to a multiple of 8, so a new stop set does not recompile."""
    if stop_ids is None:
        stop_ids = model.config.text.eos_token_id
    if stop_ids is None:
        stop_ids = ()
    ids = sorted({int(i) for i in ((stop_ids,) if isinstance(stop_ids, int | np.integer) else stop_ids)})
    padded = np.full(-(-max(len(ids), 1) // 8) * 8, -1, np.int32)
    padded[: len(ids)] = ids
    return jax.device_put(padded)


def _check_settings(config: SamplingConfig, rng) -> None:
    problems = []
    if config.max_new_tokens < 1:
        problems.append(f"max_new_tokens={config.max_new_tokens} must be >= 1")
    if config.temperature < 0:
        problems.append(f"temperature={config.temperature} must be >= 0")
    if config.top_k < 0:
        problems.append(f"top_k={config.top_k} must be >= 0 (0 = off)")
    if not 0.0 < config.top_p <= 1.0:
        problems.append(f"top_p={config.top_p} must be in (0, 1]")
    if config.num_samples < 1:
        problems.append(f"num_samples={config.num_samples} must be >= 1")
    if not config.greedy and rng is None:
        problems.append(f"temperature={config.temperature} samples, so it needs rng (a jax.random.key or an int seed)")
    if problems:
        raise ValueError("generate: " + "; ".join(problems))


def _check_left_padded(batch: Batch) -> None:
    mask = np.asarray(batch.attention_mask, bool)
    real = mask.any(axis=1)
    bad = np.flatnonzero(real & ~mask[:, -1])
    if bad.size:
        raise ValueError(
            f"generate: batch row {int(bad[0])} ends in padding; generation batches must be left-padded "
            "(collate(..., padding_side='left'))"
        )


def _mesh_of(params: nnx.State):
    """The mesh of the first parameter placed with a NamedSharding (None for single-device parameters)."""
    for leaf in jax.tree.leaves(params):
        spec = getattr(leaf, "sharding", None)
        if isinstance(spec, jax.sharding.NamedSharding) and spec.mesh.size > 1:
            return spec.mesh
    return None


def _place(batch: Batch, mesh) -> Batch:
    """The batch on device, split over ('data', 'fsdp') along its sample axis (axis 1 of position_ids)."""

    def put(name: str, x):
        if mesh is None:
            return jax.device_put(x)
        axes = [None] * np.ndim(x)
        axes[1 if name == "position_ids" else 0] = "batch"
        return jax.device_put(x, sharding.logical_sharding(axes, np.shape(x), mesh))

    return batch.replace(**{f.name: put(f.name, getattr(batch, f.name)) for f in dataclasses.fields(batch)})
