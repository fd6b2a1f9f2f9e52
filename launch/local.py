#!/usr/bin/env python3
"""Starts N processes of one command on this machine, as one multi-process JAX run (for testing multi-host code).

    python launch/local.py --num_processes=2 --devices_per_process=4 -- \
        python -m qponder_jax.main --config=configs/qponder_ci.py:tiny --workdir=runs/ci_2proc

Process i gets QPONDER_COORDINATOR_ADDRESS=127.0.0.1:<port>, QPONDER_NUM_PROCESSES=N, QPONDER_PROCESS_ID=i (read by
`qponder_jax.distributed`), JAX_PLATFORMS=cpu and XLA_FLAGS with `devices_per_process` simulated CPU devices; CPU
collectives go over gloo. Output lines are prefixed `[pI]` and also written to `<log_dir>/process_I.log`. When one
process fails, the others get `--grace` seconds and are then terminated; the exit status is the first failure's, so a
preempted run (status 75, `qponder_jax.errors.EXIT_RESUME`) exits with 75: resume later. A SIGTERM to this launcher is
passed on to every process (each saves and exits with 75); if any of them then fails, the launcher exits with 75.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXIT_RESUME = 75  # a run that stopped early and resumes when rerun (= qponder_jax.errors.EXIT_RESUME)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(
    base: Mapping[str, str],
    process_id: int,
    num_processes: int,
    port: int,
    *,
    devices_per_process: int = 4,
    platform: str = "cpu",
    timeout_s: int | None = None,
) -> dict[str, str]:
    """The environment of process `process_id`: the coordinator variables and the simulated devices."""
    env = dict(base)
    env["QPONDER_COORDINATOR_ADDRESS"] = f"127.0.0.1:{port}"
    env["QPONDER_NUM_PROCESSES"] = str(num_processes)
    env["QPONDER_PROCESS_ID"] = str(process_id)
    if timeout_s is not None:
        env["QPONDER_DISTRIBUTED_TIMEOUT"] = str(timeout_s)
    if platform:
        env["JAX_PLATFORMS"] = platform
    if platform == "cpu":
        flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")).strip()
        env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices_per_process}".strip()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def describe(command: Sequence[str], env: Mapping[str, str], process_id: int) -> str:
    """The exact shell line process `process_id` runs (only the variables this launcher sets)."""
    keys = ("QPONDER_COORDINATOR_ADDRESS", "QPONDER_NUM_PROCESSES", "QPONDER_PROCESS_ID", "QPONDER_DISTRIBUTED_TIMEOUT")
    keys += ("JAX_PLATFORMS", "XLA_FLAGS")
    assigns = " ".join(f"{k}={shlex.quote(env[k])}" for k in keys if k in env)
    return f"[p{process_id}] {assigns} {shlex.join(command)}"


def _pump(stream, prefix: str, log_path: Path | None, lock: threading.Lock) -> None:
    log = open(log_path, "w") if log_path else None  # closed below
    try:
        for line in stream:
            with lock:
                sys.stdout.write(f"{prefix} {line}")
                sys.stdout.flush()
            if log:
                log.write(line)
                log.flush()
    finally:
        if log:
            log.close()


def run(
    command: Sequence[str],
    *,
    num_processes: int,
    devices_per_process: int = 4,
    port: int = 0,
    platform: str = "cpu",
    timeout_s: int | None = None,
    log_dir: str | None = None,
    omit: Sequence[int] = (),
    grace_s: float = 10.0,
) -> int:
    """Runs the processes to the end; returns 0, or the exit status of the first process that failed."""
    port = port or free_port()
    logs = Path(log_dir) if log_dir else None
    if logs:
        logs.mkdir(parents=True, exist_ok=True)
    lock = threading.Lock()
    procs: dict[int, subprocess.Popen] = {}
    pumps = []
    for i in range(num_processes):
        if i in omit:
            continue
        env = process_env(os.environ, i, num_processes, port, devices_per_process=devices_per_process,
                          platform=platform, timeout_s=timeout_s)  # fmt: skip
        print(describe(command, env, i), flush=True)
        procs[i] = subprocess.Popen(
            list(command), env=env, cwd=os.getcwd(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        log_path = logs / f"process_{i}.log" if logs else None
        pump = threading.Thread(target=_pump, args=(procs[i].stdout, f"[p{i}]", log_path, lock), daemon=True)
        pump.start()
        pumps.append(pump)
    status, failed_at = 0, None
    terminated = []

    def forward(signum, frame):  # a preemption notice for the whole run: every process saves and stops
        terminated.append(signum)
        for p in list(procs.values()):
            p.send_signal(signum)

    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, forward) if in_main else None
    try:
        while procs:
            for i, p in list(procs.items()):
                code = p.poll()
                if code is None:
                    continue
                del procs[i]
                if code != 0 and status == 0:
                    status, failed_at = code, time.monotonic()
                    print(f"[local] process {i} exited with status {code}", flush=True)
            if failed_at is not None and time.monotonic() - failed_at > grace_s:
                for i, p in procs.items():
                    print(f"[local] terminating process {i} (pid {p.pid}) after process failure", flush=True)
                    p.terminate()
                for p in procs.values():
                    try:
                        p.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        p.kill()
                procs.clear()
            time.sleep(0.1)
    except KeyboardInterrupt:
        for p in procs.values():
            p.terminate()
        raise
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
    for pump in pumps:
        pump.join(timeout=5)
    return EXIT_RESUME if terminated and status != 0 else status


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_processes", type=int, default=2, help="processes to start")
    parser.add_argument("--devices_per_process", type=int, default=4, help="simulated CPU devices per process")
    parser.add_argument("--port", type=int, default=0, help="coordinator port on 127.0.0.1 (0: a free one)")
    parser.add_argument("--platform", default="cpu", help="JAX_PLATFORMS for the processes ('' = leave as is)")
    parser.add_argument("--timeout", type=int, default=None, help="seconds to wait for all processes to join")
    parser.add_argument("--log_dir", default=None, help="also write each process's output to process_I.log here")
    parser.add_argument("--grace", type=float, default=10.0, help="seconds the others get after one process fails")
    parser.add_argument("--omit", type=int, action="append", default=[], help="do not start this process (tests)")
    parser.add_argument("--dry_run", action="store_true", help="print the commands and exit")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- the command every process runs")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --, e.g. -- python -m qponder_jax.main --config=... --workdir=...")
    if args.dry_run:
        port = args.port or 12345
        for i in range(args.num_processes):
            env = process_env({}, i, args.num_processes, port, devices_per_process=args.devices_per_process,
                              platform=args.platform, timeout_s=args.timeout)  # fmt: skip
            print(describe(command, env, i))
        return 0
    return run(
        command, num_processes=args.num_processes, devices_per_process=args.devices_per_process, port=args.port,
        platform=args.platform, timeout_s=args.timeout, log_dir=args.log_dir, omit=args.omit, grace_s=args.grace,
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
