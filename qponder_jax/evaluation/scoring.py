"""Scoring one batch of images: by decoding (greedy, or the mean over N samples) or by Q-Align level scoring.

- **Decoding.** `generate_fn` (by default `sampling.generate`; injectable, so tests can script the "model") returns
  completions; each is decoded (`skip_special_tokens=True`) and parsed with `rewards.parse.parse_text`, the reference
  semantics of the on-device parser. The score of a completion is the mean of the first `num_ratings` numbers of its
  last `<answer>` block (padded with the first one when `pad_with_first`, PreResQ-R1's rule); NaN when that block
  holds no number: a parse failure, never a default score. A completion is in range when every number its score
  uses lies within the prompt's scale (`score_range`); a score outside is kept as written, never clipped, and
  flagged. How completions become one image's score: `image_scoring.combine`.
- **Level scoring (Q-Align).** The prompt, the assistant header and an answer prefix (e.g. "The quality of the image
  is") run through the model once; at the last position, softmax over the logits of the five level tokens
  (bad, poor, fair, good, excellent) dotted with [1, 2, 3, 4, 5]. See `level_token_ids` for the tokens.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from qponder_jax import prompts
from qponder_jax.data.processing import Example, Processor
from qponder_jax.rewards.parse import parse_text
from qponder_jax.sampling import cached_split
from qponder_jax.train.sft import batch_shardings

LEVEL_WEIGHTS = np.arange(1, len(prompts.LEVELS) + 1, dtype=np.float32)  # bad=1 .. excellent=5

GenerateFn = Callable[..., object]  # sampling.generate's signature; returns .tokens [N, L] and .mask [N, L]


def level_token_ids(tokenizer, prefix: str = "", *, policy: str = "first_token") -> tuple[np.ndarray, dict]:
    """The token ids [5] (bad .. excellent) that score the answer position, and how each was chosen.

    After a prefix that ends in a letter ("... is") the next word comes with a leading space (" good"); at the start
    of the answer, or after whitespace, without; `info` lists the tokens of both forms. Each word in the form used
    should be one token (true for Qwen2's tokenizer and, after a prefix, for the demo tokenizer). When it is not:
    policy "first_token" uses its first token (documented in the report), "single" raises. Five first tokens that
    are not distinct always raise: they cannot tell the levels apart.
    """
    if policy not in ("first_token", "single"):
        raise ValueError(f"level token policy must be 'first_token' or 'single', got {policy!r}")
    space = " " if prefix and not prefix[-1].isspace() else ""
    ids, info = [], {}
    for word in prompts.LEVELS:
        form = space + word
        tokens = [int(t) for t in tokenizer.encode(form, add_special_tokens=False)]
        if not tokens:
            raise ValueError(f"the tokenizer encodes the level word {form!r} to no tokens")
        if len(tokens) > 1 and policy == "single":
            raise ValueError(
                f"level scoring: {form!r} is {len(tokens)} tokens {tokens} in this tokenizer, not one; use "
                "level_token_policy='first_token' to score its first token"
            )
        ids.append(tokens[0])
        other = [int(t) for t in tokenizer.encode(word if space else " " + word, add_special_tokens=False)]
        info[word] = {"form": form, "tokens": tokens, "single_token": len(tokens) == 1, "other_form_tokens": other}
    if len(set(ids)) < len(ids):
        raise ValueError(f"level scoring: the level words start with the same token ({info}); they cannot be scored")
    return np.asarray(ids, np.int32), info


def level_score(level_logits) -> tuple[np.ndarray, np.ndarray]:
    """(scores [...], probabilities [..., 5]) from the logits [..., 5] of bad .. excellent: softmax, dot 1..5."""
    logits = np.asarray(level_logits, np.float64)
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    # a row-wise sum, not `probs @ weights`: BLAS picks its kernel by the number of rows, and a score must not depend
    # on how many images share its batch (its last bit did)
    return (probs * LEVEL_WEIGHTS.astype(np.float64)).sum(axis=-1), probs


def append_tokens(ex: Example, token_ids: Sequence[int]) -> Example:
    """`ex` followed by text tokens `token_ids` (an assistant prefix); their M-RoPE positions continue the prompt's."""
    ids = np.asarray(token_ids, np.int32)
    if ids.size == 0:
        return ex
    start = int(ex.position_ids.max()) + 1
    new_positions = np.broadcast_to(start + np.arange(ids.size, dtype=np.int32), (3, ids.size))
    return dataclasses.replace(
        ex,
        input_ids=np.concatenate([ex.input_ids, ids]),
        loss_mask=np.concatenate([ex.loss_mask, np.zeros(ids.size, bool)]),
        position_ids=np.concatenate([ex.position_ids, new_positions], axis=1),
    )  # rope_delta = max position + 1 - T is unchanged: both grow by len(ids)


def to_host(x) -> np.ndarray:
    """A (possibly multi-host sharded) array as numpy on every host."""
    if isinstance(x, np.ndarray):
        return x
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _answer_logits(graphdef, state, batch, token_ids):
    model = nnx.merge(graphdef, state)
    b, t = batch.input_ids.shape
    logits, _ = model.prefill(batch, model.init_cache(b, t), last_only=True)  # [B, 1, V]
    return jnp.take(logits[:, 0], token_ids, axis=-1)  # [B, 5]


def answer_logits(model, batch, token_ids: np.ndarray, mesh: jax.sharding.Mesh) -> np.ndarray:
    """Logits [B, 5] of `token_ids` at the last position of a left-padded batch (no decoding)."""
    graphdef, state = cached_split(model)
    with jax.set_mesh(mesh):
        placed = jax.device_put(batch, batch_shardings(batch, mesh))
        return to_host(_answer_logits(graphdef, state, placed, jnp.asarray(token_ids)))


@dataclasses.dataclass(frozen=True)
class Completion:
    text: str
    score: float  # NaN when the answer holds no number
    format_ok: bool
    level: int  # 1..5 bad..excellent from the reasoning, 0 = none
    count: int  # numbers in the last answer block
    in_range: bool = True  # parsed, and every number the score uses lies within the score range


def completion_score(numbers: Sequence[float], count: int, num_ratings: int, pad_with_first: bool) -> float:
    """Mean of the first `num_ratings` numbers (missing ones count as the first with `pad_with_first`); NaN if none."""
    if count == 0 or not numbers:
        return float("nan")
    used = list(numbers[:num_ratings])
    if pad_with_first:
        used += [used[0]] * (num_ratings - len(used))
    return float(np.mean(used))


def parse_completions(
    proc: Processor,
    tokens: np.ndarray,
    mask: np.ndarray,
    *,
    num_ratings: int = 1,
    pad_with_first: bool = False,
    score_range: tuple[float, float] = prompts.SCORE_RANGE,
) -> list[Completion]:
    """Decodes and parses each row of tokens [N, L] under mask [N, L]."""
    lo, hi = score_range
    out = []
    for row, keep in zip(np.asarray(tokens), np.asarray(mask, bool)):
        text = proc.tokenizer.decode(row[keep].astype(np.int64).tolist(), skip_special_tokens=True)
        parsed = parse_text(text, max_numbers=max(num_ratings, 1))
        score = completion_score(parsed.numbers, parsed.count, num_ratings, pad_with_first)
        used = parsed.numbers[:num_ratings]
        in_range = bool(used) and all(lo <= x <= hi for x in used)
        out.append(Completion(text, score, parsed.format_ok, parsed.level, parsed.count, in_range))
    return out


def stop_ids(proc: Processor, model_config) -> tuple[int, ...]:
    """The end-of-turn token plus the model config's eos ids."""
    eos = model_config.text.eos_token_id
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    return tuple(sorted({proc.end_of_turn_id, *[int(e) for e in eos]}))


def generate_completions(
    generate_fn: GenerateFn,
    model,
    proc: Processor,
    batch,
    *,
    num_prompts: int,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    num_samples: int,
    rng,
    num_ratings: int = 1,
    pad_with_first: bool = False,
    score_range: tuple[float, float] = prompts.SCORE_RANGE,
) -> list[list[Completion]]:
    """`num_samples` parsed completions for each of the first `num_prompts` prompts of a left-padded batch."""
    out = generate_fn(
        model,
        batch,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        num_samples=num_samples,
        rng=rng,
        stop_ids=stop_ids(proc, model.config),
        pad_id=proc.pad_token_id,
    )
    tokens, mask = to_host(out.tokens), to_host(out.mask)  # [B * num_samples, L]
    rows = num_prompts * num_samples
    kw = dict(num_ratings=num_ratings, pad_with_first=pad_with_first, score_range=score_range)
    parsed = parse_completions(proc, tokens[:rows], mask[:rows], **kw)
    return [parsed[i * num_samples : (i + 1) * num_samples] for i in range(num_prompts)]
