"""The `eval` job: score IQA and VQA datasets with a checkpoint and report SRCC / PLCC / KRCC / MAE and description
checks.

    qponder --config=configs/eval.py:tiny --workdir=runs/eval_tiny
    qponder --config=configs/eval.py:koniq_cross --workdir=runs/eval --config.checkpoint=runs/qponder_7b \
        --config.data.data_dir=/data/tfds

The model is an HF folder or an orbax training workdir (`loading.load_checkpoint`). Images are scored by the path the
Scorer uses too (`evaluation/image_scoring.py`): "greedy", "sample_mean" (mean over N samples at a temperature) or
"level" (Q-Align level scoring, no decoding). Video records (the VQA sets) are decoded and sampled as `data.video`
says and prompted with the clip, its key-frame crops and the text (`train.video_inputs`); an undecodable video or
image is skipped and listed in the report (or raises with data.strict_images). Outputs in `<workdir>/<name>/`:
report.json, table.md (also printed), predictions/<set>.jsonl (one line per image or video) and plots/<set>.png
(predicted score against MOS). Scores outside the prompt's scale are kept, flagged (`in_range`) and counted, and left
out of the metrics like parse failures.
Every metric in the report is recomputable from the predictions (`evaluation.report.metrics_from_predictions`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import logging

from qponder_jax import prompts
from qponder_jax.data.datasets import ImageError, decode_image
from qponder_jax.data.processing import Processor
from qponder_jax.data.sources import build_info, open_source
from qponder_jax.data.video import VideoError, VideoSampling, load_video_inputs
from qponder_jax.errors import ConfigError
from qponder_jax.evaluation import descriptions, image_scoring
from qponder_jax.evaluation import report as reporting
from qponder_jax.loading import load_checkpoint, make_processor
from qponder_jax.metrics import iqa_metrics
from qponder_jax.model import sharding
from qponder_jax.train import video_inputs

MODES = image_scoring.MODES


@dataclasses.dataclass(frozen=True)
class EvalSettings(image_scoring.ScoreSettings):
    """How images are scored (the `score` section of configs/eval.py) and which records are read (`data`)."""

    max_images: int = 0  # per dataset; 0 = all
    strict_images: bool = False  # raise on an undecodable image or video instead of skipping and counting it
    video: VideoSampling | None = None  # how video records are sampled (config data.video; None = the defaults)

    @classmethod
    def from_config(cls, score: Mapping, data: Mapping) -> EvalSettings:
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in dict(score).items() if k in names}
        kwargs.update({k: data[k] for k in ("batch_size", "max_images", "strict_images") if k in data})
        if "video" in data:
            kwargs["video"] = video_inputs.sampling_from(data)
        return cls(**kwargs)


def _records(source, settings: EvalSettings, spec: str):
    """Yields (index, record, inputs) of the first max_images records: inputs is the PIL image, or (clip, crops) of a
    video record, or None for an undecodable image or video (skipped and logged with its name or path)."""
    n = len(source) if not settings.max_images else min(len(source), settings.max_images)
    sampling = settings.video or VideoSampling()
    for i in range(n):
        record = source[i]
        name = video_inputs.record_name(record)
        try:
            if video_inputs.is_video_record(record):
                yield i, record, load_video_inputs(record["video_path"], sampling)
            else:
                yield i, record, decode_image(record["image"])
        except VideoError as e:
            if settings.strict_images:
                raise
            logging.warning("%s: skipping video %d (%s): %s", spec, i, e.path, e.reason)
            yield i, record, None
        except (OSError, ValueError) as e:
            if settings.strict_images:
                raise ImageError(f"{spec}[{i}] {name}", str(e)) from e
            logging.warning("%s: skipping image %d (%s): %s", spec, i, name, e)
            yield i, record, None


def _base_row(index: int, record: dict) -> dict:
    name_key = "video_name" if video_inputs.is_video_record(record) else "image_name"
    return {
        "index": index,
        name_key: record.get(name_key, ""),
        "dataset": record.get("dataset", ""),
        "mos": float(record["mos"]),
        "distortion_type": record.get("distortion_type", ""),
        "distortion_level": int(record.get("distortion_level", -1)),
    }


def _row(base: dict, result: image_scoring.ImageScore, mode: str) -> dict:
    """One prediction line: the record's fields and its result."""
    row = {**base, "score": result.score, "in_range": result.in_range}
    if mode == "level":
        return {**row, "level": result.level, "level_probs": list(result.level_probs)}
    row.update(
        response=result.response, format_ok=result.format_ok, level=result.level, answer_count=result.answer_count
    )
    if mode == "sample_mean":
        row.update(
            sample_scores=[c.score for c in result.samples],
            sample_in_range=[c.in_range for c in result.samples],
            responses=[c.text for c in result.samples],
        )
    return row


def evaluate_source(
    model, proc: Processor, source, spec: str, settings: EvalSettings, *, mesh, generate_fn=None, seed_offset: int = 0
) -> tuple[list[dict], dict]:
    """Scores one dataset through the shared scoring path (`evaluation.image_scoring`): (one prediction row per
    image, in dataset order; a summary with metrics and description checks)."""
    scorer = image_scoring.BatchScorer(
        model, proc, settings, mesh=mesh, generate_fn=generate_fn, seed_offset=seed_offset
    )
    bases, skipped = {}, []

    def prompts_of():
        for i, record, inputs in _records(source, settings, spec):
            if inputs is None:
                skipped.append(_skipped_row(i, record))
                continue
            bases[i] = _base_row(i, record)
            yield i, scorer.finish(_encode(proc, scorer.user_text, record, inputs, f"{spec}[{i}]"))

    results = dict(scorer.score_stream(prompts_of()))
    rows = [_row(bases[i], results[i], settings.mode) for i in sorted(results)]
    checks, sample_scores = [], []
    if settings.mode != "level":
        for i in sorted(results):
            base, samples = bases[i], results[i].samples
            sample_scores += [c.score for c in samples]
            checks += [
                descriptions.check_response(c.text, base["dataset"], base["distortion_type"], c.score, c.level)
                for c in samples
            ]
    return rows, _summarize(rows, checks, sample_scores, skipped, settings, scorer.level_info)


def _encode(proc: Processor, text: str, record: dict, inputs, example_id: str):
    """The generation prompt of one record: image + text, or video + key-frame crops + text."""
    if video_inputs.is_video_record(record):
        clip, crops = inputs
        return video_inputs.encode_video_prompt(proc, text, clip, crops, example_id=example_id)
    return proc.encode(prompts.image_messages(text), [inputs], add_generation_prompt=True, example_id=example_id)


def _skipped_row(index: int, record: dict) -> dict:
    if video_inputs.is_video_record(record):
        return {"index": index, "video_name": record.get("video_name", ""), "path": record["video_path"]}
    return {"index": index, "image_name": record.get("image_name", "")}


def _summarize(rows, checks, sample_scores, skipped, settings: EvalSettings, level_info) -> dict:
    pred, mos = reporting.score_arrays(rows) if rows else (np.zeros(0), np.zeros(0))
    summary: dict[str, Any] = iqa_metrics(pred, mos, reporting.in_range_array(rows)).as_dict() if rows else {}
    summary["images"] = len(rows)  # records scored (images or videos)
    summary["skipped_images"] = skipped  # undecodable records (images or videos), not scored
    if settings.mode == "level":
        summary["level_tokens"] = level_info
    else:
        summary["format_ok_rate"] = float(np.mean([r["format_ok"] for r in rows])) if rows else None
        summary["sample_parse_failure_rate"] = float(np.mean(~np.isfinite(sample_scores))) if sample_scores else None
        summary.update(descriptions.summarize(checks))
    return summary


def evaluate(
    model,
    proc: Processor,
    sources: Mapping[str, Any],
    settings: EvalSettings,
    out_dir: str | Path,
    *,
    mesh,
    generate_fn=None,
    title: str = "IQA evaluation",
    notes: tuple[str, ...] = (),
    info: Mapping[str, Any] | None = None,
) -> dict:
    """Evaluates every source and writes report.json, table.md, predictions/*.jsonl and plots/*.png to `out_dir`;
    returns the report. Only process 0 writes."""
    out = Path(out_dir)
    writer = jax.process_index() == 0
    results = {}
    for k, (spec, source) in enumerate(sources.items()):
        rows, summary = evaluate_source(
            model, proc, source, spec, settings, mesh=mesh, generate_fn=generate_fn, seed_offset=k
        )
        summary["build_skipped"] = build_info(source)[1]  # files skipped when the dataset was built
        results[spec] = summary
        if writer:
            stem = reporting.file_stem(spec)
            reporting.write_predictions(out / "predictions" / f"{stem}.jsonl", rows)
            pred, mos = reporting.score_arrays(rows) if rows else (np.zeros(0), np.zeros(0))
            in_range = reporting.in_range_array(rows)
            plot = out / "plots" / f"{stem}.png"
            reporting.scatter_plot(plot, pred, mos, title=f"{title}: {spec}", in_range=in_range)
        keys = ("srcc", "plcc", "parse_failure_rate", "out_of_range_rate", "images")
        logging.info("%s: %s", spec, {k: summary.get(k) for k in keys})
    mode_note = {
        "greedy": "Scores: greedy decoding; the answer's number"
        + (f"s (the mean of the first {settings.num_ratings})." if settings.num_ratings > 1 else "."),
        "sample_mean": f"Scores: mean over {settings.num_samples} samples at temperature {settings.temperature}.",
        "level": f"Scores: Q-Align level scoring after {settings.level_prefix!r} (softmax over the five level tokens, "
        "dotted with 1..5).",
    }[settings.mode]
    skipped = [
        reporting.skipped_note(spec, r["build_skipped"], len(r["skipped_images"])) for spec, r in results.items()
    ]
    all_notes = (*notes, *filter(None, skipped), mode_note, reporting.METRIC_NOTE)
    if settings.mode != "level":
        all_notes += (
            "Type named: the reasoning names the image's distortion (synonym table, negations excluded; sets with "
            "known distortions only). Level agrees: the reasoning's level word equals the score's level bin.",
        )
    table = reporting.markdown_table(results, title=title, notes=all_notes)
    report = {
        "title": title,
        "notes": list(all_notes),
        "settings": dataclasses.asdict(settings),
        "model": dict(info or {}),
        "datasets": results,
        "table_markdown": table,
    }
    if writer:
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(reporting.clean(report), indent=2, allow_nan=False) + "\n")
        (out / "table.md").write_text(table, encoding="utf-8")
    return report


# ---- the job ----


def dataset_specs(config) -> tuple[str, ...]:
    """The "name:split" specs to evaluate: config.datasets (comma-separated) if set, else the protocol's."""
    if config.datasets:
        return tuple(s.strip() for s in config.datasets.split(",") if s.strip())
    specs = reporting.protocol_specs(config.protocol)
    if not specs:
        raise ConfigError("config field datasets is empty and protocol='custom' names none; set --config.datasets")
    return specs


def run(config, workdir: str | Path) -> dict:
    """The `eval` job (configs/eval.py)."""
    workdir = Path(workdir)
    settings = EvalSettings.from_config(config.score, config.data)
    sources = {spec: open_source(spec, config.data, workdir=workdir) for spec in dataset_specs(config)}  # fail fast
    mesh = sharding.make_mesh(tuple(config.mesh))
    loaded = load_checkpoint(config.checkpoint, model_cfg=config.model, workdir=workdir, mesh=mesh, step=config.step)
    proc = make_processor(loaded.tokenizer_dir, config.data)
    notes = reporting.dataset_notes(config.protocol, {spec: build_info(src)[0] for spec, src in sources.items()})
    where = f"{config.checkpoint or loaded.base_dir}" + (f" (step {loaded.step})" if loaded.step is not None else "")
    info = {"checkpoint": where, "source": loaded.source, "step": loaded.step, "base": str(loaded.base_dir)}
    from qponder_jax import sampling

    layout = str(config.get("sampling_layout", "auto"))  # the sampler's weight layout (model/sharding.py)
    report = evaluate(
        loaded.model,
        proc,
        sources,
        settings,
        workdir / config.name,
        mesh=mesh,
        generate_fn=functools.partial(sampling.generate, layout=layout),
        title=f"{config.name}: {where}",
        notes=notes,
        info=info,
    )
    if jax.process_index() == 0:
        print(report["table_markdown"], flush=True)
        print(f"eval outputs in {workdir / config.name}", flush=True)
    return report
