"""The on-device parser against Python `re` on `tokenizer.decode(tokens[mask], skip_special_tokens=True)`."""

import time

import jax
import numpy as np
import pytest
import tokenizer_fixtures as tf
from jax.sharding import NamedSharding, PartitionSpec
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from qponder_jax.model.sharding import make_mesh
from qponder_jax.rewards.parse import _byte_alphabet, build_parser, mean_score, parse_text, ratings, token_bytes

K = 5
CHUNK = 2000
parse_jit = jax.jit(lambda parser, tokens, mask: parser(tokens, mask))


def _byte_ids(tok) -> np.ndarray:
    """[256] id of each single-byte token."""
    return np.asarray([tok.convert_tokens_to_ids(ch) for ch in _alphabet_chars()])


def _alphabet_chars() -> list[str]:
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    extra = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(extra)}
    return [table[b] for b in range(256)]


def _sequences(tok, seed: int, n: int) -> list[list[int]]:
    """Encoded completions, then mutated at the id level: random ids (special and added ones too), spans
    re-spelled as single bytes (UTF-8 characters split across tokens), stray bytes, or pure noise."""
    rng = np.random.default_rng(seed)
    byte_ids, vocab = _byte_ids(tok), len(tok)
    out = []
    for _ in range(n):
        text = tf.completion(rng)
        ids = tok.encode(text)
        r = rng.random()
        if r < 0.1:
            ids = rng.integers(0, vocab, size=rng.integers(0, 60)).tolist()
        elif r < 0.3:
            raw = text.encode()
            a, b = sorted(rng.integers(0, len(raw) + 1, size=2))
            ids = tok.encode(raw[:a].decode(errors="ignore")) + byte_ids[list(raw[a:b])].tolist()
            ids += tok.encode(raw[b:].decode(errors="ignore"))
        if rng.random() < 0.25:
            for _ in range(rng.integers(1, 4)):
                pos = rng.integers(0, len(ids) + 1)
                noise = byte_ids[rng.integers(0x80, 0x100)] if rng.random() < 0.5 else rng.integers(0, vocab)
                ids.insert(pos, int(noise))
        out.append(ids)
    return out


def _batch(seqs: list[list[int]], rng: np.random.Generator, vocab: int, length: int):
    """Padded [n, length] ids (padding = random ids, masked out) and masks with occasional holes."""
    ids = rng.integers(0, vocab + 50, size=(len(seqs), length)).astype(np.int32)  # some ids beyond the vocab
    mask = np.zeros(ids.shape, bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = True
        if rng.random() < 0.15:
            mask[i, rng.integers(0, length, size=3)] = False
    return ids, mask


def _reference(tok, ids, mask):
    ref = [parse_text(tok.decode(row[m].tolist(), skip_special_tokens=True), K) for row, m in zip(ids, mask)]
    numbers = np.full((len(ref), K), np.nan, np.float32)
    with np.errstate(over="ignore"):  # float32(float(m)) is inf beyond 3.4e38, as on the device
        for i, r in enumerate(ref):
            numbers[i, : len(r.numbers)] = r.numbers
    scalars = np.asarray([(r.format_ok, r.count, r.level) for r in ref])
    return scalars, numbers


def _ulps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float32 ulp distance of finite equal-signed values."""
    return np.abs(a.view(np.int32).astype(np.int64) - b.view(np.int32).astype(np.int64))


@pytest.mark.parametrize("name", ["many_merges", "few_merges"])
def test_parser_matches_re_on_generated_completions(name):
    tok = getattr(tf, name)()
    parser = build_parser(tok, max_numbers=K, vocab_size=len(tok) + 10)
    rng = np.random.default_rng(7)
    seqs = _sequences(tok, seed=11 if name == "many_merges" else 12, n=3 * CHUNK)
    length = max(map(len, seqs)) + 3
    total = mismatches = 0
    stats = np.zeros(4)
    for lo in range(0, len(seqs), CHUNK):
        ids, mask = _batch(seqs[lo : lo + CHUNK], rng, len(tok), length)
        res = jax.device_get(parse_jit(parser, ids, mask))
        scalars, numbers = _reference(tok, ids, mask)
        fmt, count, level = scalars.T
        same_numbers = np.all(
            np.isclose(res.numbers, numbers, rtol=1e-6, atol=0) | (np.isnan(res.numbers) & np.isnan(numbers)), axis=1
        )
        ok = (res.format_ok == fmt) & (res.count == count) & (res.level == level) & same_numbers
        mismatches += int((~ok).sum())
        total += len(ok)
        stats += [fmt.sum(), (level > 0).sum(), (count > K).sum(), np.isfinite(numbers).sum()]
        finite = np.isfinite(numbers) & np.isfinite(res.numbers) & (numbers != 0)
        assert _ulps(res.numbers[finite], numbers[finite]).max(initial=0) <= 2
    print(f"{name}: {total} completions, {mismatches} mismatches; format ok {stats[0]:.0f}, level {stats[1]:.0f}")
    assert total == 3 * CHUNK and mismatches == 0
    assert stats[0] > 0.2 * total and stats[1] > 0.15 * total and stats[2] > 0.02 * total  # the mix is real


HANDWRITTEN = [  # text, format_ok, numbers, count, level
    ("<think>The image is good.</think>\n<answer>3.75</answer>", True, [3.75], 1, 4),
    ("  <think>bad, then EXCELLENT</think><answer> 1 2 3 4 5 6 7 </answer>\n", True, [1, 2, 3, 4, 5], 7, 5),
    ("<think>faİr and égood and good_</think><answer>1.2.3 -4 ٣ 1. .5</answer>", True, [1.2, 3, -4, 3, 1], 6, 3),
    ("<think>poor</think><answer>no number</answer>", False, [], 0, 2),
    ("<think>poor<answer>2</answer>", False, [2], 1, 0),  # think never closed: no level, no format
    ("<think>a</think><answer>1</answer>x", False, [1], 1, 0),
    ("<answer>1</answer><answer>2</answer><answer>3", False, [2], 1, 0),  # last closed block
    ("<answer>1<answer>2</answer>9</answer>", False, [1, 2], 2, 0),  # nested open is content
    ("<think>good</thinkX fair</think><answer>--5 3-4</answer>", True, [-5, 3, -4], 3, 3),
]


def test_parse_text_reference_on_handwritten_cases():
    for text, fmt, numbers, count, level in HANDWRITTEN:
        ref = parse_text(text, K)
        assert (ref.format_ok, ref.count, ref.level) == (fmt, count, level), text
        np.testing.assert_allclose(ref.numbers, numbers, err_msg=text)


def test_parser_on_handwritten_cases_split_into_single_bytes():
    """Every UTF-8 character split over byte tokens, with masked, special and out-of-vocab ids in between."""
    tok = tf.few_merges()
    parser = build_parser(tok, max_numbers=K)
    byte_ids = _byte_ids(tok)
    special = tok.convert_tokens_to_ids("<|im_end|>")
    rows, masks = [], []
    for text, *_ in HANDWRITTEN:
        ids, mask = [], []
        for b in text.encode():
            ids += [int(byte_ids[b]), special, 10**6, int(byte_ids[0x41])]
            mask += [True, True, True, False]
        rows.append(ids)
        masks.append(mask)
    length = max(map(len, rows))
    ids = np.stack([np.pad(r, (0, length - len(r))) for r in rows]).astype(np.int32)
    mask = np.stack([np.pad(m, (0, length - len(m))) for m in masks])
    res = jax.device_get(parse_jit(parser, ids, mask))
    for i, (text, fmt, numbers, count, level) in enumerate(HANDWRITTEN):
        assert (res.format_ok[i], res.count[i], res.level[i]) == (fmt, count, level), text
        np.testing.assert_allclose(res.numbers[i, : len(numbers)], numbers, rtol=1e-6, err_msg=text)
        assert np.isnan(res.numbers[i, len(numbers) :]).all(), text


def test_long_runs_squeezed_exactly():
    """Tokens that are long runs of one character class (squeezed in the tables) between numbers and tags."""
    tok = tf.many_merges()
    parser = build_parser(tok, max_numbers=K)
    rng = np.random.default_rng(5)
    pieces = tf.RUNS + ["<think>", "</think>", "<answer>", "</answer>", "good", "7", "3.5", "-", ".", " ", "x"]
    mix = lambda: "".join(rng.choice(pieces, rng.integers(0, 12)))
    seqs = [tok.encode(f"<think>{mix()}</think><answer>{mix()}</answer>" if i % 2 else mix()) for i in range(400)]
    ids, mask = _batch(seqs, rng, len(tok), max(map(len, seqs)))
    res = jax.device_get(parse_jit(parser, ids, mask))
    scalars, numbers = _reference(tok, ids, mask)
    np.testing.assert_array_equal(np.stack([res.format_ok, res.count, res.level], 1), scalars)
    np.testing.assert_allclose(res.numbers, numbers, rtol=1e-6)
    assert (scalars[:, 1] > 0).mean() > 0.15 and scalars[:, 0].sum() > 20 and (scalars[:, 2] > 0).sum() > 20


def test_scores_and_ratings():
    tok = tf.few_merges()
    parser = build_parser(tok, max_numbers=K)
    texts = ["<answer>2 4</answer>", "<answer>x</answer>", "<answer>1 2 3 4 5 6</answer>"]
    enc = [tok.encode(t) for t in texts]
    ids = np.zeros((3, max(map(len, enc))), np.int32)
    mask = np.zeros(ids.shape, bool)
    for i, e in enumerate(enc):
        ids[i, : len(e)], mask[i, : len(e)] = e, True
    res = parse_jit(parser, ids, mask)
    np.testing.assert_array_equal(res.parsed, [True, False, True])
    np.testing.assert_allclose(res.score, [2, np.nan, 1])
    np.testing.assert_allclose(mean_score(res, 5), [3, np.nan, 3])
    np.testing.assert_allclose(mean_score(res, 5, pad_with_first=True), [(2 + 4 + 2 * 3) / 5, np.nan, 3])
    np.testing.assert_allclose(ratings(res, 3, pad_with_first=False), [[2, 4, np.nan], [np.nan] * 3, [1, 2, 3]])
    with pytest.raises(ValueError, match="max_numbers"):
        ratings(res, K + 1)


def _random_number(rng) -> str:
    digits = "".join(map(str, rng.integers(0, 10, size=rng.integers(1, 26 if rng.random() < 0.3 else 9))))
    cut = rng.integers(1, len(digits) + 1)
    return ("-" if rng.random() < 0.3 else "") + digits[:cut] + ("." + digits[cut:] if cut < len(digits) else "")


def test_number_values_match_python_float():
    """60k numbers (1-25 digits, leading zeros, long fractions) against float32(float(match))."""
    tok = tf.few_merges()
    parser = build_parser(tok, max_numbers=K, check=0)
    byte_ids = _byte_ids(tok)
    rng = np.random.default_rng(2)
    got, want, short = [], [], []
    for _ in range(3):
        texts = [[_random_number(rng) for _ in range(K)] for _ in range(4000)]
        rows = [byte_ids[list(f"<answer>{' '.join(t)}</answer>".encode())] for t in texts]
        ids = np.zeros((len(rows), max(map(len, rows))), np.int32)
        mask = np.zeros(ids.shape, bool)
        for i, r in enumerate(rows):
            ids[i, : len(r)], mask[i, : len(r)] = r, True
        got.append(np.asarray(parse_jit(parser, ids, mask).numbers).ravel())
        with np.errstate(over="ignore"):
            want.append(np.float32([float(x) for t in texts for x in t]))
        for x in (x for t in texts for x in t):
            sig = x.lstrip("-").replace(".", "").lstrip("0")
            frac = len(x.split(".")[1]) if "." in x else 0
            short.append(len(sig) <= 7 and frac <= 10)
    got, want, short = np.concatenate(got), np.concatenate(want), np.asarray(short)
    assert got.shape == (60_000,)
    finite = np.isfinite(want) & (want != 0)
    np.testing.assert_array_equal(got[~finite], want[~finite])  # zeros (signed) and infinities
    ulps = _ulps(got[finite], want[finite])
    print(f"max ulp: {ulps.max()} overall, {ulps[short[finite]].max()} for <= 7 significant digits")
    assert ulps.max() <= 2 and ulps[short[finite]].max() <= 1


def test_parser_under_a_sharded_batch():
    tok = tf.many_merges()
    parser = build_parser(tok, max_numbers=K, check=0)
    rng = np.random.default_rng(4)
    seqs = _sequences(tok, seed=3, n=64)
    ids, mask = _batch(seqs, rng, len(tok), max(map(len, seqs)))
    rows = NamedSharding(make_mesh((-1, 1, 1)), PartitionSpec(("data", "fsdp")))
    sharded = parse_jit(parser, jax.device_put(ids, rows), jax.device_put(mask, rows))
    plain = parse_jit(parser, ids, mask)
    assert len(sharded.numbers.sharding.device_set) == len(jax.devices())
    for a, b in zip(sharded, plain):
        np.testing.assert_array_equal(a, b)


def test_byte_alphabet_matches_tokenizers():
    assert set(_byte_alphabet()) == set(pre_tokenizers.ByteLevel.alphabet())
    assert sorted(_byte_alphabet().values()) == list(range(256))


def test_cleanup_that_would_change_text_is_refused():
    tok = tf.train_bpe(["a b"], 270, split="none")
    tok.clean_up_tokenization_spaces = True
    token_bytes(tok)  # transformers skips the clean-up for BPE models
    tok.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = True
    with pytest.raises(ValueError, match="clean up"):
        token_bytes(tok)


def test_unsupported_decoder_is_refused():
    tok = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tok.decoder = decoders.WordPiece()
    with pytest.raises(ValueError, match="ByteLevel"):
        token_bytes(PreTrainedTokenizerFast(tokenizer_object=tok))


def test_build_parser_on_a_qwen_sized_vocabulary():
    tok = tf.synthetic_vocab(150_000)
    start = time.perf_counter()
    parser = build_parser(tok, max_numbers=K, vocab_size=152_064)
    seconds = time.perf_counter() - start
    sizes = {k: (v.shape, v.dtype.name, v.nbytes) for k, v in vars(parser).items() if hasattr(v, "nbytes")}
    print(f"build_parser on {len(tok)} tokens: {seconds:.1f} s; tables {sizes}")
    assert len(tok) == 150_003 and parser.body_trans.shape == (152_065, 110) and parser.body.shape[0] == 152_065
    run_id = tok.convert_tokens_to_ids("=" * 128)
    assert (np.asarray(parser.body[run_id]) != np.asarray(parser.body[run_id])[-1]).sum() <= 2  # squeezed
    assert sum(v[2] for v in sizes.values()) < 64 * 2**20
    rng = np.random.default_rng(3)
    ids = rng.integers(0, len(tok), size=(256, 60)).astype(np.int32)  # long random tokens
    byte_ids = _byte_ids(tok)
    for i in range(0, 256, 2):  # a template spelled in single bytes, random tokens inside the think block
        spelled = byte_ids[list(tf.completion(rng).encode())][:50]
        ids[i, : len(spelled)] = spelled
        ids[i, rng.integers(0, len(spelled), 3)] = rng.integers(0, len(tok), 3)
    mask = rng.random(ids.shape) < 0.95
    res = jax.device_get(parse_jit(parser, ids, mask))
    scalars, numbers = _reference(tok, ids, mask)
    fmt, count, level = scalars.T
    np.testing.assert_array_equal(res.count, count)
    np.testing.assert_array_equal(res.level, level)
    np.testing.assert_array_equal(res.format_ok, fmt)
    np.testing.assert_allclose(res.numbers, numbers, rtol=1e-6)
