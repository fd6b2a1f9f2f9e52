"""launch/sweep.py and launch/collect.py: a config's sweep expands into one run per point (own workdir and name), the
dry run prints the plan, finished points are skipped, and the collector builds one sorted table (Markdown + CSV)."""

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "launch"))

import collect  # noqa: E402  (launch/collect.py)
import sweep  # noqa: E402  (launch/sweep.py)
from process_helpers import sigterm_when_ready  # noqa: E402

SWEEP = "configs/sweeps/qponder_ci_lr.py:tiny"


def test_names_and_values():
    assert sweep.point_name({"optim.peak_lr": 0.001, "seed": 1}) == "peak_lr=0.001,seed=1"
    assert sweep.point_name({"a.seed": 1, "b.seed": 2}) == "a.seed=1,b.seed=2"  # colliding leaves: full keys
    assert sweep.point_name({"data.prompt": "my prompt/v2"}) == "prompt=my_prompt_v2"
    assert sweep.format_value((256,)) == "(256,)" and sweep.format_value((1, 2)) == "(1, 2)"
    assert sweep.format_value(1e-5) == "1e-05" and sweep.format_value(True) == "True"
    assert sweep.parse_config_flags(["--config.train.total_steps=3", "--config.data.prompt=x y", "--other=1"]) == {
        "train.total_steps": 3,
        "data.prompt": "x y",
    }


def test_expand_gives_distinct_workdirs_and_commands(tmp_path):
    points = sweep.expand(SWEEP, tmp_path, extra=["--config.train.total_steps=2"])
    assert len(points) == 3
    assert len({p.workdir for p in points}) == 3 and len({tuple(p.command) for p in points}) == 3
    for p, lr in zip(points, ("0.001", "0.003", "0.01")):
        assert p.workdir == tmp_path / f"peak_lr={lr}"
        assert f"--config.optim.peak_lr={lr}" in p.command and f"--workdir={p.workdir}" in p.command
        assert p.command[-1] == "--config.train.total_steps=2" and p.total_steps == 2
    with_launcher = sweep.expand(SWEEP, tmp_path, launcher="sbatch launch/slurm_gpu.sbatch")
    assert with_launcher[0].command[:2] == ["sbatch", "launch/slurm_gpu.sbatch"]


def test_a_bad_sweep_key_is_an_error(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('ci', {str(ROOT / 'configs/qponder_ci.py')!r})\n"
        "ci = importlib.util.module_from_spec(spec); spec.loader.exec_module(ci)\n"
        "get_config = ci.get_config\n"
        "def get_sweep(arg=None):\n    return [{'optim.peak_lrr': 1.0}]\n"
    )
    with pytest.raises(ValueError, match="peak_lrr"):
        sweep.expand(f"{bad}:tiny", tmp_path)


def _fake_run(workdir: Path, *, steps: list[int], saved: list[str], total: int, loss: float | None = None):
    workdir.mkdir(parents=True)
    records = [{"step": s, "prefix": "train", "loss": 5.0} for s in steps]
    if loss is not None:
        records.append({"step": steps[-1], "prefix": "eval", "loss": loss})
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (workdir / "config.json").write_text(json.dumps({"train": {"total_steps": total}}))
    for name in saved:
        (workdir / "checkpoints" / name).mkdir(parents=True)


def test_completion_marker(tmp_path):
    _fake_run(tmp_path / "done", steps=[1, 2, 3, 4], saved=["2", "4"], total=4)
    _fake_run(tmp_path / "saving", steps=[1, 2, 3, 4], saved=["2", "4.orbax-checkpoint-tmp-9"], total=4)
    _fake_run(tmp_path / "half", steps=[1, 2], saved=["2"], total=4)
    _fake_run(tmp_path / "grpo", steps=[4], saved=["8"], total=4)  # checkpoints count updates, not steps
    assert sweep.is_complete(tmp_path / "done", 4)
    assert not sweep.is_complete(tmp_path / "saving", 4)  # the final save had not finished
    assert not sweep.is_complete(tmp_path / "half", 4)
    assert sweep.is_complete(tmp_path / "grpo", 4)
    assert not sweep.is_complete(tmp_path / "missing", 4)


def test_collect_sorts_and_writes_markdown_and_csv(tmp_path):
    for name, loss in (("b", 2.0), ("a", 3.0), ("c", 1.0)):
        _fake_run(tmp_path / name, steps=[1, 2], saved=["2"], total=2, loss=loss)
        (tmp_path / name / sweep.POINT_FILE).write_text(json.dumps({"overrides": {"optim.peak_lr": loss / 10}}))
    _fake_run(tmp_path / "no_eval", steps=[1], saved=[], total=2)
    columns, rows = collect.collect(tmp_path, "eval/loss")
    assert [r["run"] for r in rows] == ["c", "b", "a", "no_eval"]  # ascending; runs without the metric last
    assert columns[:5] == ["run", "complete", "step", "optim.peak_lr", "eval/loss"]
    assert [r["complete"] for r in rows] == [True, True, True, False]
    _, rows = collect.collect(tmp_path, "eval/loss", descending=True)
    assert [r["run"] for r in rows] == ["a", "b", "c", "no_eval"]
    assert collect.main([f"--root={tmp_path}", "--metric=eval/loss"]) == 0
    table = (tmp_path / "results.md").read_text().splitlines()
    assert table[0].startswith("| run | complete | step | optim.peak_lr | eval/loss") and table[2].startswith("| c |")
    with open(tmp_path / "results.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["run"] for r in csv_rows] == ["c", "b", "a", "no_eval"] and csv_rows[0]["eval/loss"] == "1.0"


def _point(tmp_path: Path, name: str, script: str) -> sweep.Point:
    return sweep.Point(name, {}, tmp_path / name, [sys.executable, "-c", script], total_steps=4)


def test_a_preempted_point_is_resumed_later_not_done(tmp_path):
    """Exit 75 (a preempted qponder run) is "preempted": no further point starts and the sweep exits with 75, so a
    scheduler reruns it; a point that failed otherwise still makes the sweep fail."""
    started = tmp_path / "c_started"
    points = [
        _point(tmp_path, "a", "pass"),
        _point(tmp_path, "b", "import sys; sys.exit(75)"),
        _point(tmp_path, "c", f"open({str(started)!r}, 'w').close()"),
    ]
    status = sweep.run_points(points)
    assert status == {"a": "done", "b": "preempted", "c": "not started"} and not started.exists()
    assert sweep.exit_status(status) == 75
    assert sweep.exit_status({"a": "done", "b": "failed (exit 3)", "c": "preempted"}) == 1
    assert sweep.exit_status({"a": "done", "b": "skipped"}) == 0


def test_sigterm_to_the_sweep_reaches_the_running_point(tmp_path):
    """The sweep passes SIGTERM on to the running point (which saves and exits 75, as qponder does), waits for it,
    starts no further point and exits with 75."""
    got = tmp_path / "point_got_sigterm"
    point = (
        "import signal, sys, time\n"
        f"signal.signal(signal.SIGTERM, lambda *a: (open({str(got)!r}, 'w').close(), sys.exit(75)))\n"
        f"open({str(tmp_path / 'ready')!r}, 'w').close()\n"
        "time.sleep(60)\n"
    )
    driver = (
        f"import sys; sys.path.insert(0, {str(ROOT / 'launch')!r}); import sweep\n"
        f"points = [sweep.Point(n, {{}}, sweep.Path({str(tmp_path)!r}) / n, [sys.executable, '-c', {point!r}], 4)"
        " for n in ('a', 'b')]\n"
        "sys.exit(sweep.exit_status(sweep.run_points(points)))\n"
    )
    code, out = sigterm_when_ready([sys.executable, "-c", driver], (tmp_path / "ready").exists)
    assert code == 75, out
    assert got.exists() and "1 not started, 1 preempted" in out


def _sweep(*args, timeout=900) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "launch/sweep.py"), f"--config={SWEEP}", *args]
    env = {**__import__("os").environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_dry_run_prints_the_plan(tmp_path):
    out = _sweep(f"--root={tmp_path}", "--dry_run")
    assert out.returncode == 0, out.stderr
    commands = re.findall(r"command: (.*)", out.stdout)
    workdirs = re.findall(r"workdir: (.*)", out.stdout)
    assert len(set(commands)) == 3 and len(set(workdirs)) == 3
    assert "sweep: 3 points: 3 planned" in out.stdout
    assert not any(tmp_path.iterdir())  # a dry run writes nothing


@pytest.mark.slow
def test_sweep_runs_collects_and_skips_finished_points(tmp_path):
    """Three tiny SFT runs (4 steps each), one table, then a re-run that skips all three."""
    out = _sweep(f"--root={tmp_path}")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "sweep: 3 points: 3 done" in out.stdout
    assert collect.main([f"--root={tmp_path}", "--metric=eval/loss"]) == 0
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and all(r["complete"] == "True" and r["step"] == "4" for r in rows)
    losses = [float(r["eval/loss"]) for r in rows]
    assert losses == sorted(losses) and len(set(losses)) == 3  # sorted, and the learning rates made a difference
    assert {r["optim.peak_lr"] for r in rows} == {"0.001", "0.003", "0.01"}
    again = _sweep(f"--root={tmp_path}")
    assert again.returncode == 0 and "sweep: 3 points: 3 skipped" in again.stdout
    assert again.stdout.count("skip (complete)") == 3 and "sft:" not in again.stdout
