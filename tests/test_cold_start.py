"""Cold-start JSONL: round trip, line-level validation, and missing/corrupt images."""

import json
import logging

import numpy as np
import pytest
from PIL import Image

from qponder_jax.data.datasets import ColdStartRecord, ColdStartSource, ColdStartWriter, ImageError, write_cold_start
from qponder_jax.errors import DataError

RESPONSE = "<think>sharp, quality good</think><answer>4</answer>"


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
        f.write(json.dumps({"image": "imgs/missing.png", "prompt": "p", "response": RESPONSE, "mos": 3.0}) + "\n")
        f.write(json.dumps({"image": "imgs/bad.png", "prompt": "p", "response": RESPONSE, "mos": 3.0}) + "\n")
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
    good = json.dumps({"image": "a.png", "prompt": "p", "response": RESPONSE, "mos": 3.0})
    path = tmp_path / "cold.jsonl"
    path.write_text(f"{good}\n\n{line}\n{good}\n")
    with pytest.raises(ValueError, match=rf"cold\.jsonl:3: {message}"):
        ColdStartSource(path)


def _line(response, image="a.png"):
    return json.dumps({"image": image, "prompt": "p", "response": response, "mos": 3.0})


def test_non_utf8_line_names_file_and_line(tmp_path):
    _image(tmp_path / "a.png", 1)
    path = tmp_path / "cold.jsonl"
    latin1 = _line(RESPONSE).encode().replace(b"sharp", b"caf\xe9")  # Latin-1 bytes, not UTF-8
    path.write_bytes(_line(RESPONSE).encode() + b"\n" + latin1 + b"\n")
    with pytest.raises(DataError, match=r"cold\.jsonl:2: not UTF-8 text \(byte b'\\xe9' at column \d+\)"):
        ColdStartSource(path)


def test_malformed_line_reports_the_real_column(tmp_path):
    path = tmp_path / "cold.jsonl"
    line = _line(RESPONSE)[:-1]  # the closing brace is missing: the error is at the end of the line
    path.write_text(f"{line}\n")
    with pytest.raises(
        DataError, match=rf"cold\.jsonl:1: invalid JSON \(Expecting ',' delimiter at column {len(line) + 1}\)"
    ):
        ColdStartSource(path)


def test_responses_without_the_format_are_skipped_counted_or_strict(tmp_path, caplog):
    _image(tmp_path / "a.png", 1)
    bad = ["", "   \n", "It looks fine. 3.5", "<answer>3</answer><think>late</think>", "<think>no answer</think>"]
    path = tmp_path / "cold.jsonl"
    path.write_text("\n".join([_line(RESPONSE)] + [_line(r) for r in bad] + [_line(f"  {RESPONSE}\n")]) + "\n")
    with caplog.at_level(logging.WARNING):
        source = ColdStartSource(path)
    assert len(source) == 2 and source.num_skipped == len(bad)
    assert [s["path"] for s in source.skip_log.skipped] == [f"{path}:{i}" for i in range(2, 2 + len(bad))]
    reasons = [s["reason"] for s in source.skip_log.skipped]
    assert reasons[:2] == ["empty response", "response is only whitespace"]
    assert set(reasons[2:]) == {"response is not <think>...</think><answer>...</answer>"}
    assert f"skipped {len(bad)} of {len(bad) + 2} records" in caplog.text
    with pytest.raises(DataError, match=r"cold\.jsonl:2: empty response \(strict mode"):
        ColdStartSource(path, strict=True)
    path.write_text("\n".join(_line(r) for r in bad[2:]) + "\n")  # nothing left to train on
    with pytest.raises(DataError, match=r"every one of its 3 records was skipped \(first: .*cold\.jsonl:1: response"):
        ColdStartSource(path)


def test_response_pattern_is_the_rewards_format():
    from qponder_jax.data.datasets.cold_start import RESPONSE_PATTERN
    from qponder_jax.rewards.parse import FORMAT_PATTERN

    assert RESPONSE_PATTERN == FORMAT_PATTERN


def test_every_image_missing_is_one_clear_error(tmp_path):
    """A JSONL whose images are all missing (e.g. moved) stops at once, naming the file (was: '0 records cannot fill
    one global batch' after the model was built); qponder prints DataError as one line."""
    from qponder_jax import main as qmain

    path = tmp_path / "cold.jsonl"
    path.write_text("\n".join(_line(RESPONSE, image=f"moved/{i}.png") for i in range(3)) + "\n")
    with pytest.raises(DataError, match=r"cold\.jsonl: every one of its 3 records was skipped \(first: .*moved/0\.png"):
        ColdStartSource(path)
    assert DataError in qmain._user_errors()
