"""The `score` job and the `qponder-score` command: score image files, folders and manifests with a checkpoint.

    qponder-score --model runs/demo/7_export/hf runs/demo/2_data/test --out preds.csv
    python -m qponder_jax.score --model PATH INPUT... [options]                # the same command
    qponder --config=configs/score.py --workdir=DIR --config.checkpoint=PATH --config.inputs=a.jpg,shots/

Wiring only: `data.image_files.find_images` finds the images, `scorer.Scorer` scores them (the eval job's scoring
path, so the numbers agree), `scorer.summarize` sums them up. One line per image as its batch finishes (a progress
bar on a terminal), then a summary; the predictions file lists every input in order, skipped ones with their reason.
Exit status: 0; 1 with --strict when an image was skipped, did not parse or scored outside the scale; 2 for a usage
error (a bad option, nothing to score, a model that does not load).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, TextIO

from qponder_jax.data.image_files import IMAGE_EXTENSIONS, find_images
from qponder_jax.errors import ConfigError

OUT_FORMATS = (".jsonl", ".csv")
EPILOG = f"""
inputs:
  image files; folders, searched recursively for image files
  ({" ".join(IMAGE_EXTENSIONS)}); manifests: a .csv with an
  `image` column (paths relative to the manifest) and optionally `mos`, or a
  .jsonl with those keys per line. With MOS the summary gives SRCC / PLCC / KRCC.

scores:
  1 (bad) to 5 (excellent), higher is better. Unreadable images are skipped,
  listed and counted. An answer without a number scores NaN (null in JSONL,
  empty in CSV), never a made-up score; a number outside the scale is kept,
  flagged in_range=false and left out of the mean and the correlations.
  The prompt, answer length, image size limit and buckets default to the
  model's own (the qponder_scoring.json its export wrote, or the training
  run's config.json for an orbax workdir), else the "qponder" prompt.

exit status:
  0 done; 1 with --strict when any image was skipped, did not parse or scored
  out of range; 2 usage error (bad option, nothing to score, model not found).
"""


MODE_HELP = (
    "greedy: the answer of one greedy decode (default); level: Q-Align level probabilities, no decoding; "
    "sample_mean: the mean over --num-samples sampled answers"
)
OPTIONS = (  # (flag, argparse keywords): the model's own settings unless given
    ("--prompt", dict(metavar="NAME", help="prompt name in qponder_jax/prompts.py (default: the model's own)")),
    ("--prompt-text", dict(metavar="TEXT", help="a custom user prompt (default: the model's own)")),
    ("--max-new-tokens", dict(type=int, metavar="N", help="longest answer (default: the model's own, else 256)")),
    ("--max-pixels", dict(type=int, metavar="N", help="largest image area after resizing (default: the model's own)")),
    ("--score-range", dict(metavar="LO,HI", help="the prompt's scale (default: the model's own, else 1,5)")),
    ("--num-samples", dict(type=int, default=8, metavar="N", help="answers per image in sample_mean (default 8)")),
    ("--temperature", dict(type=float, default=1.0, metavar="T", help="sampling temperature of sample_mean (1)")),
    ("--seed", dict(type=int, default=0, metavar="N", help="sampling seed of sample_mean (default 0)")),
    ("--step", dict(type=int, default=-1, metavar="N", help="checkpoint step of an orbax workdir (default: latest)")),
    ("--dtype", dict(choices=("float32", "bfloat16"), default="float32", help="compute dtype (default float32)")),
    (
        "--layout",
        dict(
            default="auto",
            metavar="L",
            help="the sampler's weight layout on several devices: auto, decode, decode:T or train (default auto)",
        ),
    ),
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qponder-score",
        description="Score image quality (1-5, higher is better) with a Q-Ponder checkpoint.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image file, folder, or manifest (.csv / .jsonl)")
    p.add_argument("--model", required=True, metavar="PATH", help="exported HF folder, or orbax training workdir")
    p.add_argument("--mode", choices=("greedy", "level", "sample_mean"), default="greedy", help=MODE_HELP)
    p.add_argument("--out", metavar="FILE", help="write every input's prediction to this .jsonl or .csv file")
    p.add_argument("--explain", action="store_true", help="print each image's reasoning under its score")
    p.add_argument("--strict", action="store_true", help="exit 1 if any image is skipped, unparsed or out of range")
    p.add_argument("--batch-size", type=int, default=8, metavar="N", help="images per batch (default 8; rounded up "
                   "to a multiple of the devices)")  # fmt: skip
    for flag, kwargs in OPTIONS:
        p.add_argument(flag, **kwargs)
    return p


# ---- output ----


def format_score(score: float) -> str:
    """Two decimals as the model writes them; more when the score has them (sample_mean, level)."""
    if not math.isfinite(score):
        return "n/a"
    return f"{score:.2f}" if abs(score - round(score, 2)) < 1e-9 else f"{score:.4f}"


def format_result(result, explain: bool = False, width: int = 0) -> str:
    """One line per image, the path padded to `width` (and its reasoning, indented, with `explain`)."""
    source = result.source.ljust(width)
    if result.error:
        return f"{source}  skipped: {result.error}"
    if not result.parsed:
        line = f"{source}  n/a  (no score in the answer)"
    else:
        flag = "" if result.in_range else "  (out of range)"
        line = f"{source}  {format_score(result.score)}  {result.level or '-'}{flag}"
    if explain:
        line += "\n    " + (" ".join(result.reasoning.split()) or "(no reasoning)")
    return line


def format_summary(summary: dict, out: Path | None = None) -> str:
    mean = summary["mean_score"]
    lines = [
        f"{summary['images']} images scored: mean score {mean:.3f}" if math.isfinite(mean) else
        f"{summary['images']} images scored: no score in range",
        f"parse failures {summary['parse_failures']} | out of range {summary['out_of_range']} | "
        f"skipped {len(summary['skipped'])}",
    ]  # fmt: skip
    lines += [f"  skipped {source}: {reason}" for source, reason in summary["skipped"]]
    if "mos" in summary:
        m = summary["mos"]
        lines.append(
            f"against MOS ({m['n']} images): SRCC {m['srcc']:.4f} | PLCC {m['plcc']:.4f} | KRCC {m['krcc']:.4f}"
        )
    if out is not None:
        lines.append(f"predictions written to {out}")
    return "\n".join(lines)


def write_predictions(path: Path, rows: list[dict[str, Any]]) -> None:
    """JSONL (one object per line, null for NaN) or CSV (the common columns; empty for None)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".csv":
        columns = ["image", "score", "parsed", "in_range", "level", "mos", "error", "reasoning", "response"]
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows({k: "" if row[k] is None else row[k] for k in columns} for row in rows)
    else:
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n" for row in rows)


# ---- the run ----


def score_inputs(
    scorer, inputs: list[str], *, out: Path | None = None, explain: bool = False, strict: bool = False,
    stdout: TextIO | None = None, progress: bool | None = None,
) -> tuple[dict, int]:  # fmt: skip
    """Finds, scores and reports `inputs`; writes `out`. Returns (summary, exit status)."""
    from tqdm import tqdm

    from qponder_jax.scorer import ScoreResult, result_row, summarize

    stdout = stdout or sys.stdout
    found = find_images(inputs)
    if not found.images:
        reasons = "; ".join(f"{s}: {r}" for s, r in found.skipped) or "no inputs"
        raise ConfigError(f"nothing to score ({reasons})")
    progress = stdout.isatty() if progress is None else progress
    bar = tqdm(total=len(found.images), unit="img", disable=not progress, leave=False, file=sys.stderr)
    results: list = [None] * len(found.images)
    width = min(max(len(str(f.path)) for f in found.images), 60)
    for i, result in scorer.iter_scores([f.path for f in found.images], skip_errors=True):
        results[i] = result
        (bar.write if progress else print)(format_result(result, explain, width), file=stdout)
        bar.update(1)
    bar.close()
    results += [ScoreResult.skipped(source, reason) for source, reason in found.skipped]
    mos = [f.mos for f in found.images] + [None] * len(found.skipped)
    summary = summarize(results, mos if any(m is not None for m in mos) else None)
    if out is not None:
        write_predictions(out, [result_row(r, m) for r, m in zip(results, mos, strict=True)])
    print(format_summary(summary, out), file=stdout, flush=True)
    failures = len(summary["skipped"]) + summary["parse_failures"] + summary["out_of_range"]
    return summary, 1 if strict and failures else 0


def _score_range(text: str | None):
    if text is None:
        return None
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"--score-range {text!r}: give LO,HI, e.g. 1,5") from None
    return lo, hi


def _check_layout(layout: str) -> None:
    from qponder_jax.model.sharding import parse_layout

    try:
        parse_layout(layout)
    except ValueError as e:
        raise ConfigError(f"--layout {layout}: {e}") from None


def main(argv: list[str] | None = None) -> int:
    """The `qponder-score` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    from qponder_jax.loading import orbax_warnings_hidden

    with orbax_warnings_hidden():  # orbax warns on every read-only restore; a damaged checkpoint's notice stays
        return _main(args)


def _main(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else None
    try:
        if out is not None and out.suffix.lower() not in OUT_FORMATS:
            raise ConfigError(f"--out {args.out}: the file name must end in {' or '.join(OUT_FORMATS)}")
        if args.batch_size < 1:
            raise ConfigError(f"--batch-size {args.batch_size}: must be >= 1")
        _check_layout(args.layout)
        from qponder_jax.scorer import Scorer

        scorer = Scorer.from_pretrained(
            args.model, args.mode, step=args.step, dtype=args.dtype, batch_size=args.batch_size, prompt=args.prompt,
            prompt_text=args.prompt_text, max_new_tokens=args.max_new_tokens, max_pixels=args.max_pixels,
            score_range=_score_range(args.score_range), num_samples=args.num_samples, temperature=args.temperature,
            seed=args.seed, layout=args.layout,
        )  # fmt: skip
        summary, status = score_inputs(scorer, args.inputs, out=out, explain=args.explain, strict=args.strict)
    except (ConfigError, FileNotFoundError) as e:
        print(f"qponder-score: error: {e}", file=sys.stderr)
        return 2
    if status:
        print(f"qponder-score: --strict: {len(summary['skipped'])} skipped, {summary['parse_failures']} parse "
              f"failures, {summary['out_of_range']} out of range", file=sys.stderr)  # fmt: skip
    return status


def run(config, workdir) -> dict:
    """The `score` job (configs/score.py): predictions and summary.json in the workdir (or config.out)."""
    from qponder_jax.model import sharding
    from qponder_jax.scorer import Scorer

    workdir = Path(workdir)
    if not config.checkpoint:
        raise ConfigError("config field checkpoint is empty: give the HF folder or training workdir to score with")
    inputs = [s.strip() for s in str(config.inputs).split(",") if s.strip()]
    if not inputs:
        raise ConfigError("config field inputs is empty: give comma-separated image files, folders or CSV manifests")
    out = Path(config.out) if config.out else workdir / "predictions.jsonl"
    if out.suffix.lower() not in OUT_FORMATS:
        raise ConfigError(f"config field out={config.out!r}: the file name must end in {' or '.join(OUT_FORMATS)}")
    s = config.score
    overrides = {k: s[k] or None for k in ("prompt", "prompt_text", "max_new_tokens", "max_pixels")}
    scorer = Scorer.from_pretrained(
        config.checkpoint, s.mode, step=int(config.step), dtype=config.model.dtype,
        mesh=sharding.make_mesh(tuple(config.mesh)), layout=str(config.sampling_layout),
        batch_size=int(s.batch_size), num_samples=int(s.num_samples),
        temperature=float(s.temperature), seed=int(s.seed), score_range=tuple(s.score_range) or None, **overrides,
    )  # fmt: skip
    summary, status = score_inputs(scorer, inputs, out=out, explain=bool(config.explain), strict=bool(config.strict))
    (workdir / "summary.json").write_text(json.dumps(_json(summary), indent=2) + "\n", encoding="utf-8")
    if status:
        raise SystemExit(f"qponder: --config.strict: {len(summary['skipped'])} skipped, {summary['parse_failures']} "
                         f"parse failures, {summary['out_of_range']} out of range")  # fmt: skip
    return summary


def _json(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json(v) for v in obj]
    return obj


if __name__ == "__main__":
    sys.exit(main())
