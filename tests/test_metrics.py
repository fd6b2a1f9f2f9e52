"""IQA metrics against scipy, and the logistic fit on data generated from known parameters."""

import numpy as np
import pytest
from scipy import stats

from qponder_jax.metrics import fit_logistic, in_score_range, iqa_metrics, logistic4


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


def test_out_of_range_predictions_are_counted_and_left_out_of_every_metric():
    """Issue 23 item 3: `<answer>4009</answer>` parsed on a 1-5 scale must not make the MAE 365.5."""
    rng = np.random.default_rng(3)
    mos = rng.uniform(1, 5, 11)
    pred = mos + rng.normal(0, 0.3, 11)
    pred[[2, 7]] = [4009.0, -1.0]  # parsed, outside the scale
    pred[5] = np.nan  # did not parse
    in_range = in_score_range(pred, (1.0, 5.0)) | np.isnan(pred)  # NaN rows: the parse failure rate's business
    assert in_range.tolist() == [i not in (2, 7) for i in range(11)]
    m = iqa_metrics(pred, mos, in_range)
    keep = np.isfinite(pred) & in_range
    assert m.n == 8 and m.parse_failure_rate == pytest.approx(1 / 11) and m.out_of_range_rate == pytest.approx(2 / 11)
    assert m.mae == pytest.approx(np.mean(np.abs(pred[keep] - mos[keep])), abs=1e-12) and m.mae < 1
    assert m.srcc == pytest.approx(stats.spearmanr(pred[keep], mos[keep])[0], abs=1e-12)
    assert m.plcc == pytest.approx(stats.pearsonr(pred[keep], mos[keep])[0], abs=1e-12)
    assert m.krcc == pytest.approx(stats.kendalltau(pred[keep], mos[keep])[0], abs=1e-12)
    assert iqa_metrics(pred, mos).out_of_range_rate == 0.0  # without flags every parsed score counts as in range


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
