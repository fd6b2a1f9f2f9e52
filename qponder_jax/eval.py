"""The `eval` job: score IQA and VQA datasets with a checkpoint and report SRCC / PLCC / KRCC / MAE and description
checks.

    qponder --config=configs/eval.py:tiny --workdir=runs/eval_tiny
    qponder --config=configs/eval.py:koniq_cross --workdir=runs/eval --config.checkpoint=runs/qponder_7b \
        --config.data.data_dir=/data/tfds

The model is an HF folder or an orbax training workdir (`export.load_checkpoint`). Score modes
(`evaluation/scoring.py`): "greedy", "sample_mean" (mean over N samples at a temperature) and "level" (Q-Align level
scoring, no decoding). Video records (the VQA sets) are decoded and sampled as `data.video` says and prompted with
the clip, its key-frame crops and the text (`train.video_inputs`); an undecodable video or image is skipped and listed
in the report (or raises with data.strict_images). Outputs in `<workdir>/<name>/`: report.json, table.md (also
printed), predictions/<set>.jsonl (one line per image or video) and plots/<set>.png (predicted score against MOS).
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
from qponder_jax.data.datasets import ImageError, SyntheticIQA, decode_image
from qponder_jax.data.processing import Buckets, Processor
from qponder_jax.data.video import VideoError, VideoSampling, load_video_inputs
from qponder_jax.errors import ConfigError
from qponder_jax.evaluation import descriptions, scoring
from qponder_jax.evaluation import report as reporting
from qponder_jax.metrics import iqa_metrics
from qponder_jax.model import sharding
from qponder_jax.train import video_inputs

MODES = ("greedy", "sample_mean", "level")


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """How images are scored (the `score` section of configs/eval.py)."""

    mode: str = "greedy"  # "greedy", "sample_mean" or "level"
    prompt: str = "qponder"  # prompt name in prompts.PROMPTS (decoding modes)
    prompt_text: str = ""  # a custom user prompt instead of `prompt`
    max_new_tokens: int = 256
    temperature: float = 1.0  # sample_mean only
    top_k: int = 0
    top_p: float = 1.0
    num_samples: int = 8  # sample_mean only
    num_ratings: int = 1  # numbers of the answer averaged into the score (5 for PreResQ-R1)
    pad_with_first: bool = False  # fewer numbers than num_ratings: pad with the first (PreResQ-R1)
    level_prompt: str = "How would you rate the quality of this image?"  # level mode's user prompt
    level_prefix: str = "The quality of the image is"  # level mode's assistant text before the level word
    level_token_policy: str = "first_token"  # multi-token level words: "first_token" or "single" (raise)
    batch_size: int = 8
    max_images: int = 0  # per dataset; 0 = all
    seed: int = 0
    strict_images: bool = False  # raise on an undecodable image or video instead of skipping and counting it
    video: VideoSampling | None = None  # how video records are sampled (config data.video; None = the defaults)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"config field score.mode={self.mode!r}: choose one of {MODES}")
        if self.mode == "sample_mean" and (self.temperature <= 0 or self.num_samples < 1):
            raise ConfigError("score.mode='sample_mean' needs score.temperature > 0 and score.num_samples >= 1")
        if self.batch_size < 1:
            raise ConfigError(f"config field data.batch_size={self.batch_size} must be >= 1")

    @property
    def user_text(self) -> str:
        return self.prompt_text or prompts.prompt_text(self.prompt)

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


def _batches(items, size: int):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


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


def _level_rows(model, proc: Processor, batch, good, level_ids, mesh) -> list[dict]:
    scores, probs = scoring.level_score(scoring.answer_logits(model, batch, level_ids, mesh)[: len(good)])
    return [
        {**_base_row(i, record), "score": float(score), "level_probs": p.tolist()}
        for (i, record, _), score, p in zip(good, scores, probs)
    ]


def _decoded_rows(generate_fn, model, proc: Processor, batch, good, settings: EvalSettings, rng):
    """(rows, per-completion description checks, per-completion scores) of one batch scored by decoding."""
    sampled = settings.mode == "sample_mean"
    completions = scoring.generate_completions(
        generate_fn,
        model,
        proc,
        batch,
        num_prompts=len(good),
        max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature if sampled else 0.0,
        top_k=settings.top_k,
        top_p=settings.top_p,
        num_samples=settings.num_samples if sampled else 1,
        rng=rng if sampled else None,
        num_ratings=settings.num_ratings,
        pad_with_first=settings.pad_with_first,
    )
    rows, checks, sample_scores = [], [], []
    for (i, record, _), samples in zip(good, completions):
        row = _base_row(i, record)
        scores = np.asarray([c.score for c in samples], np.float64)
        first = samples[0]
        row.update(
            score=float(np.nanmean(scores)) if np.isfinite(scores).any() else float("nan"),
            response=first.text,
            format_ok=first.format_ok,
            level=descriptions.level_word(first.level),
            answer_count=first.count,
        )
        if sampled:
            row.update(sample_scores=scores.tolist(), responses=[c.text for c in samples])
        rows.append(row)
        sample_scores += scores.tolist()
        checks += [
            descriptions.check_response(c.text, row["dataset"], row["distortion_type"], c.score, c.level)
            for c in samples
        ]
    return rows, checks, sample_scores


def evaluate_source(
    model, proc: Processor, source, spec: str, settings: EvalSettings, *, mesh, generate_fn=None, seed_offset: int = 0
) -> tuple[list[dict], dict]:
    """Scores one dataset: (one prediction row per image, a summary with metrics and description checks)."""
    from qponder_jax import sampling

    generate_fn = generate_fn or sampling.generate
    level = settings.mode == "level"
    rows, checks, skipped, sample_scores = [], [], [], []
    level_ids = level_info = prefix_ids = None
    if level:
        level_ids, level_info = scoring.level_token_ids(
            proc.tokenizer, settings.level_prefix, policy=settings.level_token_policy
        )
        prefix_ids = proc.tokenizer.encode(settings.level_prefix, add_special_tokens=False)
    text = settings.level_prompt if level else settings.user_text
    key = jax.random.fold_in(jax.random.key(settings.seed), seed_offset)
    for batch_index, items in enumerate(_batches(_records(source, settings, spec), settings.batch_size)):
        good = [(i, r, inputs) for i, r, inputs in items if inputs is not None]
        skipped += [_skipped_row(i, r) for i, r, inputs in items if inputs is None]
        if not good:
            continue
        examples = [_encode(proc, text, record, inputs, f"{spec}[{i}]") for i, record, inputs in good]
        if level:  # the answer prefix follows the assistant header; the level word would come next
            examples = [scoring.append_tokens(ex, prefix_ids) for ex in examples]
        batch = proc.collate(examples, padding_side="left", batch_size=settings.batch_size)
        if level:
            rows += _level_rows(model, proc, batch, good, level_ids, mesh)
            continue
        rng = jax.random.fold_in(key, batch_index)
        batch_rows, batch_checks, batch_scores = _decoded_rows(generate_fn, model, proc, batch, good, settings, rng)
        rows += batch_rows
        checks += batch_checks
        sample_scores += batch_scores
    return rows, _summarize(rows, checks, sample_scores, skipped, settings, level_info)


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
    summary: dict[str, Any] = iqa_metrics(pred, mos).as_dict() if rows else {}
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
        results[spec] = summary
        if writer:
            stem = reporting.file_stem(spec)
            reporting.write_predictions(out / "predictions" / f"{stem}.jsonl", rows)
            pred, mos = reporting.score_arrays(rows) if rows else (np.zeros(0), np.zeros(0))
            reporting.scatter_plot(out / "plots" / f"{stem}.png", pred, mos, title=f"{title}: {spec}")
        logging.info("%s: %s", spec, {k: summary.get(k) for k in ("srcc", "plcc", "parse_failure_rate", "images")})
    mode_note = {
        "greedy": "Scores: greedy decoding; the answer's number"
        + (f"s (the mean of the first {settings.num_ratings})." if settings.num_ratings > 1 else "."),
        "sample_mean": f"Scores: mean over {settings.num_samples} samples at temperature {settings.temperature}.",
        "level": f"Scores: Q-Align level scoring after {settings.level_prefix!r} (softmax over the five level tokens, "
        "dotted with 1..5).",
    }[settings.mode]
    all_notes = (*notes, mode_note, reporting.METRIC_NOTE)
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


def open_source(spec: str, data: Mapping, *, workdir: str | Path | None = None):
    """A random-access source for "name:split" ("synthetic:test", "koniq10k:test", "csiq" = all of CSIQ, "lsvq:test").
    "synthetic_vqa" missing from data.data_dir (or with no data_dir) is built into `<workdir>/data/tfds` first."""
    from qponder_jax.data import datasets

    name, _, split = spec.partition(":")
    if name in datasets.VIDEO_DATASETS:
        return datasets.load(name, split or "all", data_dir=video_inputs.video_data_dir(name, data, workdir))
    if name == "synthetic":
        return SyntheticIQA(
            split or "test",
            size=int(data["synthetic_size"]) or None,
            seed=int(data["synthetic_seed"]),
            min_side=int(data["synthetic_min_side"]),
            max_side=int(data["synthetic_max_side"]),
            distortions=str(data.get("synthetic_distortions", "")),
        )
    if not data["data_dir"]:
        raise ConfigError(
            f"dataset {spec!r} needs config field data.data_dir: the tfds folder where "
            f"`qponder_jax.data.datasets.build({name!r}, ...)` wrote it"
        )
    return datasets.load(name, split or "all", data_dir=data["data_dir"])


def make_processor(tokenizer_dir: Path, data: Mapping) -> Processor:
    """The processor of `tokenizer_dir` with the config's buckets and pixel limits."""
    buckets = Buckets(
        tokens=tuple(data["token_buckets"]), patches=tuple(data["patch_buckets"]), images=tuple(data["image_buckets"])
    )
    proc = Processor.from_pretrained(tokenizer_dir, buckets=buckets, truncation=bool(data["truncation"]))
    changes = {k: int(data[k]) for k in ("min_pixels", "max_pixels") if int(data[k])}
    if changes:
        proc.image_config = dataclasses.replace(proc.image_config, **changes)
    return proc


def run(config, workdir: str | Path) -> dict:
    """The `eval` job (configs/eval.py)."""
    from qponder_jax.export import load_checkpoint

    workdir = Path(workdir)
    settings = EvalSettings.from_config(config.score, config.data)
    sources = {spec: open_source(spec, config.data, workdir=workdir) for spec in dataset_specs(config)}  # fail fast
    mesh = sharding.make_mesh(tuple(config.mesh))
    loaded = load_checkpoint(config.checkpoint, model_cfg=config.model, workdir=workdir, mesh=mesh, step=config.step)
    proc = make_processor(loaded.tokenizer_dir, config.data)
    notes = (reporting.PROTOCOLS[config.protocol][1],) if config.protocol in reporting.PROTOCOLS else ()
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
