"""The GRPO loss, pure `jnp`: per-token log-probs, the clipped policy term, KL to a reference, aggregation by name.

All per-token arrays are [N, L]: N completions, L = max_new_tokens, aligned with the sampler's `tokens`, under a
`mask` that is True on completion tokens up to and including the stop token. Per token:

    log_ratio = clip(logp - old_logp, -20, 20);  ratio = exp(log_ratio)
    policy    = max(-A * ratio, -A * clip(ratio, 1 - eps_low, 1 + eps_high))        (A: the row's advantage)
    kl        = k3: exp(r) - r - 1 (default) | k2: r^2 / 2 | k1: -r,   r = clip(ref_logp - logp, -20, 20)
    loss_tok  = policy + beta * kl           (the reference is never read when beta = 0)

and the tokens' losses are reduced by an aggregation from `AGGREGATIONS` (see each function). A token is "clipped"
when the clipped branch is the active one (ratio below 1 - eps_low with A < 0, or above 1 + eps_high with A > 0):
its gradient is then zero.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from qponder_jax.model import sharding

LOG_RATIO_CLAMP = 20.0  # |log-ratio| bound before exp, for the policy ratio and the KL estimators

Aggregation = Callable[[jax.Array, jax.Array, int], jax.Array]  # (per_token [N, L], mask [N, L], norm_length) -> []
AGGREGATIONS: dict[str, Aggregation] = {}
KL_ESTIMATORS: dict[str, Callable[[jax.Array], jax.Array]] = {}  # log(ref / policy) [N, L] -> KL estimate [N, L]


def register_aggregation(name: str):
    def wrap(fn: Aggregation) -> Aggregation:
        AGGREGATIONS[name] = fn
        return fn

    return wrap


def register_kl(name: str):
    def wrap(fn):
        KL_ESTIMATORS[name] = fn
        return fn

    return wrap


@register_aggregation("token-mean")
def token_mean(x: jax.Array, mask: jax.Array, norm_length: int) -> jax.Array:
    """Sum over every completion token of the batch / number of those tokens (verl's default, DAPO)."""
    m = mask.astype(jnp.float32)
    return jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1.0)


@register_aggregation("seq-mean-token-mean")
def seq_mean_token_mean(x: jax.Array, mask: jax.Array, norm_length: int) -> jax.Array:
    """Each completion's token mean, then the mean over completions that have tokens (the original GRPO, Tunix)."""
    m = mask.astype(jnp.float32)
    count = jnp.sum(m, axis=-1)  # [N]
    per_seq = jnp.sum(x * m, axis=-1) / jnp.maximum(count, 1.0)  # [N]
    has = (count > 0).astype(jnp.float32)
    return jnp.sum(per_seq * has) / jnp.maximum(jnp.sum(has), 1.0)


@register_aggregation("seq-mean-token-sum-norm")
def seq_mean_token_sum_norm(x: jax.Array, mask: jax.Array, norm_length: int) -> jax.Array:
    """Dr. GRPO: each completion's token sum / the constant `norm_length`, averaged over the N completions
    (TRL's dr_grpo: sum / (N * L_max)); no length bias from dividing by each completion's own length."""
    m = mask.astype(jnp.float32)
    return jnp.sum(x * m) / (x.shape[0] * float(norm_length))


@register_kl("k1")
def kl_k1(log_ref_ratio: jax.Array) -> jax.Array:
    """log(pi / ref): unbiased, high variance, can be negative."""
    return -log_ref_ratio


@register_kl("k2")
def kl_k2(log_ref_ratio: jax.Array) -> jax.Array:
    """(log(ref / pi))^2 / 2: biased, low variance, >= 0."""
    return 0.5 * jnp.square(log_ref_ratio)


@register_kl("k3")
def kl_k3(log_ref_ratio: jax.Array) -> jax.Array:
    """ref/pi - log(ref/pi) - 1: unbiased, low variance, >= 0 (Schulman's k3; GRPO's KL term)."""
    return jnp.exp(log_ref_ratio) - log_ref_ratio - 1.0


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The static settings of the GRPO loss."""

    eps_low: float = 0.2  # ratio clip below: 1 - eps_low
    eps_high: float = 0.2  # ratio clip above: 1 + eps_high (DAPO's clip-higher uses e.g. 0.28)
    beta: float = 0.0  # KL coefficient; 0 skips the reference entirely
    kl_estimator: str = "k3"  # one of KL_ESTIMATORS
    aggregation: str = "token-mean"  # one of AGGREGATIONS
    norm_length: int = 1  # the constant length of seq-mean-token-sum-norm (use max_new_tokens)
    temperature: float = 1.0  # the sampling temperature: log-probs are log_softmax(logits / temperature)

    def __post_init__(self):
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"grpo loss: unknown aggregation {self.aggregation!r}; known: {sorted(AGGREGATIONS)}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"grpo loss: unknown kl_estimator {self.kl_estimator!r}; known: {sorted(KL_ESTIMATORS)}")
        if self.eps_low < 0 or self.eps_high < 0 or self.eps_low >= 1:
            raise ValueError(f"grpo loss: need 0 <= eps_low < 1 and eps_high >= 0, got {self.eps_low}, {self.eps_high}")
        if self.beta < 0 or self.norm_length < 1 or self.temperature <= 0:
            raise ValueError(
                f"grpo loss: need beta >= 0, norm_length >= 1, temperature > 0; got {self.beta}, "
                f"{self.norm_length}, {self.temperature}"
            )


def scaled_log_softmax(logits: jax.Array, temperature: float = 1.0) -> jax.Array:
    """log_softmax(logits / temperature) in float32, [..., V]."""
    scaled = logits.astype(jnp.float32)
    if temperature != 1.0:
        scaled = scaled / temperature
    return jax.nn.log_softmax(scaled, axis=-1)


def token_logprobs(logits: jax.Array, tokens: jax.Array, temperature: float = 1.0) -> jax.Array:
    """[N, L] log-prob of each completion token; logits [N, L, V] are the ones that score those tokens."""
    logp = scaled_log_softmax(logits, temperature)
    return jnp.take_along_axis(logp, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]


def token_entropy(logits: jax.Array, temperature: float = 1.0) -> jax.Array:
    """[N, L] entropy of the (temperature-scaled) next-token distribution."""
    logp = scaled_log_softmax(logits, temperature)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def chunked_token_logprobs(
    hidden: jax.Array, w: jax.Array, tokens: jax.Array, temperature: float = 1.0, chunk: int = 8192
) -> tuple[jax.Array, jax.Array]:
    """(log-probs [N, L], entropies [N, L]) of `tokens` [N, L] under logits = hidden [N, L, D] @ w [D, V] / temperature,
    without materializing the [N, L, V] logits.

    Equal to `token_logprobs` / `token_entropy` of the dense logits (same per-element matmul, fp32 softmax). The
    forward is a `lax.scan` over vocab chunks of `chunk` columns that keeps an online log-sum-exp, the target logit
    and sum(p * logit); only the log-sum-exp [N, L] is kept for the backward. The backward is written out (a custom
    VJP): a second scan recomputes each chunk's logits and applies d logp / d logits = onehot(token) - softmax, so at
    most one [N, L, chunk] block and one [D, chunk] slice of the (FSDP all-gathered) head are live, and none of the
    online rescaling is differentiated. The entropy carries no gradient (a metric). On a mesh that splits the head's
    vocabulary (a 'tensor' axis), each block takes `chunk / shards` columns of every shard, so every device multiplies
    only its own columns.
    """
    return _chunked_logprobs(hidden, w, tokens.astype(jnp.int32), float(temperature), int(chunk))


@dataclasses.dataclass(frozen=True)
class _Blocks:
    """How the head's columns are cut: `shards` equal parts (the head's vocabulary shards on the mesh, 1 off a mesh),
    each of `per_shard` columns cut into `num` blocks of `width` (the last zero-padded). Block k holds columns
    s * per_shard + k * width + j of every shard s, so each device multiplies only its own columns."""

    shards: int
    per_shard: int
    width: int
    num: int


def _blocks(w: jax.Array, chunk: int) -> _Blocks:
    shards = sharding.dim_shards(("embed", "vocab"), w.shape, 1)
    per_shard = w.shape[1] // shards
    width = min(-(-chunk // shards), per_shard)
    return _Blocks(shards, per_shard, width, -(-per_shard // width))


def _vocab_chunks(w: jax.Array, blocks: _Blocks) -> tuple[jax.Array, jax.Array]:
    """(w [D, V] as [num, D, shards, width] column blocks, zero-padded; each block's first in-shard column [num])."""
    d = w.shape[0]
    w = w.reshape(d, blocks.shards, blocks.per_shard)
    w = jnp.pad(w, ((0, 0), (0, 0), (0, blocks.num * blocks.width - blocks.per_shard)))
    w = jnp.moveaxis(w.reshape(d, blocks.shards, blocks.num, blocks.width), 2, 0)
    w = sharding.constrain(w, (None, "embed", "vocab", None))
    return w, jnp.arange(blocks.num, dtype=jnp.int32) * blocks.width


def _chunk_logits(hidden, w_c, start, blocks: _Blocks, temperature: float) -> tuple[jax.Array, jax.Array]:
    """(fp32 logits / temperature [N, L, shards, width], -inf on the padding columns; column ids [shards, width], -1
    on the padding)."""
    logits = jnp.einsum("nld,dsc->nlsc", hidden, w_c.astype(hidden.dtype), preferred_element_type=jnp.float32)
    logits = sharding.constrain(logits, ("batch", None, "act_vocab", None))
    if temperature != 1.0:
        logits = logits / temperature
    in_shard = start + jnp.arange(blocks.width, dtype=jnp.int32)  # [width]
    column = jnp.arange(blocks.shards, dtype=jnp.int32)[:, None] * blocks.per_shard + in_shard  # [shards, width]
    if blocks.per_shard % blocks.width:  # only a padded last block has columns to hide
        column = jnp.where(in_shard < blocks.per_shard, column, -1)  # -1: no token's column
        logits = jnp.where(column >= 0, logits, -jnp.inf)
    return logits, column


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _chunked_logprobs(hidden, w, tokens, temperature: float, chunk: int):
    return _chunked_forward(hidden, w, tokens, temperature, chunk)[0]


def _chunked_forward(hidden, w, tokens, temperature: float, chunk: int):
    n, steps, _ = hidden.shape
    blocks = _blocks(w, chunk)
    w_chunks, starts = _vocab_chunks(w, blocks)
    padded = blocks.per_shard % blocks.width
    last2 = (-2, -1)

    def body(carry, xs):
        running_max, sum_exp, target, sum_p_logit = carry  # [N, L] each
        logits, column = _chunk_logits(hidden, *xs, blocks, temperature)  # [N, L, shards, width]
        new_max = jnp.maximum(running_max, jnp.max(logits, axis=last2))
        scale = jnp.exp(running_max - new_max)
        p = jnp.exp(logits - new_max[..., None, None])  # 0 on padding columns
        sum_exp = sum_exp * scale + jnp.sum(p, axis=last2)
        finite = jnp.where(column >= 0, logits, 0.0) if padded else logits
        sum_p_logit = sum_p_logit * scale + jnp.sum(p * finite, axis=last2)
        target = target + jnp.sum(jnp.where(column == tokens[..., None, None], logits, 0.0), axis=last2)
        return (new_max, sum_exp, target, sum_p_logit), None

    zeros = jnp.zeros((n, steps), jnp.float32)
    init = (jnp.full((n, steps), -jnp.inf, jnp.float32), zeros, zeros, zeros)
    (running_max, sum_exp, target, sum_p_logit), _ = jax.lax.scan(body, init, (w_chunks, starts))
    lse = running_max + jnp.log(sum_exp)  # [N, L]
    return (target - lse, lse - sum_p_logit / sum_exp), (hidden, w, tokens, lse)


def _chunked_backward(temperature: float, chunk: int, residuals, cotangents):
    hidden, w, tokens, lse = residuals
    g = cotangents[0]  # d loss / d logp [N, L]; the entropy's cotangent is dropped (it is a metric)
    d_model, vocab = w.shape
    blocks = _blocks(w, chunk)
    w_chunks, starts = _vocab_chunks(w, blocks)

    def body(d_hidden, xs):
        w_c, _ = xs
        logits, column = _chunk_logits(hidden, *xs, blocks, temperature)
        onehot = (column == tokens[..., None, None]).astype(jnp.float32)
        d_logits = g[..., None, None] * (onehot - jnp.exp(logits - lse[..., None, None]))  # 0 on padding
        if temperature != 1.0:
            d_logits = d_logits / temperature
        d_logits = d_logits.astype(hidden.dtype)
        d_hidden = d_hidden + jnp.einsum(
            "nlsc,dsc->nld", d_logits, w_c.astype(hidden.dtype), preferred_element_type=jnp.float32
        )
        d_w = jnp.einsum("nld,nlsc->dsc", hidden, d_logits, preferred_element_type=jnp.float32)
        return d_hidden, sharding.constrain(d_w, ("embed", "vocab", None))

    d_hidden, d_w = jax.lax.scan(body, jnp.zeros(hidden.shape, jnp.float32), (w_chunks, starts))
    d_w = jnp.moveaxis(d_w, 0, 2).reshape(d_model, blocks.shards, -1)[:, :, : blocks.per_shard]  # [D, S, V / S]
    return d_hidden.astype(hidden.dtype), d_w.reshape(d_model, vocab).astype(w.dtype), None


_chunked_logprobs.defvjp(_chunked_forward, _chunked_backward)


def completion_logits(logits: jax.Array, prompt_len: int) -> jax.Array:
    """The logits that score the completion tokens of a teacher-forced [N, T + L] batch: columns T - 1 .. T + L - 2
    -> [N, L, V]."""
    steps = logits.shape[1] - prompt_len
    return jax.lax.slice_in_dim(logits, prompt_len - 1, prompt_len - 1 + steps, axis=1)


def policy_terms(
    logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, eps_low: float, eps_high: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(per-token clipped policy loss [N, L], ratio [N, L], clipped flag [N, L]); advantages [N]."""
    log_ratio = jnp.clip(logp - jax.lax.stop_gradient(old_logp), -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = jnp.exp(log_ratio)
    adv = advantages[:, None].astype(jnp.float32)  # [N, 1]
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    is_clipped = ((ratio < 1.0 - eps_low) & (adv < 0)) | ((ratio > 1.0 + eps_high) & (adv > 0))
    return jnp.maximum(unclipped, clipped), ratio, is_clipped


def kl_term(logp: jax.Array, ref_logp: jax.Array, estimator: str = "k3") -> jax.Array:
    """[N, L] per-token KL(pi || ref) estimate; the reference gets no gradient."""
    log_ref_ratio = jnp.clip(jax.lax.stop_gradient(ref_logp) - logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return KL_ESTIMATORS[estimator](log_ref_ratio)


def grpo_loss(
    logits: jax.Array,
    tokens: jax.Array,
    mask: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    config: LossConfig,
    ref_logp: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(scalar loss, metrics) for completions `tokens` [N, L] scored by `logits` [N, L, V].

    old_logp [N, L]: log-probs under the policy that sampled (no gradient); advantages [N]; ref_logp [N, L] is
    required when config.beta > 0 and ignored otherwise. Metrics are token means over the mask (`kl` only when
    beta > 0), the largest |ratio - 1| over the mask, and the mean completion length.
    """
    logp = token_logprobs(logits, tokens, config.temperature)
    entropy = token_entropy(jax.lax.stop_gradient(logits), config.temperature)
    return grpo_loss_from_logprobs(logp, entropy, mask, old_logp, advantages, config, ref_logp)


def grpo_loss_from_logprobs(
    logp: jax.Array,
    entropy: jax.Array,
    mask: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    config: LossConfig,
    ref_logp: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`grpo_loss` from the policy's token log-probs [N, L] and entropies [N, L] (e.g. `chunked_token_logprobs`)."""
    per_token, ratio, is_clipped = policy_terms(logp, old_logp, advantages, config.eps_low, config.eps_high)
    metrics = {}
    if config.beta > 0:
        if ref_logp is None:
            raise ValueError("grpo loss: beta > 0 needs ref_logp")
        kl = kl_term(logp, ref_logp, config.kl_estimator)
        per_token = per_token + config.beta * kl
        metrics["kl"] = token_mean(kl, mask, 1)
    aggregate = AGGREGATIONS[config.aggregation]
    loss = aggregate(per_token, mask, config.norm_length)
    stop = jax.lax.stop_gradient
    metrics.update(
        clip_fraction=token_mean(is_clipped.astype(jnp.float32), mask, 1),
        ratio_mean=token_mean(stop(ratio), mask, 1),
        ratio_max_dev=jnp.max(jnp.where(mask, jnp.abs(stop(ratio) - 1.0), 0.0)),
        entropy=token_mean(stop(entropy), mask, 1),
        completion_length=jnp.mean(jnp.sum(mask.astype(jnp.float32), axis=-1)),
    )
    return loss, metrics
