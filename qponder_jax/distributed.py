"""Multi-host start-up: `jax.distributed.initialize` when the environment asks for it, with timeouts, and a check that
every process runs the same config.

Which environment starts a multi-process run (first match wins; see `plan_from_env`):
- `QPONDER_DISTRIBUTED=off`: never (one process, whatever else is set).
- explicit: `--coordinator_address` / `QPONDER_COORDINATOR_ADDRESS` (or jax's `JAX_COORDINATOR_ADDRESS`) with
  `--num_processes` / `QPONDER_NUM_PROCESSES` and `--process_id` / `QPONDER_PROCESS_ID` (what `launch/local.py` sets);
- SLURM: inside an `srun` step with more than one task (`SLURM_NTASKS > 1`); the coordinator is the step's first
  node on `QPONDER_COORDINATOR_PORT` (default: derived from the job id, as jax does);
- TPU pod: `QPONDER_DISTRIBUTED=tpu` (what `launch/tpu_pod.sh` sets) or GKE's `TPU_WORKER_HOSTNAMES` naming more than
  one host; jax reads the rest from the TPU metadata.

Every wait has a limit: `--distributed_timeout` / `QPONDER_DISTRIBUTED_TIMEOUT` seconds (default 300) for all processes
to join, after which the process prints which wait timed out and exits with status `EXIT_TIMEOUT`; the config check
waits as long for the other processes' fingerprints.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from absl import flags

from qponder_jax.errors import EXIT_RESUME, ConfigError

EXIT_TIMEOUT = EXIT_RESUME  # exit status of a process whose peers did not join in time: rerun to try again
DEFAULT_TIMEOUT_S = 300

_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0's coordinator (multi-process runs; env QPONDER_*)"
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "number of processes of a multi-process run")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index, 0 .. num_processes - 1")
_TIMEOUT = flags.DEFINE_integer("distributed_timeout", None, "seconds to wait for all processes to join (def. 300)")


class DistributedError(ConfigError):
    """Processes that cannot form one run: a missing process, a timeout, or processes that disagree."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """How to call `jax.distributed.initialize`; None fields are left to jax's cluster detection (TPU)."""

    source: str  # "explicit", "slurm" or "tpu": which environment asked for it
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None


def _int_env(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except (KeyError, ValueError):
        raise DistributedError(f"environment variable {name}={env.get(name)!r}: expected an integer") from None


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[003-005,9],cpu1' -> 'gpu003'."""
    m = re.match(r"([^,\[]+)(?:\[([^\],\-]+))?", nodelist.strip())
    if not m:
        raise DistributedError(f"cannot read the first host of the SLURM node list {nodelist!r}")
    return m.group(1) + (m.group(2) or "")


def plan_from_env(env: Mapping[str, str] | None = None, **explicit) -> Plan | None:
    """The start-up plan for this environment, or None for a single-process run.

    `explicit` may hold coordinator_address / num_processes / process_id (the command-line flags); they override the
    environment variables.
    """
    env = os.environ if env is None else env
    mode = env.get("QPONDER_DISTRIBUTED", "auto").strip().lower()
    if mode not in ("auto", "off", "tpu", "slurm", "explicit"):
        raise DistributedError(f"QPONDER_DISTRIBUTED={mode!r}: choose auto, off, explicit, slurm or tpu")
    if mode == "off":
        return None
    coordinator = (
        explicit.get("coordinator_address")
        or env.get("QPONDER_COORDINATOR_ADDRESS")
        or env.get("JAX_COORDINATOR_ADDRESS")
    )
    if coordinator or mode == "explicit":
        values = {}
        for field in ("num_processes", "process_id"):
            if explicit.get(field) is not None:
                values[field] = int(explicit[field])
                continue
            names = [f"QPONDER_{field.upper()}", f"JAX_{field.upper()}"]
            name = next((n for n in names if n in env), None)
            if name is None:
                raise DistributedError(
                    f"coordinator address {coordinator!r} is set but --{field} / {names[0]} is not: a multi-process "
                    "run needs the coordinator, the number of processes and this process's id"
                )
            values[field] = _int_env(env, name)
        n, pid = values["num_processes"], values["process_id"]
        if not coordinator or ":" not in coordinator:
            raise DistributedError(f"coordinator address {coordinator!r}: expected host:port")
        if not 0 <= pid < n:
            raise DistributedError(f"process id {pid} is outside 0 .. {n - 1} (num_processes={n})")
        return None if n == 1 else Plan("explicit", coordinator, n, pid)
    in_slurm_step = all(k in env for k in ("SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NODELIST"))
    if mode == "slurm" or (mode == "auto" and in_slurm_step and _int_env(env, "SLURM_NTASKS") > 1):
        if not in_slurm_step:
            raise DistributedError("QPONDER_DISTRIBUTED=slurm outside an srun step (SLURM_STEP_NODELIST is not set)")
        n, pid = _int_env(env, "SLURM_NTASKS"), _int_env(env, "SLURM_PROCID")
        port = env.get("QPONDER_COORDINATOR_PORT") or str(_int_env(env, "SLURM_JOB_ID") % 4096 + 61440)
        nodes = int(env.get("SLURM_STEP_NUM_NODES", env.get("SLURM_NNODES", n)))
        local = None
        visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        if n > nodes and len(visible) != 1:  # several tasks per node, each sees all GPUs: take GPU number LOCALID
            local = (_int_env(env, "SLURM_LOCALID"),)
        return Plan("slurm", f"{first_slurm_host(env['SLURM_STEP_NODELIST'])}:{port}", n, pid, local)
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    if mode == "tpu" or (mode == "auto" and len([h for h in hosts.split(",") if h.strip()]) > 1):
        return Plan("tpu")
    return None


def timeout_from_env(env: Mapping[str, str] | None = None, override: int | None = None) -> int:
    env = os.environ if env is None else env
    if override is not None:
        return int(override)
    return _int_env(env, "QPONDER_DISTRIBUTED_TIMEOUT") if "QPONDER_DISTRIBUTED_TIMEOUT" in env else DEFAULT_TIMEOUT_S


def _flag(holder):
    return holder.value if flags.FLAGS.is_parsed() else None


def initialize_from_env(env: Mapping[str, str] | None = None, *, timeout_s: int | None = None) -> Plan | None:
    """Calls `jax.distributed.initialize` if the environment (or the command-line flags) asks for a multi-process run;
    returns the plan it followed, or None for a single process. Call it before anything touches a JAX device.

    If not every process has joined after the timeout, prints which wait timed out and exits with `EXIT_TIMEOUT`
    (jax itself would abort with an RPC error at its own deadline, or wait for much longer).
    """
    import jax

    explicit = {"coordinator_address": _flag(_COORDINATOR), "num_processes": _flag(_NUM_PROCESSES)}
    explicit["process_id"] = _flag(_PROCESS_ID)
    plan = plan_from_env(env, **explicit)
    if plan is None or jax.distributed.is_initialized():
        return plan
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        raise DistributedError(
            "distributed start-up requested, but JAX devices were already used in this process; call "
            "qponder_jax.distributed.initialize_from_env() first"
        )
    timeout = timeout_from_env(env, timeout_s if timeout_s is not None else _flag(_TIMEOUT))
    who = "this process" if plan.process_id is None else f"process {plan.process_id} of {plan.num_processes}"
    where = plan.coordinator_address or "the TPU pod's coordinator"
    print(f"qponder: {who} joining {where} ({plan.source}; timeout {timeout} s)", file=sys.stderr, flush=True)
    message = (
        f"qponder: error: timed out after {timeout} s waiting for all processes to join the coordinator at {where} "
        f"({who}). A process did not start, crashed early, or cannot reach the coordinator: check every "
        "process's log, the address and port, and the firewall."
    )
    watchdog = threading.Timer(timeout, _exit_with, args=(message,))
    watchdog.daemon = True
    watchdog.start()
    try:
        if jax.config.jax_cpu_collectives_implementation in (None, "none"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes talk over gloo
        jax.distributed.initialize(
            coordinator_address=plan.coordinator_address,
            num_processes=plan.num_processes,
            process_id=plan.process_id,
            local_device_ids=list(plan.local_device_ids) if plan.local_device_ids else None,
            cluster_detection_method=None if plan.source == "tpu" else "deactivate",
            initialization_timeout=timeout + 30,  # jax's own deadline aborts without a message: ours comes first
        )
    finally:
        watchdog.cancel()
    return plan


def _exit_with(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
    os._exit(EXIT_TIMEOUT)


def fingerprint(config: Any, workdir: str | os.PathLike) -> dict:
    """What every process of one run must agree on: the resolved config, the workdir, versions and device count."""
    import jax

    import qponder_jax

    as_dict = json.loads(config.to_json_best_effort()) if hasattr(config, "to_json_best_effort") else dict(config)
    return {
        "config": as_dict,
        "workdir": str(Path(workdir).absolute()),
        "jax": jax.__version__,
        "qponder_jax": qponder_jax.__version__,
        "local_device_count": jax.local_device_count(),
    }


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: tree}


def differences(mine: dict, theirs: dict, labels: tuple[str, str] = ("a", "b"), limit: int = 5) -> list[str]:
    """'field (a: x, b: y)' for the flattened fields where two fingerprints differ (at most `limit`)."""
    a, b = _flatten(mine), _flatten(theirs)
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k, "<missing>") != b.get(k, "<missing>")]
    return [
        f"{k} ({labels[0]}: {a.get(k, '<missing>')!r}, {labels[1]}: {b.get(k, '<missing>')!r})" for k in keys[:limit]
    ]


_CHECKS = iter(range(1 << 30))  # a fresh key space per check, the same sequence on every process


def check_consistent(config: Any, workdir: str | os.PathLike, *, timeout_s: int | None = None) -> str:
    """Fails fast (DistributedError on every process) unless all processes have the same `fingerprint`; returns its
    sha256 ("" for one process). It uses the coordinator's key-value store: a missing process is a timeout, not a hang.
    """
    import jax

    if not jax.distributed.is_initialized():
        return ""  # one process: nothing to compare (and no device is touched)
    mine = fingerprint(config, workdir)
    from jax._src import distributed as jax_distributed

    client = jax_distributed.global_state.client
    timeout = timeout_from_env(None, timeout_s if timeout_s is not None else _flag(_TIMEOUT))
    key = f"qponder/fingerprint/{next(_CHECKS)}"
    client.key_value_set(f"{key}/{jax.process_index()}", json.dumps(mine, sort_keys=True))
    others = {}
    for p in range(jax.process_count()):
        try:
            others[p] = json.loads(client.blocking_key_value_get(f"{key}/{p}", timeout * 1000))
        except Exception as e:  # jax raises its runtime error type on a deadline
            raise DistributedError(
                f"process {jax.process_index()}: timed out after {timeout} s waiting for process {p}'s config "
                f"fingerprint ({type(e).__name__}); is every process running the same qponder command?"
            ) from e
    bad = [p for p in others if others[p] != others[0]]
    if bad:
        diff = differences(others[bad[0]], others[0], labels=(f"process {bad[0]}", "process 0"))
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise DistributedError(
            f"processes disagree: process {bad[0]}{more} differs from process 0 in "
            + "; ".join(diff)
            + ". Every process must run the same command with the same config overrides and workdir."
        )
    return hashlib.sha256(json.dumps(mine, sort_keys=True).encode()).hexdigest()


def run_once(fn, *, name: str):
    """Runs `fn()` on process 0 only (shared files: the embedded model, synthetic data); every process then waits
    at a barrier named `name` until it is done. Returns fn's result on process 0 and None elsewhere."""
    import jax

    result = fn() if jax.process_index() == 0 else None
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
    return result
