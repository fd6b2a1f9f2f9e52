"""`python -m qponder_jax.data.datasets`: build a dataset from its official layout and report its splits."""

import pytest
from dataset_fixtures import write_kadid, write_koniq

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


def _records(data_dir):
    from qponder_jax.data import datasets

    source = datasets.load("kadid10k", "all", data_dir=data_dir)
    return {r["image_name"]: r["mos_raw"] for r in (source[i] for i in range(len(source)))}


def test_changed_release_is_never_silently_reused(tmp_path, capsys):
    """Edit a score in dmos.csv and delete an image: building again stops and says what changed; --rebuild builds
    the new release; info reports the source and whether a release still matches."""
    manual, data_dir = tmp_path / "kadid", tmp_path / "tfds"
    write_kadid(manual)
    build = ["build", "kadid10k", f"--manual_dir={manual}", f"--data_dir={data_dir}"]
    assert main(build) == 0
    assert "skipped: 0 of 20 annotated files" in capsys.readouterr().out
    assert main(build) == 0  # the same release: the build is reused
    capsys.readouterr()

    dmos = manual / "dmos.csv"
    dmos.write_text(dmos.read_text().replace("I01_01_01.png,I01.png,1.3,", "I01_01_01.png,I01.png,2.9,"))
    (manual / "images" / "I02_11_03.png").unlink()
    assert main(build) == 1
    err = capsys.readouterr().err
    assert (
        "annotation file dmos.csv changed" in err and "20 found, 0 missing at the build, 19 found, 1 missing now" in err
    )
    assert "--rebuild" in err
    assert _records(data_dir)["images/I01_01_01.png"] == pytest.approx(1.3)  # the old build is left as it was
    assert main(["info", "kadid10k", f"--data_dir={data_dir}", f"--manual_dir={manual}"]) == 0
    assert "source changed since the build: annotation file dmos.csv changed" in capsys.readouterr().out

    assert main([*build, "--rebuild"]) == 0
    assert "skipped: 1 of 20 annotated files" in capsys.readouterr().out
    records = _records(data_dir)
    assert records["images/I01_01_01.png"] == pytest.approx(2.9) and "images/I02_11_03.png" not in records
    assert main(["info", "kadid10k", f"--data_dir={data_dir}", f"--manual_dir={manual}"]) == 0
    out = capsys.readouterr().out
    assert "source: unchanged since the build" in out and "annotation file: dmos.csv (sha256 " in out
    assert f"built from: {manual}" in out and "media files: 19 found, 1 missing" in out


def test_info_on_a_dataset_never_built_says_so(tmp_path, capsys):
    assert main(["info", "koniq10k", f"--data_dir={tmp_path / 'tfds'}"]) == 1
    err = capsys.readouterr().err
    assert "koniq10k: not built in" in err and "build koniq10k --manual_dir=" in err


def test_build_summary_lists_skipped_files_without_object_addresses(tmp_path, capsys):
    write_koniq(tmp_path / "koniq")
    (tmp_path / "koniq" / "1024x768" / "1001.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    (tmp_path / "koniq" / "1024x768" / "1004.jpg").unlink()
    assert main(["build", "koniq10k", f"--manual_dir={tmp_path / 'koniq'}", f"--data_dir={tmp_path / 'tfds'}"]) == 0
    out = capsys.readouterr().out
    assert "skipped: 2 of 6 annotated files" in out
    assert "1001.jpg: corrupt or unsupported image (UnidentifiedImageError: no known image format)" in out
    assert "1004.jpg: missing image file" in out and "BytesIO" not in out
