"""Where a job's model comes from: load any model source onto a mesh, and build its processor.

    loaded = load_checkpoint(path, model_cfg=config.model, workdir=workdir, mesh=mesh)  # HF folder or orbax workdir
    proc = make_processor(loaded.tokenizer_dir, config.data)                           # buckets, pixel limits

A model source is either
- a Hugging Face Qwen2.5-VL folder (config.json + safetensors), loaded with `hf.load_hf`, or
- an orbax training workdir (`<dir>/checkpoints/<step>/state`, written by `train.state.Checkpointer`). Only the
  `params` of the train state are restored (the optimizer state is never read), each parameter directly onto its
  sharding over `mesh`: no host ever holds the whole model. The architecture and tokenizer come from the run's
  base HF folder: `model_cfg.model_path` when given, else the `model` section of the run's `<dir>/config.json`
  (written by `qponder`), else the embedded `<dir>/tiny_model`.

This is a library module: the eval, distill, export and grpo jobs and the scorer all load through it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging as std_logging
from collections.abc import Iterator, Mapping
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from qponder_jax import embedded
from qponder_jax.data.processing import Buckets, Processor
from qponder_jax.errors import ConfigError
from qponder_jax.model.config import Qwen25VLConfig
from qponder_jax.model.qwen2_5_vl import Qwen25VL
from qponder_jax.train import state as train_state
from qponder_jax.train.optim import named_leaves

CHECKPOINTS = "checkpoints"
RUN_CONFIG = "config.json"  # qponder writes the run's config here (main._write_config)
TRAINING_JOBS = ("sft", "grpo", "demo")  # jobs whose workdir holds checkpoints of a model section's model


@dataclasses.dataclass
class LoadedModel:
    model: Qwen25VL
    config: Qwen25VLConfig
    tokenizer_dir: Path  # tokenizer + preprocessor folder for `Processor.from_pretrained`
    base_dir: Path  # the HF folder whose config.json describes the architecture
    source: str  # "hf" or "orbax"
    step: int | None = None  # the restored checkpoint step (orbax only)
    run_dir: Path | None = None  # the orbax training workdir (orbax only)


def is_hf_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and any(
        (path / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")
    )


def checkpoint_dir(path: Path) -> Path | None:
    """The orbax `checkpoints/` folder of a training workdir (or `path` itself when it is one), else None."""
    for candidate in (path / CHECKPOINTS, path):
        if candidate.is_dir() and any(p.is_dir() and p.name.isdigit() for p in candidate.iterdir()):
            return candidate
    return None


def read_run_config(run_dir: Path) -> dict | None:
    """The training run's config (qponder's `<run_dir>/config.json`), or None if absent or not a training config."""
    path = run_dir / RUN_CONFIG
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict) or data.get("model_type") or not isinstance(data.get("model"), dict):
        return None  # an HF config.json, or a config without a model section
    return data


def base_folders(run_dir: Path, model_cfg: Mapping) -> tuple[Path, Path]:
    """(base HF folder, tokenizer folder) of an orbax training workdir: `model_cfg.model_path` when it names a
    folder, else the run's own `config.json` model section, else its `tiny_model/` (see the module docstring)."""
    path = model_cfg.get("model_path", "")
    if path and path != embedded.EMBEDDED_TINY:
        return embedded.resolve_model_dir(model_cfg, run_dir)
    run_config = read_run_config(run_dir)
    if run_config is not None and run_config.get("job") in TRAINING_JOBS:
        section = {**dict(model_cfg), **run_config["model"]}
        return embedded.resolve_model_dir(section, run_dir)
    tiny = run_dir / embedded.TINY_MODEL_DIR
    if (tiny / "config.json").is_file() or path == embedded.EMBEDDED_TINY:
        return embedded.resolve_model_dir({**dict(model_cfg), "model_path": embedded.EMBEDDED_TINY}, run_dir)
    raise ConfigError(
        f"{run_dir}: cannot tell which model this checkpoint belongs to: no training config.json (job sft/grpo) with "
        f"a model section and no {embedded.TINY_MODEL_DIR}/ folder. Pass the HF folder the run started from as "
        "--config.model.model_path=/path/to/base"
    )


class _OrbaxWarnings(std_logging.Filter):
    """Drops orbax's own warnings (it warns on every read-only restore of a training workdir); keeps its errors and
    every other module's warnings, such as the damaged-checkpoint fallback's."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.ERROR or "/orbax/" not in record.pathname.replace("\\", "/")


@contextlib.contextmanager
def orbax_warnings_hidden() -> Iterator[None]:
    """Within: orbax's warnings are not logged (absl logs through the python logger "absl")."""
    logger, only = std_logging.getLogger("absl"), _OrbaxWarnings()
    logger.addFilter(only)
    try:
        yield
    finally:
        logger.removeFilter(only)


def restore_params(
    ckpt_dir: Path, abstract_model: Qwen25VL, mesh: jax.sharding.Mesh, step: int | None = None
) -> tuple[dict, int]:
    """(params as a pure dict placed on their shardings over `mesh`, the step) from an orbax checkpoint folder.

    The dtypes are the checkpoint's; shapes are checked against the model and a mismatch raises
    CheckpointMismatchError naming the parameter. Only the `params` subtree is read. Without a step (None or < 0):
    the newest checkpoint that restores; a newer, damaged one is named in one warning line and left in place.
    """
    handlers = {"state": ocp.PyTreeCheckpointHandler()}
    options = ocp.CheckpointManagerOptions(read_only=True)
    manager = ocp.CheckpointManager(ckpt_dir.absolute(), options=options, item_handlers=handlers)
    try:
        steps = list(manager.all_steps())
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {ckpt_dir}")
        restore_at = lambda s: _restore_params_at(manager, ckpt_dir / str(s), s, abstract_model, mesh)
        if step is not None and step >= 0:
            if int(step) not in steps:
                raise FileNotFoundError(f"{ckpt_dir}: no checkpoint at step {step}; saved steps: {sorted(steps)}")
            try:
                return restore_at(int(step)), int(step)
            except (train_state.CheckpointMismatchError, train_state.CheckpointUnreadableError):
                raise
            except Exception as e:
                reason = train_state.damage_reason(e)
                raise train_state.CheckpointUnreadableError(
                    f"checkpoint {ckpt_dir / str(step)} does not restore ({reason})"
                ) from e
        params, step, skipped = train_state.restore_newest(steps, restore_at, ckpt_dir)
        for damaged, reason in skipped:
            if jax.process_index() == 0:
                logging.warning(
                    "checkpoint step %d in %s does not restore (%s): left in place; using step %d",
                    damaged, ckpt_dir, reason, step,
                )  # fmt: skip
        return params, step
    finally:
        manager.close()


def _restore_params_at(manager, where: Path, step: int, abstract_model: Qwen25VL, mesh) -> dict:
    """The params of checkpoint `step` (see `restore_params`)."""
    saved = manager.item_metadata(step)["state"]
    saved = getattr(saved, "tree", saved)
    if not isinstance(saved, Mapping) or "params" not in saved:
        raise ValueError(f"{where}: the state holds no 'params' (not a qponder train state, or damaged)")
    have = dict(named_leaves(saved["params"]))
    _, abs_params, _ = train_state.split_model(abstract_model)
    shards = train_state.param_shardings(abstract_model, mesh)
    problems = []

    def target(path, x, shard):
        name = train_state.param_path(path)
        meta = have.pop(name, None)
        if meta is None:
            problems.append(f"parameter {name!r} is missing from the checkpoint")
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shard)
        if tuple(meta.shape) != tuple(x.shape):
            problems.append(f"parameter {name!r} has shape {tuple(meta.shape)} in the checkpoint, {x.shape} here")
        return jax.ShapeDtypeStruct(x.shape, meta.dtype, sharding=shard)

    abstract = jax.tree_util.tree_map_with_path(target, abs_params, shards)
    problems += [f"parameter {name!r} is in the checkpoint but not in the model" for name in sorted(have)]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems)} in all)" if len(problems) > 5 else "")
        raise train_state.CheckpointMismatchError(f"checkpoint {where} does not fit the model: {shown}")
    restore = ocp.args.PyTreeRestore(
        item={"params": abstract},
        restore_args=ocp.checkpoint_utils.construct_restore_args({"params": abstract}),
        partial_restore=True,
    )
    restored = manager.restore(step, args=ocp.args.Composite(state=restore))
    return restored["state"]["params"]


def load_checkpoint(
    path: str | Path,
    *,
    model_cfg: Mapping,
    workdir: str | Path,
    mesh: jax.sharding.Mesh,
    step: int = -1,
) -> LoadedModel:
    """Our model from `path`: an HF folder, an orbax training workdir, or "" for `model_cfg` (the tiny random model
    in `<workdir>/tiny_model` when `model_cfg.model_path` is "" too). Parameters land sharded over `mesh`."""
    from qponder_jax.hf import load_hf

    kwargs = embedded.model_kwargs(model_cfg)
    if not path:
        base, tok = embedded.resolve_model_dir(model_cfg, workdir)
        model, config = load_hf(base, mesh=mesh, **kwargs)
        return LoadedModel(model, config, tok, base, "hf")
    path = Path(path).expanduser()
    if is_hf_folder(path):
        model, config = load_hf(path, mesh=mesh, **kwargs)
        tok = Path(model_cfg.get("tokenizer_path") or path)
        return LoadedModel(model, config, tok, path, "hf")
    ckpt = checkpoint_dir(path)
    if ckpt is None:
        raise FileNotFoundError(
            f"checkpoint {str(path)!r}: neither a Hugging Face folder (config.json + model.safetensors) nor a training "
            f"workdir with orbax checkpoints ({CHECKPOINTS}/<step>/)"
        )
    run_dir = ckpt.parent if ckpt.name == CHECKPOINTS else ckpt
    base, tok = base_folders(run_dir, model_cfg)
    config = Qwen25VLConfig.from_json_file(base / "config.json")
    abstract = nnx.eval_shape(lambda: Qwen25VL(config, rngs=nnx.Rngs(0), **kwargs))
    params, restored_step = restore_params(ckpt, abstract, mesh, step)
    graphdef, _, rest = train_state.split_model(abstract)
    model = nnx.merge(graphdef, params, rest)
    logging.info("restored step %d of %s (architecture and tokenizer from %s)", restored_step, ckpt, base)
    return LoadedModel(model, config, tok, base, "orbax", restored_step, run_dir)


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
