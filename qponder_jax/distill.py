"""The `distill` job: cold-start JSONL from a teacher (the data of Q-Ponder-CI).

    qponder --config=configs/distill.py:teacher --workdir=runs/distill_72b \
        --config.model.model_path=/ckpt/Qwen2.5-VL-72B-Instruct --config.data.datasets=koniq10k:train \
        --config.data.data_dir=/data/tfds

The teacher is any local HF-format Qwen2.5-VL folder (or an orbax workdir), loaded sharded over the mesh and run
through our sampler. It sees the expert prompt (`teacher_prompt`, with the image's MOS as a hint through `{mos}`);
the JSONL stores the *student* prompt (`student_prompt`), so the student never sees the MOS.

A teacher output is kept when it passes the cold-start filter (`data.cold_start_filter.judge`, shared with the demo):
it parses, holds `num_ratings` numbers, names a level word (when `require_level`), and its score lies in [1, 5] and
within `tolerance` of the MOS. Otherwise the image is sampled again, `samples_per_round` at a time, up to
`max_samples` samples; then it is dropped and counted. Each rejected sample is counted by its first failed check.

Outputs in `out_dir`: `cold_start.jsonl` (read directly by the SFT job: `datasets.ColdStartSource`), the kept
images under `images/`, and `summary.json` (acceptance rates, rejections by reason, examples of rejected outputs).
The JSONL is written as `cold_start.jsonl.partial` and renamed only when the run succeeds: a teacher that never
produces a valid answer ends with `DistillError` (after `abort_after` images with none kept, or at the end), never
with an empty file that looks like success.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import jax
from absl import logging

from qponder_jax import prompts
from qponder_jax.data.cold_start_filter import REASONS, judge
from qponder_jax.data.datasets import ColdStartRecord, ColdStartWriter, decode_image
from qponder_jax.errors import ConfigError
from qponder_jax.evaluation import scoring

MAX_REJECTED_EXAMPLES = 20

# (records, left-padded prompt batch, samples per record, PRNG key) -> texts [len(records)][samples]
TextSampler = Callable[[Sequence[dict], object, int, jax.Array], list[list[str]]]


class DistillError(ConfigError):
    """The teacher produced too few valid answers; the message says what was rejected and what to change."""


@dataclasses.dataclass(frozen=True)
class DistillSettings:
    teacher_prompt: str = prompts.TEACHER  # the expert prompt; `{mos}` is replaced by the MOS hint
    student_prompt: str = prompts.QPONDER  # the prompt stored in the JSONL (what the student is trained with)
    tolerance: float = 0.5  # keep a sample when |teacher score - MOS| <= tolerance
    num_ratings: int = 1  # numbers the answer must hold (their mean is the score)
    require_level: bool = True  # the reasoning must name a level word (bad .. excellent)
    max_samples: int = 4  # samples per image before it is dropped
    samples_per_round: int = 1  # samples drawn per image per round
    max_new_tokens: int = 512
    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 1.0
    batch_size: int = 8
    max_images: int = 0  # per dataset; 0 = all
    abort_after: int = 64  # stop with DistillError when this many images gave no valid answer and none was kept
    min_acceptance_rate: float = 0.0  # fail when the share of kept images ends below this
    seed: int = 0

    def __post_init__(self):
        if "{mos" not in self.teacher_prompt:
            raise ConfigError("config field teacher_prompt must contain '{mos}' (or a format like '{mos:.2f}')")
        if self.max_samples < 1 or self.samples_per_round < 1:
            raise ConfigError("config fields max_samples and samples_per_round must be >= 1")
        if self.temperature <= 0 and self.max_samples > 1:
            raise ConfigError(
                f"config field temperature={self.temperature}: retries (max_samples={self.max_samples}) need "
                "temperature > 0, a greedy teacher repeats its answer"
            )
        if self.tolerance < 0:
            raise ConfigError(f"config field tolerance={self.tolerance} must be >= 0")

    def teacher_text(self, mos: float) -> str:
        return self.teacher_prompt.format(mos=float(mos))


def model_sampler(model, proc, settings: DistillSettings, generate_fn=None) -> TextSampler:
    """A TextSampler running `model` through `generate_fn` (default: the jitted sampler)."""
    from qponder_jax import sampling

    generate_fn = generate_fn or sampling.generate

    def sample(records, batch, num_samples, key):
        completions = scoring.generate_completions(
            generate_fn,
            model,
            proc,
            batch,
            num_prompts=len(records),
            max_new_tokens=settings.max_new_tokens,
            temperature=settings.temperature,
            top_k=settings.top_k,
            top_p=settings.top_p,
            num_samples=num_samples,
            rng=key if settings.temperature > 0 else None,
            num_ratings=settings.num_ratings,
        )
        return [[c.text for c in samples] for samples in completions]

    return sample


def rule_sampler(records, batch, num_samples, key) -> list[list[str]]:
    """The synthetic set's rule-based teacher (`data.rule_teacher`) as a TextSampler: no model, exact MOS."""
    from qponder_jax.data.rule_teacher import response_for

    texts = [response_for(r["distortion_type"], int(r["distortion_level"]), float(r["mos"])) for r in records]
    return [[t] * num_samples for t in texts]


def _image_suffix(data: bytes) -> str:
    return ".png" if data[:8] == b"\x89PNG\r\n\x1a\n" else (".jpg" if data[:2] == b"\xff\xd8" else "")


def save_image(record: dict, index: int, folder: Path) -> Path:
    """Writes the record's image under `folder/<dataset>/` (original bytes for PNG / JPEG, else PNG); its path."""
    data = record["image"]
    name = Path(record.get("image_name") or f"{index:07d}.png")
    parts = [p for p in name.parts if p not in ("", ".", "..", "/")]
    dataset = record.get("dataset") or "images"
    if parts[0] != dataset:
        parts.insert(0, dataset)
    suffix = _image_suffix(data)
    path = folder / Path(*parts).with_suffix(suffix or ".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix:
        path.write_bytes(data)
    else:
        buffer = io.BytesIO()
        decode_image(data).save(buffer, format="PNG")
        path.write_bytes(buffer.getvalue())
    return path


@dataclasses.dataclass
class DistillStats:
    images: int = 0
    kept: int = 0
    dropped: int = 0
    skipped_images: int = 0
    samples: int = 0
    rejections: Counter = dataclasses.field(default_factory=Counter)
    rejected_examples: list = dataclasses.field(default_factory=list)

    def summary(self) -> dict:
        return {
            "images": self.images,
            "kept": self.kept,
            "dropped": self.dropped,
            "skipped_images": self.skipped_images,
            "acceptance_rate": self.kept / self.images if self.images else None,
            "samples": self.samples,
            "sample_acceptance_rate": self.kept / self.samples if self.samples else None,
            "rejections": {r: int(self.rejections[r]) for r in REASONS},
            "rejected_examples": self.rejected_examples,
        }


def _failure_message(stats: DistillStats, settings: DistillSettings, where: str) -> str:
    counts = ", ".join(f"{r}: {stats.rejections[r]}" for r in REASONS if stats.rejections[r])
    example = stats.rejected_examples[0]["text"][:300] if stats.rejected_examples else ""
    return (
        f"distill: {where}: the teacher gave a valid answer for {stats.kept} of {stats.images} images "
        f"({stats.samples} samples; rejected by {counts or 'nothing'}). A valid answer has <think>...</think> with a "
        f"level word, then <answer>{'score' if settings.num_ratings == 1 else f'{settings.num_ratings} numbers'}"
        f"</answer> within {settings.tolerance} of the MOS. First rejected output: {example!r}. Check the teacher "
        "(config field model.model_path), its prompt (teacher_prompt), tolerance and max_samples. No cold-start "
        "file was published."
    )


def _encode_chunk(source, spec: str, indices, proc, settings: DistillSettings, stats: DistillStats) -> list:
    """(index, record, encoded teacher prompt) for each decodable image of `indices`; the others are counted."""
    items = []
    for i in indices:
        record = source[i]
        try:
            image = decode_image(record["image"])
        except (OSError, ValueError) as e:
            logging.warning("%s: skipping image %d (%s): %s", spec, i, record.get("image_name", ""), e)
            stats.skipped_images += 1
            continue
        messages = prompts.image_messages(settings.teacher_text(record["mos"]))
        items.append((i, record, proc.encode(messages, [image], add_generation_prompt=True, example_id=f"{spec}[{i}]")))
    return items


def _judge_samples(spec, i, record, samples, settings, writer, image_dir, stats) -> bool:
    """Keeps (writes) the first valid sample of one image; counts the rejected ones before it. True if kept."""
    stats.samples += len(samples)  # drawn, whether or not judged
    for text in samples:
        reason, score = judge(
            text,
            float(record["mos"]),
            tolerance=settings.tolerance,
            num_ratings=settings.num_ratings,
            require_level=settings.require_level,
        )
        if reason == "ok":
            if writer is not None:
                path = save_image(record, i, image_dir)
                writer.write(_cold_start_record(record, path, text, score, settings))
            return True
        stats.rejections[reason] += 1
        if len(stats.rejected_examples) < MAX_REJECTED_EXAMPLES:
            stats.rejected_examples.append(
                {"dataset": spec, "index": i, "mos": float(record["mos"]), "reason": reason, "text": text}
            )
    return False


def distill_source(
    source, spec: str, sampler: TextSampler, proc, settings: DistillSettings, writer, image_dir: Path,
    stats: DistillStats, *, seed_offset: int = 0,
) -> None:  # fmt: skip
    """Distills one dataset into `writer` (None on processes other than 0), updating `stats`."""
    n = len(source) if not settings.max_images else min(len(source), settings.max_images)
    key = jax.random.fold_in(jax.random.key(settings.seed), seed_offset)
    for chunk, start in enumerate(range(0, n, settings.batch_size)):
        pending = _encode_chunk(source, spec, range(start, min(start + settings.batch_size, n)), proc, settings, stats)
        stats.images += len(pending)
        drawn = 0
        while pending and drawn < settings.max_samples:  # one round: every pending image gets `num` more samples
            num = min(settings.samples_per_round, settings.max_samples - drawn)
            batch = proc.collate([ex for _, _, ex in pending], padding_side="left", batch_size=settings.batch_size)
            texts = sampler([r for _, r, _ in pending], batch, num, jax.random.fold_in(key, chunk * 1000 + drawn))
            drawn += num
            kept = [
                _judge_samples(spec, i, r, t, settings, writer, image_dir, stats)
                for (i, r, _), t in zip(pending, texts)
            ]
            stats.kept += sum(kept)
            pending = [item for item, ok in zip(pending, kept) if not ok]
        stats.dropped += len(pending)
        if stats.kept == 0 and stats.images >= settings.abort_after:
            raise DistillError(_failure_message(stats, settings, f"stopped early after {stats.images} images"))


def _cold_start_record(record: dict, image_path: Path, text: str, score: float, settings) -> ColdStartRecord:
    return ColdStartRecord(
        image=str(image_path),
        prompt=settings.student_prompt,
        response=text.strip(),
        mos=float(record["mos"]),
        dataset=str(record.get("dataset", "")),
        distortion_type=str(record.get("distortion_type", "")),
        distortion_level=int(record.get("distortion_level", -1)),
        teacher_score=float(score),
    )


def distill(
    sources: Mapping[str, object],
    sampler: TextSampler,
    proc,
    settings: DistillSettings,
    out_dir: str | Path,
    *,
    info: Mapping | None = None,
) -> dict:
    """Runs the teacher over every source; writes cold_start.jsonl, images/ and summary.json to `out_dir`. Returns the
    summary; raises DistillError when too few answers were valid (the JSONL then stays `.partial`)."""
    out = Path(out_dir)
    final = out / "cold_start.jsonl"
    partial = out / "cold_start.jsonl.partial"
    writer_process = jax.process_index() == 0
    if writer_process:
        out.mkdir(parents=True, exist_ok=True)
        final.unlink(missing_ok=True)
    stats = DistillStats()
    writer = ColdStartWriter(partial) if writer_process else None
    status, error = "interrupted", None
    try:
        for k, (spec, source) in enumerate(sources.items()):
            distill_source(source, spec, sampler, proc, settings, writer, out / "images", stats, seed_offset=k)
        rate = stats.kept / stats.images if stats.images else 0.0
        if stats.kept == 0 or rate < settings.min_acceptance_rate:
            where = "finished" if stats.kept else "finished with no valid answer"
            if stats.kept:
                where += f" below min_acceptance_rate={settings.min_acceptance_rate}"
            raise DistillError(_failure_message(stats, settings, where))
        status = "ok"
    except DistillError as e:
        status, error = "failed", str(e)
        raise
    finally:
        if writer is not None:
            writer.close()
        summary = {"status": status, "error": error, **stats.summary(), "settings": dataclasses.asdict(settings)}
        summary["jsonl"] = str(final if status == "ok" else partial)
        summary.update(dict(info or {}))
        if writer_process:
            if status == "ok":
                partial.replace(final)
            (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return summary


def run(config, workdir: str | Path) -> dict:
    """The `distill` job (configs/distill.py)."""
    from qponder_jax.data.sources import open_source
    from qponder_jax.loading import load_checkpoint, make_processor
    from qponder_jax.model import sharding

    workdir = Path(workdir)
    settings = DistillSettings(
        **{f.name: config[f.name] for f in dataclasses.fields(DistillSettings) if f.name in config}
    )
    specs = [s.strip() for s in config.data.datasets.split(",") if s.strip()]
    if not specs:
        raise ConfigError("config field data.datasets is empty; name the records to distill, e.g. 'koniq10k:train'")
    sources = {spec: open_source(spec, config.data) for spec in specs}
    if config.teacher == "rule":
        from qponder_jax.embedded import resolve_model_dir

        _, tok_dir = resolve_model_dir(config.model, workdir)
        sampler, info = rule_sampler, {"teacher": "rule-based (synthetic set)"}
    elif config.teacher == "model":
        mesh = sharding.make_mesh(tuple(config.mesh))
        loaded = load_checkpoint(config.checkpoint, model_cfg=config.model, workdir=workdir, mesh=mesh, step=-1)
        tok_dir = loaded.tokenizer_dir
        sampler = None
        info = {"teacher": str(config.checkpoint or loaded.base_dir)}
    else:
        raise ConfigError(f"config field teacher={config.teacher!r}: choose 'model' or 'rule'")
    proc = make_processor(tok_dir, config.data)
    if sampler is None:
        from qponder_jax import sampling

        layout = str(config.get("sampling_layout", "auto"))  # the sampler's weight layout (model/sharding.py)
        sampler = model_sampler(loaded.model, proc, settings, functools.partial(sampling.generate, layout=layout))
    out = Path(config.out_dir) if config.out_dir else workdir / "cold_start"
    summary = distill(sources, sampler, proc, settings, out, info=info)
    if jax.process_index() == 0:
        print(
            f"distill: kept {summary['kept']} of {summary['images']} images "
            f"({100 * summary['acceptance_rate']:.1f}%, {summary['samples']} samples); rejections "
            f"{summary['rejections']}; cold-start JSONL: {summary['jsonl']}",
            flush=True,
        )
    return summary
