"""The jitted sampler: greedy parity with transformers' generate, log-probs against a teacher-forced pass, stops and
early exit, batch independence, seeds and filtering, sharded vs single device, no per-token host work, bf16 weights
cast once outside the loop (the decode bench's smoke tests are in test_bench.py)."""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from PIL import Image
from torch_ref import make_torch_model, our_model_from_torch, torch_rope_index

from qponder_jax import prompts, sampling
from qponder_jax.data.processing import Buckets, Processor
from qponder_jax.data.tokenizer import DEMO_VOCAB_SIZE, build_demo_tokenizer
from qponder_jax.model.config import tiny_config
from qponder_jax.model.qwen2_5_vl import Qwen25VL, create_model
from qponder_jax.model.sharding import make_mesh

BUCKETS = Buckets(tokens=(48, 64, 96), patches=(0, 64), images=(0, 1))
STEPS = 10  # max_new_tokens everywhere: tests then share compiled decode loops
NEAR_TIE = 1e-3  # top-2 logit margin below which greedy choices may legitimately differ between implementations
TEXTS = ["Rate this image.", "How sharp is it? Please answer briefly with a score.", prompts.THINK_ANSWER_INSTRUCTION]
IMAGE_SIZES = [(112, 84), (56, 56), None]  # (width, height); None: a text-only prompt


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(processor, config, torch model, our model) on the demo tokenizer's ids, same random weights."""
    proc = Processor.from_pretrained(build_demo_tokenizer(tmp_path_factory.mktemp("tok")))
    config = tiny_config(vocab_size=DEMO_VOCAB_SIZE).replace(
        image_token_id=proc.image_token_id,
        video_token_id=proc.video_token_id,
        vision_start_token_id=proc.vision_start_token_id,
        vision_end_token_id=proc.vision_end_token_id,
    )
    torch_model = make_torch_model(config, seed=3)
    model, _ = our_model_from_torch(torch_model, tmp_path_factory.mktemp("model"))
    return proc, config, torch_model, model


def _image(size, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8)
    return Image.fromarray(pixels)


def _examples(proc, which):
    """Encoded prompts (add_generation_prompt=True), one per index into TEXTS / IMAGE_SIZES."""
    out = []
    for i in which:
        if IMAGE_SIZES[i] is None:
            messages = [{"role": "user", "content": TEXTS[i]}]
            out.append(proc.encode(messages, [], add_generation_prompt=True))
        else:
            messages = prompts.image_messages(TEXTS[i])
            out.append(proc.encode(messages, [_image(IMAGE_SIZES[i], i)], add_generation_prompt=True))
    return out


def _batch(proc, examples, **kw):
    return proc.collate(examples, padding_side="left", buckets=BUCKETS, **kw)


@torch.no_grad()
def _hf_generate(torch_model, config, batch, examples, max_new):
    """transformers' greedy generate on the same left-padded batch: (tokens [B, L], top-2 margins [B, L])."""
    ids = torch.as_tensor(batch.input_ids, dtype=torch.int64)
    kwargs = {}
    with_images = [ex for ex in examples if len(ex.image_grid_thw)]
    if with_images:
        kwargs["pixel_values"] = torch.as_tensor(np.concatenate([ex.pixel_values for ex in with_images]))
        kwargs["image_grid_thw"] = torch.as_tensor(np.concatenate([ex.image_grid_thw for ex in with_images]))
    torch_model.model.rope_deltas = None
    out = torch_model.generate(
        input_ids=ids,
        attention_mask=torch.as_tensor(batch.attention_mask, dtype=torch.int64),
        mm_token_type_ids=(ids == config.image_token_id).int(),  # M-RoPE for the image tokens (needs image_grid_thw)
        do_sample=False,
        max_new_tokens=max_new,
        pad_token_id=0,
        eos_token_id=None,
        output_scores=True,
        return_dict_in_generate=True,
        **kwargs,
    )
    torch_model.model.rope_deltas = None
    scores = torch.stack(out.scores, 1).numpy()  # [B, L, V]
    top2 = np.sort(scores, axis=-1)[..., -2:]
    return out.sequences[:, ids.shape[1] :].numpy(), top2[..., 1] - top2[..., 0]


def _compare_until_near_tie(ours, ref, margins):
    """Asserts equal greedy tokens in every row up to its first near-tie; returns the number of tokens compared."""
    compared = 0
    for row in range(ref.shape[0]):
        ties = np.flatnonzero(margins[row] < NEAR_TIE)
        n = int(ties[0]) if ties.size else ref.shape[1]
        np.testing.assert_array_equal(ours[row, :n], ref[row, :n], err_msg=f"row {row}")
        compared += n
    return compared


@pytest.mark.parametrize("which", [[0], [0, 1, 2]], ids=["image_prompt", "mixed_lengths"])
def test_greedy_matches_transformers_generate(setup, which):
    proc, config, torch_model, model = setup
    examples = _examples(proc, which)
    batch = _batch(proc, examples)
    out = sampling.generate(model, batch, max_new_tokens=STEPS)
    ref, margins = _hf_generate(torch_model, config, batch, examples, STEPS)
    compared = _compare_until_near_tie(np.asarray(out.tokens), ref, margins)
    print(f"{which}: prompt lengths {[len(ex) for ex in examples]}, min top-2 margin {margins.min():.3f}")
    assert compared == ref.size  # these seeds have no near-tie: every token is compared
    assert np.asarray(out.mask).all() and (np.asarray(out.lengths) == STEPS).all()
    # generated tokens continue each prompt's M-RoPE positions exactly as transformers' get_rope_index would
    full = sampling.completion_batch(batch, out)
    grids = np.concatenate([ex.image_grid_thw for ex in examples])
    positions, _ = torch_rope_index(torch_model, full.input_ids, full.attention_mask, grids)
    np.testing.assert_array_equal(np.asarray(full.position_ids), positions)


@nnx.jit
def _forward(model, batch):
    return model(batch)


def _teacher_forced_logprobs(model, batch, out, num_samples, temperature):
    """log_softmax(logits / T) of each generated token from one forward pass over prompt + completion."""
    full = sampling.completion_batch(batch, out, num_samples)
    t, steps = batch.input_ids.shape[1], out.tokens.shape[1]
    logits = _forward(model, full)[:, t - 1 : t - 1 + steps] / (temperature or 1.0)  # [N, L, V]
    logp = jax.nn.log_softmax(logits, axis=-1)
    return np.asarray(jnp.take_along_axis(logp, out.tokens[..., None], axis=-1)[..., 0]), logits


@pytest.mark.parametrize(
    "settings",
    [dict(temperature=0.0), dict(temperature=0.7), dict(temperature=0.7, top_k=20, top_p=0.8)],
    ids=["greedy", "t0.7", "t0.7_topk20_topp0.8"],
)
def test_logprobs_match_teacher_forced_pass(setup, settings):
    proc, config, _, model = setup
    batch = _batch(proc, _examples(proc, [0, 1, 2]))
    n = 1 if settings["temperature"] == 0 else 2
    kw = dict(max_new_tokens=STEPS, num_samples=n, rng=jax.random.key(7), **settings)
    stop = int(sampling.generate(model, batch, **kw).tokens[0, 4])  # ends row 0 by step 4: masks get False tails
    out = sampling.generate(model, batch, stop_ids=[stop], **kw)
    mask = np.asarray(out.mask)
    assert not mask.all() and mask[:, 0].all()
    ref, logits = _teacher_forced_logprobs(model, batch, out, n, settings["temperature"])
    diff = float(np.abs(ref - np.asarray(out.logprobs))[mask].max())
    print(f"{settings}: log-prob vs teacher-forced max abs diff {diff:.2e}")
    assert diff <= 1e-4
    assert (np.asarray(out.logprobs)[~mask] == 0).all()
    if "top_k" in settings:  # every sampled token lies in the top-k nucleus of its teacher-forced distribution
        kept = sampling.filter_logits(logits, settings["top_k"], settings["top_p"])
        chosen = np.asarray(jnp.take_along_axis(kept, out.tokens[..., None], axis=-1)[..., 0])
        assert np.isfinite(chosen[mask]).all()


def test_stop_tokens_pad_and_early_exit(setup):
    proc, config, _, model = setup
    batch = _batch(proc, _examples(proc, [0, 1, 2]))
    free = np.asarray(sampling.generate(model, batch, max_new_tokens=STEPS, stop_ids=()).tokens)
    stop = int(free[0, 2])
    out = sampling.generate(model, batch, max_new_tokens=STEPS, stop_ids=[stop])
    tokens, lengths, mask = (np.asarray(x) for x in (out.tokens, out.lengths, out.mask))
    for row in range(3):
        hits = np.flatnonzero(free[row] == stop)
        n = int(hits[0]) + 1 if hits.size else STEPS
        assert lengths[row] == n
        np.testing.assert_array_equal(tokens[row, :n], free[row, :n])
        assert (tokens[row, n:] == 0).all() and mask[row].tolist() == [True] * n + [False] * (STEPS - n)
    # the config's eos_token_id is the default stop set
    eos_model = nnx.merge(*nnx.split(model))
    eos_model.config = config.replace(text=dataclasses.replace(config.text, eos_token_id=stop))
    by_eos = sampling.generate(eos_model, batch, max_new_tokens=STEPS, pad_id=5)
    np.testing.assert_array_equal(np.asarray(by_eos.tokens), np.where(mask, tokens, 5))
    # early exit: every row stops on its first token, so the loop runs once
    out = sampling.generate(model, batch, max_new_tokens=STEPS, stop_ids=free[:, 0].tolist())
    assert int(out.steps) == 1 and (np.asarray(out.lengths) == 1).all()
    assert int(sampling.generate(model, batch, max_new_tokens=STEPS, stop_ids=[stop]).steps) == lengths.max()


def test_batch_independence_and_sample_grouping(setup):
    proc, _, _, model = setup
    examples = _examples(proc, [0, 1, 2])
    alone = sampling.generate(model, _batch(proc, examples[:1]), max_new_tokens=STEPS)
    # inside a wider, padded batch (an all-padding row included), with two samples per prompt
    batch = _batch(proc, examples, batch_size=4)
    assert (~batch.attention_mask[0]).sum() > (~_batch(proc, examples[:1]).attention_mask[0]).sum()  # more padding
    together = sampling.generate(model, batch, max_new_tokens=STEPS, num_samples=2)
    tokens = np.asarray(together.tokens)
    np.testing.assert_array_equal(tokens[0], np.asarray(alone.tokens)[0])
    np.testing.assert_array_equal(tokens[1], np.asarray(alone.tokens)[0])
    np.testing.assert_allclose(np.asarray(together.logprobs)[1], np.asarray(alone.logprobs)[0], atol=1e-5)
    assert not np.array_equal(tokens[0], tokens[2])


def test_seeds_and_top_k_one(setup):
    proc, _, _, model = setup
    batch = _batch(proc, _examples(proc, [0, 1, 2]))
    run = lambda **kw: sampling.generate(model, batch, max_new_tokens=STEPS, **kw)
    a, b = (run(temperature=1.0, num_samples=3, rng=jax.random.key(1)) for _ in range(2))
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    np.testing.assert_array_equal(np.asarray(a.logprobs), np.asarray(b.logprobs))
    c = run(temperature=1.0, num_samples=3, rng=2)
    assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))
    tokens = np.asarray(a.tokens)
    assert not np.array_equal(tokens[0], tokens[1])  # samples of one prompt differ
    np.testing.assert_array_equal(np.asarray(run(temperature=1.0, top_k=1, rng=3).tokens), np.asarray(run().tokens))


def test_filter_logits_keeps_the_nucleus():
    probs = np.array([0.15, 0.5, 0.05, 0.2, 0.1], np.float32)  # nucleus order: 1, 3, 0, 4, 2
    logits = jnp.log(jnp.asarray(probs))[None]
    kept = lambda **kw: np.flatnonzero(np.isfinite(np.asarray(sampling.filter_logits(logits, **kw))[0])).tolist()
    assert kept(top_p=0.45) == [1]
    assert kept(top_p=0.69) == [1, 3]
    assert kept(top_p=0.8) == [0, 1, 3]
    assert kept(top_p=1.0) == [0, 1, 2, 3, 4]
    assert kept(top_k=3) == [0, 1, 3]
    assert kept(top_k=2, top_p=0.7) == [1]  # top-p renormalizes after top-k: 0.5 / 0.7 > 0.7
    # drawn tokens come only from the nucleus, in proportion to their renormalized probabilities
    config = sampling.SamplingConfig(max_new_tokens=1, temperature=1.0, top_p=0.8)
    draws, _ = sampling.sample_token(jnp.tile(logits, (20000, 1)), jax.random.key(0), config)
    freq = np.bincount(np.asarray(draws), minlength=5) / 20000
    np.testing.assert_allclose(freq, [0.15 / 0.85, 0.5 / 0.85, 0, 0.2 / 0.85, 0], atol=0.015)


@pytest.mark.parametrize("vocab", [5, 128, 300])
def test_categorical_draws_follow_the_softmax(vocab):
    """`sampling.categorical` (two-level inverse transform) against the softmax: chi-square per row, zero-probability
    tokens never drawn (leading, trailing, a whole zero block, the partial last block), rows independent, and rows
    whose whole mass is on the first or the last token."""
    from scipy.stats import chisquare

    probs = 1.0 + np.arange(vocab) % 7.0
    zero = np.zeros(vocab, bool)
    zero[[0, vocab - 1]] = True
    zero[1::5] = True
    if vocab > 256:
        zero[128:256] = True  # the second block of 128 has no mass
    probs[zero] = 0.0
    probs /= probs.sum()
    reverse = probs[::-1]
    first, last = np.eye(vocab)[0], np.eye(vocab)[-1]
    with np.errstate(divide="ignore"):
        rows = np.log(np.stack([probs, reverse, first, last]))  # -inf where the probability is 0
    n = 40_000
    logits = jnp.asarray(np.repeat(rows, n, axis=0), jnp.float32)
    draws = np.asarray(sampling.categorical(jax.random.key(vocab), logits)).reshape(4, n)
    assert draws.dtype == np.int32
    for row, p in zip(draws[:2], (probs, reverse), strict=True):
        counts = np.bincount(row, minlength=vocab)
        assert counts[p == 0].sum() == 0
        assert chisquare(counts[p > 0], n * p[p > 0]).pvalue > 1e-4
    assert (draws[2] == 0).all() and (draws[3] == vocab - 1).all()
    # the extreme uniforms land on positive entries whatever the rounding: u = 0 skips leading zeros, u just below 1
    # (u * total may round up to the total) stops at the last positive entry, not on the trailing zeros
    p = jnp.asarray([[0.0, 0.1, 0.3, 0.0], [0.0, 0.0, 1e-30, 0.0], [1.0, 0.0, 0.0, 0.0]])
    for u, expected in ((0.0, [1, 2, 0]), (np.nextafter(np.float32(1), np.float32(0)), [2, 2, 0])):
        index = sampling._inverse_cdf(p, jnp.full((3,), u, jnp.float32))
        assert np.asarray(index).tolist() == expected


def test_sample_token_argmax_and_logprob_match_numpy():
    """The greedy token is argmax's (first of tied maxima, first NaN, 0 for an all -inf row) and every log-prob is
    log_softmax(logits / T) at the chosen token, in float64 numpy."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 3.0, (6, 300)).astype(np.float32)
    logits[1, [7, 150, 299]] = 50.0  # tied maxima
    logits[2, [4, 9]] = np.nan
    logits[3] = -np.inf
    logits[4, -1] = 40.0  # the maximum in the last column
    logits[5, :290] = -np.inf
    greedy = sampling.SamplingConfig(max_new_tokens=1)
    token, logprob = sampling.sample_token(jnp.asarray(logits), jax.random.key(0), greedy)
    assert token.dtype == jnp.int32
    token, logprob = np.asarray(token), np.asarray(logprob)
    # numpy's argmax is the reference: jnp.argmax's NaN tie-break differs by backend (the last NaN on an H200)
    assert token.tolist() == np.argmax(logits, axis=-1).tolist()
    assert token.tolist()[:5] == [int(np.argmax(logits[0])), 7, 4, 0, 299]

    def numpy_logprob(x, tokens):
        x = x.astype(np.float64)
        top = x.max(axis=-1, keepdims=True)
        logp = x - top - np.log(np.exp(x - top).sum(axis=-1, keepdims=True))
        return logp[np.arange(len(tokens)), tokens]

    finite = [0, 1, 4, 5]
    np.testing.assert_allclose(logprob[finite], numpy_logprob(logits[finite], token[finite]), atol=1e-5)
    assert logprob[1] == pytest.approx(-np.log(3.0), abs=1e-6)  # three tied maxima
    sampled = sampling.SamplingConfig(max_new_tokens=1, temperature=0.7, top_k=5)
    x = logits[[0, 4, 5]]
    token, logprob = sampling.sample_token(jnp.asarray(x), jax.random.key(1), sampled)
    np.testing.assert_allclose(np.asarray(logprob), numpy_logprob(x / 0.7, np.asarray(token)), atol=1e-5)


def test_cached_split_follows_updates_and_structure():
    """`cached_split` equals `nnx.split` on first and later calls: it returns the arrays the model holds now (after
    an in-place update), re-splits after a structural change, and holds no reference to the model."""
    import gc
    import weakref

    from qponder_jax.model.qwen2_5_vl import create_model

    model = create_model(tiny_config(), rngs_seed=3)

    def same_as_split(model):
        graphdef, state = sampling.cached_split(model)
        ref_graphdef, ref_state = nnx.split(model)
        assert graphdef == ref_graphdef
        assert jax.tree.structure(state) == jax.tree.structure(ref_state)
        assert all(a is b for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state), strict=True))
        return state

    same_as_split(model)
    assert model in sampling._SPLITS
    kernel = model.lm_head.kernel
    kernel[...] = kernel[...] + 1.0  # an in-place update, as an optimizer step on the live model
    state = same_as_split(model)
    np.testing.assert_array_equal(state["lm_head"]["kernel"][...], kernel[...])
    nnx.update(model, jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param)))
    assert not jax.tree.leaves(same_as_split(model)["lm_head"])[0].any()
    model.language_model.layers[0].mlp.extra = nnx.Param(jnp.ones((3,)))  # a new variable: the structure changes
    state = same_as_split(model)
    assert state["language_model"]["layers"][0]["mlp"]["extra"][...].shape == (3,)
    text = dataclasses.replace(model.config.text, eos_token_id=[1, 2])  # a list: the graphdef cannot be a jit key
    unhashable = create_model(dataclasses.replace(model.config, text=text), rngs_seed=3)
    with pytest.raises(TypeError, match="must be hashable"):
        sampling.cached_split(unhashable)
    alive, entries = weakref.ref(model), len(sampling._SPLITS)
    del model, state, kernel
    gc.collect()
    assert alive() is None and len(sampling._SPLITS) == entries - 1


def test_filter_logits_matches_transformers_warpers():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits = np.random.default_rng(0).standard_normal((6, 50)).astype(np.float32) * 2
    for top_k, top_p in [(0, 0.3), (0, 0.9), (10, 1.0), (10, 0.6), (49, 0.95)]:
        ref = torch.as_tensor(logits)
        if top_k:
            ref = TopKLogitsWarper(top_k)(None, ref)
        if top_p < 1:
            ref = TopPLogitsWarper(top_p)(None, ref)
        ours = np.asarray(sampling.filter_logits(jnp.asarray(logits), top_k, top_p))
        np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(ref.numpy()), err_msg=f"{top_k}, {top_p}")


def test_sharded_equals_single_device(setup, tmp_path):
    proc, config, torch_model, model = setup
    mesh = make_mesh((2, 2, 2))
    sharded, _ = our_model_from_torch(torch_model, tmp_path, mesh=mesh)
    batch = _batch(proc, _examples(proc, [0, 1, 2]), batch_size=4)
    for kw in (dict(), dict(temperature=0.8, top_p=0.9, rng=jax.random.key(4))):
        ours = sampling.generate(sharded, batch, max_new_tokens=STEPS, num_samples=2, **kw)
        ref = sampling.generate(model, batch, max_new_tokens=STEPS, num_samples=2, **kw)
        assert ours.tokens.sharding.mesh.shape == mesh.shape  # rows really split over the devices
        assert len(ours.tokens.sharding.device_set) == 8
        np.testing.assert_array_equal(np.asarray(ours.tokens), np.asarray(ref.tokens))
        np.testing.assert_allclose(np.asarray(ours.logprobs), np.asarray(ref.logprobs), atol=1e-5)


def _weight_converts_in_loop(hlo: str) -> int:
    """fp32 -> bf16 converts of 2-D tensors (the weights) inside a compiled while loop's body."""
    return sum(1 for line in hlo.splitlines()
               if "convert(" in line and "while/body" in line and re.search(r"= bf16\[\d+,\d+\]", line))  # fmt: skip


def test_bf16_compute_casts_the_weights_once_outside_the_decode_loop(setup):
    """A bf16 compute dtype over fp32 weights: `sample` casts the weights once, before the prefill. The tokens and
    log-probs are the same bits as converting at every use inside the loop, and no weight convert is left in it."""
    proc, config, _, _ = setup
    model = create_model(config, rngs_seed=5, dtype=jnp.bfloat16)
    batch = jax.device_put(_batch(proc, _examples(proc, [0, 1, 2])))
    graphdef, params = sampling.cached_split(model)
    cfg = sampling.SamplingConfig(max_new_tokens=STEPS, temperature=0.9, num_samples=2)
    stop, key = jnp.asarray([-1], jnp.int32), jax.random.key(3)

    @functools.partial(jax.jit, static_argnames=("graphdef", "config"))
    def uncast(graphdef, params, batch, rng, stop_ids, *, config):  # `sample` without the cast
        state = sampling._prefill(graphdef, params, batch, rng, config=config)
        return sampling._decode(graphdef, params, state, stop_ids, config=config)

    ref, _ = uncast(graphdef, params, batch, key, stop, config=cfg)
    out = sampling._generate(graphdef, params, batch, key, stop, config=cfg)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
    np.testing.assert_array_equal(np.asarray(out.logprobs), np.asarray(ref.logprobs))
    hlo = lambda fn: fn.lower(graphdef, params, batch, key, stop, config=cfg).compile().as_text()
    assert _weight_converts_in_loop(hlo(uncast)) >= 2 * config.text.num_hidden_layers  # the check sees them
    assert _weight_converts_in_loop(hlo(sampling._generate)) == 0


def test_one_executable_no_host_transfers_no_recompiles(setup, monkeypatch):
    proc, _, _, model = setup
    batch = _batch(proc, _examples(proc, [0, 1, 2]))
    calls = []
    original = Qwen25VL.decode_step
    monkeypatch.setattr(Qwen25VL, "decode_step", lambda self, *a: calls.append(1) or original(self, *a))
    key = jax.random.key(0)
    before = dict(sampling.TRACES)
    with jax.transfer_guard("disallow"):  # any implicit host<->device copy inside generate would raise
        out = sampling.generate(model, batch, max_new_tokens=STEPS, temperature=0.9, rng=key)
    assert calls == [1]  # the decode step is traced once for 10 tokens: it runs inside the loop, not in Python
    assert sampling.TRACES["decode"] == before.get("decode", 0) + 1
    # same shapes and settings, new prompts and key: nothing retraces
    other = _batch(proc, _examples(proc, [2, 0, 1]))
    assert other.input_ids.shape == batch.input_ids.shape
    again = sampling.generate(model, other, max_new_tokens=STEPS, temperature=0.9, rng=jax.random.key(1), stop_ids=[3])
    assert sampling.TRACES["decode"] == before.get("decode", 0) + 1
    assert sampling.TRACES["prefill"] == before.get("prefill", 0) + 1
    assert not np.array_equal(np.asarray(out.tokens), np.asarray(again.tokens))
    # the lowered decode is one module whose body is a while loop; the cache is donated into it
    config = sampling.SamplingConfig(max_new_tokens=STEPS, temperature=0.9)
    graphdef, params = nnx.split(model)
    state = sampling._prefill(graphdef, params, jax.device_put(batch), key, config=config)
    stop_ids = jnp.full((8,), -1, jnp.int32)
    jaxpr = jax.make_jaxpr(lambda *args: sampling._decode(graphdef, *args, config=config))(params, state, stop_ids)
    (decode,) = [e for e in jaxpr.eqns if e.primitive.name in ("pjit", "jit")]  # one executable
    top = [e.primitive.name for e in decode.params["jaxpr"].eqns]
    assert top.count("while") == 1 and "dot_general" not in top  # all model work happens inside the one loop
    (loop,) = [e for e in decode.params["jaxpr"].eqns if e.primitive.name == "while"]
    assert "dot_general" in str(loop.params["body_jaxpr"])
    sampling._decode(graphdef, params, state, stop_ids, config=config)
    assert state.cache.k[0].is_deleted()


def test_bad_inputs_raise(setup):
    proc, _, _, model = setup
    batch = proc.collate(_examples(proc, [0, 1]), padding_side="right", buckets=BUCKETS)
    with pytest.raises(ValueError, match=r"row 0 ends in padding; .* left-padded"):
        sampling.generate(model, batch, max_new_tokens=4)
    left = _batch(proc, _examples(proc, [0]))
    with pytest.raises(ValueError, match=r"needs rng"):
        sampling.generate(model, left, max_new_tokens=4, temperature=1.0)
    with pytest.raises(ValueError, match=r"top_p=0.0 must be in \(0, 1\]"):
        sampling.generate(model, left, max_new_tokens=4, top_p=0.0)
