"""The `qponder` CLI and configs/qponder_ci.py: locked configs, overrides, the job registry, clear errors, and the
tiny variant end to end (loss goes down; SIGTERM + rerun resumes to the same parameters; a workdir of another
model shape is refused without touching its checkpoint)."""

import atexit
import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from qponder_jax import main as qmain
from qponder_jax.train.logging import read_metrics

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/qponder_ci.py"


def _load_config_module():
    """configs/qponder_ci.py loaded by path, as config_flags does (configs/ is not an installed package)."""
    spec = importlib.util.spec_from_file_location("qponder_ci_under_test", ROOT / CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


qponder_ci = _load_config_module()


_CACHE = Path(tempfile.mkdtemp(prefix="qponder_jax_cache_"))  # compiled steps shared by this file's CLI runs
atexit.register(shutil.rmtree, _CACHE, True)


def _env(devices: int = 1) -> dict:
    env = dict(os.environ)
    env["JAX_COMPILATION_CACHE_DIR"] = str(_CACHE)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")).strip()
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


def _cmd(workdir, *overrides, variant="tiny") -> list[str]:
    return [
        sys.executable,
        "-m",
        "qponder_jax.main",
        f"--config={CONFIG}:{variant}",
        f"--workdir={workdir}",
        *overrides,
    ]


def _qponder(workdir, *overrides, variant="tiny", timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(
        _cmd(workdir, *overrides, variant=variant), cwd=ROOT, env=_env(), capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def _digest(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in directory.rglob("*")
        if p.is_file()
    }  # noqa: E501


def _final_params(workdir: Path, step: int) -> dict:
    import orbax.checkpoint as ocp

    from qponder_jax.train.optim import named_leaves

    tree = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")
    return {path: np.asarray(x) for path, x in named_leaves(tree["params"])}


def _reuse_assets(ref_dir: Path, workdir: Path) -> None:
    """Copies the built tiny model and synthetic data of another run (the job reuses them instead of rebuilding)."""
    for name in ("tiny_model", "data"):
        shutil.copytree(ref_dir / name, workdir / name)


# ---- configs and the registry (fast) ----


def _leaf_keys(cfg, prefix=""):
    for key, value in cfg.items():
        if hasattr(value, "items"):
            yield from _leaf_keys(value, f"{prefix}{key}.")
        else:
            yield key


def test_configs_are_locked_and_every_field_is_commented():
    sources = (ROOT / "configs" / "common.py").read_text() + (ROOT / "configs" / "qponder_ci.py").read_text()
    for variant in qponder_ci.VARIANTS:
        cfg = qponder_ci.get_config(variant)
        assert cfg.job == "sft" and cfg.variant == variant
        with pytest.raises(AttributeError, match="peak_lrr"):
            cfg.optim.peak_lrr = 1.0
        for key in _leaf_keys(cfg):
            assert re.search(rf"\bc(onfig)?\.{key} = .*#", sources), f"field {key} has no one-line comment"
    assert qponder_ci.get_config().variant == "tiny"
    assert qponder_ci.get_config("7b").model.model_path == ""  # real variants name the path they need
    with pytest.raises(ValueError, match="unknown config variant '13b'"):
        qponder_ci.get_config("13b")


def test_job_registry():
    from qponder_jax.train import sft_job

    assert qmain.get_job("sft") is sft_job.run
    with pytest.raises(ValueError, match=r"unknown job.*known jobs: \[.*'sft'"):
        qmain.get_job("sfft")
    qmain.register_job("echo", lambda config, workdir: ("ran", workdir))
    try:
        assert qmain.get_job("echo")(None, "w") == ("ran", "w")
    finally:
        del qmain.JOBS["echo"]
    qmain.register_job("ghost", "qponder_jax.no_such_module:run")
    try:
        with pytest.raises(ValueError, match="not available in this install"):
            qmain.get_job("ghost")
    finally:
        del qmain.JOBS["ghost"]


def test_bad_overrides_are_errors(tmp_path):
    bad_key = _qponder(tmp_path / "a", "--config.optim.peak_lrr=0.1")
    assert bad_key.returncode != 0
    assert "qponder: error: bad --config override: 'peak_lrr'" in bad_key.stderr
    assert 'Did you mean "peak_lr"' in bad_key.stderr and "Traceback" not in bad_key.stderr
    bad_type = _qponder(tmp_path / "b", "--config.train.total_steps=many")
    assert bad_type.returncode != 0 and "total_steps" in bad_type.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing ran


@pytest.mark.parametrize("how", ["returns", "raises"])
def test_a_preempted_job_exits_with_the_resume_status(tmp_path, how):
    """A job that returns status "preempted" (the trainers) or raises errors.Preempted (the demo) makes `qponder` say
    to rerun and exit with 75 (EX_TEMPFAIL), which schedulers and launch/ read as "resume later", never as done."""
    (tmp_path / "fake.py").write_text(
        "import ml_collections\n"
        "def get_config():\n"
        "    return ml_collections.ConfigDict({'job': 'fake', 'how': 'returns'}).lock()\n"
    )
    script = (
        "import sys, types\n"
        "from qponder_jax import main\n"
        "from qponder_jax.errors import Preempted\n"
        "def job(config, workdir):\n"
        "    if config.how == 'returns':\n"
        "        return types.SimpleNamespace(status='preempted')\n"
        "    raise Preempted('demo: interrupted in stage 4; rerun the same command to resume from there')\n"
        "main.register_job('fake', job)\n"
        "sys.argv[1:] = ['--config=' + sys.argv[1], '--workdir=' + sys.argv[2], '--config.how=' + sys.argv[3]]\n"
        "main.run()\n"
    )
    cmd = [sys.executable, "-c", script, str(tmp_path / "fake.py"), str(tmp_path / "w"), how]
    out = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 75, out.stdout + out.stderr
    assert "rerun the same command to resume" in out.stdout.lower() and "Traceback" not in out.stderr


def test_real_variant_names_the_missing_model_path(tmp_path):
    result = _qponder(tmp_path / "w", variant="7b")
    assert result.returncode == 1
    assert "qponder: error:" in result.stderr and "model.model_path" in result.stderr
    assert "Traceback" not in result.stderr
    missing = _qponder(tmp_path / "w", f"--config.model.model_path={tmp_path / 'nowhere'}", variant="3b")
    assert missing.returncode == 1 and "nowhere" in missing.stderr and "config.json is missing" in missing.stderr


# ---- the tiny variant end to end (slow: each run builds the embedded default and compiles the step) ----


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tiny")
    result = _qponder(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result


@pytest.mark.slow
def test_tiny_config_trains_and_lowers_the_loss(tiny_run):
    workdir, result = tiny_run
    train = read_metrics(workdir, "train")
    evals = read_metrics(workdir, "eval")
    assert [r["step"] for r in train] == list(range(5, 41, 5))
    first, last = train[0]["loss"], train[-1]["loss"]
    print(f"tiny SFT: mean loss steps 1-5 {first:.3f} -> steps 36-40 {last:.3f}; eval {[r['loss'] for r in evals]}")
    assert last < first - 1.5  # measured 6.37 -> 2.97
    assert [r["step"] for r in evals] == [20, 40] and evals[1]["loss"] < evals[0]["loss"]
    assert all(r["tokens_per_s"] > 0 and r["grad_norm"] > 0 for r in train[1:])
    assert "train step 40 | loss" in result.stdout  # metrics on stdout too
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [20, 40]
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((workdir / "config.json").read_text())["job"] == "sft"


@pytest.mark.slow
def test_sigterm_then_rerun_resumes_to_the_same_parameters(tiny_run, tmp_path):
    ref_dir, _ = tiny_run
    workdir = tmp_path / "w"
    _reuse_assets(ref_dir, workdir)
    proc = subprocess.Popen(
        _cmd(workdir), cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.time() + 400
        while time.time() < deadline and not any(r["step"] >= 10 for r in read_metrics(workdir, "train")):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, err[-3000:]  # "resume later" (errors.EXIT_RESUME), not done
    assert "preempted" in out
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir())
    stopped_at = saved[-1]
    assert 10 <= stopped_at < 40, saved

    resumed = _qponder(workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming at step {stopped_at}" in resumed.stdout
    ours, ref = _final_params(workdir, 40), _final_params(ref_dir, 40)
    diff = max(float(np.max(np.abs(ours[k] - ref[k]))) for k in ref)
    print(f"SIGTERM at step {stopped_at}, resumed: max |param diff| vs uninterrupted = {diff}")
    assert diff == 0.0
    ref_eval = read_metrics(ref_dir, "eval")[-1]["loss"]
    assert read_metrics(workdir, "eval")[-1]["loss"] == ref_eval
    steps = [r["step"] for r in read_metrics(workdir, "train")]
    assert steps == sorted(set(steps)) and steps[-1] == 40  # one row per step

    again = _qponder(workdir)  # a finished run says so instead of "resuming at step 40"
    assert again.returncode == 0, again.stderr[-3000:]
    assert "the run is complete (checkpoint at step 40" in again.stdout and "resuming" not in again.stdout


@pytest.mark.slow
def test_scoring_a_workdir_whose_newest_checkpoint_is_damaged_says_so(tiny_run, tmp_path, caplog):
    """qponder-score hides orbax's routine warnings, not the notice that it scores an older step than the newest."""
    from PIL import Image

    from qponder_jax import score

    ref_dir, _ = tiny_run
    workdir = tmp_path / "w"
    shutil.copytree(ref_dir, workdir)
    for f in (workdir / "checkpoints" / "40" / "state").rglob("d/*"):
        f.write_bytes(f.read_bytes()[:64])  # truncated: a crash mid-copy
    Image.new("RGB", (56, 56), (120, 90, 60)).save(tmp_path / "a.png")
    with caplog.at_level("WARNING"):
        assert score.main(["--model", str(workdir), str(tmp_path / "a.png"), "--max-new-tokens", "4"]) == 0
    notices = [r.getMessage() for r in caplog.records if "does not restore" in r.getMessage()]
    assert len(notices) == 1 and "checkpoint step 40" in notices[0] and "using step 20" in notices[0], notices
    assert not [r for r in caplog.records if "/orbax/" in r.pathname and r.levelno < 40]  # orbax's own: hidden


@pytest.mark.slow
def test_workdir_with_another_model_shape_is_refused(tiny_run, tmp_path):
    ref_dir, _ = tiny_run
    workdir = tmp_path / "w"
    shutil.copytree(ref_dir / "checkpoints", workdir / "checkpoints")
    _reuse_assets(ref_dir, workdir)
    other = tmp_path / "other_model"
    shutil.copytree(ref_dir / "tiny_model", other)
    config = json.loads((other / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 96
    (other / "config.json").write_text(json.dumps(config))
    before = _digest(workdir / "checkpoints")
    result = _qponder(workdir, f"--config.model.model_path={other}")
    assert result.returncode == 1
    assert "parameter 'language_model/layers/0/mlp/down_proj/kernel'" in result.stderr
    assert "(128, 64)" in result.stderr and "(96, 64)" in result.stderr and "Traceback" not in result.stderr
    assert _digest(workdir / "checkpoints") == before


def test_config_record_of_another_job_is_not_overwritten(tmp_path):
    import ml_collections

    def config(job, value):
        c = ml_collections.ConfigDict({"job": job, "value": value})
        return c.lock()

    qmain._write_config(config("sft", 1), tmp_path)
    qmain._write_config(config("eval", 2), tmp_path)  # e.g. an eval run pointed at the training workdir
    assert json.loads((tmp_path / "config.json").read_text()) == {"job": "sft", "value": 1}
    assert json.loads((tmp_path / "config.eval.json").read_text()) == {"job": "eval", "value": 2}
    qmain._write_config(config("sft", 3), tmp_path)  # the same job (a resume) refreshes its own record
    assert json.loads((tmp_path / "config.json").read_text())["value"] == 3
