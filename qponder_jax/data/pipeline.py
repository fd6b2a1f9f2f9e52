"""grain pipelines: random-access sources -> per-record transform -> collated host batches -> global jax.Arrays.

Built on `grain.MapDataset`, so every batch is a pure function of (seed, step): shuffling reseeds each
epoch, resuming only needs the step (`Loader.state()`), and per-process sharding is a slice.
- Multi-host: process p of P reads only records p, p+P, ... of each source, truncated to the same length
  on every process, and builds batches of `batch_size / P` records; `to_global` assembles the global
  array from every process's part.
- `worker_count > 0` runs the transform and collate in grain worker processes (`mp_prefetch`); the
  output is identical to `worker_count=0` (what tests use).
- Several sources with `single_dataset_batches=True`: each batch holds records of one source only
  (ranking rewards compare MOS within a batch, and MOS scales differ across datasets). The batch
  sequence is cut into blocks; block e holds n_i batches of source i (n_i = its batches per epoch, or
  its share of the block by `weights`) in a seeded random order, so mixing is proportional, random and
  still random-access. With `single_dataset_batches=False` the sources are concatenated and shuffled
  together.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np
from jax.sharding import Mesh

from qponder_jax.model.sharding import LOGICAL_RULES, logical_sharding

Source = Any  # anything with __len__ and __getitem__(int)

# Logical axes of the `Batch` fields whose batch axis is not the first; every other field is ("batch", None, ...).
BATCH_AXES: dict[str, tuple[str | None, ...]] = {"position_ids": (None, "batch", None)}


def default_collate(examples: Sequence[Any]) -> Any:
    """Stacks a list of pytrees of arrays/scalars along a new first axis."""
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *examples)


def collate_pairs(collate: Callable[[Sequence[Any]], Any]) -> Callable[[Sequence[tuple[Any, Any]]], tuple[Any, Any]]:
    """For a transform returning (example, extras): collates the examples with `collate` and stacks the extras.

    E.g. transform = record -> (processor.encode(...), {"mos": record["mos"]}) and
    collate = collate_pairs(processor.collate) give batches (Batch, {"mos": [B]}) for the ranking rewards.
    """

    def both(pairs: Sequence[tuple[Any, Any]]) -> tuple[Any, Any]:
        return collate([p[0] for p in pairs]), default_collate([p[1] for p in pairs])

    return both


class _BlockMixMap(grain.transforms.DatasetSelectionMap):
    """Batch index -> (source, batch index within that source), in seeded random blocks."""

    def __init__(self, counts: Sequence[int], seed: int, shuffle: bool, num_blocks: int | None):
        self._counts = np.asarray(counts, np.int64)
        self._starts = np.concatenate([[0], np.cumsum(self._counts)])  # [num_sources + 1]
        self._block = int(self._starts[-1])
        self._seed, self._shuffle, self._num_blocks = seed, shuffle, num_blocks
        self._cache: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return sys.maxsize if self._num_blocks is None else self._num_blocks * self._block

    def _order(self, block: int) -> np.ndarray:
        if self._cache is None or self._cache[0] != block:
            order = np.arange(self._block)
            if self._shuffle:
                order = np.random.default_rng([self._seed, block]).permutation(self._block)
            self._cache = (block, order)
        return self._cache[1]

    def __getitem__(self, index: int) -> tuple[int, int]:
        if index >= len(self):
            raise IndexError(f"batch {index} is past the end ({len(self)} batches)")
        block, position = divmod(int(index), self._block)
        slot = int(self._order(block)[position])
        source = int(np.searchsorted(self._starts, slot, side="right") - 1)
        return source, block * int(self._counts[source]) + slot - int(self._starts[source])

    def __getstate__(self):
        return {**self.__dict__, "_cache": None}


def _shard(source: Source, process_index: int, process_count: int) -> grain.MapDataset:
    """This process's records of `source`: every process_count-th, cut to the same length on every process."""
    per_process = len(source) // process_count
    if per_process == 0:
        raise ValueError(f"source {source!r} has {len(source)} records, fewer than {process_count} processes")
    return grain.MapDataset.source(source)[process_index::process_count][:per_process]


class Loader:
    """An iterator of host batches whose position can be saved and restored (JSON-serializable).

    Every batch is a pure function of its index in `batches` (a grain MapDataset), so the saved state is
    the number of batches consumed, and `restore` continues from a slice of the batch sequence. Unlike
    grain's per-worker iterator state, this survives a change of `worker_count` between runs.
    """

    def __init__(
        self, batches: grain.MapDataset, fingerprint: dict, batches_per_epoch: int, worker_count: int, buffer: int
    ):
        self.batches = batches
        self.fingerprint = fingerprint  # settings a restored state must match
        self.batches_per_epoch = batches_per_epoch  # the same on every process
        self._worker_count, self._buffer = worker_count, buffer
        self._position = 0  # batches handed out so far
        self._iterator = self._iterate_from(0)

    def _iterate_from(self, start: int):
        ds = self.batches[start:] if start else self.batches
        iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
        if self._worker_count > 0:
            _ensure_absl_flags_parsed()
            options = grain.MultiprocessingOptions(num_workers=self._worker_count, per_worker_buffer_size=self._buffer)
            iter_ds = iter_ds.mp_prefetch(options)
        return iter(iter_ds)

    def __iter__(self) -> Loader:
        return self

    def __next__(self) -> Any:
        batch = next(self._iterator)
        self._position += 1
        return batch

    def state(self) -> dict:
        """The position in the stream, as JSON-serializable data; save it with the train state."""
        return {"batches_consumed": self._position, "fingerprint": json.loads(json.dumps(self.fingerprint))}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Continues from a `state()` of a loader built with the same settings."""
        if dict(state.get("fingerprint", {})) != self.fingerprint:
            raise ValueError(
                f"loader state was saved with settings {state.get('fingerprint')}, this loader has {self.fingerprint}"
            )
        self.close()
        self._position = int(state["batches_consumed"])
        self._iterator = self._iterate_from(self._position)

    def close(self) -> None:
        """Stops worker processes, if any."""
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()


def make_loader(
    sources: Source | Sequence[Source],
    *,
    batch_size: int,
    transform: Callable[[dict], Any] | None = None,
    collate: Callable[[Sequence[Any]], Any] | None = None,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    single_dataset_batches: bool = True,
    weights: Sequence[float] | None = None,
    worker_count: int = 0,
    worker_buffer_size: int = 2,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Loader:
    """A resumable loader of collated host batches (this process's `batch_size / process_count` records).

    sources: one random-access source, or several (see the module docstring for how they mix).
    batch_size: the global batch size over all processes.
    transform: applied to each record (e.g. the processor's encode); collate: list of transformed
        records -> batch (default: stack).
    num_epochs: None repeats forever; otherwise the loader stops after that many epochs (records left
        over at the end of an epoch, fewer than a batch, start the next one).
    weights: with several sources in single-dataset mode, the share of batches drawn from each
        (default: proportional to size).
    """
    many = isinstance(sources, (list, tuple))
    sources = list(sources) if many else [sources]
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if batch_size % process_count:
        raise ValueError(f"batch_size {batch_size} is not divisible by the process count {process_count}")
    local_batch = batch_size // process_count
    if weights is not None and (len(weights) != len(sources) or not single_dataset_batches):
        raise ValueError("weights need one entry per source, and single_dataset_batches=True")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be None or >= 1, got {num_epochs}")
    collate = collate or default_collate
    shards = [_shard(s, process_index, process_count) for s in sources]
    seed = int(seed) % 2**32

    def records(ds: grain.MapDataset, source_seed: int, epochs: int | None) -> grain.MapDataset:
        if shuffle:
            ds = ds.shuffle(seed=source_seed)
        ds = ds.repeat(epochs)
        return ds.map(transform) if transform is not None else ds

    if len(shards) == 1 or not single_dataset_batches:
        ds = shards[0] if len(shards) == 1 else grain.MapDataset.concatenate(shards)
        batches_per_epoch = len(ds) // local_batch
        if batches_per_epoch == 0:
            raise ValueError(f"{len(ds)} records per process cannot fill one batch of {local_batch}")
        ds = records(ds, seed, num_epochs).batch(local_batch, drop_remainder=True, batch_fn=collate)
    else:
        per_epoch = [len(s) // local_batch for s in shards]
        if min(per_epoch) == 0:
            raise ValueError(f"every source needs at least {local_batch} records per process, got {per_epoch}")
        batches_per_epoch = sum(per_epoch)
        counts = per_epoch if weights is None else _allocate(batches_per_epoch, weights)
        batched = [
            records(s, (seed + 7919 * (i + 1)) % 2**32, None).batch(local_batch, drop_remainder=True, batch_fn=collate)
            for i, s in enumerate(shards)
        ]
        ds = grain.MapDataset.select_from_datasets(batched, _BlockMixMap(counts, seed, shuffle, num_epochs))
    fingerprint = {
        "sizes": [len(s) for s in sources],
        "batch_size": batch_size,
        "seed": seed,
        "shuffle": shuffle,
        "num_epochs": num_epochs,
        "single_dataset_batches": single_dataset_batches,
        "weights": None if weights is None else [float(w) for w in weights],
        "process": [process_index, process_count],
    }
    return Loader(ds, fingerprint, batches_per_epoch, worker_count, worker_buffer_size)


def _allocate(total: int, weights: Sequence[float]) -> list[int]:
    """Splits `total` batches by `weights` (largest remainder), at least one per positive weight."""
    w = np.asarray(weights, np.float64)
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {list(weights)}")
    total = max(total, int((w > 0).sum()))
    exact = w / w.sum() * total
    counts = np.floor(exact).astype(np.int64)
    counts[np.argsort(counts - exact)[: total - counts.sum()]] += 1
    counts = np.where(w > 0, np.maximum(counts, 1), 0)
    return [int(c) for c in counts]


def _ensure_absl_flags_parsed() -> None:
    """grain's worker processes read absl flags; outside an absl app, parse them with their defaults."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _leaf_name(path) -> str:
    key = path[-1]
    for attr in ("name", "key", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def to_global(batch: Any, mesh: Mesh, axes: Mapping[str, Sequence[str | None]] | None = None) -> Any:
    """This process's host batch (a pytree of numpy arrays) -> global jax.Arrays sharded over ('data', 'fsdp').

    Each leaf's logical axes come from `axes` (by field name, overriding `BATCH_AXES`) or default to
    ("batch", None, ...). The leaf's "batch" axis is this process's slice of the global batch axis.
    """
    table = {**BATCH_AXES, **(axes or {})}
    batch_mesh_axes = [a for a in (LOGICAL_RULES["batch"] or ()) if mesh.shape.get(a, 1) > 1]
    shards = int(np.prod([mesh.shape[a] for a in batch_mesh_axes]))

    def put(path, leaf):
        local = np.asarray(leaf)
        name = _leaf_name(path)
        default = ("batch",) + (None,) * (local.ndim - 1) if local.ndim else ()  # scalars: replicated
        leaf_axes = tuple(table.get(name, default))
        if len(leaf_axes) != local.ndim:
            raise ValueError(f"field {name!r}: axes {leaf_axes} do not match its shape {local.shape}")
        global_shape = list(local.shape)
        if "batch" in leaf_axes:
            b = leaf_axes.index("batch")
            global_shape[b] *= jax.process_count()
            if global_shape[b] % shards:
                raise ValueError(
                    f"field {name!r}: global batch {global_shape[b]} is not divisible by the {shards} "
                    f"devices of mesh axes {batch_mesh_axes}"
                )
        sharding = logical_sharding(leaf_axes, global_shape, mesh)
        return jax.make_array_from_process_local_data(sharding, local, tuple(global_shape))

    return jax.tree_util.tree_map_with_path(put, batch)
