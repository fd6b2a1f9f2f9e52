"""The training loop shared by the trainers: steps, metrics, eval, checkpoints, preemption and non-finite guards.

The loop knows nothing about the loss: it calls `train_step(state, batch) -> (state, metrics)` where metrics hold at
least `loss`, `grad_norm`, `learning_rate`, `tokens`, `patches` and `finite`, and the step leaves the state untouched
when `finite` is False. Step numbers count applied updates: after update s, `state.step == s`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any, Protocol

import jax
import numpy as np

from qponder_jax.train.logging import FlopModel, MetricLogger
from qponder_jax.train.state import Checkpointer, PreemptionHandler, TrainState


class DataIterator(Protocol):
    """A batch iterator with a checkpointable position: `get_state` / `set_state` (grain's DatasetIterator) or
    `state` / `restore` (`qponder_jax.data.pipeline.Loader`)."""

    def __next__(self) -> Any: ...


def data_position(data: DataIterator) -> Any:
    """The iterator's checkpointable position."""
    return data.get_state() if hasattr(data, "get_state") else data.state()


def set_data_position(data: DataIterator, position: Any) -> None:
    if hasattr(data, "set_state"):
        data.set_state(position)
    else:
        data.restore(position)


class NonFiniteError(FloatingPointError):
    """The loss or gradient norm stayed non-finite for more steps in a row than the config allows."""


@dataclasses.dataclass
class LoopResult:
    state: TrainState
    losses: dict[int, float]  # update number -> training loss of that update
    status: str  # "done" or "preempted"


@dataclasses.dataclass(frozen=True)
class LoopSettings:
    total_steps: int  # stop after this many applied updates
    log_every: int = 10  # metrics every N updates
    eval_every: int = 0  # held-out eval every M updates (0: never during training; always at the end if eval_fn)
    checkpoint_every: int = 100  # save every K updates (and always at the end)
    max_consecutive_nonfinite: int = 0  # skip up to this many non-finite steps in a row; one more stops the run


def restore_or_keep(checkpointer: Checkpointer, abstract: TrainState, data: DataIterator | None) -> TrainState | None:
    """The latest checkpoint's state (and the data iterator moved to its position), or None if there is none."""
    if checkpointer.latest_step() is None:
        return None
    state, data_state = checkpointer.restore(abstract)
    if data is not None and data_state is not None:
        set_data_position(data, data_state)
    return state


def start_line(step: int, total_steps: int) -> str:
    """Where a training job starts: a fresh run, a resume, or a run already complete (the loop then does nothing)."""
    if step == 0:
        return "starting at step 0"
    if step < total_steps:
        return f"resuming at step {step} of {total_steps}"
    return (
        f"the run is complete (checkpoint at step {step}, train.total_steps={total_steps}): nothing to train; raise "
        "train.total_steps to train further, or use a new --workdir"
    )


def run_loop(
    state: TrainState,
    train_step: Callable[[TrainState, Any], tuple[TrainState, dict]],
    data: DataIterator,
    settings: LoopSettings,
    *,
    checkpointer: Checkpointer,
    logger: MetricLogger,
    place: Callable[[Any], Any] = lambda b: b,
    eval_fn: Callable[[TrainState], dict] | None = None,
    flop_model: FlopModel | None = None,
    peak_flops: float | None = None,
    preemption: PreemptionHandler | None = None,
    after_step: Callable[[int, dict], None] | None = None,
) -> LoopResult:
    """Trains until `settings.total_steps` updates, a preemption signal, or too many non-finite steps."""
    step = int(jax.device_get(state.step))
    losses: dict[int, float] = {}
    last_good_data = data_position(data)
    consecutive_bad = 0
    window = _Window()
    n_devices = jax.device_count()
    while step < settings.total_steps:
        batch = place(next(data))
        state, metrics = train_step(state, batch)
        metrics = jax.device_get(metrics)
        if not bool(metrics["finite"]):
            consecutive_bad += 1
            logger.text(
                f"step {step + 1}: non-finite loss ({float(metrics['loss'])}) or gradient norm "
                f"({float(metrics['grad_norm'])}); update skipped ({consecutive_bad} in a row, "
                f"limit {settings.max_consecutive_nonfinite})"
            )
            if consecutive_bad > settings.max_consecutive_nonfinite:
                checkpointer.save(state, last_good_data)  # the state is unchanged: the last good one
                checkpointer.wait()
                raise NonFiniteError(
                    f"training stopped at step {step + 1}: the loss or gradient norm was non-finite "
                    f"(loss={float(metrics['loss'])}, grad_norm={float(metrics['grad_norm'])}) for "
                    f"{consecutive_bad} step(s) in a row (train.max_consecutive_nonfinite="
                    f"{settings.max_consecutive_nonfinite}). The last good state (step {step}) is checkpointed in "
                    f"{checkpointer.directory}; lower the learning rate or check the data, then rerun to resume."
                )
            if preemption is not None and preemption.should_stop():
                return _preempted(state, losses, checkpointer, logger, last_good_data)
            continue
        consecutive_bad = 0
        step += 1
        last_good_data = data_position(data)
        losses[step] = float(metrics["loss"])
        window.add(metrics, first=(len(losses) == 1))
        logger.advance(step)
        if after_step is not None:
            after_step(step, metrics)
        if step % settings.log_every == 0 or step == settings.total_steps:
            logger.write(step, window.scalars(metrics, flop_model, peak_flops, n_devices))
            window = _Window()
        if eval_fn is not None and (
            (settings.eval_every and step % settings.eval_every == 0) or step == settings.total_steps
        ):
            logger.write(step, eval_fn(state), prefix="eval")
        if preemption is not None and preemption.should_stop():
            return _preempted(state, losses, checkpointer, logger, last_good_data)
        if step % settings.checkpoint_every == 0 or step == settings.total_steps:
            checkpointer.save(state, last_good_data)
    checkpointer.wait()
    return LoopResult(state=state, losses=losses, status="done")


def _preempted(state, losses, checkpointer: Checkpointer, logger: MetricLogger, data_state) -> LoopResult:
    """Saves the current state (synchronously) and ends the loop."""
    checkpointer.save(state, data_state)
    checkpointer.wait()
    step = int(jax.device_get(state.step))
    logger.text(f"preempted: checkpoint saved at step {step} in {checkpointer.directory}; exiting")
    return LoopResult(state=state, losses=losses, status="preempted")


class _Window:
    """Metric sums over one logging interval. The loss is the interval's mean; the clock starts after the run's
    first step, which includes compiling."""

    def __init__(self):
        self.start = time.perf_counter()
        self.timed_steps = 0
        self.tokens = self.patches = 0.0
        self.losses: list[float] = []

    def add(self, metrics: dict, *, first: bool) -> None:
        self.losses.append(float(metrics["loss"]))
        if first:
            self.start = time.perf_counter()
            return
        self.timed_steps += 1
        self.tokens += float(metrics["tokens"])
        self.patches += float(metrics["patches"])

    def scalars(self, metrics: dict, flop_model: FlopModel | None, peak: float | None, n_devices: int) -> dict:
        elapsed = time.perf_counter() - self.start
        timed = self.timed_steps > 0 and elapsed > 0
        out = {
            "loss": float(np.mean(self.losses)),
            "learning_rate": float(metrics["learning_rate"]),
            "grad_norm": float(metrics["grad_norm"]),
            "target_tokens": float(metrics["target_tokens"]),
            "tokens_per_s": self.tokens / elapsed if timed else None,
            "steps_per_s": self.timed_steps / elapsed if timed else None,
        }
        mfu = None
        if timed and flop_model is not None and peak:
            mfu = flop_model.step_flops(self.tokens, self.patches) / (elapsed * n_devices * peak)
        out["mfu"] = mfu
        return out


def mean_eval_loss(sums: list[dict]) -> dict:
    """{'loss': total NLL / total target tokens} from per-batch eval sums."""
    nll = float(np.sum([s["nll_sum"] for s in sums]))
    n = float(np.sum([s["target_tokens"] for s in sums]))
    return {"loss": nll / max(n, 1.0), "target_tokens": n}
