"""The rule-based teacher: responses consistent with the distortion and the MOS, written as cold-start JSONL."""

import re

import numpy as np
import pytest

from qponder_jax import prompts
from qponder_jax.data.datasets.cold_start import ColdStartSource
from qponder_jax.data.rule_teacher import SEVERITY, response_for, write_synthetic_cold_start

FORMAT = re.compile(r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", re.S)
LEVEL_WORDS = re.compile(r"\b(bad|poor|fair|good|excellent)\b", re.I)


def _parse(text: str) -> tuple[str, float]:
    """(last level word in the first <think> block, the number in the last <answer> block), as DESIGN.md says."""
    assert FORMAT.fullmatch(text), text
    think = re.search(r"<think>(.*?)</think>", text, re.S).group(1)
    answer = re.findall(r"<answer>(.*?)</answer>", text, re.S)[-1]
    return LEVEL_WORDS.findall(think)[-1].lower(), float(re.findall(r"-?\d+(?:\.\d+)?", answer)[0])


@pytest.mark.parametrize(
    "mos, word",
    [(1.0, "bad"), (1.79, "bad"), (1.8, "poor"), (2.6, "fair"), (3.39, "fair"), (3.4, "good"), (4.2, "excellent"),
     (5.0, "excellent")],
)  # fmt: skip
def test_level_word_follows_five_equal_bins(mos, word):
    level, score = _parse(response_for("blur", 3, mos))
    assert level == word
    assert score == pytest.approx(round(mos, 2))


def test_reasoning_names_distortion_and_severity_and_only_one_level_word():
    for level in range(1, 6):
        text = response_for("jpeg", level, 2.345)
        assert "jpeg" in text.lower() and SEVERITY[level - 1] in text and f"level {level} of 5" in text
        think = re.search(r"<think>(.*?)</think>", text, re.S).group(1)
        assert LEVEL_WORDS.findall(think) == ["poor"]
        assert text.endswith("<answer>2.35</answer>")  # two decimals
    clean = response_for("none", 0, 4.71)
    assert _parse(clean) == ("excellent", 4.71) and "no blur" in clean
    with pytest.raises(ValueError, match="unknown distortion type 'smudge'"):
        response_for("smudge", 2, 3.0)
    with pytest.raises(ValueError, match="level 7"):
        response_for("noise", 7, 3.0)


def test_written_jsonl_reads_back_and_is_reused(tmp_path):
    path = write_synthetic_cold_start(tmp_path, "train", 12, seed=3, min_side=28, max_side=40)
    source = ColdStartSource(path, verify="decode")
    assert len(source) == 12 and source.num_skipped == 0
    for i in range(len(source)):
        rec = source[i]
        assert rec["prompt"] == prompts.prompt_text("qponder")
        word, score = _parse(rec["response"])
        assert word == prompts.level_of_score(rec["mos"]) and score == pytest.approx(round(rec["mos"], 2))
        if rec["distortion_type"] != "none":
            assert rec["distortion_type"] in rec["response"]
        assert rec["image"][:8] == b"\x89PNG\r\n\x1a\n"
    assert source.records[0].image == "train/000000.png"  # stored relative to the JSONL's folder

    mtime = path.stat().st_mtime_ns
    assert write_synthetic_cold_start(tmp_path, "train", 12, seed=3, min_side=28, max_side=40) == path
    assert path.stat().st_mtime_ns == mtime  # same settings: reused, not rewritten
    write_synthetic_cold_start(tmp_path, "train", 5, seed=3, min_side=28, max_side=40)
    assert len(ColdStartSource(path)) == 5  # new settings: rewritten


def test_teacher_errors_default_is_exact_and_each_error_does_what_it_says():
    from qponder_jax.data.rule_teacher import Answer, TeacherErrors, answer

    assert answer("contrast", 3, 3.456, key=(0, 1)) == Answer(3.46, 3, "good")  # no errors: the MOS itself
    biased = TeacherErrors(bias={"contrast": 0.4, "none": -0.3}, scale=0.5, center=3.0)
    assert answer("contrast", 3, 2.0, errors=biased).score == pytest.approx(3.0 + 0.5 * (2.0 - 3.0) + 0.4)
    assert answer("brightness", 3, 2.0, errors=biased).score == pytest.approx(2.5)  # no bias for this type
    assert answer("none", 0, 5.0, errors=biased).score == pytest.approx(3.7)
    assert answer("contrast", 1, 4.9, errors=TeacherErrors(bias={"contrast": 0.4})).score == 5.0  # clipped to [1, 5]

    noisy = TeacherErrors(bias={"contrast": 0.3}, noise=0.2, seed=7)
    errors = np.array([answer("contrast", 2, 3.0, errors=noisy, key=(0, i)).score - 3.0 for i in range(2000)])
    assert errors.mean() == pytest.approx(0.3, abs=0.02)  # systematic: averaging keeps the bias
    assert errors.std() == pytest.approx(0.2, abs=0.02)  # plus per-image noise
    assert answer("contrast", 2, 3.0, errors=noisy, key=(0, 5)) == answer("contrast", 2, 3.0, errors=noisy, key=(0, 5))
    assert answer("contrast", 2, 3.0, errors=noisy, key=(2, 5)) != answer("contrast", 2, 3.0, errors=noisy, key=(0, 5))

    always = TeacherErrors(severity_error=1.0, level_error=1.0)
    for i in range(50):
        for level in range(1, 6):
            said = answer("blur", level, 2.345, errors=always, key=(0, i))
            assert abs(said.severity - level) == 1 and 1 <= said.severity <= 5
            assert abs(prompts.LEVELS.index(said.word) - prompts.LEVELS.index("poor")) == 1
            assert said.score == 2.35  # wrong words, same score
    assert answer("none", 0, 4.9, errors=always).severity == 0  # a pristine image has no severity to get wrong


def test_respond_writes_what_the_teacher_says_and_bad_settings_fail_clearly():
    from qponder_jax.data.rule_teacher import TeacherErrors, parse_bias, respond, short_response

    errors = TeacherErrors(bias={"contrast": 0.5}, severity_error=1.0, level_error=1.0)
    text, said = respond("contrast", 2, 3.0, errors=errors, style="short")
    assert text == short_response("contrast", said.severity, 3.5, said.word)
    assert _parse(text) == (said.word, 3.5) and said.word != "good" and SEVERITY[said.severity - 1] in text
    long_text, _ = respond("contrast", 2, 3.0, errors=errors, style="long")
    assert _parse(long_text) == (said.word, 3.5) and f"level {said.severity} of 5" in long_text

    assert parse_bias("contrast:+0.45, brightness:-0.25,") == {"contrast": 0.45, "brightness": -0.25}
    assert parse_bias("") == {}
    with pytest.raises(ValueError, match="'type:shift' items"):
        parse_bias("contrast+0.4")
    with pytest.raises(ValueError, match=r"unknown distortion types \['smudge'\]"):
        TeacherErrors(bias={"smudge": 0.1})
    with pytest.raises(ValueError, match="level_error=1.5 is not a probability"):
        TeacherErrors(level_error=1.5)
    with pytest.raises(ValueError, match="response style 'medium'"):
        respond("blur", 1, 3.0, style="medium")
