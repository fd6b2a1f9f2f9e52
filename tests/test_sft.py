"""The SFT step and loop: loss alignment, mesh and accumulation equivalence, resume after SIGTERM, restore on
another mesh, non-finite guards, metrics."""

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_helpers import ListIterator, Run, make_batch

from qponder_jax.model.config import tiny_config
from qponder_jax.train import loop, optim
from qponder_jax.train import state as ts
from qponder_jax.train.logging import FlopModel, MetricLogger, read_metrics
from qponder_jax.train.sft import jit_eval_step, next_token_loss

TOTAL = 6
CONFIG = tiny_config()


@pytest.fixture(scope="module")
def batches():
    rng = np.random.default_rng(0)
    return [make_batch(rng, CONFIG) for _ in range(3)]


@pytest.fixture(scope="module")
def single():
    return Run((1, 1, 1), total_steps=TOTAL)


@pytest.fixture(scope="module")
def mesh8():
    return Run((2, 2, 2), total_steps=TOTAL)


@pytest.fixture(scope="module")
def reference(single, batches, tmp_path_factory):
    """An uninterrupted 1-device run: (losses by step, final params on the host)."""
    result = _train(single, batches, tmp_path_factory.mktemp("ref"))
    return result.losses, jax.device_get(result.state.params)


def _train(run, batches, workdir, *, state=None, data=None, settings=None, **kw):
    data = data or ListIterator(batches)
    ckpt = ts.Checkpointer(workdir / "checkpoints", max_to_keep=5)
    logger = MetricLogger(workdir, total_steps=TOTAL, progress=False, tensorboard=kw.pop("tensorboard", False))
    try:
        return loop.run_loop(
            state if state is not None else run.fresh_state(),
            run.step_fn(batches[0]),
            data,
            settings or loop.LoopSettings(total_steps=TOTAL, log_every=2, checkpoint_every=100),
            checkpointer=ckpt,
            logger=logger,
            **kw,
        )
    finally:
        ckpt.close()
        logger.close()


def _max_diff(a, b) -> float:
    return max(
        float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def test_next_token_loss_alignment_and_mask():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    ids = rng.integers(0, 7, size=(2, 5)).astype(np.int32)
    mask = np.array([[0, 0, 1, 1, 0], [0, 1, 0, 0, 1]], bool)
    total, count = next_token_loss(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(mask))
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    # target token t is predicted by the logits at t - 1
    want = -sum(logp[b, t - 1, ids[b, t]] for b in range(2) for t in range(1, 5) if mask[b, t])
    assert float(count) == 4.0
    assert float(total) == pytest.approx(want, rel=1e-5)
    # a target at position 0 has no prediction and is ignored
    mask0 = mask.copy()
    mask0[0, 0] = True
    assert float(next_token_loss(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(mask0))[1]) == 4.0


@pytest.mark.slow  # compiling the step for 8 devices takes ~40 s on 2 cores
def test_mesh_2x2x2_matches_one_device(mesh8, batches, reference, tmp_path):
    losses, params = reference
    result = _train(mesh8, batches, tmp_path)
    diffs = [abs(result.losses[s] - losses[s]) for s in range(1, TOTAL + 1)]
    print("max loss diff (2,2,2) vs 1 device:", max(diffs), "max param diff:", _max_diff(result.state.params, params))
    assert max(diffs) < 1e-5
    # Adam divides by sqrt(nu): entries with near-zero gradients amplify reduction-order rounding, so parameters
    # agree to ~3e-5 after 6 steps at lr 3e-3 while the losses agree to ~5e-7.
    assert _max_diff(result.state.params, params) < 1e-4
    assert losses[TOTAL] < losses[1] - 0.5  # the steps are really learning (memorizing 3 batches)
    kernel = result.state.params["language_model"]["layers"][0]["mlp"]["up_proj"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")


def test_gradient_accumulation_matches_one_big_batch(single, batches):
    accum = Run((1, 1, 1), total_steps=TOTAL, grad_accum=2)
    fn_big, fn_acc = single.step_fn(batches[0]), accum.step_fn(batches[0])
    big, acc = single.fresh_state(), accum.fresh_state()
    for i in range(3):
        big, m_big = fn_big(big, batches[i])
        acc, m_acc = fn_acc(acc, batches[i])
        assert float(m_acc["loss"]) == pytest.approx(float(m_big["loss"]), abs=1e-6)
        assert float(m_acc["grad_norm"]) == pytest.approx(float(m_big["grad_norm"]), rel=1e-5)
    assert _max_diff(acc.params, big.params) < 2e-5  # measured ~6e-6: Adam amplifies summation-order rounding


def test_frozen_vision_tower_does_not_move(batches):
    run = Run((1, 1, 1), total_steps=TOTAL, freeze=("vision_tower",))
    state0 = jax.device_get(run.fresh_state().params)
    state = run.fresh_state()
    fn = run.step_fn(batches[0])
    for i in range(2):
        state, _ = fn(state, batches[i])
    after = dict(optim.named_leaves(jax.device_get(state.params)))
    before = dict(optim.named_leaves(state0))
    for path in before:
        moved = not np.array_equal(after[path], before[path])
        frozen = path.startswith("visual/") and not path.startswith("visual/merger/")
        assert moved != frozen, path


def test_resume_after_sigterm_matches_uninterrupted_run(single, batches, reference, tmp_path):
    ref_losses, ref_params = reference

    def kill_at_3(step, metrics):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    with ts.PreemptionHandler() as handler:
        first = _train(single, batches, tmp_path, preemption=handler, after_step=kill_at_3)
    assert first.status == "preempted"
    assert sorted(first.losses) == [1, 2, 3]
    ckpt = ts.Checkpointer(tmp_path / "checkpoints")
    assert ckpt.all_steps() == [3]
    ckpt.close()

    # A new process would rebuild everything: a state from another seed, a data iterator at position 0.
    data = ListIterator(batches)
    ckpt = ts.Checkpointer(tmp_path / "checkpoints")
    state = loop.restore_or_keep(ckpt, single.abstract, data)
    ckpt.close()
    assert int(state.step) == 3 and data.index == 3
    second = _train(single, batches, tmp_path, state=state, data=data)
    assert second.status == "done"
    curve = {**first.losses, **second.losses}
    assert curve == ref_losses  # bit-identical loss curve
    assert _max_diff(second.state.params, ref_params) == 0.0


@pytest.mark.slow  # shares the 8-device compile with the test above
def test_checkpoint_from_one_mesh_continues_on_another(single, mesh8, batches, reference, tmp_path):
    ref_losses, ref_params = reference
    settings = loop.LoopSettings(total_steps=3, log_every=1, checkpoint_every=3)
    first = _train(single, batches, tmp_path, settings=settings)
    data = ListIterator(batches)
    ckpt = ts.Checkpointer(tmp_path / "checkpoints")
    state = loop.restore_or_keep(ckpt, mesh8.abstract, data)  # saved on 1 device, restored onto (2, 2, 2)
    ckpt.close()
    gate = state.params["language_model"]["layers"][1]["mlp"]["gate_proj"]["kernel"]
    assert len(gate.sharding.device_set) == 8
    second = _train(mesh8, batches, tmp_path, state=state, data=data)
    curve = {**first.losses, **second.losses}
    assert max(abs(curve[s] - ref_losses[s]) for s in ref_losses) < 1e-5
    assert _max_diff(second.state.params, ref_params) < 1e-4


def test_nan_loss_stops_with_the_step_and_keeps_checkpoints(single, batches, tmp_path):
    bad = batches[2].replace(pixel_values=np.full_like(batches[2].pixel_values, np.nan))
    poisoned = [batches[0], batches[1], bad]
    settings = loop.LoopSettings(total_steps=TOTAL, log_every=1, checkpoint_every=1)
    with pytest.raises(loop.NonFiniteError, match=r"stopped at step 3: .*non-finite.*last good state \(step 2\)"):
        _train(single, poisoned, tmp_path, settings=settings)
    ckpt = ts.Checkpointer(tmp_path / "checkpoints")
    assert ckpt.all_steps() == [1, 2]  # nothing lost, nothing written for the bad step
    state, data_state = ckpt.restore(single.abstract)
    ckpt.close()
    assert int(state.step) == 2 and data_state == {"index": 2}  # resumes right before the bad batch
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


def test_skipping_nonfinite_steps_up_to_the_limit(single, batches, tmp_path):
    bad = batches[1].replace(pixel_values=np.full_like(batches[1].pixel_values, np.nan))
    data = ListIterator([batches[0], bad, batches[2]])
    settings = loop.LoopSettings(total_steps=4, log_every=10, checkpoint_every=100, max_consecutive_nonfinite=1)
    result = _train(single, batches, tmp_path, data=data, settings=settings)
    assert result.status == "done" and int(result.state.step) == 4
    assert data.index == 6  # two bad batches were consumed and skipped on the way to 4 updates
    assert all(np.isfinite(v) for v in result.losses.values())


def test_a_resumed_logger_keeps_one_row_per_step(tmp_path):
    """Rows logged after the checkpoint a run resumes from (lost to a kill) are replayed: metrics.jsonl keeps one row
    per step and prefix, with the replayed values, and a line cut off by the kill is dropped."""
    first = MetricLogger(tmp_path, total_steps=6, progress=False, tensorboard=False)
    for step in range(1, 6):
        first.write(step, {"loss": float(step)})
    first.write(4, {"loss": 0.5}, prefix="eval")
    first.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "pre')  # the kill came mid-write
    resumed = MetricLogger(tmp_path, total_steps=6, initial_step=3, progress=False, tensorboard=False)
    for step in range(4, 7):
        resumed.write(step, {"loss": 10.0 + step})
    resumed.close()
    rows = [(r["step"], r["loss"]) for r in read_metrics(tmp_path)]
    assert rows == [(1, 1), (2, 2), (3, 3), (4, 14), (5, 15), (6, 16)]
    assert read_metrics(tmp_path, "eval") == []  # logged at step 4, after the checkpoint: replayed if at all


def test_metrics_eval_and_flop_model(single, batches, tmp_path):
    flops = FlopModel.from_params(single.host_params, single.step.labels, merge_unit=CONFIG.vision.merge_unit)
    text = sum(np.prod(x.shape) for p, x in optim.named_leaves(single.host_params) if p.startswith(("language", "lm_")))
    embed = np.prod(single.host_params["language_model"]["embed_tokens"]["embedding"].shape)
    assert flops.per_text_token == 6.0 * (text - embed)  # embedding lookups are not matmuls
    assert flops.per_patch > 0

    eval_fn_raw = jit_eval_step(single.step, ts.shardings_of(single.abstract).params, single.mesh)

    def eval_fn(state):
        return loop.mean_eval_loss([eval_fn_raw(state.params, b) for b in batches[:2]])

    settings = loop.LoopSettings(total_steps=4, log_every=2, eval_every=2, checkpoint_every=100)
    result = _train(
        single, batches, tmp_path, settings=settings, eval_fn=eval_fn, flop_model=flops, peak_flops=1e12,
        tensorboard=True,
    )  # fmt: skip
    train = read_metrics(tmp_path, "train")
    assert [r["step"] for r in train] == [2, 4]
    assert train[1]["loss"] == pytest.approx((result.losses[3] + result.losses[4]) / 2, rel=1e-6)  # interval mean
    for key in ("loss", "learning_rate", "grad_norm", "tokens_per_s", "mfu"):
        assert train[-1][key] is not None and train[-1][key] > 0, key
    evals = read_metrics(tmp_path, "eval")
    assert [r["step"] for r in evals] == [2, 4] and evals[1]["loss"] < evals[0]["loss"]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))

    # eval loss of a state on a batch == the train step's (pre-update) loss on that batch
    state = single.fresh_state()
    sums = eval_fn_raw(state.params, batches[0])
    _, metrics = single.step_fn(batches[0])(state, batches[0])
    assert float(sums["nll_sum"] / sums["target_tokens"]) == pytest.approx(float(metrics["loss"]), rel=1e-6)
    # learning rate reported is the one optax applied at that update (warmup: (step + 1) / warmup * peak)
    assert float(metrics["learning_rate"]) == pytest.approx(3e-3 / 2, rel=1e-6)
