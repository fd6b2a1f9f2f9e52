"""IQA metrics against scipy, and the logistic fit on data generated from known parameters."""

import numpy as np
import pytest
from scipy import stats

from qponder_jax.metrics import fit_logistic, iqa_metrics, logistic4


def test_metrics_equal_scipy_on_random_data():
    rng = np.random.default_rng(0)
    mos = rng.uniform(1, 5, 200)
    pred = mos + rng.normal(0, 0.7, 200)
    m = iqa_metrics(pred, mos)
    assert m.srcc == pytest.approx(stats.spearmanr(pred, mos)[0], abs=1e-12)
    assert m.plcc == pytest.approx(stats.pearsonr(pred, mos)[0], abs=1e-12)
    assert m.krcc == pytest.approx(stats.kendalltau(pred, mos)[0], abs=1e-12)
    assert m.mae == pytest.approx(np.mean(np.abs(pred - mos)), abs=1e-12)
    assert m.n == 200 and m.parse_failure_rate == 0.0
    assert m.plcc_fitted >= m.plcc - 1e-3  # a monotone fit should not make the linear fit worse


def test_nan_predictions_are_failures_not_defaults():
    rng = np.random.default_rng(1)
    mos = rng.uniform(1, 5, 50)
    pred = mos.copy()
    pred[:10] = np.nan
    m = iqa_metrics(pred, mos)
    assert m.n == 40 and m.parse_failure_rate == pytest.approx(0.2)
    assert m.srcc == pytest.approx(1.0)
    with pytest.raises(ValueError, match="differ in length"):
        iqa_metrics(pred[:3], mos)


def test_logistic_fit_recovers_known_parameters():
    rng = np.random.default_rng(2)
    true = np.array([4.6, 1.2, 0.3, 0.8])
    x = rng.uniform(-3, 3, 400)
    y = logistic4(x, *true) + rng.normal(0, 0.01, 400)
    np.testing.assert_allclose(fit_logistic(x, y), true, rtol=0.03, atol=0.03)


def test_constant_predictions_give_nan_correlation():
    m = iqa_metrics(np.full(10, 3.0), np.linspace(1, 5, 10))
    assert np.isnan(m.srcc) and np.isnan(m.plcc)


def test_logistic_is_stable_far_from_its_centre():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an overflow in exp would raise here
        y = logistic4(np.array([-1e4, 0.0, 1e4]), 5.0, 1.0, 0.0, 0.1)
    np.testing.assert_allclose(y, [1.0, 3.0, 5.0])
