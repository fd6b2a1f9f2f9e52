"""Cold-start JSONL: round trip, line-level validation, and missing/corrupt images."""

import json
import logging

import numpy as np
import pytest
from PIL import Image

from qponder_jax.data.datasets import ColdStartRecord, ColdStartSource, ColdStartWriter, ImageError, write_cold_start


def _image(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((6, 5, 3), value, np.uint8)).save(path)
    return path


def _records(tmp_path):
    inside = _image(tmp_path / "out" / "imgs" / "a.png", 10)
    outside = _image(tmp_path / "elsewhere" / "b.png", 20)
    return [
        ColdStartRecord(str(inside), "Rate it.", "<think>sharp</think><answer>4.1</answer>", 4.25, "koniq10k"),
        ColdStartRecord(str(outside), "Rate it.", "<think>noisy</think><answer>2</answer>", 1.5, "kadid10k",
                        "white_noise", 3, teacher_score=2.0),
    ]  # fmt: skip


def test_round_trip_and_relative_paths(tmp_path):
    records = _records(tmp_path)
    path = tmp_path / "out" / "cold.jsonl"
    assert write_cold_start(path, records) == 2
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0]["image"] == "imgs/a.png"  # inside the JSONL's folder: relative
    assert lines[1]["image"] == str(tmp_path / "elsewhere" / "b.png")  # outside: absolute
    assert "teacher_score" not in lines[0] and lines[1]["teacher_score"] == 2.0
    source = ColdStartSource(path)
    assert len(source) == 2 and source.num_skipped == 0
    first, second = source[0], source[1]
    assert first["image"] == (tmp_path / "out" / "imgs" / "a.png").read_bytes()
    assert (first["prompt"], first["mos"], first["dataset"], first["distortion_level"]) == (
        "Rate it.",
        4.25,
        "koniq10k",
        -1,
    )
    assert np.isnan(first["teacher_score"])
    assert (second["distortion_type"], second["distortion_level"], second["teacher_score"]) == ("white_noise", 3, 2.0)
    assert second["response"] == records[1].response
    with ColdStartWriter(path, append=True) as writer:
        writer.write(records[0])
    assert len(ColdStartSource(path)) == 3


def test_missing_and_corrupt_images_skipped_or_strict(tmp_path, caplog):
    path = tmp_path / "out" / "cold.jsonl"
    write_cold_start(path, _records(tmp_path))
    with open(path, "a") as f:
        f.write(json.dumps({"image": "imgs/missing.png", "prompt": "p", "response": "r", "mos": 3.0}) + "\n")
        f.write(json.dumps({"image": "imgs/bad.png", "prompt": "p", "response": "r", "mos": 3.0}) + "\n")
    (tmp_path / "out" / "imgs" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with caplog.at_level(logging.WARNING):
        source = ColdStartSource(path)
    assert len(source) == 2 and source.num_skipped == 2
    reasons = {s["path"].rsplit("/", 1)[-1]: s["reason"] for s in source.skip_log.skipped}
    assert reasons["missing.png"].startswith("missing image file") and "cold.jsonl:3" in reasons["missing.png"]
    assert reasons["bad.png"].startswith("corrupt image")
    assert "missing.png" in caplog.text and "bad.png" in caplog.text
    with pytest.raises(ImageError, match="missing.png"):
        ColdStartSource(path, strict=True)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"image": "a.png", "prompt": "p", "response": "r", "mos": 3.0', "invalid JSON"),
        ('{"image": "a.png", "prompt": "p", "mos": 3.0}', "missing field 'response'"),
        ('{"image": "a.png", "prompt": "p", "response": "r", "mos": "3.0"}', "field 'mos' must be a number"),
        ('{"image": "a.png", "prompt": "p", "response": "r", "mos": NaN}', "mos nan is NaN or outside"),
        ('{"image": "a.png", "prompt": "p", "response": "r", "mos": 7}', r"mos 7.0 is NaN or outside \[1.0, 5.0\]"),
        (
            '{"image": "a.png", "prompt": "p", "response": "r", "mos": 3, "distortion_level": "2"}',
            "field 'distortion_level' must be an integer",
        ),
        ('["a.png", "p", "r", 3]', "expected a JSON object"),
    ],
)
def test_bad_line_names_file_and_line(tmp_path, line, message):
    _image(tmp_path / "a.png", 1)
    good = json.dumps({"image": "a.png", "prompt": "p", "response": "r", "mos": 3.0})
    path = tmp_path / "cold.jsonl"
    path.write_text(f"{good}\n\n{line}\n{good}\n")
    with pytest.raises(ValueError, match=rf"cold\.jsonl:3: {message}"):
        ColdStartSource(path)
