"""On-device parser of sampled completions: format, answer numbers and reasoning level, from token ids.

    parse = build_parser(tokenizer, max_numbers=5)  # host tables, built once
    res = parse(tokens, mask)  # jittable: tokens [N, T] int32, mask [N, T] bool

It gives exactly what these regexes give on `text = tokenizer.decode(tokens[mask], skip_special_tokens=True)`
(`parse_text` is that reference, for host-side use):
- `format_ok`: `re.fullmatch(FORMAT_PATTERN, text, re.S)` and `count > 0`;
- `numbers` [N, K]: the first K matches of `-?\\d+(?:\\.\\d+)?` in the last block of
  `re.findall(r"<answer>(.*?)</answer>", text, re.S)`, as float32 (NaN where absent); `count` [N]: how many
  numbers that block holds, NOT capped at K (so "more numbers than asked for" stays visible);
- `level` [N]: 1..5 for the last of bad/poor/fair/good/excellent (re.I, `\\b` both sides) in the first
  `<think>(.*?)</think>` block, 0 when none.
Python's Unicode semantics are kept: `\\s`, `\\d` and `\\w` are Unicode classes ("égood" has no word boundary
before "good", "٣" is the digit 3), "İ"/"ı" match "i" under re.I, invalid UTF-8 decodes to U+FFFD.

How (the tables live in parse_tables.py):
1. Host, once. Each token's bytes (byte-level BPE alphabet inverted; special tokens and ids outside the
   tokenizer are empty) split into head (up to 3 leading UTF-8 continuation bytes), body (decoded alone: its
   characters never depend on the neighbours) and tail (a trailing incomplete UTF-8 prefix). Four character
   automata, 110 states in all (format 47, think/level 41, answer 17, number 5), run over character classes;
   each is composed over every body, giving `body_trans` [vocab + 1, 110] uint8 (17 MB for a 152k vocabulary),
   plus the body characters [vocab + 1, W] int8. Runs of one class that no automaton can tell apart from a
   shorter run (spaces, '=', '-': Qwen's longest tokens) are cut short, which keeps W small.
2. Pass 1, `lax.scan` over the T tokens (vectorized over N): the pending UTF-8 character meets the next head
   (at most two character events: the finished character or U+FFFD, then stray bytes), all automata step
   over those events with one gather, then over the whole body with one more, and the tail becomes the new
   pending character. It records each token's start states; the end states give the format verdict.
3. Pass 2, parallel over all N x T tokens: a scan over the (2 + longest body) characters of every token from
   its start state yields per-character events: digits that start a number, fraction digits, minus signs,
   answer blocks opened and closed, level words ended inside the think block.
4. Reductions and running counts pick the last closed answer block and its first K numbers; each value is
   sign * M * 10^e with M the integer of the number's first 9 significant digits (int32, exact): one rounding
   for up to 7 significant digits and |e| <= 10, otherwise within 2 float32 ulps of float32(float(match))
   (values below the float32 normal range may flush to zero).
"""

from __future__ import annotations

import re
from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from qponder_jax.rewards import parse_tables as pt

FORMAT_PATTERN = r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*"
ANSWER_PATTERN = r"<answer>(.*?)</answer>"
THINK_PATTERN = r"<think>(.*?)</think>"
NUMBER_PATTERN = r"-?\d+(?:\.\d+)?"
LEVEL_PATTERN = r"\b(" + "|".join(pt.LEVEL_WORDS) + r")\b"
_SIG_DIGITS = 9  # significant digits kept exactly (int32)
_POW10 = np.asarray([float(f"1e{i}") for i in range(39)] + [np.inf]).astype(np.float32)  # 10^0 .. 10^38, inf


class ParseResult(NamedTuple):
    format_ok: jax.Array  # [N] bool
    numbers: jax.Array  # [N, K] float32, NaN where absent
    count: jax.Array  # [N] int32 numbers in the last answer block (not capped at K)
    level: jax.Array  # [N] int32 1..5 = bad..excellent, 0 = none

    @property
    def parsed(self) -> jax.Array:
        """[N] bool: the last answer block holds at least one number."""
        return self.count > 0

    @property
    def score(self) -> jax.Array:
        """[N] the first number of the answer, NaN when none."""
        return self.numbers[:, 0]


class TextParse(NamedTuple):
    format_ok: bool
    numbers: list[float]  # the first max_numbers numbers
    count: int
    level: int


def parse_text(text: str, max_numbers: int = 5) -> TextParse:
    """The reference semantics on decoded text (host side)."""
    blocks = re.findall(ANSWER_PATTERN, text, re.S)
    found = re.findall(NUMBER_PATTERN, blocks[-1]) if blocks else []
    think = re.search(THINK_PATTERN, text, re.S)
    words = re.findall(LEVEL_PATTERN, think.group(1), re.I) if think else []
    level = next(i + 1 for i, w in enumerate(pt.LEVEL_WORDS) if re.fullmatch(w, words[-1], re.I)) if words else 0
    format_ok = bool(re.fullmatch(FORMAT_PATTERN, text, re.S)) and bool(found)
    return TextParse(format_ok, [float(x) for x in found[:max_numbers]], len(found), level)


def mean_score(res: ParseResult, n: int = 1, *, pad_with_first: bool = False) -> jax.Array:
    """[N] mean of the first n numbers; with fewer, the mean of those there are, or with `pad_with_first` the
    missing ones count as the first (PreResQ-R1). NaN when the answer holds no number."""
    if pad_with_first:
        return jnp.mean(ratings(res, n, pad_with_first=True), axis=-1)
    nums = ratings(res, n, pad_with_first=False)
    used = jnp.minimum(res.count, n)
    total = jnp.sum(jnp.where(jnp.isnan(nums), 0.0, nums), axis=-1)
    return jnp.where(used > 0, total / jnp.maximum(used, 1), jnp.nan)


def ratings(res: ParseResult, n: int, *, pad_with_first: bool = True) -> jax.Array:
    """[N, n] the first n numbers; missing ones are the first number (or NaN); all NaN when none parsed."""
    if n > res.numbers.shape[1]:
        raise ValueError(f"parse: asked for {n} numbers but the parser keeps max_numbers={res.numbers.shape[1]}")
    nums = res.numbers[:, :n]
    return jnp.where(jnp.arange(n) < res.count[:, None], nums, nums[:, :1] if pad_with_first else jnp.nan)


@flax.struct.dataclass
class Parser:
    """Device tables (a pytree: pass it into jitted functions as an argument, so XLA does not embed ~30 MB of
    constants). Row `empty_id` of the per-token tables is the empty token."""

    max_numbers: int = flax.struct.field(pytree_node=False)
    utf8_split: jax.Array  # [R, 9] uint8: head bytes (3), head length, more bytes after head, tail (3), tail length
    body: jax.Array  # [R, W] int8 character classes of each body, NONE-padded
    body_trans: jax.Array  # [R, S] uint8 state after the body, from each state (global state ids)
    char_trans: jax.Array  # [S, C] int32 state after one character class
    char_events: jax.Array  # [S, C] int8 event code of that transition
    starts: jax.Array  # [4] int32 start states: format, think, answer, number
    accept: jax.Array  # [S] bool: format automaton accepts
    closed: jax.Array  # [S] bool: the first think block is closed
    utf8: jax.Array  # [256, 4] int32 per lead byte: continuations needed, first range lo/hi, code point bits
    cp_class: jax.Array  # [n] int8 class of each code point below n (the rest: OTHER)

    @property
    def empty_id(self) -> int:
        return self.body.shape[0] - 1

    def __call__(self, tokens: jax.Array, mask: jax.Array) -> ParseResult:
        """Parses tokens [N, T] where mask [N, T] is True (rows are independent, any mask pattern)."""
        tokens, mask = jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, bool)
        n, t = tokens.shape
        ids = jnp.where(mask & (tokens >= 0) & (tokens < self.empty_id), tokens, self.empty_id)  # [N, T]
        final, heads, starts = self._scan_tokens(ids)  # [N, 4], [N, T, 2], [N, T, 3]
        chars = jnp.concatenate([heads, self.body[ids].astype(jnp.int32)], axis=-1)  # [N, T, W + 2]
        events = self._char_events(starts, chars)  # [N, T, W + 2, 3] think, answer, number
        numbers, count = _assemble_numbers(chars, events[..., 1], events[..., 2], self.max_numbers)
        level = _last_level(events[..., 0].reshape(n, -1), self.closed[final[:, 1]])
        return ParseResult(self.accept[final[:, 0]] & (count > 0), numbers, count, level)

    def _cp_class(self, cp: jax.Array) -> jax.Array:
        size = self.cp_class.shape[0]
        return jnp.where(cp < size, self.cp_class[jnp.minimum(cp, size - 1)].astype(jnp.int32), pt.OTHER)

    def _utf8_head(self, split, lead, have, cp):
        """Feeds a token's head bytes to the pending character: (first event, second event, new pending)."""
        need, lo, hi = self.utf8[lead, 0], self.utf8[lead, 1], self.utf8[lead, 2]  # [N]; need 0: none pending
        pending = need > 0
        ev1 = ev2 = jnp.full_like(lead, pt.NONE)
        for i in range(3):
            byte, present = split[:, i], i < split[:, 3]
            first = have == 0
            ok = pending & present & (byte >= jnp.where(first, lo, 0x80)) & (byte <= jnp.where(first, hi, 0xBF))
            cp, have = jnp.where(ok, cp * 64 + (byte & 0x3F), cp), jnp.where(ok, have + 1, have)
            done = ok & (have == need)
            ev1 = jnp.where(done, self._cp_class(cp), jnp.where(pending & present & ~ok, pt.OTHER, ev1))
            ev2 = jnp.where(present & ~ok, pt.OTHER, ev2)  # a byte the pending character did not take: U+FFFD
            pending = pending & ~done & (ok | ~present)
        has_more = split[:, 4] > 0
        ev1 = jnp.where(pending & has_more, pt.OTHER, ev1)  # cut short by a byte that is no continuation
        keep = pending & ~has_more  # the whole token was continuation bytes: still pending
        tail_len = split[:, 8]
        new_lead = jnp.where(tail_len > 0, split[:, 5], 0)
        bits = self.utf8[new_lead, 3]
        for i in (1, 2):
            bits = jnp.where(tail_len > i, bits * 64 + (split[:, 5 + i] & 0x3F), bits)
        lead = jnp.where(keep, lead, new_lead)
        return ev1, ev2, lead, jnp.where(keep, have, jnp.maximum(tail_len - 1, 0)), jnp.where(keep, cp, bits)

    def _scan_tokens(self, ids):
        """Pass 1. Returns final states [N, 4], head events [N, T, 2] and think/answer/number start states
        [N, T, 3] of every token (before its head events)."""
        n = ids.shape[0]
        zeros = jnp.zeros((n,), jnp.int32)

        def step(carry, v):  # v [N]
            states, lead, have, cp = carry  # states [N, 4] global ids
            ev1, ev2, lead, have, cp = self._utf8_head(self.utf8_split[v].astype(jnp.int32), lead, have, cp)
            before = states[:, 1:]
            states = self.char_trans[states, ev1[:, None]]
            states = self.char_trans[states, ev2[:, None]]
            states = self.body_trans[v[:, None], states].astype(jnp.int32)
            return (states, lead, have, cp), (jnp.stack([ev1, ev2], -1), before)

        init = (jnp.broadcast_to(self.starts, (n, 4)), zeros, zeros, zeros)
        (states, lead, _, _), (heads, starts) = lax.scan(step, init, ids.T)
        last = jnp.where(self.utf8[lead, 0] > 0, pt.OTHER, pt.NONE)  # an unfinished character at the end
        final = self.char_trans[states, last[:, None]]
        return final, jnp.swapaxes(heads, 0, 1), jnp.swapaxes(starts, 0, 1)

    def _char_events(self, starts, chars):
        """Pass 2: per-character event codes [N, T, W + 2, 3] from each token's start states."""

        def step(states, c):  # states [N, T, 3], c [N, T]
            return self.char_trans[states, c[..., None]], self.char_events[states, c[..., None]]

        _, events = lax.scan(step, starts, jnp.moveaxis(chars, -1, 0))  # [W + 2, N, T, 3]
        return jnp.moveaxis(events, 0, 2).astype(jnp.int32)


def _last_level(level_events: jax.Array, closed: jax.Array) -> jax.Array:
    """[N] the level of the last level word ended inside a closed first think block ([N, P] events)."""
    p = level_events.shape[1]
    last = jnp.max(jnp.where(level_events > 0, jnp.arange(p), -1), axis=1)  # [N]
    found = jnp.take_along_axis(level_events, jnp.maximum(last, 0)[:, None], axis=1)[:, 0]
    return jnp.where((last >= 0) & closed, found, 0).astype(jnp.int32)


def _cumsum(x: jax.Array) -> jax.Array:
    """Inclusive running count in text order of [N, T, W] flags: within tokens, then across them (cheaper
    than one scan over T * W)."""
    inner = jnp.cumsum(x, axis=2, dtype=jnp.int32)
    totals = inner[:, :, -1]
    return inner + (jnp.cumsum(totals, axis=1) - totals)[..., None]


def _assemble_numbers(chars, answer_ev, number_ev, k):
    """The first k numbers of the last closed answer block, from [N, T, W] classes and events -> [N, k], [N]."""
    n, t, w = chars.shape
    pos = jnp.arange(t * w, dtype=jnp.int32).reshape(t, w)  # text order
    flat = lambda x: x.reshape(n, t * w)
    last_close = jnp.max(jnp.where((answer_ev & pt.ANSWER_CLOSED) > 0, pos, -1), axis=(1, 2))[:, None, None]
    last_open = jnp.max(jnp.where(((answer_ev & pt.ANSWER_OPENED) > 0) & (pos < last_close), pos, -1), axis=(1, 2))
    target = (chars < 10) & (pos > last_open[:, None, None]) & (pos < last_close)  # digits of that block
    start = target & ((number_ev & pt.NUMBER_START) > 0)
    ordinal = _cumsum(start)  # 1-based number index within the block
    count = ordinal[:, -1, -1]
    slot = flat(jnp.where(target & (ordinal <= k), ordinal - 1, k))  # [N, P]; slot k collects everything else
    per_slot = lambda op, x: jax.vmap(lambda x, s: op(x, s, num_segments=k + 1))(x, slot)  # [N, P, ...] per row
    per_char = lambda table: jnp.take_along_axis(table, slot, axis=1).reshape(n, t, w)  # [N, k + 1] -> chars
    first_nonzero = per_slot(jax.ops.segment_min, flat(jnp.where(target & (chars > 0), pos, t * w)))  # [N, k + 1]
    seen = _cumsum(target)  # digits of the block so far
    seen_at_first = jnp.take_along_axis(flat(seen), jnp.minimum(first_nonzero, t * w - 1), axis=1)
    significant = target & (pos >= per_char(first_nonzero))  # from the number's first nonzero digit on
    sig_index = seen - per_char(seen_at_first)  # 0-based among the number's significant digits
    pow10 = jnp.asarray([10**i for i in range(_SIG_DIGITS + 1)], jnp.int32)
    kept = significant & (sig_index < _SIG_DIGITS)
    digit_value = jnp.where(kept, chars * pow10[jnp.clip(_SIG_DIGITS - 1 - sig_index, 0, _SIG_DIGITS)], 0)
    frac = target & ((number_ev & pt.NUMBER_FRAC) > 0)
    negative = start & ((number_ev & pt.NUMBER_NEG) > 0)
    fields = jnp.stack([digit_value, significant, frac, negative], -1).astype(jnp.int32)  # [N, T, W, 4]
    sums = per_slot(jax.ops.segment_sum, fields.reshape(n, t * w, 4))  # [N, k + 1, 4]
    mant9, n_sig, n_frac, neg = jnp.moveaxis(sums[:, :k], -1, 0)  # each [N, k]
    n_keep = jnp.minimum(n_sig, _SIG_DIGITS)
    mantissa = (mant9 // pow10[_SIG_DIGITS - n_keep]).astype(jnp.float32)
    exponent = n_sig - n_keep - n_frac
    p10 = jnp.asarray(_POW10)
    down = jnp.clip(-exponent, 0, 76)  # below 1e-76 every float32 is 0 anyway
    down1 = jnp.minimum(down, 38)
    magnitude = mantissa * p10[jnp.clip(exponent, 0, 39)] / p10[down1] / p10[down - down1]
    value = jnp.where(mant9 == 0, 0.0, magnitude)
    value = jnp.where(neg > 0, -value, value)
    return jnp.where(jnp.arange(k) < count[:, None], value, jnp.nan), count


# ------------------------------------------------------------------------------------------------ building
def _byte_alphabet() -> dict[str, int]:
    """GPT-2/Qwen2 byte-level alphabet: character -> byte."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    extra = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(extra)}


def token_bytes(tokenizer, num_ids: int | None = None) -> list[bytes]:
    """The bytes each id contributes to `decode(..., skip_special_tokens=True)`; special tokens and unknown
    ids contribute none. Supports tokenizers whose decoder is byte-level (GPT-2, Qwen2)."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor holding a tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = type(getattr(backend, "decoder", None)).__name__
    if decoder != "ByteLevel":
        raise ValueError(f"parse: the tokenizer's decoder is {decoder}; build_parser supports ByteLevel decoders")
    if getattr(tokenizer, "clean_up_tokenization_spaces", False) and (
        type(backend.model).__name__ != "BPE"
        or getattr(tokenizer, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False)
    ):
        raise ValueError("parse: decode() would clean up tokenization spaces; set clean_up_tokenization_spaces=False")
    size = backend.get_vocab_size(with_added_tokens=True)
    special = {i for i, tok in backend.get_added_tokens_decoder().items() if tok.special}
    alphabet = _byte_alphabet()
    out = []
    for i, tok in enumerate(tokenizer.convert_ids_to_tokens(list(range(size)))):
        if tok is None or i in special:
            out.append(b"")
        elif all(ch in alphabet for ch in tok):
            out.append(bytes(alphabet[ch] for ch in tok))
        else:  # the byte-level decoder keeps such (added) tokens as their UTF-8 text
            out.append(tok.encode())
    return out + [b""] * max(0, (num_ids or 0) - size)


def build_parser(tokenizer, max_numbers: int = 5, *, vocab_size: int | None = None, check: int = 256) -> Parser:
    """Tables for `tokenizer` (a transformers fast tokenizer with a byte-level decoder). `vocab_size` pads the
    tables to the model's embedding size (unknown ids decode to nothing). `check` random id sequences are
    decoded both ways to verify the byte tables against `tokenizer.decode`."""
    data = token_bytes(tokenizer, vocab_size)
    rows = len(data) + 1  # + the empty token
    split = np.zeros((rows, 9), np.uint8)
    bodies = []
    for i, b in enumerate(data):
        head, body, tail = pt.split_token(b)
        split[i, : len(head)], split[i, 3], split[i, 4] = list(head), len(head), len(b) > len(head)
        split[i, 5 : 5 + len(tail)], split[i, 8] = list(tail), len(tail)
        bodies.append(body)
    bodies.append("")
    autos = [pt.format_automaton(), pt.think_automaton(), pt.answer_automaton(), pt.number_automaton()]
    offsets = np.cumsum([0] + [len(a.states) for a in autos])
    char_trans = np.concatenate([a.trans + o for a, o in zip(autos, offsets)])
    char_events = np.concatenate([a.events for a in autos])
    classes = pt.classify("".join(bodies))  # every body character, token after token
    owner = np.repeat(np.arange(rows), [len(b) for b in bodies])
    keep = pt.squeeze_runs(classes, owner, pt.run_caps(char_trans, char_events))
    classes, owner = classes[keep], owner[keep]
    lengths = np.bincount(owner, minlength=rows)
    body = np.full((rows, max(1, int(lengths.max()))), pt.NONE, np.int8)
    body[owner, np.arange(len(owner)) - (np.cumsum(lengths) - lengths)[owner]] = classes
    body_trans = np.concatenate([pt.compose(a.trans, body, lengths) + o for a, o in zip(autos, offsets)], axis=1)
    flag = lambda name: np.concatenate([getattr(a, name, np.zeros(len(a.states), bool)) for a in autos])
    if check:
        _check_decode(tokenizer, data, check)
    return Parser(
        max_numbers=int(max_numbers),
        utf8_split=jnp.asarray(split),
        body=jnp.asarray(body),
        body_trans=jnp.asarray(body_trans.astype(np.uint8)),
        char_trans=jnp.asarray(char_trans, jnp.int32),
        char_events=jnp.asarray(char_events),
        starts=jnp.asarray(offsets[:4], jnp.int32),
        accept=jnp.asarray(flag("accept")),
        closed=jnp.asarray(flag("closed")),
        utf8=jnp.asarray(pt.utf8_tables()),
        cp_class=jnp.asarray(pt.codepoint_classes()),
    )


def _check_decode(tokenizer, data: list[bytes], trials: int, length: int = 24) -> None:
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    rng = np.random.default_rng(0)
    known = len(tokenizer)
    for _ in range(trials):
        ids = rng.integers(0, known, size=length).tolist()
        ours = b"".join(data[i] for i in ids).decode("utf-8", "replace")
        theirs = tokenizer.decode(ids, skip_special_tokens=True)
        if ours != theirs:
            raise ValueError(f"parse: token bytes disagree with tokenizer.decode for ids {ids}: {ours!r} != {theirs!r}")
