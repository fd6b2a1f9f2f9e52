"""Up-front checks of a job's config: a config that cannot run stops with one line naming the field and its value,
before any model or data is built (`main` calls `check_config` before the job).

    check_config(config, workdir)   # raises errors.ConfigError

Fields are checked by name wherever they appear (the demo config nests its sections):
- `mesh`: three integers, each >= 1 or a single -1, that the devices can fill (`sharding.make_mesh`'s rules);
- `sampling_layout`: "auto", "decode", "decode:T" or "train" (`sharding.parse_layout`);
- `*_buckets`: non-empty tuples of positive integers; patch buckets are multiples of 4 (a 2x2 merge) and the
  largest holds an image of `max_pixels` (image sections only: video frames have their own limits);
- batch sizes and step counts are positive, pixel limits and intervals not negative;
- the workdir can be created and written (checked last, and created), an `out_dir` can be;
- every dataset a job reads (`data.datasets`, or the eval job's `datasets` / protocol) has a known name and split and
  is built in `data.data_dir` (`data.sources.check_spec`);
- the `sft` job of a real-size variant names its base checkpoint.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from qponder_jax.errors import ConfigError

POSITIVE = ("batch_size", "eval_batch_size", "total_steps", "grad_accum", "num_generations", "num_iterations",
            "num_minibatches", "max_new_tokens", "num_samples", "keep_checkpoints")  # fmt: skip
NON_NEGATIVE = ("warmup_steps", "log_every", "eval_every", "sample_every", "min_pixels", "max_pixels", "max_images",
                "eval_max_batches", "worker_count", "max_consecutive_nonfinite")  # fmt: skip
# Fields where 0 means "not set here: take the model's own" (per job), so 0 passes the POSITIVE check.
UNSET_AS_ZERO = {"score": ("score.max_new_tokens",)}
PATCH = 14  # ViT patch side in pixels
MERGE = 2  # patches merged per side into one token: buckets hold whole 2x2 groups


def check_config(config, workdir: str | os.PathLike) -> None:
    """Raises ConfigError for the first problem found (see the module docstring)."""
    unset_ok = UNSET_AS_ZERO.get(config.get("job"), ())
    for path, value in _leaves(config):
        if not (path in unset_ok and value == 0):
            _check_field(path, value)
    for path, section in _sections(config):
        if "patch_buckets" in section and "video" not in section:
            _check_patch_buckets(path, section)
    if "mesh" in config:
        check_mesh(config.mesh)
    if "sampling_layout" in config:
        _check_layout(config.sampling_layout)
    _check_model(config)
    if "data" in config:
        from qponder_jax.data.sources import check_spec

        for spec in dataset_specs(config):
            check_spec(spec, config.data)
    check_writable(Path(workdir), "--workdir", create=True)  # last: a config that fails creates no workdir
    if config.get("out_dir"):
        check_writable(Path(config.out_dir), "config field out_dir")


def _leaves(config, prefix: str = "") -> Iterator[tuple[str, object]]:
    for key, value in config.items():
        if hasattr(value, "items"):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _sections(config, prefix: str = "") -> Iterator[tuple[str, object]]:
    yield prefix, config
    for key, value in config.items():
        if hasattr(value, "items"):
            yield from _sections(value, f"{prefix}{key}.")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_field(path: str, value) -> None:
    key = path.rsplit(".", 1)[-1]
    if key.endswith("_buckets"):
        if not isinstance(value, (tuple, list)) or not value or not all(_is_int(v) and v > 0 for v in value):
            raise ConfigError(f"config field {path}={value!r}: give a tuple of positive integers, e.g. (256, 512)")
        if key == "patch_buckets" and any(v % MERGE**2 for v in value):
            raise ConfigError(f"config field {path}={tuple(value)}: every patch bucket must be a multiple of 4")
    elif key in POSITIVE and _is_int(value) and value <= 0:
        raise ConfigError(f"config field {path}={value}: must be at least 1")
    elif key in NON_NEGATIVE and _is_int(value) and value < 0:
        raise ConfigError(f"config field {path}={value}: must not be negative")


def _check_patch_buckets(prefix: str, section) -> None:
    """The largest patch bucket must hold one image of `max_pixels` (resized to multiples of 28 pixels a side, at
    most max_pixels in area: at most 4 * (max_pixels // 784) patch rows)."""
    max_pixels, min_pixels = int(section.get("max_pixels", 0)), int(section.get("min_pixels", 0))
    if max_pixels and min_pixels > max_pixels:
        raise ConfigError(f"config field {prefix}min_pixels={min_pixels} is above {prefix}max_pixels={max_pixels}")
    if not max_pixels:  # 0 = preprocessor_config.json's limit, known only once the model folder is read
        return
    rows = MERGE**2 * (max_pixels // (PATCH * MERGE) ** 2)
    buckets = tuple(section.patch_buckets)
    if max(buckets) < rows:
        raise ConfigError(
            f"config field {prefix}patch_buckets={buckets}: an image of up to {prefix}max_pixels={max_pixels} pixels "
            f"takes up to {rows} patch rows, more than the largest bucket; add a bucket of at least {rows} or lower "
            f"{prefix}max_pixels"
        )


def check_mesh(mesh) -> None:
    """ConfigError unless `mesh` is a mesh shape the devices can fill."""
    from qponder_jax.model import sharding

    shape = tuple(mesh) if isinstance(mesh, (tuple, list)) else mesh
    try:
        sharding.make_mesh(shape if isinstance(shape, tuple) else (shape,))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config field mesh={shape!r}: {e}") from None


def _check_layout(layout) -> None:
    from qponder_jax.model import sharding

    try:
        sharding.parse_layout(layout)
    except ValueError as e:
        raise ConfigError(f"config field sampling_layout={layout!r}: {e}") from None


def _check_model(config) -> None:
    """A real-size SFT variant needs the base checkpoint: name the one that variant is sized for."""
    if config.get("job") != "sft" or config.model.model_path:
        return
    size = str(config.get("variant", "")).removeprefix("vqa_")
    example = f"Qwen2.5-VL-{size.upper()}-Instruct" if size[:-1].isdigit() and size.endswith("b") else "Qwen2.5-VL"
    raise ConfigError(
        f"config field model.model_path is empty: the {config.get('variant', '')!r} variant fine-tunes a real "
        f"Qwen2.5-VL checkpoint. Pass --config.model.model_path=/path/to/{example} (a local Hugging Face folder), or "
        "'embedded:tiny' for the tiny random model"
    )


def dataset_specs(config) -> tuple[str, ...]:
    """The "name:split" specs a config reads: `data.datasets`, else (the eval job) `datasets` or its protocol's."""
    if "datasets" in config.data:
        return tuple(s.strip() for s in str(config.data.datasets).split(",") if s.strip())
    if config.get("datasets"):
        return tuple(s.strip() for s in str(config.datasets).split(",") if s.strip())
    if "protocol" in config:
        from qponder_jax.evaluation.report import protocol_specs

        return protocol_specs(config.protocol)
    return ()


def check_writable(path: Path, field: str, *, create: bool = False) -> None:
    """ConfigError unless folder `path` is writable or can be created (its nearest existing parent is a writable
    folder). With `create`, the folder is made and a file written and removed in it, which also catches what
    permission bits cannot say (a read-only mount, a root user, a virtual file system)."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{field}={str(path)!r} is a file, not a folder")
    existing = path.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{field}={str(path)!r}: cannot create it, {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == path.absolute() else f"cannot be created: {existing} is not writable"
        raise ConfigError(f"{field}={str(path)!r} {what} (read-only or no permission)")
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=path):
                pass
        except OSError as e:
            raise ConfigError(f"{field}={str(path)!r}: cannot write there ({e.strerror or e})") from None
