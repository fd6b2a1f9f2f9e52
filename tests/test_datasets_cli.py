"""`python -m qponder_jax.data.datasets`: build a dataset from its official layout and report its splits."""

import pytest
from dataset_fixtures import write_koniq

from qponder_jax.data.datasets.__main__ import main


def test_build_then_info(tmp_path, capsys):
    write_koniq(tmp_path / "koniq")
    assert main(["build", "koniq10k", f"--manual_dir={tmp_path / 'koniq'}", f"--data_dir={tmp_path / 'tfds'}"]) == 0
    out = capsys.readouterr().out
    assert "koniq10k train: 3 records" in out and "koniq10k test: 2 records" in out
    assert main(["info", "koniq10k", f"--data_dir={tmp_path / 'tfds'}"]) == 0
    assert "koniq10k validation: 1 records" in capsys.readouterr().out


def test_missing_release_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["build", "koniq10k", f"--data_dir={tmp_path}"])
    assert "needs --manual_dir" in capsys.readouterr().err
    assert main(["build", "koniq10k", f"--manual_dir={tmp_path / 'nope'}", f"--data_dir={tmp_path / 'tfds'}"]) == 1
    assert "error:" in capsys.readouterr().err
