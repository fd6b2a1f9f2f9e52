"""Up-front config checks (qponder_jax/validation.py): each bad value gives one ConfigError naming the field and value,
before any model or data is built; through the CLI, one line and exit status 1, and no workdir is made."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from dataset_fixtures import write_kadid

from configs import eval as eval_config
from configs import export as export_config
from configs import qponder, qponder_ci
from qponder_jax import validation
from qponder_jax.data import datasets
from qponder_jax.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _config(module, variant="tiny", **overrides):
    config = module.get_config(variant)
    for dotted, value in overrides.items():
        *sections, key = dotted.split("__")
        target = config
        for section in sections:
            target = target[section]
        target[key] = value
    return config


@pytest.mark.parametrize(
    ("module", "overrides", "message"),
    [
        (qponder_ci, {"mesh": (2,)}, r"config field mesh=\(2,\): mesh shape must have 3 entries"),
        (qponder_ci, {"mesh": (0, 1, 1)}, r"config field mesh=\(0, 1, 1\): .*positive integers \(or one -1\)"),
        (qponder_ci, {"mesh": (1, 16, 1)}, r"config field mesh=\(1, 16, 1\): .*needs 16 devices, only 8 available"),
        (qponder_ci, {"mesh": (1, -1, -1)}, r"config field mesh=\(1, -1, -1\): at most one -1"),
        (qponder_ci, {"data__token_buckets": ("abc",)}, r"data\.token_buckets=\('abc',\): give a tuple of positive"),
        (qponder_ci, {"data__batch_size": 0}, r"config field data\.batch_size=0: must be at least 1"),
        (qponder_ci, {"train__total_steps": -5}, r"config field train\.total_steps=-5: must be at least 1"),
        (
            qponder_ci,
            {"data__patch_buckets": (8,)},
            r"data\.patch_buckets=\(8,\): an image of up to data\.max_pixels"
            r"=7056 pixels takes up to 36 patch rows",
        ),
        (qponder_ci, {"data__patch_buckets": (62,)}, r"data\.patch_buckets=\(62,\): .* multiple of 4"),
        (qponder_ci, {"optim__warmup_steps": -1}, r"config field optim\.warmup_steps=-1: must not be negative"),
        (qponder, {"sampling_layout": "decode:0"}, r"config field sampling_layout='decode:0': .* is not one of"),
        (qponder, {"data__datasets": "synthetic:trian"}, r"dataset 'synthetic:trian': unknown split 'trian'"),
        (qponder, {"data__datasets": "koniq:train"}, r"unknown dataset 'koniq' \(did you mean 'koniq10k'\?\)"),
        (qponder, {"data__datasets": "koniq10k:train"}, r"'koniq10k:train' needs config field data\.data_dir"),
        (
            qponder,
            {"data__datasets": "koniq10k:train", "data__data_dir": "/nonexistent/tfds"},
            r"config field data\.data_dir='/nonexistent/tfds' is not a folder",
        ),
    ],  # fmt: skip
)
def test_bad_values_name_field_and_value(module, overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        validation.check_config(_config(module, **overrides), tmp_path / "w")
    assert not (tmp_path / "w").exists()  # nothing was made


def test_datasets_must_be_built_with_that_split(tmp_path):
    data_dir = tmp_path / "tfds"
    data_dir.mkdir()
    unbuilt = _config(qponder, data__datasets="kadid10k:train", data__data_dir=str(data_dir))
    with pytest.raises(ConfigError, match=r"'kadid10k:train' is not built in data\.data_dir=.*build kadid10k"):
        validation.check_config(unbuilt, tmp_path / "w")
    evaluation = _config(eval_config, "kadid", data__data_dir=str(data_dir))  # the protocol's datasets
    with pytest.raises(ConfigError, match=r"'kadid10k:test' is not built"):
        validation.check_config(evaluation, tmp_path / "w")
    write_kadid(tmp_path / "kadid")
    datasets.build("kadid10k", tmp_path / "kadid", data_dir)
    typo = _config(qponder, data__datasets="kadid10k:trian", data__data_dir=str(data_dir))
    with pytest.raises(ConfigError, match=r"kadid10k has no split 'trian' \(did you mean 'train'\?\)"):
        validation.check_config(typo, tmp_path / "w")
    validation.check_config(_config(qponder, data__datasets="kadid10k:train", data__data_dir=str(data_dir)), tmp_path)


def test_real_size_variant_names_its_own_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="model.model_path is empty") as error:
        validation.check_config(qponder_ci.get_config("3b"), tmp_path / "w")
    assert "Qwen2.5-VL-3B-Instruct" in str(error.value) and "7B" not in str(error.value)


def test_workdir_and_out_dir_must_be_writable(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ConfigError, match=r"--workdir=.*a_file/w': cannot create it, .*a_file is a file"):
        validation.check_config(qponder_ci.get_config("tiny"), tmp_path / "a_file" / "w")
    export = _config(export_config, out_dir=str(tmp_path / "a_file" / "hf"))
    with pytest.raises(ConfigError, match=r"config field out_dir=.*cannot create it"):
        validation.check_config(export, tmp_path / "w")
    if sys.platform == "linux":  # a virtual file system: no folder can be made there, even by root
        with pytest.raises(ConfigError, match=r"--workdir='/proc/qponder_w': cannot write there"):
            validation.check_config(qponder_ci.get_config("tiny"), Path("/proc/qponder_w"))
    if os.geteuid() != 0:  # permission bits do not stop root
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        with pytest.raises(ConfigError, match=r"--workdir=.*locked/w' cannot be created: .* is not writable"):
            validation.check_config(qponder_ci.get_config("tiny"), locked / "w")
    validation.check_config(qponder_ci.get_config("tiny"), tmp_path / "w")
    assert (tmp_path / "w").is_dir()  # the last check makes the workdir


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--config=configs/qponder_ci.py:tiny", "--config.mesh=(0,1,1)"], "config field mesh=(0, 1, 1): mesh shape"),
        (["--config=configs/qponder_ci.py:tiny", "--config.data.batch_size=0"], "data.batch_size=0: must be at least"),
        (["--config=configs/qponder_ci.py:tiny", "--config.job=sfft"], "job='sfft': unknown job (did you mean 'sft'?)"),
        (["--config=configs/nope.py:tiny"], "--config: cannot load the config file ([Errno 2] No such file"),
        (["--config=configs/qponder_ci.py:tinyy"], "--config=configs/qponder_ci.py:tinyy: unknown config variant"),
    ],
)
def test_cli_prints_one_line_and_builds_nothing(args, message, tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "qponder_jax.main", f"--workdir={tmp_path / 'w'}", *args],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, lines
    assert lines[0].startswith("qponder: error: ") and message in lines[0]
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(
    ("name", "variant"),
    [("qponder_ci", "tiny"), ("qponder", "tiny"), ("preresq", "tiny"), ("preresq", "vqa_tiny"), ("eval", "tiny"),
     ("eval", "vqa_tiny"), ("distill", "tiny"), ("export", "tiny"), ("demo", None), ("demo", "test"),
     ("demo", "smoke"), ("score", None)],
)  # fmt: skip
def test_the_configs_that_run_out_of_the_box_pass(name, variant, tmp_path):
    """Validation never refuses a shipped config's own defaults (e.g. the score job's 0 = "the model's own")."""
    import importlib

    config = importlib.import_module(f"configs.{name}").get_config(variant)
    validation.check_config(config, tmp_path / "w")
