"""launch/: the shell launchers parse (bash -n, shellcheck when installed) and their dry runs show the exact per-worker
commands; the local launcher runs the tiny SFT as 2 processes x 4 devices with the same losses as 1 process x 8
devices, and its checkpoint restores in a single process."""

import functools
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
from process_helpers import sigterm_when_ready  # noqa: E402

SCRIPTS = ["launch/tpu_pod.sh", "launch/slurm_gpu.sbatch", "launch/accelerator_bench.sh"]
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


def test_accelerator_bench_dry_run_picks_the_benchmarks_and_the_reference_side(tmp_path):
    script = str(ROOT / "launch/accelerator_bench.sh")
    env = dict(os.environ, DRY_RUN="1", PYTHON=sys.executable)
    run = lambda *names: subprocess.run(["bash", script, str(tmp_path / "out"), *names], capture_output=True, text=True,
                                        env=env, cwd=ROOT)  # fmt: skip
    out = run("decode-tiny", "sft-3b", "grpo-small")
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith("== ")]
    # no CUDA for torch here: the torch side is skipped; the 3b and GRPO runs carry exactly one --no-reference
    assert lines == [
        f"== decode-tiny: {sys.executable} -m qponder_jax.bench decode --size tiny --no-reference "
        f"--out {tmp_path}/out/decode-tiny",
        f"== sft-3b: {sys.executable} -m qponder_jax.bench sft --size 3b --dtype bfloat16 --batch 8 --tokens 512 "
        f"--matmul-n 8192 --no-reference --out {tmp_path}/out/sft-3b",
        f"== grpo-small: {sys.executable} -m qponder_jax.bench grpo --size small --no-reference "
        f"--out {tmp_path}/out/grpo-small",
    ]
    assert not (tmp_path / "out").exists()  # a dry run writes nothing
    assert len([line for line in run().stdout.splitlines() if line.startswith("== ")]) == 7  # the default set
    bad = run("decode-huge")
    assert bad.returncode == 2 and "unknown benchmark decode-huge; choose from: decode-tiny" in bad.stderr
    usage = subprocess.run(["bash", script, "--help"], capture_output=True, text=True)
    assert "Usage: launch/accelerator_bench.sh" in usage.stdout


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


def test_local_launcher_passes_sigterm_on_and_exits_with_resume_status(tmp_path):
    """SIGTERM to launch/local.py reaches every process (each saves and exits 75, as a preempted qponder run does);
    the launcher waits for them and exits with 75 ("resume later") instead of dying and orphaning them."""
    script = (
        "import os, signal, sys, time\n"
        f"me = os.path.join({str(tmp_path)!r}, os.environ['QPONDER_PROCESS_ID'])\n"
        "signal.signal(signal.SIGTERM, lambda *a: (open(me + '.got', 'w').close(), sys.exit(75)))\n"
        "open(me + '.ready', 'w').close()\n"
        "time.sleep(60)\n"
    )
    cmd = [sys.executable, str(ROOT / "launch/local.py"), "--num_processes=2", "--", sys.executable, "-c", script]
    code, out = sigterm_when_ready(cmd, lambda: len(list(tmp_path.glob("*.ready"))) == 2)
    assert code == 75, out
    assert sorted(p.name for p in tmp_path.glob("*.got")) == ["0.got", "1.got"]


def _fake_tools(tmp_path: Path, **tools: str) -> dict:
    """An environment whose PATH starts with `tmp_path/bin` holding the given shell scripts (stand-ins for gcloud,
    srun, scontrol)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in tools.items():
        (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body + "\n")
        (bin_dir / name).chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


@pytest.mark.parametrize("codes, expected", [((0, 75), 75), ((75, 75), 75), ((3, 75), 1), ((0, 0), 0)])
def test_tpu_pod_run_reports_a_preempted_worker_as_resume_later(tmp_path, codes, expected):
    """`tpu_pod.sh run` with a stand-in gcloud whose worker i's command exits codes[i]: 75 from a worker (and no other
    failure) is the script's exit status 75, "rerun to resume"; any other failure is 1."""
    gcloud = 'case "$*" in ' + " ".join(f"*--worker={i}*) exit {c} ;;" for i, c in enumerate(codes)) + " esac"
    env = _fake_tools(tmp_path, gcloud=gcloud)
    env.update(TPU_NAME="qp", NUM_WORKERS="2", LOG_DIR=str(tmp_path / "logs"))
    out = subprocess.run(["bash", str(ROOT / "launch/tpu_pod.sh"), "run", "--", "python3", "-c", "pass"],
                         capture_output=True, text=True, env=env, timeout=60)  # fmt: skip
    assert out.returncode == expected, out.stdout + out.stderr
    if expected == 75:
        assert "rerun the same command to resume" in out.stderr


@pytest.mark.parametrize("requeue", ["1", "0"])
def test_slurm_script_requeues_a_preempted_run(tmp_path, requeue):
    """With a stand-in srun that exits 75 (the tasks were preempted after saving), the batch script requeues its job
    through scontrol (unless QPONDER_REQUEUE=0) and exits with 75; a run that finishes is not requeued."""
    calls = tmp_path / "scontrol_calls"
    env = _fake_tools(tmp_path, srun='exit "${FAKE_SRUN_EXIT}"', scontrol=f'echo "$*" >> {calls}')
    env.update(SLURM_JOB_ID="4242", SLURM_NTASKS="2", LOG_DIR=str(tmp_path / "logs"), QPONDER_REQUEUE=requeue)
    env.pop("SLURM_JOB_NODELIST", None)
    script = ["bash", str(ROOT / "launch/slurm_gpu.sbatch"), "python", "-m", "qponder_jax.main", "--workdir=/w"]
    out = subprocess.run(script, capture_output=True, text=True, env={**env, "FAKE_SRUN_EXIT": "75"}, timeout=60)
    assert out.returncode == 75, out.stdout + out.stderr
    assert (calls.read_text().split() if calls.exists() else []) == (["requeue", "4242"] if requeue == "1" else [])
    calls.unlink(missing_ok=True)
    done = subprocess.run(script, capture_output=True, text=True, env={**env, "FAKE_SRUN_EXIT": "0"}, timeout=60)
    assert done.returncode == 0 and not calls.exists(), done.stdout + done.stderr


# ---- 2 processes x 4 devices against 1 process x 8 devices (slow: CLI runs, each compiling the step) ----
# The data stream does not depend on the process layout (process p reads rows [p*B/P, (p+1)*B/P) of every global
# batch), so both layouts train on the same batches, and fine buckets make the two processes' halves of a batch need
# different buckets (`_halves_needing_other_buckets` checks it): without the agreement on one shape per batch the
# 2-process runs would fail. A 1-process run then resumes the 2-process checkpoint and must take the step the
# 1-process reference took.

SFT_FLAGS = [
    "--config=configs/qponder_ci.py:tiny",
    "--config.optim.warmup_steps=1",
    "--config.optim.end_lr_ratio=1.0",  # constant after warmup: the schedule does not depend on total_steps
    "--config.train.log_every=1",
    "--config.train.eval_every=0",
    "--config.train.checkpoint_every=3",
    "--config.data.synthetic_train_size=16",  # 2 batches of 8 per epoch: step 4 is epoch 2's second batch
    "--config.data.synthetic_eval_size=16",
    # the synthetic records have 211-230 tokens (with the demo tokenizer, which is trained on a corpus holding the
    # prompts, so lengths move a little when prompts.py changes): 8-token buckets from 208 to 240 cover the drift
    "--config.data.token_buckets=(208, 216, 224, 232, 240)",
    "--config.data.patch_buckets=(16, 24, 64)",
]


def _env(devices: int) -> dict:
    return local.process_env(os.environ, 0, 1, 0, devices_per_process=devices)


def _run(args: list[str], *, devices: int = 8) -> str:
    out = subprocess.run(QPONDER + args, cwd=ROOT, env=_env(devices), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stderr + out.stdout


def _run_two_processes(args: list[str], workdir: Path) -> str:
    launcher = [sys.executable, str(ROOT / "launch/local.py"), "--num_processes=2", "--devices_per_process=4",
                "--timeout=300", f"--log_dir={workdir / 'logs'}", "--"]  # fmt: skip
    out = subprocess.run(launcher + QPONDER + args, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-5000:]
    assert "mesh {'data': 1, 'fsdp': 8, 'tensor': 1}" in out.stdout and "[p1]" in out.stdout
    return out.stdout


def _metrics(workdir: Path, prefix: str = "train", key: str = "loss") -> dict:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {(r["prefix"], r["step"]): r[key] for r in records if r["prefix"] == prefix or prefix == "*"}


def _config(name: str, variant: str, overrides: dict):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_for_launch", ROOT / f"configs/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(variant)
    config.update_from_flattened_dict(overrides)
    return config


def _halves_needing_other_buckets(source, transform, collate, batch_size: int, steps: int) -> int:
    """How many of the first `steps` global batches have halves (2 processes) that pick different buckets alone."""
    from qponder_jax.data import pipeline

    loaders = [pipeline.make_loader(source, batch_size=batch_size, transform=transform, collate=collate,
                                    process_index=p, process_count=2) for p in range(2)]  # fmt: skip
    differ = 0
    for _ in range(steps):
        halves = [next(loader) for loader in loaders]
        sizes = [pipeline.bucket_sizes(h[0] if isinstance(h, tuple) else h) for h in halves]
        differ += sizes[0] != sizes[1]
    return differ


def _restore_params(workdir: Path, steps: int) -> tuple[int, dict]:
    """The final SFT checkpoint's params, restored in this (single, 8-device) process."""
    from qponder_jax import embedded
    from qponder_jax.model import sharding
    from qponder_jax.train import optim
    from qponder_jax.train import state as state_lib

    config = _config("qponder_ci", "tiny", {"optim.warmup_steps": 1, "optim.end_lr_ratio": 1.0})
    mesh = sharding.make_mesh(tuple(config.mesh))
    abstract_model, _ = embedded.abstract_model(config.model, workdir / "tiny_model")
    _, abs_params, _ = state_lib.split_model(abstract_model)
    tx, _, _ = optim.from_config(config.optim, abs_params, total_steps=steps)
    abstract = state_lib.abstract_train_state(abs_params, tx, state_lib.param_shardings(abstract_model, mesh), mesh)
    ckpt = state_lib.Checkpointer(workdir / "checkpoints", async_save=False)
    try:
        state, _ = ckpt.restore(abstract)
    finally:
        ckpt.close()
    return int(state.step), jax.device_get(state.params)


@pytest.mark.slow
def test_two_processes_match_one_process_and_the_checkpoint_resumes_in_one(tmp_path):
    from qponder_jax.data.datasets.cold_start import ColdStartSource
    from qponder_jax.data.processing import Buckets, Processor
    from qponder_jax.train.sft_job import EncodeColdStart

    ref, multi = tmp_path / "one_process", tmp_path / "two_processes"
    _run(SFT_FLAGS + ["--config.train.total_steps=4", f"--workdir={ref}"])
    buckets = Buckets(tokens=(208, 216, 224, 232, 240), patches=(16, 24, 64), images=(1,))  # SFT_FLAGS' buckets
    proc = Processor.from_pretrained(ref / "tiny_model", buckets=buckets)
    source = ColdStartSource(ref / "data/train.jsonl")
    assert _halves_needing_other_buckets(source, EncodeColdStart(proc), proc.collate, 8, 3) >= 1

    stdout = _run_two_processes(SFT_FLAGS + ["--config.train.total_steps=3", f"--workdir={multi}"], multi)
    assert "sft:" not in (multi / "logs/process_1.log").read_text()  # only process 0 logs
    assert "[p0] sft:" in stdout
    ref_losses, multi_losses = _metrics(ref, "*"), _metrics(multi, "*")
    assert set(multi_losses) == {("train", 1), ("train", 2), ("train", 3), ("eval", 3)}
    diffs = {k: abs(ref_losses[k] - multi_losses[k]) for k in multi_losses if k[0] == "train"}
    assert max(diffs.values()) < 1e-4, diffs
    assert ref_losses[("train", 3)] < ref_losses[("train", 1)] - 0.1  # it trained

    # One process resumes the 2-process checkpoint (step 3, data position 3 batches) and takes step 4 exactly as the
    # 1-process run did: same parameters, optimizer state and next batch.
    resumed = _run(SFT_FLAGS + ["--config.train.total_steps=4", f"--workdir={multi}"])
    assert "resuming at step 3" in resumed
    multi_losses = _metrics(multi, "*")
    assert abs(multi_losses[("train", 4)] - ref_losses[("train", 4)]) < 1e-4
    assert abs(multi_losses[("eval", 4)] - ref_losses[("eval", 4)]) < 1e-4
    step_ref, params_ref = _restore_params(ref, 4)
    step_multi, params_multi = _restore_params(multi, 4)
    assert step_ref == step_multi == 4
    leaf_diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), params_ref, params_multi))
    assert max(leaf_diffs) < 1e-4


# ---- GRPO: the same for a few steps from a cold-started tiny model whose rewards vary across the batch ----

COLD_START_PROMPT = "Rate the quality."
GRPO_TOKEN_BUCKETS, GRPO_PATCH_BUCKETS = (24, 28, 32, 36, 40, 48, 64), (16, 24, 32, 36, 48, 64)
GRPO_FLAGS = [
    "--config=configs/qponder.py:tiny",  # constant learning rate: the schedule does not depend on total_steps
    "--config.train.log_every=1",
    "--config.train.sample_every=1",
    "--config.train.checkpoint_every=3",
    "--config.grpo.max_new_tokens=24",
    "--config.data.synthetic_size=32",
    f"--config.data.prompt_text={COLD_START_PROMPT}",
    f"--config.data.token_buckets={GRPO_TOKEN_BUCKETS}",
    f"--config.data.patch_buckets={GRPO_PATCH_BUCKETS}",
]
GRPO_KEYS = ("reward_mean", "reward_std", "format_rate", "completion_length", "zero_std_fraction", "loss", "kl")


def _cold_start(root: Path) -> Path:
    """An SFT workdir whose tiny model writes `<think>The quality is W.</think><answer>S</answer>` (S uniform in
    [1, 5], whatever the image) often enough that format, accuracy and consistency rewards vary across a batch."""
    from qponder_jax import prompts
    from qponder_jax.data.datasets import SyntheticIQA, decode_image

    data = root / "cold_start"
    data.mkdir(parents=True)
    source, rng = SyntheticIQA("train", size=32, min_side=56, max_side=84), np.random.default_rng(0)
    lines = []
    for i in range(32):
        record, score = source[i], float(np.round(rng.uniform(1, 5), 1))
        decode_image(record["image"]).save(data / f"{i}.png")
        response = f"<think>The quality is {prompts.level_of_score(score)}.</think><answer>{score:.1f}</answer>"
        lines.append({"image": f"{i}.png", "prompt": COLD_START_PROMPT, "response": response, "mos": record["mos"]})
    (data / "train.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    workdir = root / "sft"
    _run(["--config=configs/qponder_ci.py:tiny", "--config.data.source=jsonl", f"--config.data.train_jsonl="
          f"{data / 'train.jsonl'}", "--config.train.total_steps=80", "--config.optim.peak_lr=3e-3",
          "--config.optim.warmup_steps=5", "--config.optim.end_lr_ratio=0.1", "--config.train.eval_every=0",
          "--config.train.log_every=80", "--config.data.token_buckets=(64, 128)", f"--workdir={workdir}"])  # fmt: skip
    return workdir


def _grpo_metrics(workdir: Path) -> dict[int, dict]:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if r["prefix"] == "grpo"}


def _samples(text: str) -> dict[int, str]:
    return {int(m.group(1)): m.group(2) for m in re.finditer(r"grpo step (\d+) sample (.*)", text)}


@pytest.mark.slow
def test_grpo_two_processes_match_one_process_and_resume_in_one(tmp_path):
    from qponder_jax.data import pipeline
    from qponder_jax.data.sources import open_source
    from qponder_jax.loading import make_processor
    from qponder_jax.train.grpo_job import EncodePrompt

    sft = _cold_start(tmp_path)
    flags = GRPO_FLAGS + [f"--config.init_checkpoint={sft}"]
    config = _config("qponder", "tiny", {"data.synthetic_size": 32, "data.token_buckets": GRPO_TOKEN_BUCKETS,
                                         "data.patch_buckets": GRPO_PATCH_BUCKETS})  # fmt: skip
    proc = make_processor(sft / "tiny_model", config.data)
    collate = pipeline.collate_pairs(functools.partial(proc.collate, padding_side="left"))
    prompts_source = open_source("synthetic:train", config.data)
    assert _halves_needing_other_buckets(prompts_source, EncodePrompt(proc, COLD_START_PROMPT), collate, 8, 3) >= 1

    ref, multi = tmp_path / "one_process", tmp_path / "two_processes"
    ref_out = _run(flags + ["--config.train.total_steps=4", f"--workdir={ref}"])
    multi_out = _run_two_processes(flags + ["--config.train.total_steps=3", f"--workdir={multi}"], multi)
    want, got = _grpo_metrics(ref), _grpo_metrics(multi)
    assert sorted(got) == [1, 2, 3]
    assert (
        max(want[s]["reward_std"] for s in got) > 0.2 and max(want[s]["format_rate"] for s in got) > 0
    )  # rewards vary
    for step in got:  # identical rollouts (same prompts, same PRNG stream), so identical rewards and lengths
        for key in GRPO_KEYS:
            assert abs(got[step][key] - want[step][key]) < 1e-4, (step, key, got[step][key], want[step][key])
    assert _samples(multi_out) == {s: t for s, t in _samples(ref_out).items() if s <= 3} and _samples(multi_out)

    resumed = _run(flags + ["--config.train.total_steps=4", f"--workdir={multi}"])  # 1 process, 2-process checkpoint
    assert "resuming at step 3" in resumed
    got = _grpo_metrics(multi)
    for key in GRPO_KEYS:
        assert abs(got[4][key] - want[4][key]) < 1e-4, (key, got[4][key], want[4][key])
    assert _samples(resumed)[4] == _samples(ref_out)[4]
