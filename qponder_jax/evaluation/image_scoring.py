"""The one scoring path of the eval job and the Scorer: prompts grouped by bucket, scored in batches of a fixed size.

    scorer = BatchScorer(model, proc, ScoreSettings(mode="greedy"), mesh=mesh)
    for key, result in scorer.score_stream((key, scorer.image_prompt(image, str(key))) for key, image in items):
        ...  # result: ImageScore (score, parsed, in_range, level, response, ...)

Batch invariance: each prompt is padded to the buckets it needs alone (tokens, patch rows, vision slots) and every
batch has exactly `batch_size` rows (missing rows are empty padding), so a prompt is computed with the same shapes
whatever else is in its batch, and rows never mix: its greedy or level score does not depend on its neighbours.
Prompts are grouped by that bucket key in arrival order and a group is scored when it holds `batch_size` prompts
(the rest at the end), so prompts that share one bucket run in their order. `sample_mean` draws with one key per
batch (the seed folded with the batch number): reproducible for the same inputs, not across batch compositions.

Scores (`combine`): a completion's score is the number(s) of its answer (`scoring.parse_completions`). The image's
score is the mean over its completions that parsed within the prompt's scale; when every parsed completion is outside
that scale, their mean with `in_range` False (reported as written, never clipped, and left out of every metric); NaN
with `parsed` False when none parsed: a parse failure, never a made-up score.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import numpy as np

from qponder_jax import prompts
from qponder_jax.data.example import Example
from qponder_jax.data.processing import Processor
from qponder_jax.errors import ConfigError
from qponder_jax.evaluation import scoring
from qponder_jax.evaluation.descriptions import level_word, reasoning_of

MODES = ("greedy", "sample_mean", "level")


@dataclasses.dataclass(frozen=True)
class ScoreSettings:
    """How images are scored (the `score` section of configs/eval.py and configs/score.py)."""

    mode: str = "greedy"  # "greedy", "sample_mean" or "level"
    prompt: str = "qponder"  # prompt name in prompts.PROMPTS (decoding modes)
    prompt_text: str = ""  # a custom user prompt instead of `prompt`
    max_new_tokens: int = 256
    temperature: float = 1.0  # sample_mean only
    top_k: int = 0
    top_p: float = 1.0
    num_samples: int = 8  # sample_mean only
    num_ratings: int = 1  # numbers of the answer averaged into the score (5 for PreResQ-R1)
    pad_with_first: bool = False  # fewer numbers than num_ratings: pad with the first (PreResQ-R1)
    level_prompt: str = "How would you rate the quality of this image?"  # level mode's user prompt
    level_prefix: str = "The quality of the image is"  # level mode's assistant text before the level word
    level_token_policy: str = "first_token"  # multi-token level words: "first_token" or "single" (raise)
    batch_size: int = 8  # rows of every batch
    seed: int = 0
    score_range: tuple[float, float] = prompts.SCORE_RANGE  # the prompt's scale; parsed scores outside are flagged

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"config field score.mode={self.mode!r}: choose one of {MODES}")
        if self.mode == "sample_mean" and (self.temperature <= 0 or self.num_samples < 1):
            raise ConfigError("score.mode='sample_mean' needs score.temperature > 0 and score.num_samples >= 1")
        if self.batch_size < 1:
            raise ConfigError(f"config field data.batch_size={self.batch_size} must be >= 1")
        lo, hi = (float(x) for x in self.score_range)
        if not lo < hi:
            raise ConfigError(f"config field score.score_range={tuple(self.score_range)}: give (low, high), low < high")
        object.__setattr__(self, "score_range", (lo, hi))

    @property
    def user_text(self) -> str:
        """The user prompt of the decoding modes."""
        return self.prompt_text or prompts.prompt_text(self.prompt)


@dataclasses.dataclass(frozen=True)
class ImageScore:
    """One image's result."""

    score: float  # NaN when no completion parsed
    parsed: bool  # a completion's answer held a number (always True in level mode)
    in_range: bool  # the score lies within the prompt's scale (see the module docstring)
    level: str  # the reasoning's level word ("" when none); level mode: the most likely level
    response: str = ""  # the (first) completion; "" in level mode
    format_ok: bool | None = None  # <think>..</think><answer>..</answer> with a number; None in level mode
    answer_count: int = 0  # numbers in the answer of the (first) completion
    samples: tuple[scoring.Completion, ...] = ()  # every completion (sample_mean: num_samples of them)
    level_probs: tuple[float, ...] | None = None  # level mode: softmax over bad .. excellent

    @property
    def reasoning(self) -> str:
        """The first `<think>` block of the response (the whole response when it has none), stripped."""
        return reasoning_of(self.response).strip()


def combine(samples: Sequence[scoring.Completion]) -> ImageScore:
    """One image's result from its completions (see the module docstring)."""
    scores = np.asarray([c.score for c in samples], np.float64)
    parsed = np.isfinite(scores)
    in_range = parsed & np.asarray([c.in_range for c in samples], bool)
    use = in_range if in_range.any() else parsed
    first = samples[0]
    return ImageScore(
        score=float(np.mean(scores[use])) if use.any() else float("nan"),
        parsed=bool(parsed.any()),
        in_range=bool(in_range.any()),
        level=level_word(first.level),
        response=first.text,
        format_ok=first.format_ok,
        answer_count=first.count,
        samples=tuple(samples),
    )


class BatchScorer:
    """Scores encoded prompts with one model and processor (see the module docstring)."""

    def __init__(
        self,
        model,
        proc: Processor,
        settings: ScoreSettings,
        *,
        mesh: jax.sharding.Mesh,
        generate_fn: scoring.GenerateFn | None = None,
        seed_offset: int = 0,
    ):
        from qponder_jax import sampling

        self.model, self.proc, self.settings, self.mesh = model, proc, settings, mesh
        self.generate_fn = generate_fn or sampling.generate
        self.level_ids = self.level_info = None
        self.prefix_ids: list[int] = []
        if settings.mode == "level":
            self.level_ids, self.level_info = scoring.level_token_ids(
                proc.tokenizer, settings.level_prefix, policy=settings.level_token_policy
            )
            self.prefix_ids = proc.tokenizer.encode(settings.level_prefix, add_special_tokens=False)
        self.key = jax.random.fold_in(jax.random.key(settings.seed), seed_offset)
        self.batches = 0  # batches scored so far (sample_mean's key of the next one)

    @property
    def user_text(self) -> str:
        return self.settings.level_prompt if self.settings.mode == "level" else self.settings.user_text

    def finish(self, ex: Example) -> Example:
        """A generation prompt made ready to score: level mode appends the answer prefix (the level word comes next)."""
        return scoring.append_tokens(ex, self.prefix_ids) if self.prefix_ids else ex

    def image_prompt(self, image, example_id: str = "") -> Example:
        """The scoring prompt of one PIL image."""
        messages = prompts.image_messages(self.user_text)
        ex = self.proc.encode(messages, [image], add_generation_prompt=True, example_id=example_id)
        return self.finish(ex)

    def bucket_key(self, ex: Example) -> tuple[int, int, int]:
        """(tokens, patch rows, vision slots): the buckets `ex` needs alone."""
        b, n = self.proc.buckets, len(ex)
        if self.proc.truncation:
            n = min(n, max(b.tokens))
        try:
            return b.pick("tokens", n), b.pick("patches", ex.num_patches), b.pick("images", len(ex.vision_grid_thw))
        except ValueError as e:
            raise ValueError(f"{ex.example_id or 'a prompt'}: {e}") from None

    def score_batch(self, examples: Sequence[Example]) -> list[ImageScore]:
        """Scores up to `batch_size` prompts as one left-padded batch of `batch_size` rows."""
        s = self.settings
        batch = self.proc.collate(examples, padding_side="left", batch_size=s.batch_size)
        rng = jax.random.fold_in(self.key, self.batches)
        self.batches += 1
        if s.mode == "level":
            logits = scoring.answer_logits(self.model, batch, self.level_ids, self.mesh)[: len(examples)]
            scores, probs = scoring.level_score(logits)
            lo, hi = s.score_range
            return [
                ImageScore(float(x), True, bool(lo <= x <= hi), prompts.LEVELS[int(np.argmax(p))], level_probs=tuple(p))
                for x, p in zip(scores, probs.tolist())
            ]
        sampled = s.mode == "sample_mean"
        completions = scoring.generate_completions(
            self.generate_fn,
            self.model,
            self.proc,
            batch,
            num_prompts=len(examples),
            max_new_tokens=s.max_new_tokens,
            temperature=s.temperature if sampled else 0.0,
            top_k=s.top_k,
            top_p=s.top_p,
            num_samples=s.num_samples if sampled else 1,
            rng=rng if sampled else None,
            num_ratings=s.num_ratings,
            pad_with_first=s.pad_with_first,
            score_range=s.score_range,
        )
        return [combine(samples) for samples in completions]

    def score_stream(self, items: Iterable[tuple[Any, Example]]) -> Iterator[tuple[Any, ImageScore]]:
        """(key, result) for each (key, prompt), batch by batch as groups fill (see the module docstring)."""
        pending: dict[tuple[int, int, int], list[tuple[Any, Example]]] = {}
        for key, ex in items:
            bucket = self.bucket_key(ex)
            group = pending.setdefault(bucket, [])
            group.append((key, ex))
            if len(group) == self.settings.batch_size:
                del pending[bucket]
                yield from self._run(group)
        for group in pending.values():
            yield from self._run(group)

    def _run(self, group: list[tuple[Any, Example]]) -> Iterator[tuple[Any, ImageScore]]:
        results = self.score_batch([ex for _, ex in group])
        yield from ((key, result) for (key, _), result in zip(group, results, strict=True))
