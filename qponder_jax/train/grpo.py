"""The GRPO step: rollouts -> on-device parse -> rewards [B, G] -> group advantages -> mu clipped updates, one jit.

    step = GRPOStep(graphdef, rest, tx, schedule, labels, settings)
    state, metrics = step(state, batch, mos, parser, ref_params)      # inside jax.jit (see `jit_grpo_step`)

- Rollouts: the sampler's prefill runs once per prompt and its KV cache is tiled G times; the decode loop samples
  G completions per prompt (rows b*G .. b*G+G-1 belong to prompt b). The PRNG key is the state's. The weights are
  cast to the compute dtype and resharded once into the sampler's layout (`sampling_layout`, see
  `qponder_jax.sampling`); the reference pass and the updates keep the training layout.
- Scores: `rewards.parse` reads format, answer numbers and the reasoning level from the token ids; the score is the
  mean of the first `score_numbers` numbers (NaN when none parsed: a parse failure, never a default score). A parsed
  score with a number outside `score_range` (the prompt's scale) is out of range: counted (`out_of_range_rate`) and
  left out of the logged SRCC / PLCC; its rewards are the reward functions' own (e.g. no accuracy reward far off).
- Rewards: each configured `RewardTerm` is looked up by name in `rewards.registry`; their weighted sum is [B, G].
- Advantages: `rewards.advantages.group_advantages`, (r - mean_g) / (std_g + eps) with std none (Dr. GRPO),
  population or unbiased; groups whose rewards are all equal get 0 and are counted.
- Updates: the N = B*G completions, appended to their prompts on device (`sampling.completion_batch`: static shape
  [N, T + L], positions continue after each prompt, loss only on completion tokens up to the stop token), are cut
  into `num_minibatches` minibatches (row i -> minibatch i % M, so each stays evenly sharded) and the optimizer
  steps mu * M times over them in a `lax.scan` (epoch by epoch, minibatches in order). The old log-probs are the
  sampler's, so the very first update has ratio 1 (`first_ratio_max_dev` measures how close).
- Shared prompts (`share_prompts`, when M divides G with G / M > 1): a minibatch then holds G / M completions of
  every prompt, so it runs each prompt and its images once, with gradients, and the completions attend to that
  prompt's keys and values repeated G / M times (`shared_prompt_hidden`). The same log-probs and gradients as the
  teacher-forced [N, T + L] batch, without G / M forward and backward passes over every prompt and image.
- Reference: with beta > 0 the frozen reference params score every completion once, before the updates; with
  beta = 0 they are not even passed in.
- `state.step` counts GRPO steps (one per call); the optimizer's schedule counts inner updates (mu * M per step).
  A non-finite loss or gradient in any inner update leaves the whole state untouched (`finite` False) and skips
  the step's later updates. With one update per step this is a branch around the update, in place; with more,
  undoing the earlier ones keeps a copy of the step's starting parameters and AdamW state live through them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qponder_jax import sampling
from qponder_jax.data.batch import Batch
from qponder_jax.model import sharding
from qponder_jax.model.qwen2_5_vl import check_shapes
from qponder_jax.rewards import iqa, registry
from qponder_jax.rewards import parse as parse_lib
from qponder_jax.rewards.advantages import STD_MODES, group_advantages
from qponder_jax.train import optim
from qponder_jax.train.grpo_loss import LossConfig, chunked_token_logprobs, completion_logits, grpo_loss_from_logprobs
from qponder_jax.train.sft import batch_shardings, hidden_and_head, lm_head, split_micro_batches
from qponder_jax.train.state import TrainState

# names of the step's phases in the compiled program's op metadata (`benchmarks.hlo` attributes costs by them)
REFERENCE_SCOPE = "reference_logprobs"
UPDATE_SCOPE = "policy_update"


@dataclasses.dataclass(frozen=True)
class RewardTerm:
    """One reward of the recipe: a name registered in `rewards.registry`, its weight and its keyword settings."""

    name: str
    weight: float = 1.0
    params: tuple[tuple[str, Any], ...] = ()


@dataclasses.dataclass(frozen=True)
class GRPOSettings:
    """The static settings of the GRPO step (a change compiles a new step)."""

    num_generations: int = 4  # G completions per prompt
    max_new_tokens: int = 64  # L
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    num_iterations: int = 1  # mu: passes over the same rollouts
    num_minibatches: int = 1  # optimizer updates per pass
    advantage_std: str = "population"  # none (Dr. GRPO) | population | unbiased
    advantage_eps: float = 1e-6
    score_numbers: int = 1  # the score is the mean of the answer's first score_numbers numbers (PreResQ-R1: 5)
    stop_ids: tuple[int, ...] = ()
    pad_id: int = 0
    loss: LossConfig = LossConfig()
    rewards: tuple[RewardTerm, ...] = (RewardTerm("format"), RewardTerm("accuracy"))
    logprob_chunk: int = 8192  # vocab columns per step of the update's log-prob scan (no [N, L, V] logits)
    share_prompts: bool = True  # the update runs each prompt once per minibatch when M divides G (see the docstring)
    score_range: tuple[float, float] = (1.0, 5.0)  # the prompt's scale; parsed scores outside count as out of range
    sampling_layout: str = "auto"  # rollout weights: "auto", "decode", "decode:T", "train" (sharding.choose_layout)

    def __post_init__(self):
        try:
            sharding.parse_layout(self.sampling_layout)
        except ValueError as e:
            raise ValueError(f"grpo: {e}") from None
        if self.advantage_std not in STD_MODES:
            raise ValueError(f"grpo: advantage_std {self.advantage_std!r} is not one of {STD_MODES}")
        if min(self.num_generations, self.max_new_tokens, self.num_iterations, self.num_minibatches,
               self.logprob_chunk) < 1:  # fmt: skip
            raise ValueError(
                "grpo: num_generations, max_new_tokens, num_iterations, num_minibatches, logprob_chunk must be >= 1"
            )
        unknown = [t.name for t in self.rewards if t.name not in registry.available_rewards()]
        if unknown or not self.rewards or len({t.name for t in self.rewards}) != len(self.rewards):
            raise ValueError(
                f"grpo: rewards {[t.name for t in self.rewards]} must be distinct registered names; unknown: "
                f"{unknown}; registered: {list(registry.available_rewards())}"
            )
        if self.temperature <= 0 or self.loss.temperature != self.temperature:
            raise ValueError(
                f"grpo: temperature must be > 0 (got {self.temperature}) and equal loss.temperature "
                f"({self.loss.temperature}): the trainer's log-probs must be the sampler's"
            )

    @property
    def updates_per_step(self) -> int:
        return self.num_iterations * self.num_minibatches

    @property
    def completions_per_prompt(self) -> int:
        """G / M when the update shares each prompt among that many completions of a minibatch, else 0 (every
        completion row re-runs its prompt)."""
        g, m = self.num_generations, self.num_minibatches
        return g // m if self.share_prompts and g % m == 0 and g > m else 0

    def sampling_config(self) -> sampling.SamplingConfig:
        return sampling.SamplingConfig(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            num_samples=self.num_generations,
            pad_id=self.pad_id,
        )


@flax.struct.dataclass
class Rollouts:
    """G completions of B prompts (N = B * G rows), scored."""

    tokens: jax.Array  # [N, L] int32
    mask: jax.Array  # [N, L] bool; completion tokens up to and including the stop token
    old_logp: jax.Array  # [N, L] float32; the sampler's log-probs
    scores: jax.Array  # [B, G] float32; NaN where nothing parsed
    rewards: dict  # name -> [B, G] float32, unweighted
    total: jax.Array  # [B, G] float32; weighted sum
    advantages: jax.Array  # [N] float32
    zero_std: jax.Array  # [B] bool; groups whose rewards are all equal
    parsed: jax.Array  # [N] bool
    format_ok: jax.Array  # [N] bool
    in_range: jax.Array  # [N] bool; parsed, and every number of the score within score_range


@flax.struct.dataclass
class Minibatch:
    batch: Batch | None  # [n, T + L] teacher-forced prompt + completion; None with shared prompts
    tokens: jax.Array  # [n, L]
    mask: jax.Array  # [n, L]
    old_logp: jax.Array  # [n, L]
    advantages: jax.Array  # [n]
    ref_logp: jax.Array | None  # [n, L] or None when beta = 0


def score_rollouts(
    settings: GRPOSettings, parser: parse_lib.Parser, tokens: jax.Array, mask: jax.Array, mos: jax.Array
) -> tuple[parse_lib.ParseResult, jax.Array, dict, jax.Array]:
    """(parse result [N], scores [B, G], rewards by name [B, G], weighted total [B, G]) from token ids."""
    res = parser(tokens, mask)
    inputs = iqa.reward_inputs(res, mos, settings.num_generations, score_numbers=settings.score_numbers)
    rewards = registry.compute_rewards(inputs, {t.name: dict(t.params) for t in settings.rewards})
    total = registry.combine_rewards(rewards, {t.name: t.weight for t in settings.rewards})
    return res, inputs.scores, rewards, total


def score_in_range(res: parse_lib.ParseResult, score_numbers: int, score_range: tuple[float, float]) -> jax.Array:
    """[N] bool: the answer parsed and each of the numbers its score uses lies within [lo, hi]."""
    used = parse_lib.ratings(res, score_numbers, pad_with_first=True)  # [N, n]; NaN when nothing parsed
    return res.parsed & jnp.all((used >= score_range[0]) & (used <= score_range[1]), axis=-1)


def _sample(model, batch: Batch, rng: jax.Array, s: GRPOSettings) -> tuple[sampling.DecodeState, jax.Array]:
    """The sampler's jitted pieces, traced inline: one prefill per prompt (cache tiled G times), then the decode
    loop. Returns the final decode state (tokens, log-probs, lengths) and the completion mask [N, L]."""
    graphdef, full = nnx.split(model)
    config = s.sampling_config()
    stop_ids = jnp.asarray(list(s.stop_ids) or [-1], jnp.int32)  # [S]; -1 matches nothing
    rng = None if config.greedy else rng
    return sampling.sample(graphdef, full, batch, rng, stop_ids, config=config, layout=s.sampling_layout)


def shared_prompt_hidden(model, prompts: Batch, tokens: jax.Array, mask: jax.Array, per_prompt: int) -> jax.Array:
    """The final hidden states [n, L, D] that score `tokens` [n, L] (rows j*k .. j*k+k-1 continue prompt j, k =
    `per_prompt`, n = B * k), with each prompt of the left-padded `prompts` [B, T] (images included) run once.

    The prompts go through the decoder into a KV cache of T + L slots; the cache is repeated k times and the
    completions run as one cached call (their positions continue each prompt's, `mask` [n, L] marks the tokens up
    to the stop). Completion token 0 is scored by the prompt's last hidden state, token i by completion position
    i - 1. Differentiable (the prompt's gradient sums over its k completions) and equal to the rows' teacher-forced
    pass over `sampling.completion_batch`; the layers are rematerialized when the model's `remat` is set.
    """
    check_shapes(prompts, model.config)
    lm = model.language_model
    b, t = prompts.input_ids.shape
    steps = tokens.shape[1]
    prompt_mask = jnp.asarray(prompts.attention_mask).astype(jnp.int32)
    cache = model.init_cache(b, t + steps)
    hidden, cache = lm(
        model.embed_inputs(prompts), jnp.asarray(prompts.position_ids), prompt_mask, cache, remat=lm.remat
    )  # [B, T, D]
    rep = lambda x: _rows(jnp.repeat(x, per_prompt, axis=0))
    start = rep(prompts.rope_deltas + jnp.sum(prompt_mask, axis=-1, dtype=jnp.int32))  # [n] first new position
    positions = start[:, None] + jnp.arange(steps, dtype=jnp.int32)  # [n, L]
    positions = jnp.broadcast_to(positions, (3, *positions.shape))
    completion, _ = lm(lm.embed(tokens), positions, mask.astype(jnp.int32), cache.repeat(per_prompt), remat=lm.remat)
    return jnp.concatenate([rep(hidden[:, -1:]), completion[:, :-1]], axis=1)


def _rows(x: jax.Array, axis: int = 0) -> jax.Array:
    axes = [None] * x.ndim
    axes[axis] = "batch"
    return sharding.constrain(x, axes)


def _constrain_batch(batch: Batch) -> Batch:
    axis = lambda name: 1 if name == "position_ids" else 0
    return batch.replace(**{f.name: _rows(getattr(batch, f.name), axis(f.name)) for f in dataclasses.fields(batch)})


def _split_rows(x: jax.Array, num: int) -> jax.Array:
    """[N, ...] -> [num, N / num, ...]; row i goes to minibatch i % num."""
    x = x.reshape(x.shape[0] // num, num, *x.shape[1:])
    return jnp.moveaxis(x, 1, 0)


@dataclasses.dataclass(frozen=True)
class GRPOStep:
    """Static pieces of the GRPO step: the model's graph, the optimizer, the parameter labels and the settings."""

    graphdef: nnx.GraphDef
    rest: nnx.State  # non-parameter model state (passed through unchanged)
    tx: optax.GradientTransformation
    schedule: optax.Schedule  # indexed by inner update
    labels: dict  # TRAIN / FROZEN per parameter
    settings: GRPOSettings

    def _model(self, params):
        return nnx.merge(self.graphdef, params, self.rest)

    def rollout(self, params: dict, batch: Batch, mos: jax.Array, rng: jax.Array, parser) -> Rollouts:
        """Samples G completions per prompt of the left-padded `batch` and scores them; mos [B] normalized MOS."""
        s = self.settings
        decode_state, mask = _sample(self._model(params), batch, rng, s)
        tokens = _rows(decode_state.tokens)
        mask = _rows(mask)
        res, scores, rewards, total = score_rollouts(s, parser, tokens, mask, mos)
        advantages, zero_std = group_advantages(total, std=s.advantage_std, eps=s.advantage_eps)
        in_range = score_in_range(res, s.score_numbers, s.score_range)
        return Rollouts(
            tokens=tokens,
            mask=mask,
            old_logp=_rows(jnp.where(mask, decode_state.logprobs, 0.0)),
            scores=scores,
            rewards=rewards,
            total=total,
            advantages=_rows(jax.lax.stop_gradient(advantages).reshape(-1).astype(jnp.float32)),
            zero_std=zero_std,
            parsed=res.parsed,
            format_ok=res.format_ok,
            in_range=in_range,
        )

    def _completion_logp(self, params, mb: Minibatch, prompts: Batch) -> tuple[jax.Array, jax.Array]:
        """(log-probs [n, L], entropies [n, L]) of the minibatch's completion tokens under `params`.

        With shared prompts the prompts [B, T] run once (`shared_prompt_hidden`), else the minibatch's teacher-forced
        [n, T + L] batch. Only the L completion positions go through the LM head, chunked over the vocabulary
        (`chunked_token_logprobs`): neither the [n, T + L, V] nor the [n, L, V] fp32 logits are materialized.
        """
        s = self.settings
        model = self._model(params)
        if s.completions_per_prompt:
            hidden = shared_prompt_hidden(model, prompts, mb.tokens, mb.mask, s.completions_per_prompt)
            head = lm_head(model)
        else:
            hidden, head = hidden_and_head(model, mb.batch)  # [n, T + L, D], [D, V]
            hidden = completion_logits(hidden, prompts.input_ids.shape[1])  # the positions that score the completion
        return chunked_token_logprobs(hidden, head, mb.tokens, s.loss.temperature, s.logprob_chunk)

    def minibatches(self, batch: Batch, ro: Rollouts, ref_params: dict | None) -> Minibatch:
        """The rollouts as [M, N / M, ...] minibatches, with reference log-probs when beta > 0."""
        s = self.settings
        m = s.num_minibatches
        full = None
        if not s.completions_per_prompt:
            full = split_micro_batches(_constrain_batch(sampling.completion_batch(batch, ro, s.num_generations)), m)
        stacked = Minibatch(
            batch=full,  # [M, n, T + L] or None
            tokens=_split_rows(ro.tokens, m),
            mask=_split_rows(ro.mask, m),
            old_logp=_split_rows(ro.old_logp, m),
            advantages=_split_rows(ro.advantages, m),
            ref_logp=None,
        )
        if s.loss.beta > 0:
            prompts = _constrain_batch(batch)

            def ref_logp(mb):
                # tied to the minibatch, the reference weights' FSDP all-gathers stay inside the loop (else XLA
                # hoists them out of it: a whole unsharded copy of the reference model per device)
                tied, mb = jax.lax.optimization_barrier((ref_params, mb))
                return self._completion_logp(tied, self._constrain(mb), prompts)[0]

            with jax.named_scope(REFERENCE_SCOPE):
                ref = jax.lax.map(ref_logp, stacked)
            stacked = stacked.replace(ref_logp=jax.lax.stop_gradient(ref))
        return stacked

    @staticmethod
    def _constrain(mb: Minibatch) -> Minibatch:
        arrays = {k: _rows(getattr(mb, k)) for k in ("tokens", "mask", "old_logp", "advantages")}
        ref = None if mb.ref_logp is None else _rows(mb.ref_logp)
        full = None if mb.batch is None else _constrain_batch(mb.batch)
        return mb.replace(batch=full, ref_logp=ref, **arrays)

    def __call__(
        self, state: TrainState, batch: Batch, mos: jax.Array, parser, ref_params: dict | None = None
    ) -> tuple[TrainState, dict]:
        """One GRPO step: rollouts, rewards, advantages and mu * M optimizer updates (see the module docstring)."""
        s = self.settings
        key, sample_key = jax.random.split(jax.random.wrap_key_data(state.rng))
        ro = self.rollout(state.params, batch, mos, sample_key, parser)
        stacked = self.minibatches(batch, ro, ref_params)
        prompts = _constrain_batch(batch)

        def mb_loss(params, mb: Minibatch):
            logp, entropy = self._completion_logp(params, mb, prompts)  # [n, L] each
            return grpo_loss_from_logprobs(logp, entropy, mb.mask, mb.old_logp, mb.advantages, s.loss, mb.ref_logp)

        def update(carry, u):
            params, opt_state, ok = carry
            mb = self._constrain(jax.tree.map(lambda x: x[u % s.num_minibatches], stacked))
            (loss, metrics), grads = jax.value_and_grad(mb_loss, has_aux=True)(params, mb)
            grad_norm = optim.trainable_global_norm(grads, self.labels)
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            ok = ok & finite  # after a non-finite update, the step's later updates are skipped too
            params, opt_state = optim.update_if(ok, self.tx, params, opt_state, grads)
            return (params, opt_state, ok), dict(metrics, loss=loss, grad_norm=grad_norm, finite=finite)

        with jax.named_scope(UPDATE_SCOPE):
            (params, opt_state, finite), per_update = jax.lax.scan(
                update, (state.params, state.opt_state, jnp.bool_(True)), jnp.arange(s.updates_per_step)
            )
            if s.updates_per_step > 1:
                # undo the updates before a non-finite one: this keeps the step's starting parameters and optimizer
                # state live through the updates (one more copy, 12 bytes per parameter / devices); with a single
                # update per step the branch above already left them untouched, in place
                keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
                params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
        new_state = state.replace(
            step=state.step + finite.astype(jnp.int32),
            params=params,
            opt_state=opt_state,
            rng=jnp.where(finite, jax.random.key_data(key), state.rng),
        )
        return new_state, self._metrics(state, batch, mos, ro, per_update, finite)

    def _metrics(self, state: TrainState, batch: Batch, mos, ro: Rollouts, per_update: dict, finite) -> dict:
        s = self.settings
        f32 = lambda x: x.astype(jnp.float32)
        # tokens / patches the update runs per pass (for throughput and MFU): each prompt once per minibatch when
        # prompts are shared, else once per completion
        prompt_runs = s.num_minibatches if s.completions_per_prompt else s.num_generations
        real_tokens = jnp.sum(f32(batch.attention_mask)) * prompt_runs + jnp.sum(f32(ro.mask))
        real_patches = jnp.sum(f32(batch.window_segment_ids != 0)) * prompt_runs
        metrics = {
            "loss": jnp.mean(per_update["loss"]),
            "grad_norm": jnp.mean(per_update["grad_norm"]),
            "learning_rate": self.schedule(state.step * s.updates_per_step),
            "tokens": real_tokens * s.num_iterations,
            "patches": real_patches * s.num_iterations,
            "target_tokens": jnp.sum(f32(ro.mask)),
            "finite": finite,
            "reward_mean": jnp.mean(ro.total),
            "reward_std": jnp.std(ro.total),
            "zero_std_fraction": jnp.mean(f32(ro.zero_std)),
            "parse_failure_rate": 1.0 - jnp.mean(f32(ro.parsed)),
            "out_of_range_rate": jnp.mean(f32(ro.parsed & ~ro.in_range)),
            "format_rate": jnp.mean(f32(ro.format_ok)),
            "completion_length": jnp.mean(jnp.sum(f32(ro.mask), axis=-1)),
            "clip_fraction": jnp.mean(per_update["clip_fraction"]),
            "entropy": per_update["entropy"][0],
            "ratio_mean": jnp.mean(per_update["ratio_mean"]),
            "first_ratio_max_dev": per_update["ratio_max_dev"][0],
            "advantage_abs_mean": jnp.mean(jnp.abs(ro.advantages)),
            # arrays for the host: correlations of group mean scores with MOS, and a decoded sample
            "scores": ro.scores,
            "score_in_range": ro.in_range.reshape(ro.scores.shape),
            "mos": mos,
            "sample_tokens": ro.tokens[0],
            "sample_mask": ro.mask[0],
        }
        if "kl" in per_update:
            metrics["kl"] = jnp.mean(per_update["kl"])
        for name, r in ro.rewards.items():
            metrics[f"reward/{name}_mean"] = jnp.mean(r)
            metrics[f"reward/{name}_std"] = jnp.std(r)
        return metrics


def jit_grpo_step(step: GRPOStep, state_shards: TrainState, mesh: Mesh) -> Callable[..., tuple[TrainState, dict]]:
    """`step` under one jax.jit over `mesh`: explicit state shardings (the state is donated), the batch and MOS split
    over ('data', 'fsdp'), parser tables and reference params as given; metrics come back replicated.

    Call it as `fn(state, batch, mos, parser, ref_params)`; ref_params is None when beta = 0."""
    rep = NamedSharding(mesh, PartitionSpec())
    cache: dict = {}

    def run(state: TrainState, batch: Batch, mos: jax.Array, parser, ref_params: dict | None = None):
        if (ref_params is None) != (step.settings.loss.beta == 0):
            raise ValueError("grpo: pass ref_params exactly when loss.beta > 0")
        if "fn" not in cache:
            shards = batch_shardings(batch, mesh)
            ref_shards = None if ref_params is None else state_shards.params
            cache["fn"] = jax.jit(
                step.__call__,
                in_shardings=(state_shards, shards, shards.rope_deltas, rep, ref_shards),
                out_shardings=(state_shards, rep),
                donate_argnums=0,
            )
        with jax.set_mesh(mesh):
            return cache["fn"](state, batch, mos, parser, ref_params)

    run.cache = cache  # holds the jitted function after the first call (lowering / compile-count checks)
    return run
