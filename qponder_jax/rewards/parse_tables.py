"""Host-side tables for the on-device answer parser (the algorithm is described in parse.py).

Everything here is numpy, built once per tokenizer:
- character classes: every Unicode code point maps to one of `NUM_CLASSES` classes that keep exactly what the
  reference regexes can tell apart under Python `re` semantics (Unicode `\\s`, `\\d`, `\\w`, and `re.I` folding:
  "İ" and "ı" both match "i");
- four small character automata as [states, classes] transition tables plus per-transition event codes:
  `format` (the full-match format regex, by subset construction), `think` (first think block and its level
  words), `answer` (answer blocks, as `re.findall` finds them) and `number` (the syntax of `-?\\d+(?:\\.\\d+)?`);
- the split of every token's bytes into a head (up to 3 leading UTF-8 continuation bytes that may finish a
  character begun by earlier tokens), a body (decoded on its own: its characters never depend on neighbours) and
  a tail (a trailing incomplete but still valid UTF-8 prefix), and each automaton composed over every body.
"""

from __future__ import annotations

import codecs
import functools
import re
import unicodedata
from collections.abc import Callable, Hashable

import numpy as np

LEVEL_WORDS = ("bad", "poor", "fair", "good", "excellent")  # level 1..5
THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE = "<think>", "</think>", "<answer>", "</answer>"

# Character classes. 0..9: a decimal digit (any Unicode Nd) of that value.
SPACE, OTHER, WORD = 10, 11, 12  # \s; anything else (U+FFFD too); a word character with no role below
PUNCT = "<>/-."
LEVEL_LETTERS = "".join(sorted(set("".join(LEVEL_WORDS))))
LOWER = "".join(sorted(set(THINK_OPEN + ANSWER_OPEN + LEVEL_LETTERS) - set(PUNCT)))  # exact lowercase letters
PUNCT_CLASS = {ch: 13 + i for i, ch in enumerate(PUNCT)}
LOWER_CLASS = {ch: 13 + len(PUNCT) + i for i, ch in enumerate(LOWER)}
FOLD_CLASS = {ch: 13 + len(PUNCT) + len(LOWER) + i for i, ch in enumerate(LEVEL_LETTERS)}  # other-case forms
NONE = 13 + len(PUNCT) + len(LOWER) + len(LEVEL_LETTERS)  # no character (padding): every automaton stays put
NUM_CLASSES = NONE + 1
MINUS, DOT = PUNCT_CLASS["-"], PUNCT_CLASS["."]
_CLASS_CHAR = {c: ch for ch, c in {**PUNCT_CLASS, **LOWER_CLASS}.items()}  # exact character of a class
_CLASS_LEVEL_LETTER = {**{c: ch for ch, c in LOWER_CLASS.items() if ch in LEVEL_LETTERS},
                       **{c: ch for ch, c in FOLD_CLASS.items()}}  # fmt: skip

# Event bits written by the automata on each transition.
ANSWER_OPENED, ANSWER_CLOSED = 1, 2  # the '>' that completes an open or close tag
NUMBER_START, NUMBER_NEG, NUMBER_FRAC = 1, 2, 4  # a digit that starts a number (after '-'), or a fraction digit


_LETTER_CLASSES = frozenset(LOWER_CLASS.values()) | frozenset(FOLD_CLASS.values())


def is_word(c: int) -> bool:
    """Whether a class holds `\\w` characters (digits, letters, underscore, ...)."""
    return c < 10 or c == WORD or c in _LETTER_CLASSES


@functools.lru_cache(maxsize=1)
def codepoint_classes() -> np.ndarray:
    """[n] int8 class of every code point below n; all code points from n on are OTHER."""
    text = "".join(map(chr, range(0x110000)))
    to_array = lambda s: np.frombuffer(s.encode("utf-32-le", "surrogatepass"), np.uint32)
    table = np.full(0x110000, OTHER, np.int8)
    table[to_array(re.sub(r"\W", "\0", text)) != 0] = WORD
    table[[m.start() for m in re.finditer(r"\s", text)]] = SPACE
    for m in re.finditer(f"[{LEVEL_LETTERS}]", text, re.I):  # which level letter a character folds to
        table[m.start()] = FOLD_CLASS[next(x for x in LEVEL_LETTERS if re.fullmatch(x, m.group(), re.I))]
    for ch, c in {**LOWER_CLASS, **PUNCT_CLASS}.items():
        table[ord(ch)] = c
    for m in re.finditer(r"\d", text):
        value = unicodedata.decimal(m.group())
        assert float(m.group()) == value, m.group()  # float() reads every \d character as its decimal value
        table[m.start()] = value
    return table[: int(np.nonzero(table != OTHER)[0][-1]) + 1]


def classify(text: str) -> np.ndarray:
    """[len(text)] int8 classes of a string's characters."""
    table = codepoint_classes()
    cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32).astype(np.int64)
    return np.where(cps < len(table), table[np.minimum(cps, len(table) - 1)], OTHER).astype(np.int8)


# ----------------------------------------------------------------------------------------------- automata
class Automaton:
    """A deterministic automaton over character classes: `trans` [S, C], `events` [S, C] int8, start state 0."""

    def __init__(self, start: Hashable, step: Callable[[Hashable, int], tuple[Hashable, int]]):
        self.states, index = [start], {start: 0}
        trans, events = [], []
        while len(trans) < len(self.states):  # breadth-first over reachable states
            state, row, ev = self.states[len(trans)], [], []
            for c in range(NUM_CLASSES):
                nxt, e = (state, 0) if c == NONE else step(state, c)
                if nxt not in index:
                    index[nxt] = len(self.states)
                    self.states.append(nxt)
                row.append(index[nxt])
                ev.append(e)
            trans.append(row)
            events.append(ev)
        self.trans = np.asarray(trans, np.int32)  # [S, C]
        self.events = np.asarray(events, np.int8)  # [S, C]
        assert len(self.states) < 256, len(self.states)
        # one U+FFFD or several: the same state, so invalid byte runs need one OTHER however long they are
        assert (self.trans[self.trans[:, OTHER], OTHER] == self.trans[:, OTHER]).all()

    def flags(self, predicate: Callable[[Hashable], bool]) -> np.ndarray:
        return np.asarray([predicate(s) for s in self.states], bool)


def _kmp_step(pattern: str, k: int, ch: str | None) -> int:
    """Characters of `pattern` matched after reading `ch` with `k` matched before (pattern has no self-overlap
    except its leading '<', so the fallback is: restart, then try `ch` as a first character)."""
    assert pattern[0] not in pattern[1:], pattern
    if ch is not None and k < len(pattern) and pattern[k] == ch:
        return k + 1
    return 1 if ch == pattern[0] else 0


def format_automaton() -> Automaton:
    """Full match of `\\s*<think>.*?</think>\\s*<answer>.*?</answer>\\s*` (re.S): subset construction."""
    lit = lambda s: [("lit", ch) for ch in s]
    atoms = [("space", None), *lit(THINK_OPEN), ("any", None), *lit(THINK_CLOSE), ("space", None)]
    atoms += [*lit(ANSWER_OPEN), ("any", None), *lit(ANSWER_CLOSE), ("space", None)]

    def closure(positions):
        out, todo = set(positions), list(positions)
        while todo:  # a star may match nothing
            i = todo.pop()
            if i < len(atoms) and atoms[i][0] != "lit" and i + 1 not in out:
                out.add(i + 1)
                todo.append(i + 1)
        return frozenset(out)

    def step(positions, c):
        nxt = set()
        for i in positions:
            kind, ch = atoms[i] if i < len(atoms) else (None, None)
            if kind == "lit" and _CLASS_CHAR.get(c) == ch:
                nxt.add(i + 1)
            elif kind == "any" or kind == "space" and c == SPACE:
                nxt.add(i)
        return closure(nxt), 0

    auto = Automaton(closure({0}), step)
    auto.accept = auto.flags(lambda positions: len(atoms) in positions)
    return auto


def _level_step(word: str, c: int) -> tuple[str, int]:
    """Level words as whole `\\w+` runs: "" = after a non-word character, "#" = inside a non-level word."""
    if not is_word(c):
        return "", LEVEL_WORDS.index(word) + 1 if word in LEVEL_WORDS else 0
    grown = word + _CLASS_LEVEL_LETTER.get(c, "#")
    return (grown if any(w.startswith(grown) for w in LEVEL_WORDS) else "#"), 0


def think_automaton() -> Automaton:
    """The first `<think>(.*?)</think>` block; events = level word (1..5) ended by a non-word char inside it."""

    def step(state, c):
        phase, k, word = state
        if phase == "after":
            return state, 0
        ch = _CLASS_CHAR.get(c)
        if phase == "before":
            k = _kmp_step(THINK_OPEN, k, ch)
            return (("in", 0, "") if k == len(THINK_OPEN) else ("before", k, "")), 0
        word, event = _level_step(word, c)
        k = _kmp_step(THINK_CLOSE, k, ch)
        return (("after", 0, "") if k == len(THINK_CLOSE) else ("in", k, word)), event

    auto = Automaton(("before", 0, ""), step)
    auto.closed = auto.flags(lambda s: s[0] == "after")
    return auto


def answer_automaton() -> Automaton:
    """`<answer>(.*?)</answer>` blocks as re.findall finds them; events = ANSWER_* bits."""

    def step(state, c):
        inside, k = state
        ch = _CLASS_CHAR.get(c)
        k = _kmp_step(ANSWER_CLOSE if inside else ANSWER_OPEN, k, ch)
        if inside and k == len(ANSWER_CLOSE):
            return (False, 0), ANSWER_CLOSED
        if not inside and k == len(ANSWER_OPEN):
            return (True, 0), ANSWER_OPENED
        return (inside, k), 0

    return Automaton((False, 0), step)


def number_automaton() -> Automaton:
    """The syntax of `-?\\d+(?:\\.\\d+)?` scanned left to right; events = NUMBER_* bits on digits."""

    def step(phase, c):
        if c < 10:
            event = {"none": NUMBER_START, "neg": NUMBER_START | NUMBER_NEG, "dot": NUMBER_FRAC}.get(phase, 0)
            event = NUMBER_FRAC if phase == "frac" else event
            return ("frac" if phase in ("dot", "frac") else "int"), event
        if c == MINUS:
            return "neg", 0
        return ("dot" if c == DOT and phase == "int" else "none"), 0

    return Automaton("none", step)


# ---------------------------------------------------------------------------------------------- token split
_UTF8_NEED = {**{b: 1 for b in range(0xC2, 0xE0)}, **{b: 2 for b in range(0xE0, 0xF0)},
              **{b: 3 for b in range(0xF0, 0xF5)}}  # fmt: skip
_UTF8_FIRST = {0xE0: (0xA0, 0xBF), 0xED: (0x80, 0x9F), 0xF0: (0x90, 0xBF), 0xF4: (0x80, 0x8F)}


def utf8_tables() -> np.ndarray:
    """[256, 4] int32 per lead byte: continuation bytes needed (0: not a lead), first-continuation range
    [lo, hi], and the code point bits the lead byte carries."""
    out = np.zeros((256, 4), np.int32)
    for b, need in _UTF8_NEED.items():
        lo, hi = _UTF8_FIRST.get(b, (0x80, 0xBF))
        out[b] = need, lo, hi, b & (0x3F >> need)
    return out


def split_token(data: bytes) -> tuple[bytes, str, bytes]:
    """(head, body text, tail): head = up to 3 leading continuation bytes, tail = trailing incomplete prefix."""
    h = 0
    while h < min(3, len(data)) and 0x80 <= data[h] < 0xC0:
        h += 1
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    body = decoder.decode(data[h:], final=False)
    return data[:h], body, decoder.getstate()[0]


def run_caps(trans: np.ndarray, events: np.ndarray, limit: int = 16) -> np.ndarray:
    """[C] for each class c the least r with c^n = c^r (same state, no further events) for every n >= r and
    every start state; no cap (a huge one) where there is none, as for digits, whose values matter."""
    caps = np.full(trans.shape[1], np.iinfo(np.int32).max, np.int64)
    for c in range(trans.shape[1]):
        state = np.arange(trans.shape[0])
        for r in range(1, limit + 1):
            state = trans[state, c]
            if (trans[state, c] == state).all() and (events[state, c] == 0).all():
                caps[c] = r
                break
    return caps


def squeeze_runs(classes: np.ndarray, owner: np.ndarray, caps: np.ndarray) -> np.ndarray:
    """Mask keeping at most caps[c] of each run of one class c within one token (`owner` [n] token of each
    character): the automata cannot tell the rest apart, so bodies shrink (Qwen's long tokens are runs of
    spaces, '=', '-', ...)."""
    new_run = np.ones(len(classes), bool)
    new_run[1:] = (classes[1:] != classes[:-1]) | (owner[1:] != owner[:-1])
    run_start = np.maximum.accumulate(np.where(new_run, np.arange(len(classes)), 0))
    return np.arange(len(classes)) - run_start < caps[classes]


def compose(trans: np.ndarray, body: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """[V, S] state after each token body ([V, W] classes, NONE-padded) from each start state."""
    order = np.argsort(-lengths, kind="stable")
    chars, active = body[order], np.sort(lengths)[::-1]
    state = np.tile(np.arange(trans.shape[0], dtype=trans.dtype), (len(order), 1))  # [V, S]
    for j in range(body.shape[1]):
        n = int(np.searchsorted(-active, -j, side="left"))  # tokens with more than j characters
        state[:n] = trans[state[:n], chars[:n, j, None]]
    out = np.empty_like(state)
    out[order] = state
    return out.astype(np.uint8)
