"""launch/: the shell launchers parse (bash -n, shellcheck when installed) and their dry runs show the exact per-worker
commands; the local launcher runs the tiny SFT as 2 processes x 4 devices with the same losses as 1 process x 8
devices, and its checkpoint restores in a single process."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "launch"))

import local  # noqa: E402  (launch/local.py)

SCRIPTS = ["launch/tpu_pod.sh", "launch/slurm_gpu.sbatch"]
QPONDER = [sys.executable, "-m", "qponder_jax.main"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True).returncode == 0
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    out = subprocess.run(["shellcheck", str(ROOT / script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


def test_tpu_pod_dry_run_shows_every_worker_command():
    env = {**os.environ, "TPU_NAME": "qp", "ZONE": "us-east5-a", "ACCELERATOR_TYPE": "v5p-32", "NUM_WORKERS": "4"}
    cmd = ["bash", str(ROOT / "launch/tpu_pod.sh"), "--dry_run", "all", "--", "python3", "-m", "qponder_jax.main",
           "--config=configs/qponder.py:7b", "--workdir=gs://b/runs/qp"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "+ gcloud compute tpus tpu-vm create qp --accelerator-type=v5p-32 --version=tpu-ubuntu2204-base " \
        "--zone=us-east5-a" in lines  # fmt: skip
    assert any("tpu-vm scp" in line and "--worker=all" in line for line in lines)
    assert any("--worker=all" in line and "pip install" in line for line in lines)
    runs = [line for line in lines if re.search(r"--worker=\d", line)]
    assert len(runs) == 4
    for i, line in enumerate(runs):
        assert f"--worker={i} " in line
        assert "QPONDER_DISTRIBUTED=tpu python3 -m qponder_jax.main --config=configs/qponder.py:7b " \
            "--workdir=gs://b/runs/qp" in line  # fmt: skip
    assert [f"worker {i} -> runs/tpu_logs/qp/worker_{i}.log" for i in range(4)] == [
        line for line in lines if line.startswith("worker ")
    ]
    usage = subprocess.run(["bash", str(ROOT / "launch/tpu_pod.sh"), "--help"], capture_output=True, text=True)
    assert "Usage: launch/tpu_pod.sh" in usage.stdout


def test_slurm_dry_run_shows_the_srun_command():
    env = {**os.environ, "DRY_RUN": "1", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "4"}
    out = subprocess.run(["bash", str(ROOT / "launch/slurm_gpu.sbatch"), "python", "-m", "qponder_jax.main",
                          "--workdir=/shared/w"], capture_output=True, text=True, env=env, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    port = 61440 + 4242 % 4096
    assert f":{port}, 4 processes" in out.stdout and "QPONDER_NUM_PROCESSES=4" in out.stdout
    assert "srun --kill-on-bad-exit=1 --output=slurm_logs/%j_task%t.log" in out.stdout
    assert out.stdout.rstrip().endswith("qponder python -m qponder_jax.main --workdir=/shared/w")
    usage = subprocess.run(["bash", str(ROOT / "launch/slurm_gpu.sbatch"), "--help"], capture_output=True, text=True)
    assert "Usage: sbatch" in usage.stdout and "set -euo" not in usage.stdout


def test_local_dry_run_and_environment():
    env = local.process_env({"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --foo"}, 1, 2, 5555)
    assert env["QPONDER_COORDINATOR_ADDRESS"] == "127.0.0.1:5555" and env["QPONDER_PROCESS_ID"] == "1"
    assert env["XLA_FLAGS"] == "--foo --xla_force_host_platform_device_count=4" and env["JAX_PLATFORMS"] == "cpu"
    out = subprocess.run([sys.executable, str(ROOT / "launch/local.py"), "--num_processes=3", "--port=777",
                          "--dry_run", "--", "echo", "hi"], capture_output=True, text=True)  # fmt: skip
    lines = out.stdout.splitlines()
    assert len(lines) == 3
    for i, line in enumerate(lines):
        assert line.startswith(f"[p{i}] QPONDER_COORDINATOR_ADDRESS=127.0.0.1:777 QPONDER_NUM_PROCESSES=3 "
                               f"QPONDER_PROCESS_ID={i} ") and line.endswith(" echo hi")  # fmt: skip


def test_local_launcher_stops_the_others_when_one_fails(tmp_path):
    """Process 1 fails at once; process 0 (which would sleep 60 s) is terminated after the grace period."""
    script = "import os, sys, time\nif os.environ['QPONDER_PROCESS_ID'] == '1': sys.exit(3)\ntime.sleep(60)\n"
    code = local.run([sys.executable, "-c", script], num_processes=2, grace_s=0.5, log_dir=str(tmp_path))
    assert code == 3
    assert (tmp_path / "process_0.log").exists() and (tmp_path / "process_1.log").exists()


# ---- 2 processes x 4 devices against 1 process x 8 devices (slow: three CLI runs, each compiling the step) ----

SFT_FLAGS = [
    "--config=configs/qponder_ci.py:tiny",
    "--config.train.total_steps=3",
    "--config.optim.warmup_steps=1",
    "--config.train.log_every=1",
    "--config.train.eval_every=0",
    # 8 records = one global batch, so both layouts see the same records in every step (in another order), and one
    # token bucket, so both processes pad their halves to the same shape
    "--config.data.synthetic_train_size=8",
    "--config.data.synthetic_eval_size=16",
    "--config.data.token_buckets=(256,)",
]


def _env(devices: int) -> dict:
    return local.process_env(os.environ, 0, 1, 0, devices_per_process=devices)


def _metrics(workdir: Path) -> dict:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {(r["prefix"], r["step"]): r["loss"] for r in records}


def _restore_params(workdir: Path, overrides: list[str]) -> tuple[int, dict]:
    """The final checkpoint's params, restored in this (single, 8-device) process."""
    import importlib.util

    from qponder_jax import embedded
    from qponder_jax.model import sharding
    from qponder_jax.train import optim
    from qponder_jax.train import state as state_lib

    spec = importlib.util.spec_from_file_location("qponder_ci_for_launch", ROOT / "configs/qponder_ci.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("tiny")
    config.update_from_flattened_dict({"optim.warmup_steps": 1, "train.total_steps": 3})
    mesh = sharding.make_mesh(tuple(config.mesh))
    abstract_model, _ = embedded.abstract_model(config.model, workdir / "tiny_model")
    _, abs_params, _ = state_lib.split_model(abstract_model)
    tx, _, _ = optim.from_config(config.optim, abs_params, total_steps=3)
    abstract = state_lib.abstract_train_state(abs_params, tx, state_lib.param_shardings(abstract_model, mesh), mesh)
    ckpt = state_lib.Checkpointer(workdir / "checkpoints", async_save=False)
    try:
        state, _ = ckpt.restore(abstract)
    finally:
        ckpt.close()
    return int(state.step), jax.device_get(state.params)


@pytest.mark.slow
def test_two_processes_match_one_process_and_the_checkpoint_restores(tmp_path):
    ref, multi = tmp_path / "one_process", tmp_path / "two_processes"
    out = subprocess.run(QPONDER + SFT_FLAGS + [f"--workdir={ref}"], cwd=ROOT, env=_env(8), capture_output=True,
                         text=True, timeout=900)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    # The embedded tiny model and the synthetic records are built by every process into the same workdir paths
    # (embedded.build_tiny_model / rule_teacher.write_synthetic_cold_start); give the 2-process run the ones the
    # 1-process run built (deterministic, so identical) instead of racing on them.
    multi.mkdir()
    for name in ("tiny_model", "data"):
        shutil.copytree(ref / name, multi / name)
    launcher = [sys.executable, str(ROOT / "launch/local.py"), "--num_processes=2", "--devices_per_process=4",
                "--timeout=300", f"--log_dir={multi / 'logs'}", "--"]  # fmt: skip
    out = subprocess.run(launcher + QPONDER + SFT_FLAGS + [f"--workdir={multi}"], cwd=ROOT, capture_output=True,
                         text=True, timeout=900)  # fmt: skip
    assert out.returncode == 0, out.stdout[-5000:]
    assert "mesh {'data': 1, 'fsdp': 8, 'tensor': 1}" in out.stdout and "[p1]" in out.stdout
    assert "sft:" not in (multi / "logs/process_1.log").read_text()  # only process 0 logs

    ref_losses, multi_losses = _metrics(ref), _metrics(multi)
    assert set(ref_losses) == set(multi_losses) == {("train", 1), ("train", 2), ("train", 3), ("eval", 3)}
    diffs = {k: abs(ref_losses[k] - multi_losses[k]) for k in ref_losses}
    assert max(diffs.values()) < 1e-4, diffs
    assert ref_losses[("train", 3)] < ref_losses[("train", 1)] - 0.1  # it trained

    step_ref, params_ref = _restore_params(ref, SFT_FLAGS)
    step_multi, params_multi = _restore_params(multi, SFT_FLAGS)
    assert step_ref == step_multi == 3
    leaf_diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), params_ref, params_multi))
    assert max(leaf_diffs) < 1e-4
