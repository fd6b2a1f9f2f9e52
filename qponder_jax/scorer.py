"""Score your own images with a Q-Ponder checkpoint: load once, score many.

    from qponder_jax import Scorer
    scorer = Scorer.from_pretrained("runs/demo/7_export/hf")   # an HF folder or an orbax training workdir
    results = scorer(["a.jpg", pil_image])                      # list[ScoreResult], in input order
    results[0].score, results[0].reasoning                      # NaN when the answer held no number
    scorer.score_range, scorer.lower_better                     # (1.0, 5.0), False

Images go through the eval job's scoring path (`evaluation.image_scoring`), so both give the same numbers: batched
by bucket, each batch `batch_size` rows, so greedy and level scores do not depend on the other images of a call.

How a model wants to be prompted travels with it: the export job writes `qponder_scoring.json` into the HF folder
(`scoring_record`: the training run's prompt, answer length, numbers per score, image size limits and buckets); for
an orbax workdir the same record comes from the run's config.json. `from_pretrained`'s keyword arguments override
it; without either, `ScoreSettings`' defaults (the "qponder" prompt) and buckets that fit any image up to the
processor's `max_pixels`. One process; the model is placed over all its devices (mesh (1, -1, 1)).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from qponder_jax import prompts, sampling
from qponder_jax.data.datasets.images import ImageError, decode_image, to_rgb8
from qponder_jax.data.example import Buckets
from qponder_jax.data.processing import Processor
from qponder_jax.evaluation.image_scoring import BatchScorer, ImageScore, ScoreSettings
from qponder_jax.metrics import iqa_metrics

SCORING_FILE = "qponder_scoring.json"  # in an exported HF folder: how to prompt and score the model
PROCESSING_KEYS = ("min_pixels", "max_pixels", "token_buckets", "patch_buckets")  # processor fields of the record
_SETTING_NAMES = {f.name for f in dataclasses.fields(ScoreSettings)}


@dataclasses.dataclass(frozen=True)
class ScoreResult:
    """One image's score."""

    score: float  # the answer's number (mean over samples in sample_mean); NaN when unparsed or skipped
    parsed: bool  # the answer held a number
    in_range: bool  # the score lies within `Scorer.score_range` (out-of-range scores are kept, never clipped)
    level: str  # the reasoning's level word, bad .. excellent ("" when none; level mode: the most likely level)
    reasoning: str  # the first <think> block of the response (the whole response when it has none)
    response: str  # the model's full (first) response; "" in level mode
    source: str = ""  # the file path, or "<image i>" for an in-memory image
    error: str = ""  # why the image was skipped (unreadable); "" when scored
    sample_scores: tuple[float, ...] = ()  # sample_mean: each sample's score
    level_probs: tuple[float, ...] | None = None  # level mode: probabilities of bad .. excellent

    @classmethod
    def of(cls, result: ImageScore, source: str, *, sampled: bool = False) -> ScoreResult:
        return cls(
            score=result.score,
            parsed=result.parsed,
            in_range=result.in_range,
            level=result.level,
            reasoning=result.reasoning,
            response=result.response,
            source=source,
            sample_scores=tuple(c.score for c in result.samples) if sampled else (),
            level_probs=result.level_probs,
        )

    @classmethod
    def skipped(cls, source: str, reason: str) -> ScoreResult:
        return cls(math.nan, False, False, "", "", "", source=source, error=reason)


# ---- the scoring record that travels with a model ----


def scoring_record(run_config: Mapping | None) -> dict[str, Any]:
    """How a model trained by the run with this config (qponder's config.json) is prompted and scored: {} when the
    config cannot say (e.g. SFT on a JSONL whose records carry their own prompts)."""
    if not run_config:
        return {}
    data, job = dict(run_config.get("data") or {}), run_config.get("job")
    record: dict[str, Any] = {}
    prompt_text = data.get("prompt_text") or prompts.PROMPTS.get(str(data.get("prompt", "")), "")
    if job == "grpo":
        g = dict(run_config.get("grpo") or {})
        record.update(prompt_text=prompt_text, max_new_tokens=int(g.get("max_new_tokens", 256)))
        record.update(num_ratings=int(g.get("score_numbers", 1)), pad_with_first=True)  # the reward's scoring rule
        if g.get("score_range"):
            record["score_range"] = [float(x) for x in g["score_range"]]
    elif job == "sft" and data.get("source") == "synthetic" and prompt_text:
        record["prompt_text"] = prompt_text
    else:
        return {}
    record.update({k: int(data[k]) for k in ("min_pixels", "max_pixels") if data.get(k)})
    record.update({k: [int(x) for x in data[k]] for k in ("token_buckets", "patch_buckets") if data.get(k)})
    return record


def write_scoring_record(out_dir: str | Path, run_config: Mapping | None, *, source: str = "") -> Path | None:
    """Writes `<out_dir>/qponder_scoring.json` from the training run's config; its path, or None when the config
    cannot say (nothing written)."""
    record = scoring_record(run_config)
    if not record:
        return None
    path = Path(out_dir) / SCORING_FILE
    path.write_text(json.dumps({**record, "written_from": source}, indent=2) + "\n", encoding="utf-8")
    return path


def read_scoring_record(folder: Path) -> dict[str, Any]:
    """The scoring record of an HF folder ({} when it has none)."""
    path = folder / SCORING_FILE
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(record, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return record


# ---- images ----


def default_buckets(proc: Processor) -> Buckets:
    """Buckets for any image up to the processor's max_pixels: patch rows 64, 256, ... (x4) and prompt lengths
    128, 256, ... (x2), each ladder up to the largest image plus room for the text."""
    cfg = proc.image_config
    max_patches = max(cfg.max_pixels // cfg.patch_size**2, 64)
    patches = [64]
    while patches[-1] < max_patches:
        patches.append(patches[-1] * 4)
    tokens = [128]
    while tokens[-1] < max_patches // cfg.merge_size**2 + 512:
        tokens.append(tokens[-1] * 2)
    return Buckets(tokens=tuple(tokens), patches=tuple(patches), images=(1,))


def load_image(item) -> Image.Image:
    """A path (str / PathLike), PIL image or HxWx3 uint8 array as 8-bit RGB; raises ImageError naming the input."""
    if isinstance(item, Image.Image):
        return to_rgb8(item)
    if isinstance(item, np.ndarray):
        try:
            return to_rgb8(Image.fromarray(item))
        except (TypeError, ValueError) as e:
            raise ImageError(f"<array {item.shape} {item.dtype}>", f"not an image array ({e})") from e
    if not isinstance(item, str | os.PathLike):
        raise TypeError(f"cannot score a {type(item).__name__}: give a path, a PIL image or an HxWx3 uint8 array")
    try:
        data = Path(item).read_bytes()
    except OSError as e:
        raise ImageError(item, f"cannot read the file ({e.strerror or e})") from e
    try:
        return decode_image(data)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(item, f"not a decodable image ({e})") from e


def _source(item, index: int) -> str:
    return str(item) if isinstance(item, str | os.PathLike) else f"<image {index}>"


class Scorer:
    """A loaded model that scores images (see the module docstring)."""

    lower_better = False  # higher scores mean better quality

    def __init__(
        self, model, proc: Processor, settings: ScoreSettings, *, mesh, info: Mapping | None = None, generate_fn=None
    ):
        self.model, self.processor, self.settings, self.mesh = model, proc, settings, mesh
        self.info = dict(info or {})  # where the model came from
        self._batches = BatchScorer(model, proc, settings, mesh=mesh, generate_fn=generate_fn)

    @property
    def score_range(self) -> tuple[float, float]:
        return self.settings.score_range

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        mode: str = "greedy",
        *,
        step: int = -1,
        dtype: str = "float32",
        attn_impl: str = "xla",
        mesh=None,
        layout: str = "auto",
        **overrides,
    ) -> Scorer:
        """Loads an HF folder or an orbax training workdir (its checkpoint `step`, -1 = the latest). `overrides`:
        any `ScoreSettings` field (batch_size, prompt, prompt_text, max_new_tokens, num_samples, temperature, seed,
        score_range, ...; None = the model's own) and the processor's min_pixels, max_pixels, token_buckets,
        patch_buckets. batch_size is rounded up to a multiple of the mesh's ('data', 'fsdp') devices. layout: the
        sampler's weight layout ("auto", "decode", "decode:T" or "train"; `model.sharding.choose_layout`)."""
        from qponder_jax.loading import load_checkpoint, read_run_config
        from qponder_jax.model import sharding

        sharding.parse_layout(layout)  # a bad layout fails before the checkpoint loads
        unknown = sorted(set(overrides) - _SETTING_NAMES - set(PROCESSING_KEYS) - {"mode"})
        if unknown:
            raise TypeError(f"Scorer.from_pretrained: unknown settings {unknown}")
        path = Path(path).expanduser()
        mesh = mesh if mesh is not None else sharding.make_mesh((1, -1, 1))
        model_cfg = dict(model_path="", tokenizer_path="", dtype=dtype, param_dtype="float32", remat=False,
                         attn_impl=attn_impl, seed=0)  # fmt: skip
        loaded = load_checkpoint(path, model_cfg=model_cfg, workdir=path, mesh=mesh, step=step)
        record = read_scoring_record(path) if loaded.source == "hf" else scoring_record(read_run_config(loaded.run_dir))
        given = {k: v for k, v in overrides.items() if v is not None}
        if "prompt" in given and "prompt_text" not in given:
            record = {k: v for k, v in record.items() if k != "prompt_text"}  # a named prompt replaces the model's
        chosen = {**record, **given, "mode": mode}
        data_parallel = mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
        chosen["batch_size"] = -(-int(chosen.get("batch_size", 8)) // data_parallel) * data_parallel
        settings = ScoreSettings(**{k: _setting(k, v) for k, v in chosen.items() if k in _SETTING_NAMES})
        proc = Processor.from_pretrained(loaded.tokenizer_dir)
        pixels = {k: int(chosen[k]) for k in ("min_pixels", "max_pixels") if chosen.get(k)}
        proc.image_config = dataclasses.replace(proc.image_config, **pixels)
        axes = {"token_buckets": "tokens", "patch_buckets": "patches"}
        given_buckets = {axis: tuple(int(x) for x in chosen[k]) for k, axis in axes.items() if chosen.get(k)}
        proc.buckets = dataclasses.replace(default_buckets(proc), **given_buckets)
        info = {"path": str(path), "source": loaded.source, "step": loaded.step, "record": record}
        generate_fn = functools.partial(sampling.generate, layout=layout)
        return cls(loaded.model, proc, settings, mesh=mesh, info=info, generate_fn=generate_fn)

    def __call__(self, images: Sequence | Any, *, skip_errors: bool = False) -> list[ScoreResult]:
        """Scores `images` (paths, PIL images or arrays; one alone is fine); results in input order. An unreadable
        image raises ImageError, or with `skip_errors` gets a result with `error` set and a NaN score."""
        items = [images] if isinstance(images, str | os.PathLike | Image.Image | np.ndarray) else list(images)
        results: list[ScoreResult | None] = [None] * len(items)
        for i, result in self.iter_scores(items, skip_errors=skip_errors):
            results[i] = result
        return results

    def iter_scores(self, images: Iterable, *, skip_errors: bool = False) -> Iterator[tuple[int, ScoreResult]]:
        """(input index, result) as each batch finishes (skipped images as soon as they are found)."""
        skipped: list[tuple[int, ScoreResult]] = []
        sources: dict[int, str] = {}

        def prompts_of():
            for i, item in enumerate(images):
                source = _source(item, i)
                try:
                    prompt = self._batches.image_prompt(load_image(item), source)
                    self._batches.bucket_key(prompt)  # raises when no bucket holds it
                except (ImageError, ValueError) as e:  # unreadable, or a size the processor or buckets cannot take
                    if not skip_errors:
                        raise
                    skipped.append((i, ScoreResult.skipped(source, getattr(e, "reason", str(e)))))
                    continue
                sources[i] = source
                yield i, prompt

        for i, result in self._batches.score_stream(prompts_of()):
            yield from skipped
            skipped.clear()
            yield i, ScoreResult.of(result, sources.pop(i), sampled=self.settings.mode == "sample_mean")
        yield from skipped


def _setting(name: str, value):
    return tuple(float(x) for x in value) if name == "score_range" else value


def summarize(results: Sequence[ScoreResult], mos: Sequence[float | None] | None = None) -> dict[str, Any]:
    """Counts, the mean in-range score and, where `mos` gives values, SRCC / PLCC / KRCC against them (over the
    images that parsed in range; MOS taken as given, so MAE is not reported)."""
    scored = [r for r in results if not r.error]
    valid = [r.score for r in scored if r.parsed and r.in_range]
    summary: dict[str, Any] = {
        "images": len(scored),
        "mean_score": float(np.mean(valid)) if valid else math.nan,
        "parse_failures": sum(not r.parsed for r in scored),
        "out_of_range": sum(r.parsed and not r.in_range for r in scored),
        "skipped": [(r.source, r.error) for r in results if r.error],
    }
    if mos is not None:
        pairs = [(r, m) for r, m in zip(results, mos, strict=True) if m is not None and not r.error]
        if pairs:
            m = iqa_metrics([r.score for r, _ in pairs], [m for _, m in pairs], [r.in_range for r, _ in pairs])
            summary["mos"] = {k: getattr(m, k) for k in ("srcc", "plcc", "krcc", "n")}
    return summary


def result_row(result: ScoreResult, mos: float | None = None) -> dict[str, Any]:
    """One prediction line: path, score (None when NaN), flags, level, MOS, error, reasoning, response (+ samples)."""
    row = {
        "image": result.source,
        "score": result.score if math.isfinite(result.score) else None,
        "parsed": result.parsed,
        "in_range": result.in_range,
        "level": result.level,
        "mos": mos,
        "error": result.error,
        "reasoning": result.reasoning,
        "response": result.response,
    }
    if result.sample_scores:
        row["sample_scores"] = [s if math.isfinite(s) else None for s in result.sample_scores]
    if result.level_probs is not None:
        row["level_probs"] = list(result.level_probs)
    return row
