"""The language model and the whole model against transformers' torch Qwen2.5-VL on the same random weights,
the KV cache against a full forward, compile counting, and bad-batch errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from torch_ref import make_batch, make_torch_model, our_model_from_torch, torch_logits, torch_rope_index

from qponder_jax.hf import load_hf
from qponder_jax.model.config import tiny_config
from qponder_jax.model.qwen2_5_vl import check_batch, create_model

IMAGE_GRID = (1, 4, 6)  # 6 merged image tokens


def _models(config, tmp_path, seed=0):
    torch_model = make_torch_model(config, seed)
    model, loaded_config = our_model_from_torch(torch_model, tmp_path)
    assert loaded_config == config
    return torch_model, model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    config = tiny_config()
    folder = tmp_path_factory.mktemp("tiny")
    return (config, *_models(config, folder), folder / "hf_model")


def _place(seqs, t, *, left):
    """Pads token lists to length t (left or right); returns ids [B, t] and mask [B, t]."""
    ids = np.zeros((len(seqs), t), np.int32)
    mask = np.zeros((len(seqs), t), bool)
    for b, seq in enumerate(seqs):
        cols = slice(t - len(seq), t) if left else slice(0, len(seq))
        ids[b, cols] = seq
        mask[b, cols] = True
    return ids, mask


def _image_sequence(config, rng, n_before, n_image, n_after):
    """[text..., <|vision_start|>, n_image x <|image_pad|>, <|vision_end|>, text...]"""
    text = lambda n: list(rng.integers(0, 400, n))
    return text(n_before) + [config.vision_start_token_id] + [config.image_token_id] * n_image + [
        config.vision_end_token_id
    ] + text(n_after)  # fmt: skip


def _mrope_text_inputs(config, torch_model, lengths, t, rng, *, left):
    """A text-only batch whose M-RoPE rows differ: positions come from `get_rope_index` on sequences holding a
    4x6-patch image block, whose <|image_pad|> tokens are then replaced by ordinary text tokens."""
    seqs = [_image_sequence(config, rng, 2, 6, n - 10) for n in lengths]
    ids, mask = _place(seqs, t, left=left)
    positions, _ = torch_rope_index(torch_model, ids, mask, [IMAGE_GRID] * len(lengths))
    assert (positions[0] != positions[1]).any() and (positions[1] != positions[2]).any()
    ids[ids == config.image_token_id] = 7
    return ids, mask, positions


def _max_diff(ours, ref, mask):
    return float(np.abs(np.asarray(ours) - ref)[mask].max())


def test_text_parity_right_padding(tiny):
    config, torch_model, model, _ = tiny
    ids, mask = _place([np.arange(12) * 31 % 400, np.arange(8) * 17 % 400], 12, left=False)
    positions = np.broadcast_to(np.maximum(np.cumsum(mask, 1) - 1, 0), (3, *ids.shape))
    ours = model(make_batch(config, ids, mask, positions))
    ref = torch_logits(torch_model, ids, mask, positions)
    assert ours.shape == ref.shape and ours.dtype == jnp.float32
    diff = _max_diff(ours, ref, mask)
    print(f"text parity (right padding): max abs diff {diff:.2e}, max |logit| {np.abs(ref).max():.2f}")
    assert diff <= 1e-4


@pytest.mark.parametrize(
    "overrides",
    [
        dict(text=dict(num_attention_heads=8, num_key_value_heads=2, mrope_section=(1, 1, 2))),  # GQA ratio 4
        dict(tie_word_embeddings=True),
    ],
    ids=["gqa4", "tied"],
)
def test_text_parity_mrope(overrides, tmp_path):
    config = tiny_config(**overrides.get("text", {}))
    if overrides.get("tie_word_embeddings"):
        config = config.replace(tie_word_embeddings=True)
    torch_model, model = _models(config, tmp_path, seed=1)
    if config.tie_word_embeddings:
        assert not hasattr(model, "lm_head")
    ids, mask, positions = _mrope_text_inputs(config, torch_model, [16, 12], 16, np.random.default_rng(1), left=False)
    ours = model(make_batch(config, ids, mask, positions))
    ref = torch_logits(torch_model, ids, mask, positions)
    diff = _max_diff(ours, ref, mask)
    print(f"text parity ({overrides}): max abs diff {diff:.2e}")
    assert diff <= 1e-4


def _jitted_generation_fns():
    prefill = nnx.jit(lambda m, batch, cache: m.prefill(batch, cache))
    decode = nnx.jit(lambda m, tokens, positions, cache: m.decode_step(tokens, positions, cache))
    return prefill, decode


@nnx.jit
def _decode_loop(model, tokens, positions, cache):
    """Decodes the given tokens [B, N] (positions [3, B, N]) in a lax.fori_loop; returns logits [B, N, V], cache."""
    graphdef, state = nnx.split(model)
    b, n = tokens.shape

    def step(i, carry):
        cache, out = carry
        token = jax.lax.dynamic_slice_in_dim(tokens, i, 1, axis=1)
        position = jax.lax.dynamic_slice_in_dim(positions, i, 1, axis=2)
        logits, cache = nnx.merge(graphdef, state).decode_step(token, position, cache)
        return cache, jax.lax.dynamic_update_slice_in_dim(out, logits, i, axis=1)

    out = jnp.zeros((b, n, model.config.text.vocab_size), jnp.float32)
    cache, out = jax.lax.fori_loop(0, n, step, (cache, out))
    return out, cache


def _check_cache_against_full(model, config, full_batch, prompt_len, cache_len):
    """Prefill the first `prompt_len` columns, then decode the rest one token at a time; each step's logits must
    equal the full forward's at the same column. Returns the largest difference."""
    full = np.asarray(model(full_batch))
    b, t = full_batch.input_ids.shape
    prompt = full_batch.replace(
        input_ids=full_batch.input_ids[:, :prompt_len],
        attention_mask=full_batch.attention_mask[:, :prompt_len],
        position_ids=full_batch.position_ids[:, :, :prompt_len],
        loss_mask=full_batch.loss_mask[:, :prompt_len],
        image_feature_index=full_batch.image_feature_index[:, :prompt_len],
    )
    prefill, decode = _jitted_generation_fns()
    logits, prompt_cache = prefill(model, prompt, model.init_cache(b, cache_len))
    mask = full_batch.attention_mask[:, :prompt_len]
    diffs = [_max_diff(logits, full[:, :prompt_len], mask)]
    cache = prompt_cache
    for col in range(prompt_len, t):
        step_logits, cache = decode(
            model, full_batch.input_ids[:, col : col + 1], full_batch.position_ids[:, :, col : col + 1], cache
        )
        assert step_logits.shape == (b, 1, config.text.vocab_size)
        diffs.append(float(np.abs(np.asarray(step_logits[:, 0]) - full[:, col]).max()))
    assert int(cache.index) == t
    # the same steps as a lax.fori_loop carrying the cache, on the cache repeated twice per row (as for sampling)
    tokens = np.repeat(full_batch.input_ids[:, prompt_len:], 2, axis=0)
    positions = np.repeat(full_batch.position_ids[:, :, prompt_len:], 2, axis=1)
    loop_logits, loop_cache = _decode_loop(model, tokens, positions, prompt_cache.repeat(2))
    assert int(loop_cache.index) == t
    for r in range(2):
        diffs.append(float(np.abs(np.asarray(loop_logits[r::2]) - full[:, prompt_len:]).max()))
    np.testing.assert_array_equal(np.asarray(cache.segment_ids[:, :t]), full_batch.attention_mask.astype(np.int32))
    assert not np.asarray(cache.segment_ids[:, t:]).any()
    return max(diffs)


def test_kv_cache_left_padded_matches_full_forward(tiny):
    config, torch_model, model, _ = tiny
    # two prompts of different lengths (9 and 14 tokens), left-padded, each followed by 4 generated tokens
    ids, mask, positions = _mrope_text_inputs(config, torch_model, [13, 18], 18, np.random.default_rng(2), left=True)
    diff = _check_cache_against_full(model, config, make_batch(config, ids, mask, positions), 14, 21)
    print(f"KV cache vs full forward (text, left-padded): max abs diff {diff:.2e}")
    assert diff <= 1e-5


def _image_batch(config, torch_model, rng, grids, num_patch_rows, t, extra_text=0):
    """A left-padded batch with one image per sample, its torch inputs, and positions from get_rope_index."""
    unit = config.vision.merge_unit
    seqs = [
        _image_sequence(config, rng, 3 + 2 * i, int(np.prod(g)) // unit, 2 + extra_text) for i, g in enumerate(grids)
    ]
    ids, mask = _place(seqs, t, left=True)
    positions, _ = torch_rope_index(torch_model, ids, mask, grids)
    pixels = [rng.standard_normal((int(np.prod(g)), config.vision.patch_dim)).astype(np.float32) for g in grids]
    batch = make_batch(
        config, ids, mask, positions, grids=[[g] for g in grids], pixel_values=pixels, num_patch_rows=num_patch_rows
    )
    return batch, np.concatenate(pixels), np.asarray(grids)


def test_full_model_parity_with_images(tiny):
    config, torch_model, model, _ = tiny
    grids = [IMAGE_GRID, (1, 8, 12)]  # 6 and 24 image tokens; the second spans two attention windows
    batch, pixels, grid_thw = _image_batch(config, torch_model, np.random.default_rng(3), grids, 100, 36)
    check_batch(batch, config)
    ours = model(batch)
    ref = torch_logits(torch_model, batch.input_ids, batch.attention_mask, batch.position_ids, pixels, grid_thw)
    diff = _max_diff(ours, ref, batch.attention_mask)
    print(f"full-model parity with images: max abs diff {diff:.2e}")
    assert diff <= 1e-4
    # the pixels really reach the logits
    other_pixels = model(batch.replace(pixel_values=batch.pixel_values * 0.5))
    assert _max_diff(other_pixels, ref, batch.attention_mask) > 1e-2


def test_kv_cache_with_image_prefill(tiny):
    config, torch_model, model, _ = tiny
    batch, _, _ = _image_batch(config, torch_model, np.random.default_rng(4), [IMAGE_GRID, (1, 4, 4)], 24, 20, 3)
    diff = _check_cache_against_full(model, config, batch, 17, 24)
    print(f"KV cache vs full forward (image prefill): max abs diff {diff:.2e}")
    assert diff <= 1e-5


def test_same_bucket_compiles_once(tiny):
    config, torch_model, model, _ = tiny
    traces = []

    @nnx.jit
    def forward(model, batch):
        traces.append(batch.input_ids.shape)  # runs only while tracing
        return model(batch)

    rng = np.random.default_rng(5)
    first, _, _ = _image_batch(config, torch_model, rng, [IMAGE_GRID, (1, 6, 4)], 32, 24)
    second, _, _ = _image_batch(config, torch_model, rng, [(1, 2, 8), (1, 4, 4)], 32, 24)
    assert not np.array_equal(first.window_segment_ids, second.window_segment_ids)
    out1 = forward(model, first)
    out2 = forward(model, second)
    assert len(traces) == 1
    assert not np.allclose(np.asarray(out1), np.asarray(out2))
    third, _, _ = _image_batch(config, torch_model, rng, [IMAGE_GRID, IMAGE_GRID], 32, 28)  # another bucket
    forward(model, third)
    assert len(traces) == 2


def test_bad_image_token_counts_raise(tiny):
    config, torch_model, model, _ = tiny
    batch, _, _ = _image_batch(config, torch_model, np.random.default_rng(6), [IMAGE_GRID, IMAGE_GRID], 24, 20)
    ids = batch.input_ids.copy()
    ids[1, np.flatnonzero(ids[1] == config.image_token_id)[0]] = 5  # sample 1 loses one <|image_pad|>
    with pytest.raises(ValueError, match=r"sample 1: 5 <\|image_pad\|> tokens .* but 6 tokens"):
        model(batch.replace(input_ids=ids))
    grids = batch.image_grid_thw.copy()
    grids[0, 0] = (1, 4, 4)  # sample 0's grid now gives 4 merged patches for its 6 tokens
    with pytest.raises(ValueError, match=r"sample 0: 6 <\|image_pad\|> tokens but image_grid_thw .* gives 4"):
        check_batch(batch.replace(image_grid_thw=grids), config)
    with pytest.raises(ValueError, match=r"batch.position_ids has shape \(2, 20\)"):
        nnx.jit(lambda m, b: m(b))(model, batch.replace(position_ids=batch.position_ids[0]))


def test_remat_and_bf16(tiny):
    config, _, plain, folder = tiny
    ids, mask = _place([np.arange(10) * 7 % 400], 10, left=False)
    batch = make_batch(config, ids, mask, np.broadcast_to(np.arange(10), (3, 1, 10)))
    forward = nnx.jit(lambda m, b: m(b))
    loss = lambda m: jnp.sum(m(batch) ** 2) / 1e3
    remat, _ = load_hf(folder, remat=True)
    reference = np.asarray(forward(plain, batch))
    np.testing.assert_allclose(np.asarray(forward(remat, batch)), reference, atol=1e-6)
    g_plain = nnx.jit(nnx.grad(loss))(plain)
    g_remat = nnx.jit(nnx.grad(loss))(remat)
    for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)

    bf16, _ = load_hf(folder, dtype=jnp.bfloat16)
    assert bf16.language_model.layers[0].mlp.up_proj.kernel[...].dtype == jnp.float32  # params stay float32
    assert bf16.init_cache(1, 12).k[0].dtype == jnp.bfloat16
    logits = np.asarray(forward(bf16, batch))
    assert logits.dtype == np.float32
    diff = np.abs(logits - reference).max()
    print(f"bf16 compute vs fp32: max abs diff {diff:.3f} (max |logit| {np.abs(reference).max():.2f})")
    assert 0 < diff < 0.05 * np.abs(reference).max()


def test_remat_model_decodes_inside_a_while_loop():
    """The GRPO rollout decodes inside a jitted loop; a remat model (the 3b/7b configs) must work there too."""
    cfg = tiny_config()
    outs = []
    for remat in (False, True):
        graphdef, state = nnx.split(create_model(cfg, rngs_seed=0, remat=remat))

        @jax.jit
        def run(state, graphdef=graphdef):
            m = nnx.merge(graphdef, state)

            def body(i, carry):
                cache, tok, acc = carry
                logits, cache = m.decode_step(tok, jnp.full((3, 2, 1), i, jnp.int32), cache)
                return cache, jnp.argmax(logits, -1).astype(jnp.int32), acc + logits[:, 0, :3]

            init = (m.init_cache(2, 8), jnp.ones((2, 1), jnp.int32), jnp.zeros((2, 3)))
            return jax.lax.fori_loop(0, 4, body, init)[2]

        outs.append(np.asarray(run(state)))
    np.testing.assert_array_equal(outs[0], outs[1])
