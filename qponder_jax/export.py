"""The `export` job: an orbax training run out as a Hugging Face folder that transformers loads.

    export_checkpoint(run_dir, out_dir, model_cfg=config.model, mesh=mesh)  # orbax -> safetensors + configs + card

The run is loaded with `loading.load_checkpoint` (parameters only, restored sharded over `mesh`). Export gathers
one tensor at a time (`hf.save_hf`), writes the tokenizer / preprocessor / generation config of the base folder, a
README.md model card with the run's training config and eval numbers when present, and `qponder_scoring.json` (how
the run prompted and scored the model, for `Scorer.from_pretrained`) when the run's config says.

The folder always holds exactly one model. Everything is written into the sibling `<out_dir>.partial`, which then
replaces `out_dir` by renaming (`_swap_in`): no stale weights of an earlier export survive next to the new ones, and
a crash mid-export leaves `out_dir` as it was (the half-written folder is only ever called `.partial`). A non-empty
`out_dir` that is not an earlier export (its model card carries `EXPORT_MARK`) is refused unless `overwrite`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np

from qponder_jax.errors import ConfigError
from qponder_jax.loading import CHECKPOINTS, LoadedModel, checkpoint_dir, load_checkpoint, read_run_config
from qponder_jax.model import sharding
from qponder_jax.scorer import write_scoring_record

_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
EXPORT_MARK = "(qponder_jax export)"  # in the model card's title: marks a folder a later export may replace


# ---- the model card ----


def latest_eval_report(run_dir: Path) -> Path | None:
    """The newest `report.json` written by the eval job under `run_dir` (any sub-folder), or None."""
    reports = [p for p in run_dir.glob("*/report.json") if p.is_file()]
    return max(reports, key=lambda p: p.stat().st_mtime) if reports else None


def model_card(loaded: LoadedModel, *, run_config: dict | None, eval_report: dict | None) -> str:
    """README.md text: what the folder is, how to load it, the training config and eval numbers (when known)."""
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: image-text-to-text",
        "tags: [image-quality-assessment, qwen2_5_vl, q-ponder]",
        "---",
        "",
        f"# Q-Ponder image quality model {EXPORT_MARK}",
        "",
        "A Qwen2.5-VL model fine-tuned for reasoning-based image quality assessment: it writes its reasoning in "
        "`<think> </think>`, then a quality score from 1 (bad) to 5 (excellent) in `<answer> </answer>`.",
        "",
        f"- Exported from: `{loaded.run_dir}` (orbax checkpoint, step {loaded.step})",
        f"- Architecture and tokenizer of: `{loaded.base_dir}`",
        f"- Text layers: {loaded.config.text.num_hidden_layers}, hidden size {loaded.config.text.hidden_size}, "
        f"vision depth {loaded.config.vision.depth}",
        "",
        "Load it with transformers: `Qwen2_5_VLForConditionalGeneration.from_pretrained(path)` and "
        "`AutoProcessor.from_pretrained(path)`; or with qponder_jax: `qponder_jax.hf.load_hf(path)`.",
        "",
    ]
    if eval_report:
        lines += ["## Evaluation", "", eval_report.get("table_markdown", "").strip(), ""]
    if run_config:
        lines += ["## Training config", "", "```json", json.dumps(run_config, indent=2, sort_keys=True), "```", ""]
    return "\n".join(lines)


# ---- the target folder ----


def is_export(folder: Path) -> bool:
    """True when `folder` holds an earlier export of this job (its README.md model card carries `EXPORT_MARK`)."""
    card = folder / "README.md"
    return card.is_file() and EXPORT_MARK in card.read_text(encoding="utf-8", errors="replace")[:1000]


def check_target(out: Path, *, overwrite: bool = False) -> None:
    """Raises ConfigError when `out` cannot take an export: a file, a non-empty folder that is not an earlier export
    (unless `overwrite`), or a place that cannot be written. Cheap; runs before the checkpoint is loaded."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"config field out_dir={str(out)!r} is a file; the export needs a folder")
    if out.is_dir() and not overwrite and any(out.iterdir()) and not is_export(out):
        raise ConfigError(
            f"config field out_dir={str(out)!r} is a non-empty folder that is not an earlier qponder_jax export; an "
            "export replaces the whole folder. Pick a new or empty folder, or pass --config.overwrite=True"
        )
    parent = out.parent.absolute()
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"config field out_dir={str(out)!r}: cannot write in {parent} (read-only or no permission)")


def _swap_in(staging: Path, out: Path) -> None:
    """Replaces `out` by the complete folder `staging` with two renames. A crash between them leaves no `out` and the
    previous export in `<out>.old` (removed by the next export), never a half-written `out`."""
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    try:
        staging.rename(out)
    except OSError:
        if old.exists():
            old.rename(out)  # the previous export back in place
        raise
    shutil.rmtree(old, ignore_errors=True)


def export_checkpoint(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    model_cfg: Mapping,
    mesh: jax.sharding.Mesh,
    step: int = -1,
    dtype: str = "",
    max_shard_bytes: int = 4 * 2**30,
    eval_report: str | Path = "",
    overwrite: bool = False,
) -> LoadedModel:
    """Writes checkpoint `step` of the orbax run in `run_dir` as an HF folder at `out_dir` (see the module docstring);
    returns what was loaded. Every process must call it; only process 0 writes."""
    from qponder_jax.hf import save_hf

    run_dir = Path(run_dir)
    if checkpoint_dir(run_dir) is None:
        raise FileNotFoundError(
            f"{run_dir}: no orbax checkpoints ({CHECKPOINTS}/<step>/) to export; run a training job "
            "(e.g. qponder --config=configs/qponder_ci.py:tiny) with this workdir first, or point "
            "--config.checkpoint at a training workdir"
        )
    if dtype and dtype not in _DTYPES:
        raise ConfigError(f"config field dtype={dtype!r}: choose one of {sorted(_DTYPES)} or '' (the parameters')")
    out = Path(out_dir)
    check_target(out, overwrite=overwrite)
    staging = out.with_name(out.name + ".partial")
    writer = jax.process_index() == 0
    if writer:
        shutil.rmtree(staging, ignore_errors=True)  # left by an export that crashed
        try:
            staging.mkdir(parents=True)
        except OSError as e:
            raise ConfigError(f"config field out_dir={str(out)!r}: cannot create {staging} ({e.strerror})") from None
    try:
        loaded = load_checkpoint(run_dir, model_cfg=model_cfg, workdir=run_dir, mesh=mesh, step=step)
        save_hf(
            loaded.model,
            loaded.config,
            staging,
            tokenizer_dir=loaded.tokenizer_dir,
            dtype=_DTYPES[dtype] if dtype else None,
            max_shard_bytes=max_shard_bytes,
        )
        if writer:
            report_path = Path(eval_report) if eval_report else latest_eval_report(loaded.run_dir)
            report = json.loads(report_path.read_text()) if report_path and report_path.is_file() else None
            run_config = read_run_config(loaded.run_dir)
            card = model_card(loaded, run_config=run_config, eval_report=report)
            (staging / "README.md").write_text(card, encoding="utf-8")
            write_scoring_record(staging, run_config, source=f"{loaded.run_dir} (step {loaded.step})")  # for Scorer
            _swap_in(staging, out)
    finally:
        if writer:
            shutil.rmtree(staging, ignore_errors=True)  # only still there when the export failed
    return loaded


def run(config: Any, workdir: str | Path) -> dict:
    """The `export` job (configs/export.py)."""
    mesh = sharding.make_mesh(tuple(config.mesh))
    run_dir = Path(config.checkpoint or workdir)
    out = Path(config.out_dir) if config.out_dir else Path(workdir) / "hf"
    loaded = export_checkpoint(
        run_dir,
        out,
        model_cfg=config.model,
        mesh=mesh,
        step=int(config.step),
        dtype=config.dtype,
        max_shard_bytes=int(config.max_shard_gb * 2**30),
        eval_report=config.eval_report,
        overwrite=bool(config.overwrite),
    )
    print(f"exported step {loaded.step} of {run_dir} to {out}", flush=True)
    return {"out_dir": str(out), "step": loaded.step}
