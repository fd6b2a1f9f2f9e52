"""Random-access sources of IQA and VQA records by "name:split", for evaluation, distillation, GRPO and scoring.

    source = open_source("koniq10k:test", config.data, workdir=workdir)   # len(source), source[i] -> record dict

"synthetic:<split>" is generated on the fly (no files); "synthetic_vqa" is built into `<workdir>/data/tfds` when
`data.data_dir` lacks it (nothing downloaded); every other name reads a tfds build in `data.data_dir`.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Mapping
from pathlib import Path

from etils import epath

from qponder_jax.data.datasets import SyntheticIQA
from qponder_jax.errors import ConfigError

log = logging.getLogger(__name__)

SYNTHETIC_VQA = "synthetic_vqa"  # the generated VQA set: built into the workdir when data.data_dir lacks it


def check_spec(spec: str, data: Mapping) -> None:
    """ConfigError naming the spec (and data.data_dir) unless "name:split" names a known dataset and split that
    `open_source` can read: built in data.data_dir, except the generated synthetic sets. Reads only the build's
    dataset_info.json."""
    from qponder_jax.data import datasets
    from qponder_jax.data.datasets.synthetic import SPLITS

    name, _, split = spec.partition(":")
    if name in ("synthetic", SYNTHETIC_VQA):  # generated: nothing to find on disk
        allowed = [*SPLITS, "all"] if name == SYNTHETIC_VQA else list(SPLITS)
        if split and split not in allowed:
            raise ConfigError(f"dataset {spec!r}: unknown split {split!r}; the {name} set has {allowed}")
        return
    if name not in datasets.BUILDERS:
        close = difflib.get_close_matches(name, [*datasets.BUILDERS, "synthetic"], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"dataset {spec!r}: unknown dataset {name!r}{hint}; known: {sorted(datasets.BUILDERS)}")
    data_dir = str(data["data_dir"])
    if not data_dir:
        raise ConfigError(
            f"dataset {spec!r} needs config field data.data_dir: the tfds folder where "
            f"`python -m qponder_jax.data.datasets build {name} ...` wrote it"
        )
    root = epath.Path(data_dir)  # a local folder or a bucket (gs://...), as tfds reads it
    if not root.is_dir():
        raise ConfigError(f"dataset {spec!r}: config field data.data_dir={data_dir!r} is not a folder")
    builder = datasets.get_builder(name, data_dir) if (root / name).is_dir() else None
    if builder is None or not builder.is_prepared():
        there = sorted(p.name for p in root.iterdir() if p.name in datasets.BUILDERS and p.is_dir())
        raise ConfigError(
            f"dataset {spec!r} is not built in data.data_dir={data_dir!r} (it holds {there or 'no dataset'}); build "
            f"it with `python -m qponder_jax.data.datasets build {name} --manual_dir=<its release> "
            f"--data_dir={data_dir}`"
        )
    splits = sorted(builder.info.splits)
    if split and split != "all" and split not in splits:
        close = difflib.get_close_matches(split, splits, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"dataset {spec!r}: {name} has no split {split!r}{hint}; it has {splits} (or 'all')")


def open_source(spec: str, data: Mapping, *, workdir: str | Path | None = None):
    """A random-access source for "name:split" ("synthetic:test", "koniq10k:test", "csiq" = all of CSIQ, "lsvq:test").
    "synthetic_vqa" missing from data.data_dir (or with no data_dir) is built into `<workdir>/data/tfds` first.
    A spec that cannot be read raises ConfigError (`check_spec`)."""
    from qponder_jax.data import datasets

    check_spec(spec, data)
    name, _, split = spec.partition(":")
    if name in datasets.VIDEO_DATASETS:
        return datasets.load(name, split or "all", data_dir=video_data_dir(name, data, workdir))
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


def build_info(source) -> tuple[str, list[dict]]:
    """(what the dataset is, the files skipped when it was built: [{"path", "reason"}]) of a source; ("", []) for a
    source that records neither."""
    return getattr(source, "build_info", ("", []))


def video_data_dir(name: str, data: Mapping, workdir: str | os.PathLike | None) -> str:
    """The tfds folder to read VQA set `name` from: data.data_dir; for the synthetic VQA set, when data.data_dir is
    empty or does not hold it, `<workdir>/data/tfds`, built there first (process 0 only; nothing downloaded)."""
    from qponder_jax.data import datasets

    data_dir = str(data["data_dir"])
    if name != SYNTHETIC_VQA:
        if not data_dir:
            raise ConfigError(
                f"dataset {name!r} needs config field data.data_dir: the tfds folder where "
                f"`qponder_jax.data.datasets.build({name!r}, manual_dir, data_dir)` wrote it"
            )
        return data_dir
    if data_dir and datasets.get_builder(name, data_dir).is_prepared():
        return data_dir
    if workdir is None:
        raise ConfigError(
            f"dataset {name!r} is not built in data.data_dir={data_dir!r}: build it with "
            f"`python -m qponder_jax.data.datasets build {name} --data_dir=DIR` (nothing to download)"
        )
    target = Path(workdir) / "data" / "tfds"

    def build():
        if not datasets.get_builder(name, target).is_prepared():
            log.info("%s is not built in data.data_dir=%r: building it into %s", name, data_dir, target)
            datasets.build(name, None, target)

    from qponder_jax import distributed

    distributed.run_once(build, name=f"build_{name}:{target}")
    return str(target)
