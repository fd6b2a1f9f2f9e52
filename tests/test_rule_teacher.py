"""The rule-based teacher: responses consistent with the distortion and the MOS, written as cold-start JSONL."""

import re

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
