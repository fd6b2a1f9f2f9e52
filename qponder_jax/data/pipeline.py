"""grain pipelines: random-access sources -> per-record transform -> collated host batches -> global jax.Arrays.

Built on `grain.MapDataset`, so every batch is a pure function of (seed, step): shuffling reseeds each
epoch, resuming only needs the step (`Loader.state()`), and per-process sharding is a slice.
- Multi-host: the batch sequence is global and the same for every process layout. Global batch k is records
  [k*B, (k+1)*B) of the shuffled record stream; process p of P reads and transforms only its rows
  [p*B/P, (p+1)*B/P) of it, and `to_global` assembles the global array from every process's part. So a 2-process
  run trains on exactly the batches of a 1-process run (same rows, same order), and a checkpoint resumes on
  another process count with the same data position.
- Buckets: each process collates its rows to the smallest buckets that fit *its* rows, so two processes could
  build different shapes for one global batch (a shape error or a hang in the step). With `padding=Padding(...)`
  a multi-process loader allgathers every process's (tokens, patches, image slots) sizes, 3 ints per batch, and
  re-pads to the largest (`agree_on_shapes`): the shape a single process would have picked for the whole batch.
  (Always padding to the largest bucket needs no collective, but multiplies the compute of short batches.)
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

import dataclasses
import functools
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np
from jax.sharding import Mesh

from qponder_jax.data.batch import Batch
from qponder_jax.errors import ConfigError
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


class LoaderStateError(ConfigError):
    """A saved data position that does not fit this loader's settings."""


class Loader:
    """An iterator of host batches whose position can be saved and restored (JSON-serializable).

    Every batch is a pure function of its index in `batches` (a grain MapDataset), so the saved state is
    the number of batches consumed, and `restore` continues from a slice of the batch sequence. Unlike
    grain's per-worker iterator state, this survives a change of `worker_count` between runs.
    """

    def __init__(
        self,
        batches: grain.MapDataset,
        fingerprint: dict,
        batches_per_epoch: int,
        worker_count: int,
        buffer: int,
        agree: Callable[[Any], Any] | None = None,
    ):
        self.batches = batches
        self.fingerprint = fingerprint  # settings a restored state must match (not the process layout)
        self.batches_per_epoch = batches_per_epoch  # global batches per epoch, the same on every process
        self._worker_count, self._buffer = worker_count, buffer
        self._agree = agree  # host batch -> the batch padded to the shapes all processes agree on
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
        return batch if self._agree is None else self._agree(batch)

    def state(self) -> dict:
        """The position in the stream, as JSON-serializable data; save it with the train state."""
        return {"batches_consumed": self._position, "fingerprint": json.loads(json.dumps(self.fingerprint))}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Continues from a `state()` of a loader built with the same settings (any process layout)."""
        saved = dict(state.get("fingerprint", {}))
        if saved != self.fingerprint:
            keys = sorted(set(saved) | set(self.fingerprint))
            diff = [
                f"{k} (saved {saved.get(k, '<missing>')!r}, now {self.fingerprint.get(k, '<missing>')!r})"
                for k in keys
                if saved.get(k, "<missing>") != self.fingerprint.get(k, "<missing>")
            ]
            raise LoaderStateError(
                "data loader: the checkpoint's data position was saved with other settings: " + "; ".join(diff) + ". "
                "Its batch count would not point at the batches this run would have seen. Resume with the data "
                "settings that wrote it, or start a fresh --workdir from its weights (GRPO: "
                "--config.init_checkpoint=<that workdir>; SFT: export it with configs/export.py, then "
                "--config.model.model_path=<the export>)."
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
    padding: Padding | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Loader:
    """A resumable loader of collated host batches: this process's `batch_size / process_count` rows of each
    global batch (the module docstring says which rows; the global sequence does not depend on the layout).

    sources: one random-access source, or several (see the module docstring for how they mix).
    batch_size: the global batch size over all processes.
    transform: applied to each record (e.g. the processor's encode); collate: list of transformed
        records -> batch (default: stack).
    num_epochs: None repeats forever; otherwise the loader stops after that many epochs (records left
        over at the end of an epoch, fewer than a batch, start the next one).
    weights: with several sources in single-dataset mode, the share of batches drawn from each
        (default: proportional to size).
    padding: for a collate producing `Batch`es (alone or inside a tuple): how it pads, so that with several
        processes every batch is re-padded to the sizes all processes agree on (`agree_on_shapes`).
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
    seed = int(seed) % 2**32

    def local_batches(ds: grain.MapDataset, source_seed: int, epochs: int | None) -> grain.MapDataset:
        """This process's part of every global batch of `ds` (lazy: only its own records are read)."""
        if shuffle:
            ds = ds.shuffle(seed=source_seed)
        ds = ds.repeat(epochs)
        if transform is not None:
            ds = ds.map(transform)
        parts = ds.batch(local_batch, drop_remainder=True, batch_fn=collate)  # part q of global batch q // P
        if process_count == 1:
            return parts
        if epochs is not None:
            parts = parts[: len(parts) // process_count * process_count]  # whole global batches only
        return parts[process_index::process_count]

    datasets = [grain.MapDataset.source(s) for s in sources]
    if len(datasets) == 1 or not single_dataset_batches:
        ds = datasets[0] if len(datasets) == 1 else grain.MapDataset.concatenate(datasets)
        batches_per_epoch = len(ds) // batch_size
        if batches_per_epoch == 0:
            raise ValueError(f"{len(ds)} records cannot fill one global batch of {batch_size}")
        ds = local_batches(ds, seed, num_epochs)
    else:
        per_epoch = [len(s) // batch_size for s in datasets]
        if min(per_epoch) == 0:
            raise ValueError(f"every source needs at least batch_size={batch_size} records, got sizes {per_epoch}")
        batches_per_epoch = sum(per_epoch)
        counts = per_epoch if weights is None else _allocate(batches_per_epoch, weights)
        batched = [local_batches(s, (seed + 7919 * (i + 1)) % 2**32, None) for i, s in enumerate(datasets)]
        ds = grain.MapDataset.select_from_datasets(batched, _BlockMixMap(counts, seed, shuffle, num_epochs))
    fingerprint = {
        "sizes": [len(s) for s in sources],
        "batch_size": batch_size,
        "seed": seed,
        "shuffle": shuffle,
        "num_epochs": num_epochs,
        "single_dataset_batches": single_dataset_batches,
        "weights": None if weights is None else [float(w) for w in weights],
    }
    agree = functools.partial(agree_on_shapes, padding=padding) if padding is not None and process_count > 1 else None
    return Loader(ds, fingerprint, batches_per_epoch, worker_count, worker_buffer_size, agree)


# ---- one global shape: every process pads to the buckets all processes agree on ----


@dataclasses.dataclass(frozen=True)
class Padding:
    """How a collate padded its `Batch`es: the token side and the pad token id (`Processor.collate`'s settings)."""

    side: str = "right"  # "right" (training) or "left" (generation prompts: every prompt ends at T - 1)
    pad_token_id: int = 0

    def __post_init__(self):
        if self.side not in ("right", "left"):
            raise ValueError(f"Padding.side must be 'right' or 'left', got {self.side!r}")


def bucket_sizes(batch: Batch) -> tuple[int, int, int]:
    """(T tokens, P patch rows, M image slots): the bucket sizes a collated Batch was padded to."""
    return int(batch.input_ids.shape[1]), int(batch.pixel_values.shape[1]), int(batch.image_grid_thw.shape[1])


def pad_batch(batch: Batch, tokens: int, patches: int, images: int, padding: Padding) -> Batch:
    """`batch` re-padded to larger bucket sizes, identical to what `Processor.collate` builds at those sizes: pad
    tokens on `padding.side`, zero patch rows (their window index continues the identity, segment id 0) and zero
    image slots. The real tokens' M-RoPE positions and rope deltas do not depend on padding."""
    have = bucket_sizes(batch)
    if tokens < have[0] or patches < have[1] or images < have[2]:
        raise ValueError(f"pad_batch: sizes {(tokens, patches, images)} are smaller than the batch's {have}")
    extra_t, extra_p, extra_m = tokens - have[0], patches - have[1], images - have[2]
    token_pad = (extra_t, 0) if padding.side == "left" else (0, extra_t)

    def pad(x: np.ndarray, axis: int, width: tuple[int, int], value) -> np.ndarray:
        widths = [(0, 0)] * x.ndim
        widths[axis] = width
        return np.pad(np.asarray(x), widths, constant_values=value)

    rows = np.broadcast_to(np.arange(have[1], patches, dtype=np.int32), (batch.batch_size, extra_p))  # [B, extra]
    padded = dict(
        input_ids=pad(batch.input_ids, 1, token_pad, padding.pad_token_id),  # [B, T]
        attention_mask=pad(batch.attention_mask, 1, token_pad, False),
        position_ids=pad(batch.position_ids, 2, token_pad, 0),  # [3, B, T]
        loss_mask=pad(batch.loss_mask, 1, token_pad, False),
        image_feature_index=pad(batch.image_feature_index, 1, token_pad, -1),
        pixel_values=pad(batch.pixel_values, 1, (0, extra_p), 0.0),  # [B, P, D_patch]
        vision_pos_ids=pad(batch.vision_pos_ids, 1, (0, extra_p), 0),  # [B, P, 2]
        window_index=np.concatenate([np.asarray(batch.window_index), rows], axis=1).astype(np.int32),  # [B, P]
        window_segment_ids=pad(batch.window_segment_ids, 1, (0, extra_p), 0),
        full_segment_ids=pad(batch.full_segment_ids, 1, (0, extra_p), 0),
        image_grid_thw=pad(batch.image_grid_thw, 1, (0, extra_m), 0),  # [B, M, 3]
    )
    unknown = {f.name for f in dataclasses.fields(batch)} - set(padded) - {"rope_deltas"}
    if unknown:  # a new Batch field: fail loudly rather than give processes different shapes
        raise NotImplementedError(f"data/pipeline.py pad_batch: no padding rule for Batch fields {sorted(unknown)}")
    return batch.replace(**padded)


def _process_allgather(sizes: np.ndarray) -> np.ndarray:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(sizes))  # [processes, ...]


def agree_on_shapes(item: Any, padding: Padding, gather: Callable[[np.ndarray], np.ndarray] | None = None) -> Any:
    """`item` (a Batch, or a pytree holding Batches, e.g. (Batch, extras)) with every Batch re-padded to the largest
    bucket sizes over all processes. `gather` (default: one `process_allgather`, a collective every process must
    call) maps this process's [n, 3] sizes to everyone's [processes, n, 3]."""
    is_batch = lambda x: isinstance(x, Batch)  # noqa: E731
    leaves, treedef = jax.tree.flatten(item, is_leaf=is_batch)
    where = [i for i, leaf in enumerate(leaves) if is_batch(leaf)]
    if not where:
        return item
    mine = np.asarray([bucket_sizes(leaves[i]) for i in where], np.int32)  # [n, 3]
    agreed = np.asarray((gather or _process_allgather)(mine)).reshape(-1, *mine.shape).max(axis=0)  # [n, 3]
    for row, i in enumerate(where):
        if tuple(agreed[row]) != tuple(mine[row]):
            leaves[i] = pad_batch(leaves[i], *(int(v) for v in agreed[row]), padding)
    return jax.tree.unflatten(treedef, leaves)


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
