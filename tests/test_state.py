"""Train state and checkpoints: shardings, restore on another mesh, mismatch errors, keep-last-N, SIGTERM."""

import hashlib
import os
import signal
from pathlib import Path

import jax
import numpy as np
import pytest
from train_helpers import optim_cfg, random_model

from qponder_jax.model import sharding
from qponder_jax.model.config import tiny_config
from qponder_jax.train import optim
from qponder_jax.train import state as ts


def _state_on(mesh_shape, *, config=None, freeze=(), seed=0):
    """(TrainState, its abstract target, optimizer) for the tiny model on a mesh of the first devices."""
    mesh = sharding.make_mesh(mesh_shape, jax.devices()[: int(np.prod(mesh_shape))])
    _, params, _, shards = random_model(config or tiny_config(), mesh, seed=seed)
    tx, _, _ = optim.from_config(optim_cfg(freeze=freeze), params, total_steps=10)
    abstract = ts.abstract_train_state(params, tx, shards, mesh)
    return ts.init_train_state(params, tx, abstract, seed=seed), abstract, tx


def _tree_digest(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A checkpoint at step 3 of a state on the (2, 2, 2) mesh, with non-zero Adam moments."""
    state, abstract, tx = _state_on((2, 2, 2))
    # distinct values everywhere (eagerly: no compile): params shifted, moments and counts non-zero
    state = state.replace(
        step=state.step + 3,
        params=jax.tree.map(lambda x: x + 0.01, state.params),
        opt_state=jax.tree.map(lambda x: x + 1, state.opt_state),
    )
    directory = tmp_path_factory.mktemp("ckpt")
    ckpt = ts.Checkpointer(directory, max_to_keep=2)
    ckpt.save(state, {"index": 17, "epoch": 1})
    ckpt.close()
    return directory, jax.device_get(state)


def test_param_and_moment_shardings_follow_the_rules():
    state, _, _ = _state_on((2, 2, 2))
    kernel = state.params["language_model"]["layers"][0]["mlp"]["gate_proj"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    moments = [x for path, x in optim.named_leaves(state.opt_state) if path.endswith("layers/0/mlp/gate_proj/kernel")]
    assert len(moments) == 2  # Adam mu and nu, sharded like the parameter
    assert all(m.sharding.spec == kernel.sharding.spec for m in moments)
    assert state.step.sharding.spec == jax.sharding.PartitionSpec()


@pytest.mark.parametrize("mesh_shape", [(1, 1, 1), (1, 4, 2)])
def test_restore_on_another_mesh_shape(saved, mesh_shape):
    directory, expected = saved
    _, abstract, _ = _state_on(mesh_shape, seed=1)
    ckpt = ts.Checkpointer(directory)
    restored, data_state = ckpt.restore(abstract)
    ckpt.close()
    assert data_state == {"index": 17, "epoch": 1}
    assert int(restored.step) == 3
    for (path, got), (_, want), (_, target) in zip(
        optim.named_leaves(ts.state_tree(restored)),
        optim.named_leaves(ts.state_tree(expected)),
        optim.named_leaves(ts.state_tree(abstract)),
    ):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=path)
        assert got.sharding == target.sharding, path  # placed on the *new* mesh's shardings
    gate = restored.params["language_model"]["layers"][0]["mlp"]["gate_proj"]["kernel"]
    assert len(gate.sharding.device_set) == int(np.prod(mesh_shape))


def test_checkpoint_of_another_model_shape_is_a_clear_error_and_untouched(saved):
    directory, _ = saved
    before = _tree_digest(directory)
    _, abstract, _ = _state_on((1, 1, 1), config=tiny_config(intermediate_size=96))
    ckpt = ts.Checkpointer(directory)
    with pytest.raises(ts.CheckpointMismatchError) as info:
        ckpt.restore(abstract)
    ckpt.close()
    message = str(info.value)
    assert "parameter 'language_model/layers/0/mlp/down_proj/kernel'" in message
    assert "(128, 64)" in message and "(96, 64)" in message
    assert "not modified" in message
    assert _tree_digest(directory) == before


def test_changed_freeze_setting_is_named(saved):
    directory, _ = saved
    _, abstract, _ = _state_on((1, 1, 1), freeze=("vision_tower",))
    ckpt = ts.Checkpointer(directory)
    with pytest.raises(ts.CheckpointMismatchError, match=r"opt_state/.*visual/blocks/0/.*in the checkpoint but not in"):
        ckpt.restore(abstract)
    ckpt.close()


def test_keep_last_n_and_async_saves(tmp_path):
    state, _, _ = _state_on((1, 1, 1))
    ckpt = ts.Checkpointer(tmp_path, max_to_keep=2, async_save=True)
    for step in range(1, 6):
        assert ckpt.save(state.replace(step=state.step + step), {"index": step})
    assert not ckpt.save(state.replace(step=state.step + 5))  # that step already exists
    ckpt.wait()
    assert ckpt.all_steps() == [4, 5]
    assert ckpt.latest_step() == 5
    ckpt.close()


def _damage(step_dir: Path, how: str) -> None:
    if how == "truncated":  # every array data file cut short (a crash or a full disk mid-copy)
        for f in (step_dir / "state").rglob("d/*"):
            f.write_bytes(f.read_bytes()[:64])
    else:  # the array metadata is gone: it once read as "every parameter is missing" (a model mismatch)
        (step_dir / "state" / "_METADATA").unlink()


@pytest.mark.parametrize("how", ["truncated", "no_metadata"])
def test_a_damaged_latest_checkpoint_falls_back_and_is_kept(tmp_path, caplog, how):
    """The newest checkpoint is damaged: resume restores the one before it, one warning line names the skipped step,
    why, and where it was moved (byte for byte, never deleted), and the run can save that step again. When no
    checkpoint restores, one error names every step and nothing is moved."""
    state, abstract, _ = _state_on((1, 1, 1))
    ckpt = ts.Checkpointer(tmp_path / "checkpoints", async_save=False)
    for step in (1, 2, 3):
        ckpt.save(state.replace(step=state.step + step), {"index": step})
    ckpt.close()
    _damage(tmp_path / "checkpoints" / "3", how)
    before = _tree_digest(tmp_path / "checkpoints" / "3")
    ckpt = ts.Checkpointer(tmp_path / "checkpoints", async_save=False)
    with caplog.at_level("WARNING"):
        restored, data_state = ckpt.restore(abstract)
    assert int(restored.step) == 2 and data_state == {"index": 2}
    lines = [r.getMessage() for r in caplog.records if "does not restore" in r.getMessage()]
    assert len(lines) == 1 and "checkpoint step 3 in" in lines[0] and "resuming from step 2" in lines[0], lines
    assert f"moved to {tmp_path / 'checkpoints.damaged' / '3'} (not deleted)" in lines[0]
    assert _tree_digest(tmp_path / "checkpoints.damaged" / "3") == before
    assert ckpt.all_steps() == [1, 2] and ckpt.save(restored.replace(step=restored.step + 1))  # step 3 again
    ckpt.close()

    for step in (1, 2, 3):
        _damage(tmp_path / "checkpoints" / str(step), how)
    ckpt = ts.Checkpointer(tmp_path / "checkpoints")
    every_step = r"no checkpoint in .* restores \(step 3: .*; step 2: .*; step 1: "
    with pytest.raises(ts.CheckpointUnreadableError, match=every_step):
        ckpt.restore(abstract)
    ckpt.close()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2", "3"]


def test_read_only_restore_skips_a_damaged_latest_checkpoint(tmp_path, caplog):
    """Eval and export (`loading.restore_params` without a step) use the newest checkpoint that restores, name the
    damaged one in one line and leave it where it is; asked for that step explicitly, they raise one clear error."""
    from flax import nnx

    from qponder_jax import loading
    from qponder_jax.model.qwen2_5_vl import Qwen25VL

    state, _, _ = _state_on((1, 1, 1))
    ckpt = ts.Checkpointer(tmp_path, async_save=False)
    for step in (1, 2):
        shifted = jax.tree.map(lambda x, k=step: x + k, state.params)
        ckpt.save(state.replace(step=state.step + step, params=shifted))
    ckpt.close()
    _damage(tmp_path / "2", "truncated")
    before = _tree_digest(tmp_path)
    abstract = nnx.eval_shape(lambda: Qwen25VL(tiny_config(), rngs=nnx.Rngs(0)))
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    with caplog.at_level("WARNING"):
        params, step = loading.restore_params(tmp_path, abstract, mesh)
    assert step == 1
    got = params["language_model"]["embed_tokens"]["embedding"]
    want = state.params["language_model"]["embed_tokens"]["embedding"] + 1
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    lines = [r.getMessage() for r in caplog.records if "does not restore" in r.getMessage()]
    assert len(lines) == 1 and "step 2" in lines[0] and "left in place; using step 1" in lines[0], lines
    assert _tree_digest(tmp_path) == before
    with pytest.raises(ts.CheckpointUnreadableError, match=r"checkpoint .*2 does not restore \("):
        loading.restore_params(tmp_path, abstract, mesh, step=2)


def test_sigterm_sets_the_flag_and_restores_the_previous_handler():
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda *a: seen.append("old"))
    try:
        with ts.PreemptionHandler() as handler:
            assert not handler.should_stop()
            os.kill(os.getpid(), signal.SIGTERM)
            assert handler.should_stop()
            assert seen == []
        os.kill(os.getpid(), signal.SIGTERM)
        assert seen == ["old"]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_data_state_encoding_round_trips():
    for value in ({"a": [1, 2]}, None, b"\x00grain-state\xff", "text"):
        assert ts.decode_data_state(ts.encode_data_state(value)) == value
