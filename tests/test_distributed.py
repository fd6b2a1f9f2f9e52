"""qponder_jax.distributed: which environment starts a multi-process run, the join timeout (no hang when a process
never starts), and the cross-process config check (processes that disagree fail fast, naming the field)."""

import dataclasses
import functools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qponder_jax import distributed as dist
from qponder_jax.data import pipeline
from qponder_jax.data.batch import Batch
from qponder_jax.data.processing import Buckets, Processor
from qponder_jax.data.tokenizer import build_demo_tokenizer
from qponder_jax.errors import ConfigError

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


# ---- every process pads a global batch to the same buckets ----

BUCKETS = dict(tokens=(32, 48, 64, 96, 128, 192, 256), patches=(0, 16, 32, 64, 128, 256), images=(0, 1, 2))


class Conversations:
    """Records with 0-2 images of varied sizes and texts of varied length: batch halves need different buckets."""

    def __len__(self):
        return 32

    def __getitem__(self, index):
        rng = np.random.default_rng(index)
        sides = rng.choice([28, 56, 84], size=(index % 3, 2))
        images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sides]
        return {"index": index, "images": images, "text": " ".join(["sharp"] * int(rng.integers(1, 60)))}


class EncodeConversation:
    def __init__(self, proc, generation: bool):
        self.proc, self.generation = proc, generation

    def __call__(self, record):
        content = [{"type": "image"} for _ in record["images"]] + [{"type": "text", "text": record["text"]}]
        messages = [{"role": "user", "content": content}]
        if not self.generation:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": "fair"}]})
        ex = self.proc.encode(messages, record["images"], add_generation_prompt=self.generation)
        return ex, {"index": np.int32(record["index"])}


@pytest.fixture(scope="module")
def proc(tmp_path_factory):
    return Processor.from_pretrained(build_demo_tokenizer(tmp_path_factory.mktemp("tok")), buckets=Buckets(**BUCKETS))


@pytest.mark.parametrize("side", ["right", "left"])
def test_processes_agree_on_each_batch_shape(proc, side, monkeypatch):
    """Two processes' halves of a global batch pick different buckets on their own; after the loader's agreement
    both have the same shapes, and together they are exactly the batch one process collates for the whole batch."""
    collate = pipeline.collate_pairs(functools.partial(proc.collate, padding_side=side))
    kwargs = dict(batch_size=4, transform=EncodeConversation(proc, side == "left"), collate=collate, seed=0)
    padding = pipeline.Padding(side, proc.pad_token_id)
    one = pipeline.make_loader(Conversations(), **kwargs)
    raw = [pipeline.make_loader(Conversations(), process_index=p, process_count=2, **kwargs) for p in range(2)]
    agreeing = [pipeline.make_loader(Conversations(), process_index=p, process_count=2, padding=padding, **kwargs)
                for p in range(2)]  # fmt: skip
    differed = 0
    for _ in range(8):
        whole = next(one)
        local = [next(r) for r in raw]
        sizes = np.stack([[pipeline.bucket_sizes(item[0])] for item in local])  # [processes, 1, 3]
        differed += int((sizes[0] != sizes[1]).any())
        monkeypatch.setattr(pipeline, "_process_allgather", lambda mine, sizes=sizes: sizes)  # the collective
        parts = [next(a) for a in agreeing]
        assert (
            pipeline.bucket_sizes(parts[0][0]) == pipeline.bucket_sizes(parts[1][0]) == pipeline.bucket_sizes(whole[0])
        )
        for field in dataclasses.fields(Batch):
            axis = 1 if field.name == "position_ids" else 0
            joined = np.concatenate([getattr(part[0], field.name) for part in parts], axis=axis)
            np.testing.assert_array_equal(joined, getattr(whole[0], field.name), err_msg=field.name)
        np.testing.assert_array_equal(np.concatenate([part[1]["index"] for part in parts]), whole[1]["index"])
    assert differed >= 3, "the records no longer exercise different buckets per process"


def test_pad_batch_refuses_to_shrink_and_single_process_loaders_do_not_gather(proc, monkeypatch):
    batch = proc.collate([EncodeConversation(proc, False)(Conversations()[1])[0]])
    with pytest.raises(ValueError, match="smaller"):
        pipeline.pad_batch(batch, 16, 16, 1, pipeline.Padding())
    monkeypatch.setattr(pipeline, "_process_allgather", lambda mine: pytest.fail("gathered in a 1-process run"))
    loader = pipeline.make_loader(Conversations(), batch_size=2, transform=EncodeConversation(proc, False),
                                  collate=pipeline.collate_pairs(proc.collate), padding=pipeline.Padding())  # fmt: skip
    assert next(loader)[0].batch_size == 2


class Numbers:
    def __len__(self):
        return 16

    def __getitem__(self, index):
        return {"index": np.int32(index)}


def test_data_position_restores_on_any_layout_but_not_other_settings():
    """A position saved by process 1 of 2 restores in one process; other data settings are refused with a one-line
    error (a ConfigError: the CLI prints it without a traceback) naming the setting and the way forward."""
    saved = pipeline.make_loader(Numbers(), batch_size=4, seed=1, process_index=1, process_count=2)
    next(saved)
    state = saved.state()
    one = pipeline.make_loader(Numbers(), batch_size=4, seed=1)
    expected = [next(one)["index"].tolist() for _ in range(2)][1]
    resumed = pipeline.make_loader(Numbers(), batch_size=4, seed=1)
    resumed.restore(state)
    assert next(resumed)["index"].tolist() == expected  # the next global batch
    with pytest.raises(pipeline.LoaderStateError, match=r"batch_size \(saved 4, now 8\).*init_checkpoint") as error:
        pipeline.make_loader(Numbers(), batch_size=8, seed=1).restore(state)
    assert isinstance(error.value, ConfigError)
