"""The cold-start filter the distill job and the demo share: each rejection reason, in order, and the tolerance."""

import math

import pytest

from qponder_jax import distill
from qponder_jax.data.cold_start_filter import REASONS, judge


@pytest.mark.parametrize(
    "text, kw, reason, score",
    [
        ("<think>It looks fair.</think><answer>3.10</answer>", {}, "ok", 3.1),
        ("<think>It looks fair.</think><answer>3.50</answer>", {}, "ok", 3.5),  # |3.5 - 3.0| == tolerance: kept
        ("<think>It looks fair.</think><answer>3.51</answer>", {}, "tolerance", 3.51),
        ("It looks fair. 3.1", {}, "format", math.nan),
        ("<think>It looks fair.</think><answer>3.1 and 3.2</answer>", {}, "answer_count", 3.1),
        ("<think>It looks fair.</think><answer>3.1 and 3.2</answer>", {"num_ratings": 2}, "ok", 3.15),
        ("<think>Nothing to say.</think><answer>3.1</answer>", {}, "no_level", 3.1),
        ("<think>Nothing to say.</think><answer>3.1</answer>", {"require_level": False}, "ok", 3.1),
        ("<think>It looks excellent.</think><answer>7</answer>", {"tolerance": 9.0}, "out_of_range", 7.0),
    ],
)
def test_judge_names_the_first_failed_check(text, kw, reason, score):
    got, parsed = judge(text, 3.0, **{"tolerance": 0.5, **kw})
    assert got == reason and (got == "ok" or got in REASONS)
    assert parsed == pytest.approx(score, nan_ok=True)


def test_distill_filters_with_the_same_function():
    assert distill.judge is judge and distill.REASONS is REASONS
