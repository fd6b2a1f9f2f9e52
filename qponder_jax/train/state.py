"""The train state, its shardings, orbax checkpoints (async, keep last N, resume on any mesh) and SIGTERM handling.

A checkpoint step directory `<workdir>/checkpoints/<step>/` holds two items:
- `state`: the TrainState pytree (params, optimizer state, step, RNG) as sharded arrays;
- `data`: the data iterator's state as JSON, so a resumed run sees exactly the batches it would have seen.
Restoring takes an abstract target with the *current* mesh's shardings, so a run saved on one mesh shape resumes on
another. Before restoring, the checkpoint's array metadata is compared with the target and any difference raises a
`CheckpointMismatchError` naming the parameter; the checkpoint itself is never modified. A damaged checkpoint (a
truncated or missing file: it fails to read) is skipped for the newest one that restores (`restore_newest`); the
training `Checkpointer` moves it to `<checkpoints>.damaged/<step>` so the run can save that step again, and says so
in one line. It is never deleted.
"""

from __future__ import annotations

import base64
import os
import signal
import threading
from pathlib import Path
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qponder_jax.model import sharding
from qponder_jax.train.optim import named_leaves, param_path


@flax.struct.dataclass
class TrainState:
    """Everything a training step reads and writes. `step` counts applied optimizer updates."""

    step: jax.Array  # [] int32
    params: dict  # nested dict of arrays: the model's nnx.Param values (nnx.to_pure_dict layout)
    opt_state: optax.OptState
    rng: jax.Array  # [2] uint32; raw PRNG key data (checkpointable)


class CheckpointMismatchError(ValueError):
    """A checkpoint in the workdir does not fit the model or optimizer being trained."""


class CheckpointUnreadableError(ValueError):
    """No checkpoint of a folder restores (each one is damaged), or the step asked for does not."""


def damage_reason(error: BaseException) -> str:
    """Why a checkpoint did not restore, in one short line: the error's type and the first line of its message."""
    first = (str(error).strip().splitlines() or [""])[0].split(" See full TensorStore details")[0]
    first = first if len(first) <= 160 else first[:157] + "..."
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def restore_newest(steps, restore_at, where: Path) -> tuple[Any, int, list[tuple[int, str]]]:
    """`restore_at(step)` of the newest of `steps` that restores, trying them newest first: (its result, that step,
    [(each newer step, why it did not restore)]). A CheckpointMismatchError (the model or optimizer differs, so every
    step would fail alike) is raised at once; when no step restores, CheckpointUnreadableError names each step."""
    skipped: list[tuple[int, str]] = []
    for step in sorted(steps, reverse=True):
        try:
            result, reason = restore_at(step), None
        except CheckpointMismatchError:
            raise
        except Exception as e:  # damage surfaces as orbax, tensorstore, JSON or OS errors of many types
            result, reason = None, damage_reason(e)
        if not _on_every_process(reason is None):  # all processes fall back together
            skipped.append((step, reason or "it did not restore on another process"))
            continue
        return result, step, skipped
    listed = "; ".join(f"step {step}: {reason}" for step, reason in skipped)
    raise CheckpointUnreadableError(
        f"no checkpoint in {where} restores ({listed}). They are left in place; move them away to start afresh"
    )


def _on_every_process(ok: bool) -> bool:
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(multihost_utils.process_allgather(jnp.asarray(ok)).all())


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, dict, nnx.State]:
    """(graphdef, params as a pure dict, the remaining non-parameter state)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, nnx.to_pure_dict(params), rest


def param_shardings(model: nnx.Module, mesh: Mesh) -> dict:
    """NamedSharding per parameter (pure dict layout), from the `axes` metadata and the rules table."""
    abstract_params = nnx.state(model, nnx.Param)
    return nnx.to_pure_dict(sharding.state_shardings(abstract_params, mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def opt_state_shardings(abstract_opt_state, param_shards: dict, params, mesh: Mesh):
    """Shardings for an optimizer state: a leaf whose path ends with a parameter's path and has that parameter's
    shape (Adam's mu / nu) takes the parameter's sharding; everything else (counts, scalars) is replicated."""
    by_path = {path: (p.shape, s) for (path, p), (_, s) in zip(named_leaves(params), named_leaves(param_shards))}

    def one(path, leaf):
        full = param_path(path)
        for ppath, (shape, shard) in by_path.items():
            if (full == ppath or full.endswith("/" + ppath)) and tuple(leaf.shape) == tuple(shape):
                return shard
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(one, abstract_opt_state)


def abstract_train_state(params, tx: optax.GradientTransformation, param_shards: dict, mesh: Mesh) -> TrainState:
    """The TrainState for `params` (arrays or ShapeDtypeStructs) as ShapeDtypeStructs carrying their shardings.

    It is both the restore target and, through `shardings_of`, the jit in/out shardings of the train step.
    """
    sds = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    abs_params = jax.tree.map(sds, params, param_shards)
    abs_opt = jax.eval_shape(tx.init, abs_params)
    opt_shards = opt_state_shardings(abs_opt, param_shards, params, mesh)
    rep = replicated(mesh)
    return TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
        params=abs_params,
        opt_state=jax.tree.map(sds, abs_opt, opt_shards),
        rng=jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep),
    )


def shardings_of(abstract: TrainState) -> TrainState:
    return jax.tree.map(lambda x: x.sharding, abstract)


def init_train_state(params: dict, tx: optax.GradientTransformation, abstract: TrainState, *, seed: int = 0):
    """A TrainState at step 0 laid out as `abstract`: params moved onto their shardings, the optimizer state
    created directly on its shardings."""
    shards = shardings_of(abstract)
    params = jax.device_put(params, shards.params)
    mesh = shards.step.mesh
    with jax.set_mesh(mesh):
        opt_state = jax.jit(tx.init, out_shardings=shards.opt_state)(params)
    rng = jax.device_put(jax.random.key_data(jax.random.key(seed)), shards.rng)
    step = jax.device_put(jnp.zeros((), jnp.int32), shards.step)
    return TrainState(step=step, params=params, opt_state=opt_state, rng=rng)


# ---- data iterator state <-> JSON ----


def encode_data_state(data_state: Any) -> dict:
    """A JSON-able dict for an iterator state that is a JSON-able value, bytes, or None."""
    if isinstance(data_state, bytes):
        return {"bytes_b64": base64.b64encode(data_state).decode("ascii")}
    return {"value": data_state}


def decode_data_state(blob: dict) -> Any:
    if "bytes_b64" in blob:
        return base64.b64decode(blob["bytes_b64"])
    return blob.get("value")


class Checkpointer:
    """orbax CheckpointManager for a TrainState plus the data-iterator state, keeping the last `max_to_keep`."""

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save)
        handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, state: TrainState, data_state: Any = None) -> bool:
        """Starts an (async) save at the state's step; False if that step is already saved."""
        step = int(jax.device_get(state.step))
        if step in self.manager.all_steps():
            return False
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state_tree(state)), data=ocp.args.JsonSave(encode_data_state(data_state))
        )
        self.manager.save(step, args=args, force=True)
        return True

    def check_compatible(self, target: TrainState, step: int) -> None:
        """Raises CheckpointMismatchError naming the first parameters whose shape or dtype differ from `target`."""
        saved = self.manager.item_metadata(step)["state"]
        saved_tree = getattr(saved, "tree", saved)
        have = {p: (tuple(m.shape), str(m.dtype)) for p, m in named_leaves(saved_tree) if hasattr(m, "shape")}
        want = {p: (tuple(x.shape), str(x.dtype)) for p, x in named_leaves(state_tree(target))}
        where = f"checkpoint {self.directory / str(step)}"
        if not have:  # damage, not another model: the array metadata (state/_METADATA) is missing or unreadable
            raise CheckpointUnreadableError(f"{where}: its array metadata lists no arrays")
        param_problems, other_problems = [], []
        for path in sorted(set(want) | set(have)):
            is_param = path.startswith("params/")
            kind = "parameter" if is_param else "entry"
            name = path.removeprefix("params/")
            if path not in have:
                problem = f"{kind} {name!r} is missing from the checkpoint"
            elif path not in want:
                problem = f"{kind} {name!r} is in the checkpoint but not in the model being trained"
            elif have[path] != want[path]:
                problem = (
                    f"{kind} {name!r} has shape/dtype {have[path]} in the checkpoint but {want[path]} in the model"
                )
            else:
                continue
            (param_problems if is_param else other_problems).append(problem)
        problems = param_problems or other_problems  # optimizer entries mirror the parameters: name those first
        if problems:
            hint = (
                "The workdir holds a run of a different model or optimizer setup (e.g. a changed freeze setting); "
                "use a fresh --workdir or the config that wrote it. The checkpoint was not modified."
            )
            shown = "; ".join(problems[:5]) + (f"; ... ({len(problems)} differences)" if len(problems) > 5 else "")
            raise CheckpointMismatchError(f"{where} does not match: {shown}. {hint}")

    def restore(self, target: TrainState, step: int | None = None) -> tuple[TrainState, Any]:
        """(state, data_state) placed on `target`'s shardings, from `step`, or by default from the newest checkpoint
        that restores: each newer, damaged one is moved to `<directory>.damaged/` (never deleted) and named in one
        warning line, so that this run saves its step again."""
        if step is not None:
            try:
                return self._restore_at(target, step)
            except (CheckpointMismatchError, CheckpointUnreadableError):
                raise
            except Exception as e:
                where = self.directory / str(step)
                raise CheckpointUnreadableError(f"checkpoint {where} does not restore ({damage_reason(e)})") from e
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        restored, step, skipped = restore_newest(steps, lambda s: self._restore_at(target, s), self.directory)
        moved = self._set_aside([s for s, _ in skipped]) if skipped else {}
        for damaged, reason in skipped:
            if jax.process_index() == 0:
                logging.warning(
                    "checkpoint step %d in %s does not restore (%s): moved to %s (not deleted); resuming from step %d",
                    damaged, self.directory, reason, moved[damaged], step,
                )  # fmt: skip
        return restored

    @property
    def damaged_dir(self) -> Path:
        """Where damaged checkpoints are moved: `<directory>.damaged/<step>`."""
        return self.directory.with_name(self.directory.name + ".damaged")

    def _set_aside(self, steps: list[int]) -> dict[int, Path]:
        """Moves the step folders out of the manager's sight (process 0 moves, every process waits), then rereads
        the folder; returns step -> where it went (on process 0)."""
        moved = {}
        if jax.process_index() == 0:
            self.damaged_dir.mkdir(parents=True, exist_ok=True)
            for step in steps:
                target, n = self.damaged_dir / str(step), 1
                while target.exists():  # damaged at that step before: keep both
                    target, n = self.damaged_dir / f"{step}.{n}", n + 1
                (self.directory / str(step)).rename(target)
                moved[step] = target
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"set_aside:{self.directory}:{steps}")
        self.manager.reload()
        return moved

    def _restore_at(self, target: TrainState, step: int) -> tuple[TrainState, Any]:
        self.check_compatible(target, step)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(state_tree(target)), data=ocp.args.JsonRestore())
        restored = self.manager.restore(step, args=args)
        tree = restored["state"]
        state = TrainState(step=tree["step"], params=tree["params"], opt_state=tree["opt_state"], rng=tree["rng"])
        return state, decode_data_state(restored["data"] or {})

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def state_tree(state: TrainState) -> dict:
    """The TrainState as the plain dict orbax stores (stable names: params/..., opt_state/..., step, rng)."""
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state, "rng": state.rng}


class PreemptionHandler:
    """Turns SIGTERM (a preemption notice) into a flag the training loop polls between steps.

    As a context manager it installs the handler (main thread only) and restores the previous one on exit. With
    several processes, `should_stop()` agrees across all of them so every host saves the same step.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self.signals = signals
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        logging.warning("received signal %d: saving a checkpoint and stopping after this step", signum)
        self.requested = True

    def __enter__(self) -> PreemptionHandler:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def should_stop(self) -> bool:
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        return bool(multihost_utils.process_allgather(jnp.asarray(self.requested)).any())
