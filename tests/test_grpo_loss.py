"""The GRPO loss against a plain numpy transcription: every aggregation x KL estimator, asymmetric clipping that
actually clips, beta = 0 (no reference read), metrics, and the gradient at ratio 1."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qponder_jax.train import grpo_loss as gl

N, L, V = 6, 7, 13
EPS_LOW, EPS_HIGH = 0.2, 0.28


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=2.0, size=(N, L, V)).astype(np.float32)
    tokens = rng.integers(0, V, size=(N, L)).astype(np.int32)
    lengths = np.array([7, 3, 5, 1, 6, 4])
    mask = np.arange(L)[None, :] < lengths[:, None]
    logp = _np_logprobs(logits, tokens, 1.0)
    # old log-probs: ratios spread over [0.5, 1.6], so both clip edges (and the gap 1.2..1.28) are hit
    old = logp - np.log(rng.uniform(0.5, 1.6, size=(N, L)))
    old = old.astype(np.float32)
    ref = (logp + rng.normal(scale=0.5, size=(N, L))).astype(np.float32)
    adv = np.array([1.5, -0.7, 0.3, -1.2, 0.9, -0.4], np.float32)
    return logits, tokens, mask, old, ref, adv


def _np_logprobs(logits, tokens, temperature):
    z = logits.astype(np.float64) / temperature
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return np.take_along_axis(logp, tokens[..., None], -1)[..., 0]


def _np_loss(logits, tokens, mask, old, ref, adv, *, beta, kl, agg, norm_length, temperature=1.0):
    logp = _np_logprobs(logits, tokens, temperature)
    ratio = np.exp(np.clip(logp - old, -20, 20))
    a = adv[:, None].astype(np.float64)
    per_token = np.maximum(-a * ratio, -a * np.clip(ratio, 1 - EPS_LOW, 1 + EPS_HIGH))
    if beta > 0:
        r = np.clip(ref - logp, -20, 20)
        k = {"k1": -r, "k2": 0.5 * r**2, "k3": np.exp(r) - r - 1}[kl]
        per_token = per_token + beta * k
    m = mask.astype(np.float64)
    if agg == "token-mean":
        return (per_token * m).sum() / m.sum()
    if agg == "seq-mean-token-mean":
        return np.mean((per_token * m).sum(-1) / m.sum(-1))
    return (per_token * m).sum() / (N * norm_length)


@pytest.mark.parametrize("agg,kl", list(itertools.product(sorted(gl.AGGREGATIONS), sorted(gl.KL_ESTIMATORS))))
def test_loss_matches_numpy(agg, kl):
    logits, tokens, mask, old, ref, adv = _inputs()
    cfg = gl.LossConfig(eps_low=EPS_LOW, eps_high=EPS_HIGH, beta=0.04, kl_estimator=kl, aggregation=agg, norm_length=L)
    loss, metrics = jax.jit(lambda *a: gl.grpo_loss(*a, cfg, ref_logp=ref))(logits, tokens, mask, old, adv)
    want = _np_loss(logits, tokens, mask, old, ref, adv, beta=0.04, kl=kl, agg=agg, norm_length=L)
    np.testing.assert_allclose(float(loss), want, rtol=2e-5, atol=1e-6)
    assert "kl" in metrics


def test_aggregations_differ_on_these_inputs():
    """The three modes give three different numbers here (so the per-mode test above is not vacuous)."""
    logits, tokens, mask, old, ref, adv = _inputs()
    values = {
        agg: _np_loss(logits, tokens, mask, old, ref, adv, beta=0.0, kl="k3", agg=agg, norm_length=L)
        for agg in gl.AGGREGATIONS
    }
    assert len({round(v, 6) for v in values.values()}) == 3


def test_asymmetric_clipping_clips_tokens_on_both_sides():
    logits, tokens, mask, old, ref, adv = _inputs()
    logp = _np_logprobs(logits, tokens, 1.0)
    ratio = np.exp(logp - old)
    a = adv[:, None]
    low = (ratio < 1 - EPS_LOW) & (a < 0) & mask
    high = (ratio > 1 + EPS_HIGH) & (a > 0) & mask
    between = (ratio > 1 + EPS_LOW) & (ratio <= 1 + EPS_HIGH) & (a > 0) & mask  # clipped only if eps_high were 0.2
    assert low.sum() > 0 and high.sum() > 0 and between.sum() > 0
    cfg = gl.LossConfig(eps_low=EPS_LOW, eps_high=EPS_HIGH, aggregation="token-mean")
    _, metrics = gl.grpo_loss(logits, tokens, mask, old, adv, cfg)
    np.testing.assert_allclose(float(metrics["clip_fraction"]), (low.sum() + high.sum()) / mask.sum(), rtol=1e-6)
    symmetric = gl.LossConfig(eps_low=EPS_LOW, eps_high=EPS_LOW, aggregation="token-mean")
    loss_sym, m_sym = gl.grpo_loss(logits, tokens, mask, old, adv, symmetric)
    loss_asym, _ = gl.grpo_loss(logits, tokens, mask, old, adv, cfg)
    np.testing.assert_allclose(float(m_sym["clip_fraction"]), (low.sum() + high.sum() + between.sum()) / mask.sum())
    assert float(loss_sym) != pytest.approx(float(loss_asym), abs=1e-6)


def test_beta_zero_ignores_the_reference():
    logits, tokens, mask, old, ref, adv = _inputs()
    cfg = gl.LossConfig(eps_low=EPS_LOW, eps_high=EPS_HIGH, beta=0.0)
    loss_none, metrics = gl.grpo_loss(logits, tokens, mask, old, adv, cfg, ref_logp=None)
    loss_nan, _ = gl.grpo_loss(logits, tokens, mask, old, adv, cfg, ref_logp=np.full_like(ref, np.nan))
    want = _np_loss(logits, tokens, mask, old, ref, adv, beta=0.0, kl="k3", agg="token-mean", norm_length=L)
    np.testing.assert_allclose(float(loss_none), want, rtol=2e-5)
    assert float(loss_nan) == float(loss_none)
    assert "kl" not in metrics
    with pytest.raises(ValueError, match="beta > 0 needs ref_logp"):
        gl.grpo_loss(logits, tokens, mask, old, adv, gl.LossConfig(beta=0.1))


def test_metrics_match_numpy():
    logits, tokens, mask, old, ref, adv = _inputs()
    cfg = gl.LossConfig(beta=0.1, kl_estimator="k3", temperature=0.7)
    _, metrics = gl.grpo_loss(logits, tokens, mask, old, adv, cfg, ref_logp=ref)
    z = logits.astype(np.float64) / 0.7
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    entropy = -(p * np.log(p)).sum(-1)
    np.testing.assert_allclose(float(metrics["entropy"]), (entropy * mask).sum() / mask.sum(), rtol=1e-5)
    r = ref - _np_logprobs(logits, tokens, 0.7)
    np.testing.assert_allclose(float(metrics["kl"]), ((np.exp(r) - r - 1) * mask).sum() / mask.sum(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["completion_length"]), mask.sum(-1).mean())


def test_gradient_at_ratio_one_is_minus_advantage_per_token():
    """With old = current log-probs the ratio is 1, nothing is clipped, and d loss / d logp = -A * mask / #tokens."""
    logits, tokens, mask, _, _, adv = _inputs()
    logp = _np_logprobs(logits, tokens, 1.0).astype(np.float32)
    cfg = gl.LossConfig()
    grad = jax.grad(lambda lp: gl.token_mean(gl.policy_terms(lp, logp, jnp.asarray(adv), 0.2, 0.2)[0], mask, 1))(
        jnp.asarray(logp)
    )
    np.testing.assert_allclose(np.asarray(grad), -adv[:, None] * mask / mask.sum(), rtol=1e-6, atol=1e-9)
    _, metrics = gl.grpo_loss(logits, tokens, mask, logp, adv, cfg)
    assert float(metrics["clip_fraction"]) == 0.0
    np.testing.assert_allclose(float(metrics["ratio_mean"]), 1.0, atol=1e-6)


def test_log_ratio_is_clamped():
    logp = jnp.zeros((1, 2))
    old = jnp.array([[-100.0, 100.0]])  # log-ratios +100 / -100 -> clamped to +-20: finite
    loss, ratio, _ = gl.policy_terms(logp, old, jnp.array([1.0]), 0.2, 0.2)
    np.testing.assert_allclose(np.asarray(ratio), np.exp([[20.0, -20.0]]), rtol=1e-6)
    assert np.isfinite(np.asarray(gl.kl_term(logp, old, "k3"))).all()


def test_completion_logits_alignment():
    logits = jnp.arange(2 * 10 * 1, dtype=jnp.float32).reshape(2, 10, 1)
    out = gl.completion_logits(logits, prompt_len=6)  # T = 6, L = 4: columns 5..8
    np.testing.assert_array_equal(np.asarray(out[0, :, 0]), [5, 6, 7, 8])


def test_config_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown aggregation"):
        gl.LossConfig(aggregation="sum")
    with pytest.raises(ValueError, match="unknown kl_estimator"):
        gl.LossConfig(kl_estimator="k4")
