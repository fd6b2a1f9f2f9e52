"""IQA rewards and group advantages against plain numpy loop transcriptions of their definitions."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizer_fixtures as tf

from qponder_jax.rewards import iqa, preresq
from qponder_jax.rewards.advantages import group_advantages
from qponder_jax.rewards.parse import build_parser, parse_text
from qponder_jax.rewards.registry import (
    available_rewards,
    combine_rewards,
    compute_rewards,
    get_reward,
    register_reward,
)

fidelity = jax.jit(iqa.fidelity_reward)
CASES = [(4, 6), (1, 6), (3, 2), (5, 3), (2, 1)]  # (B, G): a single image, G < 3, G = 1


def _scores(rng, b, g, nan_frac=0.2, grid=None):
    s = rng.uniform(0.5, 5.5, (b, g)) if grid is None else rng.choice(grid, (b, g))
    s[rng.random((b, g)) < nan_frac] = np.nan
    return s.astype(np.float32)


def _mos(rng, b):
    return rng.choice([1.0, 2.25, 3.5, 3.5, 4.75], b).astype(np.float32)  # ties on purpose


# ------------------------------------------------------------------------------------------- numpy references
def np_accuracy(s, mos, mode, eps=0.35, scale=4.0, sigma=0.5):
    out = np.zeros(s.shape)
    for i, k in np.ndindex(s.shape):
        if not np.isfinite(s[i, k]):
            continue
        d = abs(float(s[i, k]) - float(mos[i]))
        out[i, k] = {"threshold": float(d < eps), "linear": min(max(1 - d / scale, 0), 1)}.get(
            mode, math.exp(-(d**2) / (2 * sigma**2))
        )
    return out


def np_consistency(level, s, adjacent=0.5):
    out = np.zeros(s.shape)
    for i, k in np.ndindex(s.shape):
        if level[i, k] == 0 or not np.isfinite(s[i, k]):
            continue
        b = 1 + sum(float(s[i, k]) >= e for e in np.float32([1.8, 2.6, 3.4, 4.2]))
        out[i, k] = {0: 1.0, 1: adjacent}.get(abs(int(level[i, k]) - b), 0.0)
    return out


def np_fidelity(s, mos):
    b, g = s.shape
    vals = [[float(x) for x in row if np.isfinite(x)] for row in s]
    mu = [np.mean(v) if v else np.nan for v in vals]
    var = [np.var(v, ddof=1) if len(v) > 1 else 0.0 for v in vals]
    out = np.zeros((b, g))
    for i, k in np.ndindex(b, g):
        if not np.isfinite(s[i, k]):
            continue
        rs = []
        for j in range(b):
            if j == i or not vals[j]:
                continue
            p = 0.5 * (1 + math.erf((float(s[i, k]) - mu[j]) / math.sqrt(var[i] + var[j] + 1e-6) / math.sqrt(2)))
            gt = 1.0 if mos[i] > mos[j] else 0.0 if mos[i] < mos[j] else 0.5
            rs.append(math.sqrt(p * gt + 1e-6) + math.sqrt((1 - p) * (1 - gt) + 1e-6))
        out[i, k] = np.mean(rs) if rs else 0.0
    return out


def np_preresq_terms(r, mos, lambda_std=0.5, min_std=0.5, lambda_triple=0.5, tol=0.05, dims=4, rank_tol=0.02):
    b, g, _ = r.shape
    valid = np.isfinite(r).all(-1)
    m = np.where(valid, r.mean(-1), np.nan).astype(np.float32)
    t = {k: np.zeros((b, g)) for k in ("std_penalty", "balance", "pairwise", "triplet", "rank")}
    for i in range(b):
        for k in np.nonzero(valid[i])[0]:
            t["std_penalty"][i, k] = lambda_std * max(min_std - np.std(r[i, k]), 0.0)
        gain, count = np.zeros(g), np.zeros(g)
        for tri in itertools.combinations(range(g), 3):
            if not valid[i, list(tri)].all():
                continue
            count[list(tri)] += 1
            for d in range(dims):
                (lv, ls), (cv, cs), (rv, rs) = sorted([(r[i, j, d], j) for j in tri], key=lambda x: x[0])
                gain[cs] += 1
                gain[ls] += abs(lv - cv) < np.float32(tol)
                gain[rs] += abs(rv - cv) < np.float32(tol)
        t["balance"][i] = np.where(count > 0, lambda_triple * gain / np.maximum(count * dims, 1), 0)
    order = [sorted(range(g), key=lambda k, i=i: (not valid[i, k], m[i, k] if valid[i, k] else 0)) for i in range(b)]
    rel = lambda x, y: 1.0 if x > y else 0.0 if x < y else 0.5
    for i in range(b):
        for j in range(g):
            rs = []
            for z in range(b):
                p1, p2 = m[i, order[i][j]], m[z, order[z][j]]
                if z == i or not (np.isfinite(p1) and np.isfinite(p2)):
                    continue
                c = float(rel(p1, p2) == rel(mos[i], mos[z]))
                dg = abs(float(mos[i]) - float(mos[z]))
                den = dg + abs(float(p1) - float(mos[i])) + abs(float(p2) - float(mos[z]))
                s = dg / den if den > 0 else 0.0
                rs.append(math.sqrt(c * s) + math.sqrt((1 - c) * (1 - s)))
            t["pairwise"][i, order[i][j]] = np.mean(rs) if rs else 0.0
        for k in np.nonzero(valid[i])[0]:
            fs = []
            for a, c in itertools.combinations([z for z in range(b) if z != i and valid[z, k]], 2):
                pred, gt = [m[i, k], m[a, k], m[c, k]], [mos[i], mos[a], mos[c]]
                fs.append(sum((pred[x] > pred[y]) == (gt[x] > gt[y]) for x, y in [(0, 1), (1, 2), (0, 2)]) / 3)
            t["triplet"][i, k] = np.mean(fs) if fs else 0.0
        temp = np.asarray([m[i, k] for k in range(g) if valid[i, k]] + [mos[i]], np.float32)
        pos = np.argsort(np.argsort(temp, kind="stable"), kind="stable")  # sorted position of each entry
        for k in np.nonzero(valid[i])[0]:
            if abs(m[i, k] - mos[i]) < np.float32(rank_tol):
                t["rank"][i, k] = 1.0
            else:
                first = int(np.nonzero(temp == m[i, k])[0][0])
                t["rank"][i, k] = math.exp(-abs(int(pos[first]) - int(pos[-1])) / len(temp))
    return t


def np_advantages(r, std, eps):
    adv = np.zeros(r.shape)
    for i in range(r.shape[0]):
        if np.all(r[i] == r[i, 0]):
            continue
        c = r[i] - r[i].mean()
        adv[i] = c if std == "none" else c / (np.std(r[i], ddof=1 if std == "unbiased" else 0) + eps)
    return adv


# ------------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("b,g", CASES)
@pytest.mark.parametrize("mode", ["threshold", "linear", "gaussian"])
def test_accuracy(b, g, mode):
    rng = np.random.default_rng(b * 10 + g)
    s, mos = _scores(rng, b, g), _mos(rng, b)
    s[0, 0] = mos[0] + 0.25  # inside the threshold
    got = jax.jit(lambda s, m: iqa.accuracy_reward(s, m, mode=mode))(s, mos)
    np.testing.assert_allclose(got, np_accuracy(s, mos, mode), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("b,g", CASES)
def test_format_and_consistency(b, g):
    rng = np.random.default_rng(g)
    s = _scores(rng, b, g, grid=np.float32([1.0, 1.79, 1.8, 2.6, 3.0, 3.4, 4.2, 4.99, 5.0, 0.5, 7.0]))
    level = rng.integers(0, 6, (b, g)).astype(np.int32)
    fmt = rng.random((b, g)) < 0.7
    np.testing.assert_allclose(iqa.consistency_reward(level, s, adjacent=0.25), np_consistency(level, s, 0.25))
    np.testing.assert_array_equal(iqa.format_reward(fmt, s), fmt & np.isfinite(s))
    np.testing.assert_array_equal(iqa.level_bins(jnp.float32([1.8, 2.59, 2.6, 4.2, 9.0, -1.0])), [2, 2, 3, 5, 5, 1])


@pytest.mark.parametrize("b,g", CASES)
def test_fidelity(b, g):
    rng = np.random.default_rng(100 + b)
    s, mos = _scores(rng, b, g), _mos(rng, b)
    got = fidelity(s, mos)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, np_fidelity(s, mos), rtol=2e-5, atol=2e-6)


def test_fidelity_edge_cases():
    mos = np.float32([2.0, 3.0, 4.0])
    same = np.full((3, 4), 3.0, np.float32)  # all scores equal
    np.testing.assert_allclose(fidelity(same, mos), np_fidelity(same, mos), rtol=2e-5)
    empty = same.copy()
    empty[2] = np.nan  # an image with no parsed rollout is left out of the others' means
    got = fidelity(empty, mos)
    np.testing.assert_allclose(got, np_fidelity(empty, mos), rtol=2e-5)
    np.testing.assert_array_equal(got[2], 0.0)
    np.testing.assert_array_equal(fidelity(same[:1], mos[:1]), 0.0)  # B = 1


@pytest.mark.parametrize("b,g", CASES + [(6, 4)])
def test_preresq_terms_and_total(b, g):
    rng = np.random.default_rng(7 * b + g)
    r = rng.choice(np.arange(1.0, 5.01, 0.25), (b, g, 5)).astype(np.float32)  # many ties, exact means
    r[rng.random((b, g)) < 0.2] = np.nan
    if b > 1:
        r[1] = r[1, :1]  # all rollouts of one image equal
    mos = _mos(rng, b)
    want = np_preresq_terms(r, mos)
    got, got_total = jax.jit(lambda r, m: (preresq.preresq_terms(r, m), preresq.preresq_reward(r, m)))(r, mos)
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    total = (0.375 * want["pairwise"] - want["std_penalty"] + 0.5 * want["balance"] + 0.125 * want["triplet"]) / 3
    total += want["rank"] / 3
    np.testing.assert_allclose(got_total, total, rtol=1e-5, atol=1e-6)


def test_preresq_constants_and_continuous_ratings():
    rng = np.random.default_rng(3)
    r = np.round(rng.uniform(1, 5, (5, 6, 5)), 2).astype(np.float32)  # two decimals, as the prompt asks
    r[0, 2] = [3.0, 3.04, 3.05, 2.96, 3.1]
    mos = rng.uniform(1, 5, 5).astype(np.float32)
    consts = dict(lambda_std=0.3, min_std=0.8, lambda_triple=0.7, tol=0.1, rank_tol=0.5)
    want = np_preresq_terms(r, mos, **{k: v for k, v in consts.items()})
    got = jax.jit(lambda r, m: preresq.preresq_terms(r, m, **consts))(r, mos)
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    with pytest.raises(TypeError, match="unknown constants"):
        preresq.preresq_reward(r, mos, lamda_std=0.1)


@pytest.mark.parametrize("std", ["population", "unbiased", "none"])
def test_group_advantages(std):
    rng = np.random.default_rng(0)
    r = rng.normal(size=(5, 6)).astype(np.float32)
    r[1] = 0.1  # all equal: exactly zero, flagged
    r[3, :3] = 1.0
    adv, zero = jax.jit(lambda x: group_advantages(x, std=std, eps=1e-4))(r)
    np.testing.assert_allclose(adv, np_advantages(r, std, 1e-4), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(zero, [False, True, False, False, False])
    assert (np.asarray(adv)[1] == 0).all()
    single, zero1 = group_advantages(r[:, :1], std=std)  # G = 1
    assert (np.asarray(single) == 0).all() and np.asarray(zero1).all()
    with pytest.raises(ValueError, match="std"):
        group_advantages(r, std="bessel")


def test_registry():
    assert {"format", "accuracy", "consistency", "fidelity", "preresq"} <= set(available_rewards())
    with pytest.raises(KeyError, match="registered: "):
        get_reward("acuracy")
    with pytest.raises(ValueError, match="already registered"):
        register_reward("accuracy")(lambda inputs: inputs)
    results = {"a": jnp.ones((2, 3)), "b": jnp.full((2, 3), 2.0)}
    np.testing.assert_allclose(combine_rewards(results, {"a": 0.5, "b": 2.0}), 4.5)
    with pytest.raises(KeyError, match="weights for"):
        combine_rewards(results, {"c": 1.0})


def _template(rng, mos):
    level = rng.integers(0, 6)
    word = "" if level == 0 else ["bad", "poor", "fair", "good", "excellent"][level - 1]
    score = rng.choice([f"{mos + rng.normal(0, 0.6):.2f}", "", "n/a", f"{rng.uniform(1, 5):.1f} 2 3 4"])
    body = f"<think>The image looks {word}.</think>\n<answer>{score}</answer>"
    return body if rng.random() < 0.85 else body.replace("</think>", "")


def test_parse_rewards_advantages_in_one_jit():
    """Token ids -> parser -> rewards -> advantages in one jitted function, against host decode + numpy."""
    tok, b, g = tf.few_merges(), 4, 6
    parser = build_parser(tok, max_numbers=5)
    rng = np.random.default_rng(1)
    mos = np.float32([1.5, 3.2, 3.2, 4.6])
    texts = [_template(rng, mos[i // g]) for i in range(b * g)]
    enc = [tok.encode(t) for t in texts]
    ids = np.zeros((b * g, max(map(len, enc)) + 2), np.int32)
    mask = np.zeros(ids.shape, bool)
    for i, e in enumerate(enc):
        ids[i, : len(e)], mask[i, : len(e)] = e, True
    spec = {"format": {}, "accuracy": {"mode": "gaussian", "sigma": 0.7}, "consistency": {}, "fidelity": {}}
    weights = {"format": 0.5, "accuracy": 1.0, "consistency": 0.5, "fidelity": 0.25}

    @jax.jit
    def step(parser, tokens, mask, mos):
        inputs = iqa.reward_inputs(parser(tokens, mask), mos, g)
        results = compute_rewards(inputs, spec)
        return results, group_advantages(combine_rewards(results, weights), std="unbiased", eps=1e-6)

    results, (adv, zero) = step(parser, ids, mask, mos)
    ref = [parse_text(t, 5) for t in texts]
    s = np.asarray([r.numbers[0] if r.count else np.nan for r in ref], np.float32).reshape(b, g)
    fmt = np.asarray([r.format_ok for r in ref]).reshape(b, g)
    level = np.asarray([r.level for r in ref]).reshape(b, g)
    want = {
        "format": (fmt & np.isfinite(s)).astype(float),
        "accuracy": np_accuracy(s, mos, "gaussian", sigma=0.7),
        "consistency": np_consistency(level, s),
        "fidelity": np_fidelity(s, mos),
    }
    for name in spec:
        np.testing.assert_allclose(results[name], want[name], rtol=2e-5, atol=2e-6, err_msg=name)
    total = sum(w * want[name] for name, w in weights.items())
    np.testing.assert_allclose(adv, np_advantages(total, "unbiased", 1e-6), rtol=1e-4, atol=1e-5)
    assert np.isnan(s).any() and fmt.any() and (level > 0).any() and np.isfinite(np.asarray(adv)).all()
