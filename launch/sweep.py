#!/usr/bin/env python3
"""Expands a config's sweep into one `qponder` run per point, each in its own workdir, skipping finished points.

    python launch/sweep.py --config=configs/sweeps/qponder_ci_lr.py:tiny --root=runs/lr_sweep --dry_run
    python launch/sweep.py --config=configs/sweeps/qponder_ci_lr.py:tiny --root=runs/lr_sweep
    python launch/sweep.py --config=... --root=... --launcher="python launch/local.py --num_processes=2 --"
    python launch/sweep.py --config=... --root=gs://... --launcher="sbatch launch/slurm_gpu.sbatch"

A sweep is declared next to `get_config` (big_vision style): `get_sweep(arg)` returns a list of override dicts, e.g.
`[{"optim.peak_lr": 1e-3}, {"optim.peak_lr": 3e-3}]`; every key must be a field of `get_config(arg)`. Point i runs

    <launcher...> python -m qponder_jax.main --config=<file>:<arg> --workdir=<root>/<name> --config.<key>=<value> ...

where <name> is derived from the overrides (`peak_lr=0.001`). A point is complete when its workdir has a metrics
record at step `train.total_steps` and a finished orbax checkpoint at or past it (what the training loop leaves at the
end); complete points are skipped, so re-running a half-done sweep runs only what is missing. Each launched workdir
gets `sweep_point.json` (the overrides and the command) for `launch/collect.py`.

A point that exits with status 75 (`qponder_jax.errors.EXIT_RESUME`: preempted after saving, or a peer that never
joined) is "preempted", neither done nor failed: the sweep launches no further point and exits with 75 itself, so a
scheduler reruns it and the rerun resumes that point. SIGTERM to the sweep is passed on to the running point (which
saves and exits with 75) instead of killing the sweep and orphaning the point; the point counts as preempted and no
further point starts. Exit status: 1 if a point failed, else 75 if one was preempted or not started, else 0.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.util
import json
import re
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
POINT_FILE = "sweep_point.json"
EXIT_RESUME = 75  # a point that stopped early and resumes when rerun (= qponder_jax.errors.EXIT_RESUME)


@dataclasses.dataclass(frozen=True)
class Point:
    name: str  # derived from the overrides; the workdir's folder name
    overrides: dict[str, Any]  # dotted config key -> value
    workdir: Path
    command: list[str]  # the full command, launcher prefix included
    total_steps: int | None  # train.total_steps after the overrides (None: the config has no train.total_steps)


def load_config_module(path: str | Path):
    """The config file as a module (configs/ is not an installed package)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep config {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"sweep_config_{abs(hash(str(path.resolve())))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def format_value(value: Any) -> str:
    """A value as `--config.k=<value>` text that ml_collections parses back to the same value."""
    if isinstance(value, (tuple, list)):
        inner = ", ".join(format_value(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    return repr(value) if isinstance(value, float) else str(value)


def point_name(overrides: dict[str, Any]) -> str:
    """'peak_lr=0.001,seed=1' from {'optim.peak_lr': 0.001, 'seed': 1} (the last key part; the full key if the last
    parts collide), made safe as a folder name."""
    leaves = [k.rsplit(".", 1)[-1] for k in overrides]
    keys = leaves if len(set(leaves)) == len(leaves) else list(overrides)
    text = ",".join(f"{k}={format_value(v)}" for k, v in zip(keys, overrides.values()))
    return re.sub(r"[^A-Za-z0-9_.=,+-]+", "_", text).strip("_") or "default"


def parse_config_flags(extra: Sequence[str]) -> dict[str, Any]:
    """{key: value} of the `--config.<key>=<value>` flags among `extra` (values read as Python literals if they
    parse, else kept as text), so the completion check sees e.g. a `--config.train.total_steps` given to every point."""
    out = {}
    for flag in extra:
        m = re.fullmatch(r"--config\.([\w.]+)=(.*)", flag, re.S)
        if m:
            try:
                out[m.group(1)] = ast.literal_eval(m.group(2))
            except (ValueError, SyntaxError):
                out[m.group(1)] = m.group(2)
    return out


def expand(
    config_arg: str, root: str | Path, *, launcher: str = "", python: str = sys.executable, extra: Sequence[str] = ()
) -> list[Point]:
    """The sweep's points for `--config=<file>[:<arg>]`, each checked against the config (an unknown key raises)."""
    file, _, arg = config_arg.partition(":")
    module = load_config_module(file)
    get_sweep = getattr(module, "get_sweep", None)
    if get_sweep is None:
        raise ValueError(f"{file} declares no sweep: add get_sweep(arg) returning a list of override dicts")
    sweep = list(get_sweep(arg or None))
    if not sweep:
        raise ValueError(f"{file}: get_sweep({arg!r}) returned no points")
    common = parse_config_flags(extra)
    points, names = [], set()
    for i, overrides in enumerate(sweep):
        config = module.get_config(arg or None)
        try:
            config.update_from_flattened_dict({**common, **dict(overrides)})
        except (KeyError, AttributeError, TypeError) as e:
            raise ValueError(f"{file}: sweep point {i} {overrides}: {e}") from e
        name = point_name(overrides)
        if name in names:
            raise ValueError(f"{file}: sweep point {i} {overrides} repeats the name {name!r} of an earlier point")
        names.add(name)
        workdir = Path(root) / name
        qponder = [python, "-m", "qponder_jax.main", f"--config={config_arg}", f"--workdir={workdir}"]
        qponder += [f"--config.{k}={format_value(v)}" for k, v in overrides.items()] + list(extra)
        total = int(config.train.total_steps) if "train" in config and "total_steps" in config.train else None
        points.append(Point(name, dict(overrides), workdir, shlex.split(launcher) + qponder, total))
    return points


def is_complete(workdir: str | Path, total_steps: int | None) -> bool:
    """True when the run in `workdir` reached `total_steps`: a metrics record at that step and a finished
    checkpoint at or past it (orbax renames a step folder to its bare number only once the save has finished)."""
    workdir = Path(workdir)
    metrics = workdir / "metrics.jsonl"
    if total_steps is None or not metrics.is_file():
        return False
    steps = set()
    for line in metrics.read_text().splitlines():
        try:
            steps.add(int(json.loads(line).get("step", -1)))
        except (ValueError, AttributeError):
            continue  # a line cut by a crash
    checkpoints = workdir / "checkpoints"
    saved = (
        [int(p.name) for p in checkpoints.iterdir() if p.is_dir() and p.name.isdigit()] if checkpoints.is_dir() else []
    )
    return total_steps in steps and any(s >= total_steps for s in saved)


def run_command(command: Sequence[str]) -> tuple[int, bool]:
    """Runs one point's command to its end: (its exit status, whether this process got SIGTERM meanwhile). The
    signal is passed on to the point (which saves and exits with EXIT_RESUME) rather than ending this process first."""
    child = subprocess.Popen(list(command), cwd=ROOT)
    if threading.current_thread() is not threading.main_thread():  # only the main thread may take signals
        return child.wait(), False
    terminated = []

    def forward(signum, frame):
        terminated.append(signum)
        child.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        return child.wait(), bool(terminated)
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_points(points: Sequence[Point], *, dry_run: bool = False, stop_on_failure: bool = False) -> dict[str, str]:
    """Runs (or, dry, prints) the incomplete points one after another; returns name -> done/skipped/failed/planned/
    preempted (after a preempted point, the later ones are not started)."""
    status = {}
    for i, p in enumerate(points):
        done = is_complete(p.workdir, p.total_steps)
        tag = "skip (complete)" if done else ("plan" if dry_run else "run")
        print(f"[{i + 1}/{len(points)}] {tag}: {p.name}\n  workdir: {p.workdir}\n  command: {shlex.join(p.command)}")
        sys.stdout.flush()
        if done:
            status[p.name] = "skipped"
            continue
        if dry_run:
            status[p.name] = "planned"
            continue
        p.workdir.mkdir(parents=True, exist_ok=True)
        record = {"name": p.name, "overrides": p.overrides, "command": p.command}
        (p.workdir / POINT_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")
        code, terminated = run_command(p.command)
        if code == EXIT_RESUME or (terminated and code != 0):  # killed before it could save: resumes all the same
            status[p.name] = "preempted"
            print(f"  point {p.name} stopped early (exit {code}): rerun the sweep to resume it", flush=True)
        else:
            status[p.name] = "done" if code == 0 else f"failed (exit {code})"
        if status[p.name] == "preempted" or terminated:  # the sweep itself is stopping: no further point
            status.update({q.name: "not started" for q in points[i + 1 :]})
            break
        if code != 0:
            print(f"  point {p.name} failed with exit status {code}", flush=True)
            if stop_on_failure:
                break
    counts = {s: sum(1 for v in status.values() if v == s) for s in sorted(set(status.values()))}
    print(f"sweep: {len(points)} points: " + ", ".join(f"{n} {s}" for s, n in counts.items()), flush=True)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="sweep config file with get_config and get_sweep, [:arg]")
    parser.add_argument("--root", required=True, help="folder holding one workdir per point")
    parser.add_argument(
        "--launcher", default="", help='command prefix per point, e.g. "sbatch launch/slurm_gpu.sbatch"'
    )
    parser.add_argument("--python", default=sys.executable, help="interpreter of the qponder command")
    parser.add_argument("--dry_run", action="store_true", help="print the plan (commands and workdirs) only")
    parser.add_argument("--stop_on_failure", action="store_true", help="stop at the first failing point")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="-- extra qponder flags for every point")
    args = parser.parse_args(argv)
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    points = expand(args.config, args.root, launcher=args.launcher, python=args.python, extra=extra)
    return exit_status(run_points(points, dry_run=args.dry_run, stop_on_failure=args.stop_on_failure))


def exit_status(status: dict[str, str]) -> int:
    """The sweep's exit status for `run_points`' result: 1 if a point failed, else EXIT_RESUME if a point was
    preempted or not started, else 0."""
    if any(s.startswith("failed") for s in status.values()):
        return 1
    return EXIT_RESUME if {"preempted", "not started"} & set(status.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
