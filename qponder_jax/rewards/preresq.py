"""PreResQ-R1's dual-branch reward (arXiv 2511.05393), term by term, on ratings v [B, G, R] and MOS g [B].

A rollout is valid when all its R ratings parsed; m_ik = mean(v_ik). Invalid rollouts get 0 for every term and
are left out of every comparison (the reference code substituted a default score of 3 instead). Where the paper's
code is loose we chose, and the numpy transcription in tests/test_rewards.py follows these choices:
- (a) std penalty P = λ_std · max(min_std - σ_ik, 0), σ the population std of v_ik.
- (b) response balance T: for every triple of valid rollouts of an image and each of the first `balance_dims`
  ratings, the median of the three (stable sort: ties keep rollout order) gains 1 and each extreme gains 1 when
  |v - median| < tol; T_ik = λ_triple · gain_k / (dims · #valid triples holding k); 0 when G < 3.
- (c) pairwise score-and-rank R: each image's rollouts sorted by m (stable); image i's j-th rollout p1 against
  each other image z's j-th rollout p2 (both valid): c = 1[order(p1, p2) = order(g_i, g_z)] with orders 1, 0,
  0.5 for >, <, =; s = |g_i - g_z| / (|g_i - g_z| + |p1 - g_i| + |p2 - g_z|) (0 when that is 0/0);
  r = sqrt(c s) + sqrt((1 - c)(1 - s)); the mean over z, mapped back to the unsorted rollout.
- (d) triplet ranking F: rollout k of image i with rollout k of every pair a < b of other images (all valid):
  the fraction of the pairs (i, a), (a, b), (i, b) with 1[m_x > m_y] = 1[g_x > g_y], averaged over pairs.
- (e) rank: 1 if |m - g| < rank_tol, else exp(-|rank(m) - rank(g)| / (n + 1)) with ranks the stable ascending
  positions in [m_i1 .. m_in, g_i] over the n valid rollouts (a value's rank is that of its first occurrence).
- total: (w_pair R - P + w_balance T + w_triplet F + λ_rank rank) / divisor.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np


def valid_rollouts(ratings: jax.Array) -> jax.Array:
    """[B, G] all ratings of the rollout are finite."""
    return jnp.all(jnp.isfinite(ratings), axis=-1)


def _order(x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.where(x > y, 1.0, jnp.where(x < y, 0.0, 0.5))


def _safe_mean(total: jax.Array, count: jax.Array) -> jax.Array:
    return jnp.where(count > 0, total / jnp.maximum(count, 1), 0.0)


def std_penalty(ratings: jax.Array, *, lambda_std: float = 0.5, min_std: float = 0.5) -> jax.Array:
    """(a) [B, G] penalty for ratings that barely vary."""
    sigma = jnp.std(ratings, axis=-1)
    return jnp.where(valid_rollouts(ratings), lambda_std * jnp.maximum(min_std - sigma, 0.0), 0.0)


def response_balance(
    ratings: jax.Array, *, lambda_triple: float = 0.5, tol: float = 0.05, balance_dims: int = 4
) -> jax.Array:
    """(b) [B, G] how often a rollout sits at (or within tol of) the median of triples of its group."""
    b, g = ratings.shape[:2]
    if g < 3:
        return jnp.zeros((b, g), jnp.float32)
    combos = np.asarray(list(itertools.combinations(range(g), 3)))  # [n, 3]
    x = ratings[:, combos, :balance_dims]  # [B, n, 3, D]
    members = np.arange(3)
    before = (x[:, :, None] < x[:, :, :, None]) | (  # [B, n, 3 (a), 3 (b), D]: b sorts before a
        (x[:, :, None] == x[:, :, :, None]) & (members[None, :] < members[:, None])[:, :, None]
    )
    median = jnp.sum(before, axis=3) == 1  # [B, n, 3, D]
    median_value = jnp.sum(jnp.where(median, x, 0.0), axis=2, keepdims=True)
    gain = median | (jnp.abs(x - median_value) < tol)
    ok = jnp.all(valid_rollouts(ratings)[:, combos], axis=-1)  # [B, n]
    onehot = jnp.asarray(combos[:, :, None] == np.arange(g), jnp.float32)  # [n, 3, G]
    gains = jnp.einsum("bnm,nmg->bg", jnp.where(ok[..., None], jnp.sum(gain, -1), 0).astype(jnp.float32), onehot)
    triples = jnp.einsum("bn,nmg->bg", ok.astype(jnp.float32), onehot)
    return lambda_triple * _safe_mean(gains, triples * balance_dims)


def pairwise_rank(means: jax.Array, mos: jax.Array, valid: jax.Array) -> jax.Array:
    """(c) [B, G] from rollout means [B, G]."""
    b = means.shape[0]
    order = jnp.argsort(jnp.where(valid, means, jnp.nan), axis=1, stable=True)  # invalid last
    p = jnp.take_along_axis(jnp.where(valid, means, jnp.nan), order, axis=1)  # [B, G] sorted
    p1, p2 = p[:, None, :], p[None, :, :]  # [B (i), B (z), G]
    gi, gz = mos[:, None, None], mos[None, :, None]
    c = (_order(p1, p2) == _order(gi, gz)).astype(jnp.float32)
    dg = jnp.abs(gi - gz)
    den = dg + jnp.abs(p1 - gi) + jnp.abs(p2 - gz)
    s = jnp.where(den > 0, dg / jnp.where(den > 0, den, 1.0), 0.0)
    r = jnp.sqrt(c * s) + jnp.sqrt((1.0 - c) * (1.0 - s))
    use = jnp.isfinite(p1) & jnp.isfinite(p2) & ~jnp.eye(b, dtype=bool)[:, :, None]
    sorted_reward = _safe_mean(jnp.sum(jnp.where(use, r, 0.0), axis=1), jnp.sum(use, axis=1))  # [B, G]
    return jnp.take_along_axis(sorted_reward, jnp.argsort(order, axis=1), axis=1)


def triplet_ranking(means: jax.Array, mos: jax.Array, valid: jax.Array) -> jax.Array:
    """(d) [B, G], in O(G B^2): pairs holding i are counted in closed form."""
    b = means.shape[0]
    agree = ((means[:, None, :] > means[None, :, :]) == (mos[:, None] > mos[None, :])[:, :, None]).astype(jnp.float32)
    vv = (valid[:, None, :] & valid[None, :, :] & ~jnp.eye(b, dtype=bool)[:, :, None]).astype(jnp.float32)
    upper = jnp.asarray(np.triu(np.ones((b, b)), 1))[:, :, None]  # a < b
    a_pairs = agree * vv  # [B (x), B (y), G] valid, x != y
    n_other = jnp.sum(vv, axis=1)  # [B (i), G] valid other images (given i valid)
    with_i = jnp.sum(a_pairs, axis=1)  # sum over x of A[i, x]
    oriented = a_pairs * upper + jnp.swapaxes(a_pairs, 0, 1) * jnp.swapaxes(upper, 0, 1)  # A[min, max]
    all_pairs = jnp.sum(a_pairs * upper, axis=(0, 1))  # [G] sum over valid a < b of A[a, b]
    without_i = all_pairs[None, :] - jnp.sum(oriented, axis=1)
    pairs = n_other * (n_other - 1) / 2
    f = ((n_other - 1) * with_i + without_i) / 3.0
    return jnp.where(valid, _safe_mean(f, pairs), 0.0)


def rank_reward(means: jax.Array, mos: jax.Array, valid: jax.Array, *, rank_tol: float = 0.02) -> jax.Array:
    """(e) [B, G]."""
    g = mos[:, None]
    others = valid[:, None, :]  # [B, 1 (k), G (j)]
    rank_m = jnp.sum(others & (means[:, None, :] < means[:, :, None]), axis=-1) + (g < means)
    rank_g = jnp.sum(valid & (means <= g), axis=-1, keepdims=True)
    n = jnp.sum(valid, axis=-1, keepdims=True)
    reward = jnp.where(jnp.abs(means - g) < rank_tol, 1.0, jnp.exp(-jnp.abs(rank_m - rank_g) / (n + 1.0)))
    return jnp.where(valid, reward, 0.0)


def preresq_terms(ratings: jax.Array, mos: jax.Array, **constants) -> dict[str, jax.Array]:
    """The five [B, G] terms: std_penalty, balance, pairwise, triplet, rank."""
    valid = valid_rollouts(ratings)
    means = jnp.where(valid, jnp.mean(ratings, axis=-1), 0.0)
    pick = lambda *names: {k: constants[k] for k in names if k in constants}
    return {
        "std_penalty": std_penalty(ratings, **pick("lambda_std", "min_std")),
        "balance": response_balance(ratings, **pick("lambda_triple", "tol", "balance_dims")),
        "pairwise": pairwise_rank(means, mos, valid),
        "triplet": triplet_ranking(means, mos, valid),
        "rank": rank_reward(means, mos, valid, **pick("rank_tol")),
    }


def preresq_reward(
    ratings: jax.Array,
    mos: jax.Array,
    *,
    w_pair: float = 0.375,
    w_balance: float = 0.5,
    w_triplet: float = 0.125,
    lambda_rank: float = 1.0,
    divisor: float = 3.0,
    **constants,
) -> jax.Array:
    """(f) [B, G] the total; `constants` go to the terms (lambda_std, min_std, lambda_triple, tol,
    balance_dims, rank_tol)."""
    known = {"lambda_std", "min_std", "lambda_triple", "tol", "balance_dims", "rank_tol"}
    if set(constants) - known:
        raise TypeError(f"rewards: preresq got unknown constants {sorted(set(constants) - known)}")
    t = preresq_terms(ratings, mos, **constants)
    total = w_pair * t["pairwise"] - t["std_penalty"] + w_balance * t["balance"] + w_triplet * t["triplet"]
    return (total + lambda_rank * t["rank"]) / divisor
