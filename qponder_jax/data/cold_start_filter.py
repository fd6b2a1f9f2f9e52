"""The acceptance filter for teacher outputs: which distilled responses become cold-start records.

Q-Ponder keeps a teacher's reasoning only where its score lands near the MOS. One response is accepted when it parses
(`rewards.parse.parse_text`): the think/answer format is valid, the answer holds exactly `num_ratings` numbers (their
mean is the score), the reasoning names a level word (when `require_level`), the score lies in [1, 5] and
|score - MOS| <= `tolerance`. Otherwise it is rejected for the first check it fails, one of `REASONS`. The `distill`
job (a real teacher model) and the demo (the rule-based teacher) both decide with `judge`.
"""

from __future__ import annotations

from qponder_jax.evaluation.scoring import completion_score
from qponder_jax.rewards.parse import parse_text

REASONS = ("format", "answer_count", "no_level", "out_of_range", "tolerance")  # in the order they are checked


def judge(text: str, mos: float, *, tolerance: float, num_ratings: int = 1, require_level: bool = True):
    """("ok" or the first failed check of `REASONS`, the parsed score or NaN) for one teacher response."""
    parsed = parse_text(text, max_numbers=max(num_ratings, 1))
    score = completion_score(parsed.numbers, parsed.count, num_ratings, pad_with_first=False)
    if not parsed.format_ok:
        return "format", score
    if parsed.count != num_ratings:
        return "answer_count", score
    if require_level and parsed.level == 0:
        return "no_level", score
    if not 1.0 <= score <= 5.0:
        return "out_of_range", score
    if abs(score - mos) > tolerance:
        return "tolerance", score
    return "ok", score
