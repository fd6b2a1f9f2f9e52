"""qponder_jax.distributed: which environment starts a multi-process run, the join timeout (no hang when a process
never starts), and the cross-process config check (processes that disagree fail fast, naming the field)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qponder_jax import distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "launch"))

import local  # noqa: E402  (launch/local.py)

SLURM = {
    "SLURM_JOB_ID": "1234",
    "SLURM_PROCID": "3",
    "SLURM_LOCALID": "1",
    "SLURM_NTASKS": "4",
    "SLURM_STEP_NUM_NODES": "2",
    "SLURM_STEP_NODELIST": "gpu[007-008]",
}


def test_single_process_environments_start_nothing():
    assert dist.plan_from_env({}) is None
    assert dist.plan_from_env({**SLURM, "SLURM_NTASKS": "1"}) is None  # a one-task SLURM job
    assert dist.plan_from_env({"QPONDER_COORDINATOR_ADDRESS": "h:1", "QPONDER_NUM_PROCESSES": "1",
                               "QPONDER_PROCESS_ID": "0"}) is None  # fmt: skip
    assert dist.plan_from_env({**SLURM, "QPONDER_DISTRIBUTED": "off"}) is None
    assert dist.plan_from_env({"TPU_WORKER_HOSTNAMES": "only-one"}) is None


def test_explicit_environment_and_flags():
    env = {"QPONDER_COORDINATOR_ADDRESS": "10.0.0.1:1234", "QPONDER_NUM_PROCESSES": "2", "QPONDER_PROCESS_ID": "1"}
    assert dist.plan_from_env(env) == dist.Plan("explicit", "10.0.0.1:1234", 2, 1)
    jax_names = {"JAX_COORDINATOR_ADDRESS": "h:9", "JAX_NUM_PROCESSES": "3", "JAX_PROCESS_ID": "2"}
    assert dist.plan_from_env(jax_names) == dist.Plan("explicit", "h:9", 3, 2)
    # command-line flags win over the environment
    plan = dist.plan_from_env(env, coordinator_address="other:5", num_processes=4, process_id=3)
    assert plan == dist.Plan("explicit", "other:5", 4, 3)


@pytest.mark.parametrize(
    "env, message",
    [
        ({"QPONDER_COORDINATOR_ADDRESS": "h:1", "QPONDER_PROCESS_ID": "0"}, "QPONDER_NUM_PROCESSES"),
        ({"QPONDER_COORDINATOR_ADDRESS": "h:1", "QPONDER_NUM_PROCESSES": "2", "QPONDER_PROCESS_ID": "2"}, "outside"),
        ({"QPONDER_COORDINATOR_ADDRESS": "h", "QPONDER_NUM_PROCESSES": "2", "QPONDER_PROCESS_ID": "0"}, "host:port"),
        ({"QPONDER_COORDINATOR_ADDRESS": "h:1", "QPONDER_NUM_PROCESSES": "x", "QPONDER_PROCESS_ID": "0"}, "integer"),
        ({"QPONDER_DISTRIBUTED": "maybe"}, "QPONDER_DISTRIBUTED"),
        ({"QPONDER_DISTRIBUTED": "slurm"}, "srun"),
    ],
)
def test_incomplete_settings_are_clear_errors(env, message):
    with pytest.raises(dist.DistributedError, match=message):
        dist.plan_from_env(env)


def test_slurm_plan():
    plan = dist.plan_from_env(SLURM)  # 4 tasks on 2 nodes: one per GPU, GPU number = local id
    assert plan == dist.Plan("slurm", f"gpu007:{1234 % 4096 + 61440}", 4, 3, (1,))
    one_per_node = dist.plan_from_env({**SLURM, "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "0"})
    assert one_per_node.local_device_ids is None and one_per_node.num_processes == 2  # all the node's GPUs
    bound = dist.plan_from_env({**SLURM, "CUDA_VISIBLE_DEVICES": "5", "QPONDER_COORDINATOR_PORT": "7000"})
    assert bound.local_device_ids is None and bound.coordinator_address == "gpu007:7000"  # SLURM bound one GPU


def test_first_slurm_host():
    assert dist.first_slurm_host("node001") == "node001"
    assert dist.first_slurm_host("node001,host2") == "node001"
    assert dist.first_slurm_host("gpu[003-005,9],cpu1") == "gpu003"
    assert dist.first_slurm_host("a[7,9]") == "a7"


def test_tpu_plan_defers_to_jax_detection():
    assert dist.plan_from_env({"QPONDER_DISTRIBUTED": "tpu"}) == dist.Plan("tpu")
    assert dist.plan_from_env({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}) == dist.Plan("tpu")


def test_timeout_setting():
    assert dist.timeout_from_env({}) == dist.DEFAULT_TIMEOUT_S
    assert dist.timeout_from_env({"QPONDER_DISTRIBUTED_TIMEOUT": "7"}) == 7
    assert dist.timeout_from_env({"QPONDER_DISTRIBUTED_TIMEOUT": "7"}, override=3) == 3


def test_differences_name_the_fields():
    a = {"config": {"seed": 0, "optim": {"peak_lr": 1e-3}}, "workdir": "/w"}
    b = {"config": {"seed": 1, "optim": {"peak_lr": 1e-3}}, "workdir": "/w", "extra": 2}
    diffs = dist.differences(a, b, labels=("p1", "p0"))
    assert diffs == ["config.seed (p1: 0, p0: 1)", "extra (p1: '<missing>', p0: 2)"]
    assert dist.differences(a, a) == []


def _qponder(workdir, *overrides) -> list[str]:
    return [sys.executable, "-m", "qponder_jax.main", "--config=configs/qponder_ci.py:tiny", f"--workdir={workdir}",
            *overrides]  # fmt: skip


def test_missing_process_times_out_instead_of_hanging(tmp_path):
    """Process 1 of 2 never starts: process 0 exits with EXIT_TIMEOUT and a message after the configured 3 s."""
    cmd = [sys.executable, str(ROOT / "launch/local.py"), "--num_processes=2", "--omit=1", "--timeout=3", "--"]
    out = subprocess.run(cmd + _qponder(tmp_path / "w"), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == dist.EXIT_TIMEOUT, out.stdout[-2000:]
    assert "timed out after 3 s waiting for all processes" in out.stdout
    assert "process 0 of 2" in out.stdout
    assert not (tmp_path / "w").exists()  # nothing ran


def test_processes_with_different_configs_fail_fast(tmp_path):
    """Two processes that join but were given different overrides both stop with the differing field named."""
    port = local.free_port()
    procs = []
    for pid, extra in ((0, []), (1, ["--config.seed=7"])):
        env = local.process_env(os.environ, pid, 2, port, devices_per_process=1, timeout_s=60)
        procs.append(subprocess.Popen(_qponder(tmp_path / "w", *extra), cwd=ROOT, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))  # fmt: skip
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    for p, text in zip(procs, outputs):
        assert p.returncode == 1, text[-2000:]
        assert (
            "processes disagree: process 1 differs from process 0 in config.seed (process 1: 7, process 0: 0)" in text
        )
    assert not (tmp_path / "w").exists()  # refused before the job touched the workdir


def test_run_once_runs_on_process_zero_and_waits(monkeypatch):
    import jax
    from jax.experimental import multihost_utils

    calls, barriers = [], []
    monkeypatch.setattr(multihost_utils, "sync_global_devices", barriers.append)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    assert dist.run_once(lambda: calls.append("built") or 7, name="build") is None
    assert calls == [] and barriers == ["build"]  # process 1 never writes, but waits for process 0
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    assert dist.run_once(lambda: calls.append("built") or 7, name="build") == 7
    assert calls == ["built"] and barriers == ["build", "build"]
