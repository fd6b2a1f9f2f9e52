"""IQA correlation metrics: SRCC, PLCC (raw and after the 4-parameter logistic fit), KRCC, MAE.

Conventions (as DeQA-Score, VisualQuality-R1 and PreResQ-R1 report them):
- SRCC / KRCC / PLCC are scipy's spearmanr / kendalltau (tau-b) / pearsonr.
- DeQA-Score fits y_hat = (b1 - b2) / (1 + exp(-(x - b3) / b4)) + b2 before PLCC, initialized at
  [max y, min y, mean x, std x / 4]; VisualQuality-R1 and PreResQ-R1 report raw PLCC. We report both.
- Predictions that failed to parse (NaN) are excluded from the correlations and counted in
  `parse_failure_rate`; they are never replaced by a default score.
- Predictions that parsed but lie outside the prompt's scale (`in_range` False, e.g. `<answer>4009</answer>` on a
  1-5 scale) are excluded from the correlations and MAE as well, and counted in `out_of_range_rate`; never clipped.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
from scipy import optimize, special, stats


def logistic4(x: np.ndarray, b1: float, b2: float, b3: float, b4: float) -> np.ndarray:
    """The 4-parameter logistic used by DeQA-Score before PLCC."""
    return (b1 - b2) * special.expit((x - b3) / b4) + b2  # expit: no overflow for far-out x


def fit_logistic(pred: np.ndarray, mos: np.ndarray) -> np.ndarray:
    """Least-squares fit of `logistic4` mapping predictions to MOS; returns [b1, b2, b3, b4]."""
    pred = np.asarray(pred, np.float64)
    mos = np.asarray(mos, np.float64)
    b4 = np.std(pred) / 4 or 1.0
    p0 = [np.max(mos), np.min(mos), np.mean(pred), b4]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optimize.OptimizeWarning)
        try:
            params, _ = optimize.curve_fit(logistic4, pred, mos, p0=p0, maxfev=20000)
        except RuntimeError:  # no convergence: fall back to the initial curve, still monotone
            params = np.asarray(p0)
    return np.asarray(params, np.float64)


@dataclasses.dataclass(frozen=True)
class IQAMetrics:
    srcc: float
    plcc: float  # raw Pearson
    plcc_fitted: float  # Pearson after the 4-parameter logistic fit (DeQA-Score)
    krcc: float
    mae: float  # mean absolute error on the 1-5 scale
    n: int  # predictions that parsed and lie in range (the ones the metrics use)
    parse_failure_rate: float  # share of predictions that did not parse (NaN)
    out_of_range_rate: float  # share of predictions that parsed outside the score range

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def _corr(fn, a, b) -> float:
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")  # undefined for constant inputs
    return float(fn(a, b)[0])


def in_score_range(scores, score_range: tuple[float, float]) -> np.ndarray:
    """[N] bool: each score lies within [lo, hi] (False for NaN)."""
    lo, hi = score_range
    scores = np.asarray(scores, np.float64)
    return np.isfinite(scores) & (scores >= lo) & (scores <= hi)


def iqa_metrics(pred, mos, in_range=None) -> IQAMetrics:
    """All metrics for predicted scores against normalized MOS. NaN predictions count as parse failures; parsed ones
    where `in_range` [N] (default: all True) is False count as out of range; neither enters a metric."""
    pred = np.asarray(pred, np.float64).reshape(-1)
    mos = np.asarray(mos, np.float64).reshape(-1)
    if pred.shape != mos.shape:
        raise ValueError(f"predictions {pred.shape} and MOS {mos.shape} differ in length")
    if not np.isfinite(mos).all():
        raise ValueError("MOS contains NaN or inf")
    parsed = np.isfinite(pred)
    in_range = np.ones(pred.shape, bool) if in_range is None else np.asarray(in_range, bool).reshape(-1)
    if in_range.shape != pred.shape:
        raise ValueError(f"in_range {in_range.shape} and predictions {pred.shape} differ in length")
    ok = parsed & in_range
    p, m = pred[ok], mos[ok]
    plcc_fitted = float("nan")
    if len(p) >= 4 and np.ptp(p) > 0:
        plcc_fitted = _corr(stats.pearsonr, logistic4(p, *fit_logistic(p, m)), m)
    return IQAMetrics(
        srcc=_corr(stats.spearmanr, p, m),
        plcc=_corr(stats.pearsonr, p, m),
        plcc_fitted=plcc_fitted,
        krcc=_corr(stats.kendalltau, p, m),
        mae=float(np.mean(np.abs(p - m))) if len(p) else float("nan"),
        n=int(ok.sum()),
        parse_failure_rate=float(1.0 - parsed.mean()) if len(pred) else float("nan"),
        out_of_range_rate=float((parsed & ~in_range).mean()) if len(pred) else float("nan"),
    )
