"""Image-quality rewards over a [B, G] group of rollouts (B images, G rollouts each) and the [B] normalized MOS.

All are pure jnp, jittable and NaN-safe: a rollout whose score did not parse (NaN, or a non-finite number) gets 0
for that term and is left out of every statistic other rollouts are compared with. Registered names:
- `format`: 1 when the format is valid and a score parsed.
- `accuracy`: `threshold` 1[|ŝ - s| < eps] (Q-Insight, eps 0.35), `linear` clip(1 - |ŝ - s| / scale, 0, 1),
  `gaussian` exp(-(ŝ - s)² / 2σ²).
- `consistency` (Q-Ponder's reasoning consistency; the paper's formula is not public, this is OUR definition):
  the level word of the reasoning (bad..excellent = 1..5) against the bin of the answer score among five
  equal-width bins of [lo, hi] (a score on an edge goes to the upper bin; scores outside fall in the end bins):
  1 for the same bin, `adjacent` for a neighbouring bin, 0 otherwise or when the reasoning names no level.
- `fidelity` (VisualQuality-R1): for rollout k of image i and each other image j,
  p = Φ((q_ik - μ_j) / sqrt(σ_i² + σ_j² + 1e-6)), g = 1, 0, 0.5 from the MOS order,
  r = sqrt(p g + 1e-6) + sqrt((1 - p)(1 - g) + 1e-6); the mean over j. μ, σ² are the mean and unbiased variance
  of an image's parsed scores (σ² = 0 with fewer than 2); images with no parsed score are left out; 0 when B = 1.
- `preresq`: PreResQ-R1's dual-branch reward on [B, G, R] ratings, see preresq.py.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import ndtr

from qponder_jax.rewards import preresq
from qponder_jax.rewards.parse import ParseResult, mean_score, ratings
from qponder_jax.rewards.registry import register_reward


class RewardInputs(NamedTuple):
    scores: jax.Array  # [B, G] float32 answer score, NaN when it did not parse
    mos: jax.Array  # [B] normalized MOS (1..5)
    format_ok: jax.Array  # [B, G] bool
    level: jax.Array  # [B, G] int32 level word of the reasoning, 1..5, 0 = none
    ratings: jax.Array  # [B, G, R] float32 first R numbers (padded with the first), NaN when none parsed


def reward_inputs(
    res: ParseResult, mos: jax.Array, group_size: int, *, score_numbers: int = 1, num_ratings: int | None = None
) -> RewardInputs:
    """Regroups parser output of N = B * G rollouts (rows b*G .. b*G+G-1 belong to image b, as `generate`
    lays them out). The score is the mean of the first `score_numbers` numbers (1: the single Q-Ponder score;
    5: PreResQ-R1's five ratings, missing ones padded with the first)."""
    n = res.count.shape[0]
    if n % group_size:
        raise ValueError(f"rewards: {n} rollouts do not split into groups of {group_size}")
    b = n // group_size
    group = lambda x: x.reshape(b, group_size, *x.shape[1:])
    r = ratings(res, num_ratings or res.numbers.shape[1], pad_with_first=True)
    score = mean_score(res, score_numbers, pad_with_first=True)
    return RewardInputs(group(score), jnp.asarray(mos, jnp.float32), group(res.format_ok), group(res.level), group(r))


def _valid(scores: jax.Array) -> jax.Array:
    return jnp.isfinite(scores)


def format_reward(format_ok: jax.Array, scores: jax.Array) -> jax.Array:
    """[B, G] 1 when the format is valid and a score parsed."""
    return (format_ok & _valid(scores)).astype(jnp.float32)


def accuracy_reward(
    scores: jax.Array,
    mos: jax.Array,
    *,
    mode: str = "threshold",
    eps: float = 0.35,
    scale: float = 4.0,
    sigma: float = 0.5,
) -> jax.Array:
    """[B, G] closeness of each score to its image's MOS (see the module docstring for the modes)."""
    diff = jnp.abs(scores - mos[:, None])
    if mode == "threshold":
        reward = (diff < eps).astype(jnp.float32)
    elif mode == "linear":
        reward = jnp.clip(1.0 - diff / scale, 0.0, 1.0)
    elif mode == "gaussian":
        reward = jnp.exp(-jnp.square(diff) / (2.0 * sigma**2))
    else:
        raise ValueError(f"rewards: accuracy mode must be threshold, linear or gaussian, got '{mode}'")
    return jnp.where(_valid(scores), reward, 0.0)


def level_bins(scores: jax.Array, lo: float = 1.0, hi: float = 5.0) -> jax.Array:
    """Level 1..5 of each score: five equal-width bins of [lo, hi], an edge belongs to the upper bin."""
    edges = jnp.asarray(np.float32([lo + (hi - lo) * k / 5 for k in range(1, 5)]))  # float32(1.8) for "1.8"
    return 1 + jnp.sum(scores[..., None] >= edges, axis=-1)


def consistency_reward(
    level: jax.Array, scores: jax.Array, *, adjacent: float = 0.5, lo: float = 1.0, hi: float = 5.0
) -> jax.Array:
    """[B, G] agreement of the reasoning's level word with the answer score's level bin."""
    distance = jnp.abs(level - level_bins(scores, lo, hi))
    reward = jnp.where(distance == 0, 1.0, jnp.where(distance == 1, adjacent, 0.0))
    return jnp.where((level > 0) & _valid(scores), reward, 0.0).astype(jnp.float32)


def group_stats(scores: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per image over its parsed rollouts: count, mean and unbiased variance (0 with fewer than 2), all [B]."""
    valid = _valid(scores)
    count = jnp.sum(valid, axis=1)
    clean = jnp.where(valid, scores, 0.0)
    mean = jnp.sum(clean, axis=1) / jnp.maximum(count, 1)
    sq = jnp.sum(jnp.where(valid, jnp.square(scores - mean[:, None]), 0.0), axis=1)
    return count, mean, jnp.where(count > 1, sq / jnp.maximum(count - 1, 1), 0.0)


def order_target(mos: jax.Array) -> jax.Array:
    """[B, B] 1, 0 or 0.5 as mos_i >, < or = mos_j."""
    return jnp.where(mos[:, None] > mos[None, :], 1.0, jnp.where(mos[:, None] < mos[None, :], 0.0, 0.5))


def fidelity_reward(scores: jax.Array, mos: jax.Array, *, eps: float = 1e-6) -> jax.Array:
    """[B, G] VisualQuality-R1's fidelity reward (module docstring)."""
    b = scores.shape[0]
    count, mean, var = group_stats(scores)
    z = (scores[:, :, None] - mean[None, None, :]) / jnp.sqrt(var[:, None, None] + var[None, None, :] + eps)
    p = ndtr(z)  # [B(i), G, B(j)]
    g = order_target(mos)[:, None, :]
    r = jnp.sqrt(p * g + eps) + jnp.sqrt((1.0 - p) * (1.0 - g) + eps)
    use = _valid(scores)[:, :, None] & ((count > 0) & ~jnp.eye(b, dtype=bool))[:, None, :]
    total, n = jnp.sum(jnp.where(use, r, 0.0), axis=-1), jnp.sum(use, axis=-1)
    return jnp.where(n > 0, total / jnp.maximum(n, 1), 0.0)


@register_reward("format")
def _format(inputs: RewardInputs) -> jax.Array:
    return format_reward(inputs.format_ok, inputs.scores)


@register_reward("accuracy")
def _accuracy(inputs: RewardInputs, **constants) -> jax.Array:
    return accuracy_reward(inputs.scores, inputs.mos, **constants)


@register_reward("consistency")
def _consistency(inputs: RewardInputs, **constants) -> jax.Array:
    return consistency_reward(inputs.level, inputs.scores, **constants)


@register_reward("fidelity")
def _fidelity(inputs: RewardInputs, **constants) -> jax.Array:
    return fidelity_reward(inputs.scores, inputs.mos, **constants)


@register_reward("preresq")
def _preresq(inputs: RewardInputs, **constants) -> jax.Array:
    return preresq.preresq_reward(inputs.ratings, inputs.mos, **constants)
