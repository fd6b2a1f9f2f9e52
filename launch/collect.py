#!/usr/bin/env python3
"""Gathers each sweep run's final eval into one table (Markdown and CSV), sorted by a chosen metric.

    python launch/collect.py --root=runs/ci_lr --metric=eval/loss               # lower is better (ascending)
    python launch/collect.py --root=runs/qp_sweep --metric=eval/srcc --descending

A run is a folder under `--root` with a `metrics.jsonl` (written by process 0 of every training job). Its row holds
the point's overrides (from `sweep_point.json`, written by launch/sweep.py), whether it reached train.total_steps,
the last step, and the last record of each prefix as `<prefix>/<name>` columns (eval/loss, train/loss, grpo/...).
Runs without the sort metric go last. Writes `<out>.md` and `<out>.csv` (default `<root>/results`).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sweep  # noqa: E402

SKIP = ("step", "prefix", "time")


def final_metrics(workdir: Path) -> tuple[dict[str, float], int | None]:
    """({'<prefix>/<name>': value of the last record of that prefix}, last step seen) from metrics.jsonl."""
    last: dict[str, dict] = {}
    step = None
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        last[record.get("prefix", "train")] = record
        step = max(step or 0, int(record.get("step", 0)))
    out = {}
    for prefix, record in last.items():
        for k, v in record.items():
            if k not in SKIP and isinstance(v, (int, float)) and v is not None:
                out[f"{prefix}/{k}"] = float(v)
    return out, step


def total_steps_of(workdir: Path) -> int | None:
    config = workdir / "config.json"
    if not config.is_file():
        return None
    train = json.loads(config.read_text()).get("train") or {}
    return train.get("total_steps")


def collect(root: str | Path, metric: str, *, descending: bool = False) -> tuple[list[str], list[dict]]:
    """(columns, rows sorted by `metric`) for the runs under `root`."""
    root = Path(root)
    rows = []
    for metrics in sorted(root.glob("*/metrics.jsonl")):
        workdir = metrics.parent
        values, step = final_metrics(workdir)
        point_file = workdir / sweep.POINT_FILE
        point = json.loads(point_file.read_text()) if point_file.is_file() else {}
        total = total_steps_of(workdir)
        row = {"run": workdir.name, "complete": sweep.is_complete(workdir, total), "step": step}
        row.update({k: v for k, v in (point.get("overrides") or {}).items()})
        row.update(values)
        rows.append(row)
    if not rows:
        raise FileNotFoundError(f"no runs under {root} (folders with a metrics.jsonl)")

    def key(row):
        v = row.get(metric)
        missing = v is None or (isinstance(v, float) and math.isnan(v))
        return (missing, 0.0 if missing else (-v if descending else v))

    rows.sort(key=key)
    metric_keys = {k for r in rows for k in r if "/" in k}
    override_cols = sorted({k for r in rows for k in r} - {"run", "complete", "step"} - metric_keys)
    metric_cols = sorted(metric_keys - {metric})
    columns = ["run", "complete", "step", *override_cols, metric, *metric_cols]
    return columns, rows


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def to_markdown(columns: Sequence[str], rows: Sequence[dict]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_csv(path: Path, columns: Sequence[str], rows: Sequence[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({c: r.get(c) for c in columns})


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="sweep root: one workdir per run")
    parser.add_argument("--metric", default="eval/loss", help="sort column, <prefix>/<name> (e.g. eval/srcc)")
    parser.add_argument("--descending", action="store_true", help="higher is better (SRCC, PLCC, reward)")
    parser.add_argument("--out", default=None, help="output path without extension (default <root>/results)")
    args = parser.parse_args(argv)
    columns, rows = collect(args.root, args.metric, descending=args.descending)
    if not any(args.metric in r for r in rows):
        known = sorted({k for r in rows for k in r if "/" in k})
        print(f"warning: no run has metric {args.metric!r}; known: {known}", file=sys.stderr)
    out = Path(args.out) if args.out else Path(args.root) / "results"
    markdown = to_markdown(columns, rows)
    out.with_suffix(".md").write_text(markdown)
    write_csv(out.with_suffix(".csv"), columns, rows)
    print(markdown, end="")
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.csv')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
