"""grain pipelines: exact resume (across epochs, in single-dataset mode), process sharding, global batches."""

import json

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from qponder_jax.data.batch import Batch
from qponder_jax.data.datasets import SyntheticIQA
from qponder_jax.data.pipeline import collate_pairs, make_loader, to_global
from qponder_jax.model.sharding import make_mesh


class RangeSource:
    """Records {"dataset", "index"}: which record landed where is visible in every batch."""

    def __init__(self, size, name="a"):
        self.size, self.name = size, name

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        if not 0 <= index < self.size:
            raise IndexError(index)
        return {"dataset": self.name, "index": index}


def transform(record):
    return {"index": np.int32(record["index"]), "dataset": record["dataset"]}


def _ids(batch):
    return [(str(d), int(i)) for d, i in zip(batch["dataset"], batch["index"])]


def _take(loader, n):
    return [_ids(next(loader)) for _ in range(n)]


def test_epochs_shuffle_and_stop():
    loader = make_loader(RangeSource(10), batch_size=4, transform=transform, seed=1, num_epochs=3)
    batches = list(loader)
    assert len(batches) == 7 and loader.batches_per_epoch == 2  # 30 records -> 7 full batches
    stream = [i for b in batches for _, i in _ids(b)]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert stream[:10] != stream[10:20] and stream[:10] != list(range(10))  # reshuffled every epoch
    again = make_loader(RangeSource(10), batch_size=4, transform=transform, seed=1, num_epochs=3)
    assert [_ids(b) for b in again] == [_ids(b) for b in batches]


@pytest.mark.parametrize("stop", [1, 2, 5])  # batch 2 straddles the first epoch boundary
def test_resume_matches_uninterrupted_run(stop):
    kwargs = dict(batch_size=4, transform=transform, seed=7, num_epochs=3)
    full = [_ids(b) for b in make_loader(RangeSource(10), **kwargs)]
    first = make_loader(RangeSource(10), **kwargs)
    head = _take(first, stop)
    state = json.loads(json.dumps(first.state()))  # what a checkpoint stores
    resumed = make_loader(RangeSource(10), **kwargs)
    resumed.restore(state)
    assert head + [_ids(b) for b in resumed] == full


def test_single_dataset_batches_mix_and_resume():
    sources = [RangeSource(12, "a"), RangeSource(20, "b")]
    kwargs = dict(batch_size=4, transform=transform, seed=3)
    loader = make_loader(sources, **kwargs)
    assert loader.batches_per_epoch == 8  # 3 batches of a + 5 of b per block
    batches = _take(loader, 24)
    for batch in batches:
        assert len({d for d, _ in batch}) == 1  # one dataset per batch
    blocks = [batches[i : i + 8] for i in range(0, 24, 8)]
    for block in blocks:
        assert sum(b[0][0] == "a" for b in block) == 3
    first_a = sorted(i for b in blocks[0] if b[0][0] == "a" for _, i in b)
    assert first_a == list(range(12))  # proportional to size: one pass over a per block
    assert [b[0][0] for b in blocks[0]] != [b[0][0] for b in blocks[1]]  # block order reshuffled
    state = loader.state()
    expected = _take(loader, 10)  # crosses the block boundary at 24 + 8
    resumed = make_loader(sources, **kwargs)
    resumed.restore(json.loads(json.dumps(state)))
    assert _take(resumed, 10) == expected
    weighted = _take(make_loader(sources, weights=[3, 1], **kwargs), 80)
    assert sum(b[0][0] == "a" for b in weighted) == 60  # 6 of every 8 batches


def test_mixed_batches_concatenate_sources():
    sources = [RangeSource(6, "a"), RangeSource(6, "b")]
    loader = make_loader(sources, batch_size=4, transform=transform, seed=0, single_dataset_batches=False, num_epochs=1)
    records = [r for b in loader for r in _ids(b)]
    assert sorted(records) == sorted([("a", i) for i in range(6)] + [("b", i) for i in range(6)])
    assert any(
        len({d for d, _ in _ids(b)}) == 2
        for b in make_loader(sources, batch_size=4, transform=transform, single_dataset_batches=False, num_epochs=1)
    )


@pytest.mark.parametrize("mode", ["one", "single_dataset", "concatenated"])
def test_processes_split_the_global_batches_of_one_process(mode):
    """Process p of P gets rows [p*B/P, (p+1)*B/P) of the 1-process run's batch k (same records, same order), and a
    position saved on one process count resumes on another (batch 2 straddles an epoch boundary in mode "one")."""
    sources = RangeSource(10) if mode == "one" else [RangeSource(12, "a"), RangeSource(20, "b")]
    kwargs = dict(batch_size=4, transform=transform, seed=2, single_dataset_batches=mode != "concatenated")
    one = _take(make_loader(sources, **kwargs), 12)
    for count in (2, 4):
        parts = [_take(make_loader(sources, process_index=p, process_count=count, **kwargs), 12) for p in range(count)]
        assert all(len(batch) == 4 // count for part in parts for batch in part)
        assert [sum((part[k] for part in parts), []) for k in range(12)] == one
    two = make_loader(sources, process_index=1, process_count=2, **kwargs)
    _take(two, 5)
    resumed = make_loader(sources, **kwargs)  # a 2-process checkpoint resumed by one process
    resumed.restore(json.loads(json.dumps(two.state())))
    assert _take(resumed, 7) == one[5:]


def test_each_process_reads_only_its_rows():
    read = {0: [], 1: []}

    def recording(p):
        return lambda record: read[p].append(record["index"]) or transform(record)

    runs = [make_loader(RangeSource(11), batch_size=4, transform=recording(p), seed=2, num_epochs=1, process_index=p,
                        process_count=2) for p in range(2)]  # fmt: skip
    seen = [[i for b in run for _, i in _ids(b)] for run in runs]
    assert all(len(s) == 4 for s in seen) and not set(seen[0]) & set(seen[1])  # 2 global batches of 4; 3 left over
    assert sorted(read[0]) == sorted(seen[0]) and sorted(read[1]) == sorted(seen[1])  # nothing else was read
    with pytest.raises(ValueError, match="not divisible"):
        make_loader(RangeSource(11), batch_size=3, process_index=0, process_count=2)


def test_restore_rejects_other_settings():
    state = make_loader(RangeSource(10), batch_size=2, seed=1).state()
    with pytest.raises(ValueError, match="settings"):
        make_loader(RangeSource(10), batch_size=2, seed=2).restore(state)


def test_synthetic_source_through_workers_matches_in_process():
    source = SyntheticIQA("train", 12, seed=0)

    def mos_of(record):
        return {"mos": np.float32(record["mos"]), "size": np.int32(record["height"] * record["width"])}

    kwargs = dict(batch_size=4, transform=mos_of, seed=5, num_epochs=2)
    expected = [b["mos"].tolist() for b in make_loader(source, **kwargs)]
    loader = make_loader(source, worker_count=2, **kwargs)
    try:
        head = [next(loader)["mos"].tolist() for _ in range(2)]
        state = loader.state()
        loader.restore(state)  # restoring in place continues where it was
        head.append(next(loader)["mos"].tolist())
        state = loader.state()
    finally:
        loader.close()
    resumed = make_loader(source, worker_count=0, **kwargs)  # the state does not depend on worker_count
    resumed.restore(state)
    assert head + [b["mos"].tolist() for b in resumed] == expected and len(expected) == 6


def _batch(batch_size=8, seq=6, patches=8, slots=2):
    rng = np.random.default_rng(0)
    ints = lambda *shape: rng.integers(0, 100, size=shape, dtype=np.int32)  # noqa: E731
    return Batch(
        input_ids=ints(batch_size, seq),
        attention_mask=ints(batch_size, seq) > 20,
        position_ids=ints(3, batch_size, seq),
        rope_deltas=ints(batch_size),
        loss_mask=ints(batch_size, seq) > 50,
        pixel_values=rng.normal(size=(batch_size, patches, 12)).astype(np.float32),
        image_grid_thw=ints(batch_size, slots, 3),
        vision_pos_ids=ints(batch_size, patches, 2),
        window_index=ints(batch_size, patches),
        window_segment_ids=ints(batch_size, patches),
        full_segment_ids=ints(batch_size, patches),
        image_feature_index=ints(batch_size, seq),
    )


def test_global_batch_sharding_on_mesh():
    mesh = make_mesh((2, 2, 2))
    host = _batch()
    placed = to_global(host, mesh)
    batch_spec = ("data", "fsdp")
    for name in Batch.__dataclass_fields__:
        array, local = getattr(placed, name), getattr(host, name)
        assert isinstance(array, jax.Array)
        expected = P(None, batch_spec, None) if name == "position_ids" else P(batch_spec, *[None] * (local.ndim - 1))
        assert array.sharding.spec == expected, name
        np.testing.assert_array_equal(np.asarray(array), local)
        for shard in array.addressable_shards:  # each device holds exactly its slice of the batch
            np.testing.assert_array_equal(np.asarray(shard.data), local[shard.index])
            batch_axis = 1 if name == "position_ids" else 0
            assert shard.data.shape[batch_axis] == 2
    custom = to_global({"scores": np.arange(16.0).reshape(2, 8)}, mesh, axes={"scores": (None, "batch")})
    assert custom["scores"].sharding.spec == P(None, batch_spec)
    step = to_global({"step": np.int32(3)}, mesh)["step"]  # a scalar is replicated
    assert step.sharding.spec == P() and int(step) == 3
    with pytest.raises(ValueError, match="not divisible"):
        to_global(_batch(batch_size=6), mesh)


def test_paired_batches_place_both_parts():
    def encode(record):
        example = {"ids": np.full((3,), record["index"], np.int32)}
        return example, {"mos": np.float32(record["index"] / 10)}

    def collate(examples):
        return {"ids": np.stack([e["ids"] for e in examples])}

    loader = make_loader(RangeSource(16), batch_size=8, transform=encode, collate=collate_pairs(collate), seed=0)
    batch, extras = next(loader)
    np.testing.assert_allclose(extras["mos"], batch["ids"][:, 0] / 10)
    placed = to_global((batch, extras), make_mesh((2, 2, 2)))
    assert placed[1]["mos"].sharding.spec == P(("data", "fsdp"))
    np.testing.assert_allclose(np.asarray(placed[1]["mos"]), extras["mos"])
