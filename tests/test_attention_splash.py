"""The splash path (`attn_impl="splash"`, jax's Pallas TPU kernel) against the XLA one, on the CPU in Pallas interpret
mode: outputs and gradients within 1e-5 in fp32 for the vision tower's window and full layers (two samples, three
images of different sizes, padding), causal text with left and right padding and grouped heads, the KV cache's
offset queries, a mesh (the shard_map), a whole tiny-model forward and the GRPO update's loss gradient. Padding rows
are compared too: they return the mean of the values on every path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qponder_jax import prompts
from qponder_jax.data.datasets import SyntheticIQA, decode_image
from qponder_jax.data.processing import Buckets, Processor
from qponder_jax.data.tokenizer import build_demo_tokenizer, special_token_ids
from qponder_jax.model import attention as attention_lib
from qponder_jax.model.attention import attention, resolve_impl
from qponder_jax.model.config import tiny_config
from qponder_jax.model.sharding import make_mesh
from qponder_jax.model.vision import VisionTower, rotary_angles
from qponder_jax.model.vision_layout import sample_layout

TOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def interpret():
    """Pallas interpret mode for this module (read at trace time): the TPU kernel runs on the CPU."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attention_lib, "SPLASH_INTERPRET", True)
        yield


def _close(ours, ref):
    """Every leaf within 1e-5 (relative, and absolute on the leaf's own scale when that is below 1: small gradients
    are compared as strictly as large ones)."""
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(a, b, rtol=TOL, atol=TOL * min(1.0, float(np.abs(b).max())))


def _attention_and_grads(q, k, v, cotangent, **kw):
    """(output, d(q, k, v)) of attention under jit, for a fixed random cotangent."""
    fn = lambda q, k, v: attention(q, k, v, **kw)
    out = jax.jit(fn)(q, k, v)
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) * cotangent), argnums=(0, 1, 2)))(q, k, v)
    return out, grads


def _qkv(rng, b, tq, tk, h, hkv, dh, heads_major=False):
    kv_shape = (b, hkv, tk, dh) if heads_major else (b, tk, hkv, dh)
    arrays = [rng.normal(size=(b, tq, h, dh)), rng.normal(size=kv_shape), rng.normal(size=kv_shape)]
    return [jnp.asarray(x, jnp.float32) for x in arrays] + [jnp.asarray(rng.normal(size=(b, tq, h, dh)), jnp.float32)]


@pytest.mark.parametrize("heads", [(4, 2), (2, 1)], ids=["gqa", "mqa"])
def test_causal_text_with_left_and_right_padding(heads):
    """200 tokens (two 128-blocks, the upper one skipped): a left-padded row, a right-padded row, and a row of two
    packed segments; query heads share key/value heads."""
    h, hkv = heads
    b, t, dh = 3, 200, 16
    seg = np.ones((b, t), np.int32)
    seg[0, :37] = 0  # left padding
    seg[1, 150:] = 0  # right padding
    seg[2, 90:] = 2
    q, k, v, cot = _qkv(np.random.default_rng(0), b, t, t, h, hkv, dh)
    kw = dict(q_segment_ids=jnp.asarray(seg), kv_segment_ids=jnp.asarray(seg), causal=True)
    ours = _attention_and_grads(q, k, v, cot, impl="splash", **kw)
    ref = _attention_and_grads(q, k, v, cot, impl="xla", **kw)
    assert np.abs(np.asarray(ref[0][1, :150])).max() > 0.1  # not trivially small
    _close(ours, ref)


def test_kv_cache_queries_at_an_offset():
    """The cached call's layout and positions: 6 queries at slots 9..14 of a 24-slot head-major cache (3 left-padded
    slots, 5 unwritten ones), one query row of padding, 4 query heads on 2 key/value heads."""
    b, tq, s, h, hkv, dh = 2, 6, 24, 4, 2, 16
    kv_seg = np.zeros((b, s), np.int32)
    kv_seg[:, : 9 + tq] = 1
    kv_seg[1, :3] = 0
    q_seg = np.ones((b, tq), np.int32)
    q_seg[0, 4:] = 0  # a completion that stopped
    kv_seg[0, 9 + 4 : 9 + tq] = 0
    q, k, v, cot = _qkv(np.random.default_rng(1), b, tq, s, h, hkv, dh, heads_major=True)
    kw = dict(
        q_segment_ids=jnp.asarray(q_seg), kv_segment_ids=jnp.asarray(kv_seg), causal=True, kv_heads_major=True,
        q_positions=jnp.broadcast_to(9 + jnp.arange(tq), (b, tq)), kv_positions=jnp.broadcast_to(jnp.arange(s), (b, s)),
    )  # fmt: skip
    ours = _attention_and_grads(q, k, v, cot, impl="splash", **kw)
    _close(ours, _attention_and_grads(q, k, v, cot, impl="xla", **kw))


def test_under_a_mesh():
    """On a (2, 2, 2) mesh the kernel runs in a shard_map (rows over data x fsdp, heads over tensor)."""
    b, t, h, hkv, dh = 4, 40, 4, 2, 16
    seg = np.ones((b, t), np.int32)
    seg[0, 30:] = 0
    seg[1, :10] = 0
    seg[2, 20:] = 2
    q, k, v, cot = _qkv(np.random.default_rng(2), b, t, t, h, hkv, dh)
    kw = dict(q_segment_ids=jnp.asarray(seg), kv_segment_ids=jnp.asarray(seg), causal=True)
    with jax.set_mesh(make_mesh((2, 2, 2))):
        lowered = jax.jit(lambda q, k, v: attention(q, k, v, impl="splash", **kw)).lower(q, k, v).as_text()
        assert "manual_computation" in lowered  # the shard_map is there
        _close(_attention_and_grads(q, k, v, cot, impl="splash", **kw), _attention_and_grads(q, k, v, cot, **kw))


@pytest.fixture(scope="module")
def vision_inputs():
    """Two samples padded to 232 patch rows: one 16x12 image, and 8x8 + 10x14 images (windows of 4x4 merged units:
    partial windows at the right and bottom edges)."""
    vcfg = tiny_config().vision
    samples, padded = [[[1, 16, 12]], [[1, 8, 8], [1, 10, 14]]], 232
    layouts = [
        sample_layout(g, padded, spatial_merge_size=2, window_size=vcfg.window_size, patch_size=vcfg.patch_size)
        for g in samples
    ]
    stack = lambda name: jnp.asarray(np.stack([getattr(lay, name) for lay in layouts]))
    assert int((stack("window_segment_ids") == 0).sum()) > 0 and int(stack("window_segment_ids").max()) >= 4
    return vcfg, stack


@pytest.mark.parametrize("layer", ["window", "full"])
def test_vision_layer(vision_inputs, layer):
    """One vision block, its attention on the window or the full (per image) segment ids: output and gradients with
    respect to its input and every parameter."""
    vcfg, stack = vision_inputs
    make = lambda impl: VisionTower(
        vcfg, dtype=jnp.float32, param_dtype=jnp.float32, remat=False, attn_impl=impl, rngs=nnx.Rngs(0)
    )
    index = 1 if layer == "full" else 0
    assert (index in vcfg.fullatt_block_indexes) == (layer == "full")
    seg = stack("full_segment_ids" if layer == "full" else "window_segment_ids")
    pos = jnp.take_along_axis(stack("vision_pos_ids"), stack("window_index")[..., None], axis=1)
    angles = rotary_angles(pos, vcfg.head_dim, vcfg.rope_theta)
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(*seg.shape, vcfg.hidden_size)), jnp.float32)
    cot = jnp.asarray(rng.normal(size=x.shape), jnp.float32)

    def run(impl):
        graphdef, params = nnx.split(make(impl).blocks[index])
        loss = lambda p, x: jnp.sum(nnx.merge(graphdef, p)(x, jnp.cos(angles), jnp.sin(angles), seg) * cot)
        out = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x, jnp.cos(angles), jnp.sin(angles), seg))(params, x)
        return out, jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)

    _close(run("splash"), run("xla"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The demo processor and a left-padded batch of two image prompts (56 and 84 px images) of different lengths."""
    buckets = Buckets(tokens=(64,), patches=(64,), images=(1,))
    proc = Processor.from_pretrained(build_demo_tokenizer(tmp_path_factory.mktemp("tok")), buckets=buckets)
    ids = special_token_ids(proc.tokenizer)
    config = tiny_config(vocab_size=ids["vocab_size"], eos_token_id=ids["im_end_id"], pad_token_id=ids["endoftext_id"])
    config = config.replace(**{k: ids[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                                   "vision_end_token_id")})  # fmt: skip
    images = [decode_image(SyntheticIQA("train", size=2, min_side=s, max_side=s)[0]["image"]) for s in (56, 84)]
    texts = ["Rate the quality.", "Rate the quality. Think about noise, blur and exposure first."]
    encoded = [proc.encode(prompts.image_messages(t), [im], add_generation_prompt=True) for t, im in zip(texts, images)]
    batch = proc.collate(encoded, padding_side="left")
    assert not batch.attention_mask.all()  # the shorter prompt is left-padded
    return config, batch


def _model(config, impl):
    from qponder_jax.model.qwen2_5_vl import create_model

    return create_model(config, rngs_seed=3, attn_impl=impl)


def test_whole_model_forward(tiny):
    config, batch = tiny
    ours = jax.jit(lambda m, b: m(b))(_model(config, "splash"), batch)
    ref = jax.jit(lambda m, b: m(b))(_model(config, "xla"), batch)
    _close(ours, ref)


def test_grpo_loss_gradient(tiny):
    """The GRPO update's loss (shared prompts: the prompt prefilled into the KV cache once, 2 completions each as a
    cached call at an offset, one stopping early) and its gradient with respect to every parameter."""
    from qponder_jax.train import grpo
    from qponder_jax.train.grpo_loss import LossConfig, chunked_token_logprobs, grpo_loss_from_logprobs
    from qponder_jax.train.sft import lm_head

    config, batch = tiny
    k, steps = 2, 5
    rng = np.random.default_rng(4)
    tokens = jnp.asarray(rng.integers(10, config.text.vocab_size, (2 * k, steps)), jnp.int32)
    mask = jnp.asarray(np.arange(steps)[None] < np.array([5, 2, 5, 4])[:, None])
    old_logp = jnp.asarray(rng.normal(-5, 0.1, (2 * k, steps)), jnp.float32)
    advantages = jnp.asarray([1.0, -1.0, 0.5, -0.5], jnp.float32)
    loss_config = LossConfig(beta=0.0)

    def run(impl):
        graphdef, params = nnx.split(_model(config, impl))

        def loss(p):
            m = nnx.merge(graphdef, p)
            hidden = grpo.shared_prompt_hidden(m, batch, tokens, mask, k)
            logp, entropy = chunked_token_logprobs(hidden, lm_head(m), tokens, 1.0, 512)
            return grpo_loss_from_logprobs(logp, entropy, mask, old_logp, advantages, loss_config)[0]

        return jax.jit(jax.value_and_grad(loss))(params)

    (ours, ours_grad), (ref, ref_grad) = run("splash"), run("xla")
    vision_grad = ref_grad["visual"]["blocks"][0]["attn"]["qkv"]["kernel"][...]
    assert float(np.abs(vision_grad).max()) > 1e-5  # the gradient reaches the vision attention
    _close((ours, ours_grad), (ref, ref_grad))


def test_auto_and_errors(monkeypatch):
    q = jnp.zeros((1, 8, 2, 16), jnp.float32)
    assert resolve_impl("auto", q) == "xla"  # this CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert resolve_impl("auto", q) == "splash"
    assert resolve_impl("auto", q[:, :1]) == "xla"  # decode
    assert resolve_impl("splash", q[:, :1]) == "xla"
    assert resolve_impl("cudnn", q) == "cudnn"
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
        resolve_impl("flash", q)
    monkeypatch.undo()
    monkeypatch.setattr(attention_lib, "SPLASH_INTERPRET", False)
    seg = jnp.ones((1, 8), jnp.int32)
    with pytest.raises(ValueError, match="QPONDER_SPLASH_INTERPRET=1"):
        attention(q, q, q, q_segment_ids=seg, kv_segment_ids=seg, causal=True, impl="splash")


@pytest.mark.parametrize("module, variant", [("qponder_ci", "7b"), ("qponder", "3b"), ("preresq", "7b"),
                                             ("eval", "koniq_cross"), ("distill", "teacher")])  # fmt: skip
def test_large_variants_pick_by_device(module, variant):
    import importlib

    assert importlib.import_module(f"configs.{module}").get_config(variant).model.attn_impl == "auto"


@pytest.mark.skipif(jax.default_backend() != "tpu", reason="needs a TPU (the compiled kernel, not the interpreter)")
def test_compiled_kernel_on_a_tpu(monkeypatch):
    """bf16 on a TPU: the vision tower's head size (80, padded to 128 inside), 1000 rows in 512-blocks, windows of 64
    rows and padding, against XLA on the real rows. Not run here (no TPU was available when it was written)."""
    monkeypatch.setattr(attention_lib, "SPLASH_INTERPRET", False)
    b, t, h, dh = 2, 1000, 4, 80
    seg = np.repeat(np.arange(1, t // 64 + 2), 64)[None, :t].repeat(b, 0).astype(np.int32)
    seg[1, 700:] = 0
    q, k, v, _ = (x.astype(jnp.bfloat16) for x in _qkv(np.random.default_rng(5), b, t, t, h, h, dh))
    kw = dict(q_segment_ids=jnp.asarray(seg), kv_segment_ids=jnp.asarray(seg), causal=False)
    ours = jax.jit(lambda q, k, v: attention(q, k, v, impl="splash", **kw))(q, k, v)
    ref = jax.jit(lambda q, k, v: attention(q, k, v, impl="xla", **kw))(q, k, v)
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) < 2e-2  # bf16 operands
