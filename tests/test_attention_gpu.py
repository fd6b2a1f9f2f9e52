"""The cuDNN attention path (`attn_impl="cudnn"`) against the XLA one, on an NVIDIA GPU: attention alone with padding,
GQA and causal masks, a whole bf16 forward over a left-padded batch with images, and greedy decoding through the KV
cache. Skipped without a GPU (CI has none); run with `JAX_PLATFORMS=cuda python -m pytest tests/test_attention_gpu.py`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qponder_jax import prompts, sampling
from qponder_jax.model.attention import attention


def _gpus() -> list:
    try:
        return jax.devices("gpu")
    except RuntimeError:
        return []


pytestmark = pytest.mark.skipif(not _gpus(), reason="needs an NVIDIA GPU (JAX_PLATFORMS=cuda)")
BF16_TOL = 3e-2  # relative error of bf16 operands summed over a few hundred terms


def _rel(a, b, where=None) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if where is not None:
        a, b = a[where], b[where]
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("causal", [True, False])
def test_cudnn_attention_matches_xla_on_the_real_rows(causal):
    b, t, h, hkv, dh = 3, 96, 8, 2, 64
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (b, t, h, dh), jnp.bfloat16)
    k, v = (jax.random.normal(key, (b, t, hkv, dh), jnp.bfloat16) for key in keys[1:])
    pad = np.array([0, 17, 60])  # left padding per row
    seg = jnp.asarray((np.arange(t)[None] >= pad[:, None]).astype(np.int32))
    if not causal:  # two packed segments in row 0, as the vision tower's windows
        seg = seg.at[0, 40:].set(2)
    run = lambda impl: jax.jit(lambda q, k, v: attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg,
                                                         causal=causal, impl=impl))(q, k, v)  # fmt: skip
    ours, ref = run("cudnn"), run("xla")
    real = np.asarray(seg) != 0
    assert np.isfinite(np.asarray(ours, np.float32)[real]).all()
    assert _rel(ours, ref, real) < BF16_TOL


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from qponder_jax.benchmarks.common import bench_config, random_images
    from qponder_jax.data.processing import Buckets, Processor
    from qponder_jax.data.tokenizer import build_demo_tokenizer
    from qponder_jax.model.qwen2_5_vl import create_model

    proc = Processor.from_pretrained(build_demo_tokenizer(tmp_path_factory.mktemp("tok")))
    config = bench_config("tiny", proc)
    make = lambda impl: create_model(config, rngs_seed=1, dtype=jnp.bfloat16, attn_impl=impl)
    texts = ["Rate this image.", "How sharp is it? Answer briefly with a score.", prompts.THINK_ANSWER_INSTRUCTION]
    examples = [proc.encode(prompts.image_messages(text), [image], add_generation_prompt=True)
                for text, image in zip(texts, random_images(len(texts), 112, seed=2), strict=True)]  # fmt: skip
    longest = max(len(ex) for ex in examples)
    buckets = Buckets(tokens=(-(-longest // 32) * 32,), patches=(examples[0].num_patches,), images=(1,))
    batch = proc.collate(examples, padding_side="left", buckets=buckets)  # rows padded by different amounts
    return make("cudnn"), make("xla"), batch


def test_cudnn_forward_matches_xla_over_a_left_padded_image_batch(models):
    cudnn, xla, batch = models
    ours, ref = jax.jit(lambda m, b: m(b))(cudnn, batch), jax.jit(lambda m, b: m(b))(xla, batch)
    real = np.asarray(batch.attention_mask, bool)
    assert np.isfinite(np.asarray(ours)[real]).all()
    assert _rel(ours, ref, real) < BF16_TOL


def test_cudnn_greedy_decode_matches_xla(models):
    cudnn, xla, batch = models
    ours = sampling.generate(cudnn, batch, max_new_tokens=12, stop_ids=())
    ref = sampling.generate(xla, batch, max_new_tokens=12, stop_ids=())
    assert np.isfinite(np.asarray(ours.logprobs)).all()
    # bf16 ties may flip a late greedy choice; the first tokens and most of the rest agree
    np.testing.assert_array_equal(np.asarray(ours.tokens)[:, :2], np.asarray(ref.tokens)[:, :2])
    assert np.mean(np.asarray(ours.tokens) == np.asarray(ref.tokens)) > 0.8
