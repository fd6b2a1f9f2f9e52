"""Eval outputs: per-image predictions (JSONL), per-dataset metrics, the Markdown table, scatter plots, protocols.

Every number in the report is recomputable from the predictions file: `metrics_from_predictions(path)` reads a
JSONL written by `write_predictions` and gives the same metrics (`score: null` is a parse failure, `in_range: false`
a score outside the prompt's scale).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from qponder_jax.errors import ConfigError
from qponder_jax.metrics import iqa_metrics

# name -> (the dataset specs "name:split" it evaluates, the note printed under the table)
PROTOCOLS: dict[str, tuple[tuple[str, ...], str]] = {
    "koniq_cross": (
        ("koniq10k:test", "spaq:all", "kadid10k:all", "pipal:all", "live_challenge:all", "agiqa3k:all", "csiq:all"),
        "KonIQ-trained protocol (DeQA-Score, Q-Insight): trained on the KonIQ-10k train split (7,058 images); "
        "in-domain on the KonIQ-10k test split (2,015), cross-dataset on every image of SPAQ, KADID-10k, PIPAL (public "
        "training set), LIVE Challenge, AGIQA-3K and CSIQ.",
    ),
    "kadid": (
        ("kadid10k:test", "csiq:all", "tid2013:all", "koniq10k:all", "spaq:all", "live_challenge:all", "agiqa3k:all"),
        "KADID-trained protocol (VisualQuality-R1, PreResQ-R1): trained on the KADID-10k train split (split by "
        "reference image 6:2:2, seed 42); in-domain on its test split, cross-dataset on every image of the others.",
    ),
    "synthetic": (("synthetic:test",), "The synthetic IQA set's test split (procedural distortions, known MOS)."),
    "vqa": (
        ("konvid1k:all", "live_vqc:all", "youtube_ugc:all", "lsvq:test", "lsvq:test_1080p"),
        "VQA protocol (PreResQ-R1): trained on LSVQ's train split (28,056 videos); in-domain on LSVQ test and "
        "test_1080p, cross-dataset on every video of KoNViD-1k, LIVE-VQC and YouTube-UGC. Each video is sampled as "
        "data.video says (two-stream: a low-resolution global clip plus high-resolution key-frame crops).",
    ),
    "synthetic_vqa": (
        ("synthetic_vqa:test",),
        "The synthetic VQA set's test split (procedural spatial and temporal distortions, known MOS).",
    ),
    "custom": ((), "Datasets as configured."),
}
METRIC_NOTE = (
    "SRCC, KRCC (tau-b) and PLCC are scipy's; PLCC_fit is Pearson after the 4-parameter logistic fit of DeQA-Score "
    "(VisualQuality-R1 and PreResQ-R1 report the raw PLCC). MOS normalized to 1-5 per dataset; MAE on that scale. "
    "Predictions that did not parse are excluded from the correlations and counted in the parse-failure rate (Fail); "
    "scores outside the prompt's scale (e.g. 4009 on 1-5) are excluded from the correlations and MAE too, never "
    "clipped, and counted in Out. N: the predictions the metrics use."
)
COLUMNS = (
    ("srcc", "SRCC"),
    ("plcc", "PLCC"),
    ("plcc_fitted", "PLCC_fit"),
    ("krcc", "KRCC"),
    ("mae", "MAE"),
    ("parse_failure_rate", "Fail"),
    ("out_of_range_rate", "Out"),
    ("n", "N"),
    ("type_named_rate", "Type named"),
    ("level_agreement_rate", "Level agrees"),
)


def protocol_specs(name: str) -> tuple[str, ...]:
    if name not in PROTOCOLS:
        raise ConfigError(f"config field protocol={name!r}: choose one of {sorted(PROTOCOLS)}")
    return PROTOCOLS[name][0]


def dataset_notes(protocol: str, descriptions: Mapping[str, str]) -> tuple[str, ...]:
    """The notes on what was evaluated: the protocol's note when the specs evaluated (the keys of `descriptions`,
    spec -> what its source says it is) are exactly the protocol's, else one line per spec from its description."""
    if protocol in PROTOCOLS and tuple(descriptions) == PROTOCOLS[protocol][0]:
        return (PROTOCOLS[protocol][1],)
    return tuple(f"{spec}: {text}" for spec, text in descriptions.items() if text)


def skipped_note(spec: str, build_skipped: Sequence[dict], eval_skipped: int) -> str:
    """One line on the files of `spec` left out of its metrics ("" when none): skipped when the dataset was built
    (missing or unreadable; the build covers all its splits) and undecodable at evaluation."""
    parts = []
    if build_skipped:
        first = build_skipped[0]
        parts.append(
            f"{len(build_skipped)} file(s) of {spec.partition(':')[0]} (all splits) were skipped when it was built "
            f"(first: {first.get('path', '?')}: {first.get('reason', '?')})"
        )
    if eval_skipped:
        parts.append(f"{eval_skipped} could not be decoded at evaluation")
    if not parts:
        return ""
    return f"{spec}: " + "; ".join(parts) + "; they are not in its metrics (report.json lists them)."


def file_stem(spec: str) -> str:
    """A file name for a dataset spec: 'koniq10k:test' -> 'koniq10k_test'."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in spec)


def _json_number(x):
    """NaN / inf -> None (JSON has no NaN); numpy scalars -> Python numbers."""
    if x is None:
        return None
    if isinstance(x, bool | np.bool_):
        return bool(x)
    if isinstance(x, int | np.integer):
        return int(x)
    x = float(x)
    return x if math.isfinite(x) else None


def clean(obj):
    """A JSON-ready copy of nested dicts/lists with NaN -> null."""
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [clean(v) for v in obj]
    if isinstance(obj, str) or obj is None:
        return obj
    if isinstance(obj, float | int | np.floating | np.integer | np.bool_ | bool):
        return _json_number(obj)
    return obj


def write_predictions(path: Path, rows: Sequence[dict]) -> None:
    """One JSON object per image (NaN written as null)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(clean(row), ensure_ascii=False, allow_nan=False) + "\n")


def read_predictions(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def score_arrays(rows: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(predicted scores with NaN for failures, MOS) of prediction rows."""
    pred = np.asarray([np.nan if r["score"] is None else r["score"] for r in rows], np.float64)
    mos = np.asarray([r["mos"] for r in rows], np.float64)
    return pred, mos


def in_range_array(rows: Sequence[dict]) -> np.ndarray:
    """[N] bool: each row's score is within the prompt's scale (rows without the field count as in range)."""
    return np.asarray([bool(r.get("in_range", True)) for r in rows], bool)


def metrics_from_predictions(path: Path) -> dict:
    """The IQA metrics of a predictions JSONL (NaN where undefined)."""
    rows = read_predictions(path)
    pred, mos = score_arrays(rows)
    return iqa_metrics(pred, mos, in_range_array(rows)).as_dict()


def _cell(key: str, value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if key == "n":
        return str(int(value))
    if key in ("parse_failure_rate", "out_of_range_rate", "type_named_rate", "level_agreement_rate"):
        return f"{100 * value:.1f}%"
    return f"{value:.4f}"


def markdown_table(results: dict[str, dict], *, title: str, notes: Sequence[str]) -> str:
    """One row per dataset, the metric columns of `COLUMNS`, then the notes."""
    head = "| Dataset | " + " | ".join(label for _, label in COLUMNS) + " |"
    rule = "|---|" + "---|" * len(COLUMNS)
    rows = [
        f"| {spec} | " + " | ".join(_cell(k, res.get(k)) for k, _ in COLUMNS) + " |" for spec, res in results.items()
    ]
    lines = [f"### {title}", "", head, rule, *rows, ""]
    lines += [f"- {note}" for note in notes if note]
    return "\n".join(lines) + "\n"


def scatter_plot(path: Path, pred: np.ndarray, mos: np.ndarray, *, title: str, in_range=None) -> None:
    """A PNG scatter of predicted score (y) against MOS (x) with the y = x line; failures and out-of-range scores
    (not drawn) listed in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parsed = np.isfinite(pred)
    ok = parsed & (True if in_range is None else np.asarray(in_range, bool))
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    try:
        ax.scatter(mos[ok], pred[ok], s=10, alpha=0.6)
        ax.plot([1, 5], [1, 5], color="gray", linewidth=1, linestyle="--")
        ax.set_xlim(0.8, 5.2)
        ax.set_xlabel("MOS (normalized, 1-5)")
        ax.set_ylabel("predicted score")
        failed, out = int((~parsed).sum()), int((parsed & ~ok).sum())
        ax.set_title(f"{title}\n{int(ok.sum())} scored, {failed} parse failures, {out} out of range", fontsize=9)
        if not ok.any():
            ax.text(3, 3, "no parsed predictions", ha="center", va="center")
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
