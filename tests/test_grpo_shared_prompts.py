"""Shared prompts in the GRPO update: each prompt (and image) runs once per minibatch, and the completions' log-probs
and gradients equal the teacher-forced [N, T + L] completion batch. (The whole step, shared vs not, is compared in
test_grpo.py::test_shared_prompt_step_matches_the_teacher_forced_step.)"""

import jax
import numpy as np
import pytest

from qponder_jax import prompts
from qponder_jax.data.datasets import SyntheticIQA, decode_image
from qponder_jax.data.processing import Buckets, Processor
from qponder_jax.data.tokenizer import build_demo_tokenizer, special_token_ids
from qponder_jax.model.config import tiny_config
from qponder_jax.train import grpo

PROMPT = "Rate the quality."


@pytest.fixture(scope="module")
def proc(tmp_path_factory):
    buckets = Buckets(tokens=(32, 64), patches=(16,), images=(1,))
    return Processor.from_pretrained(build_demo_tokenizer(tmp_path_factory.mktemp("tok")), buckets=buckets)


def _tiny_model(proc, remat=False):
    from qponder_jax.model.qwen2_5_vl import create_model

    ids = special_token_ids(proc.tokenizer)
    config = tiny_config(vocab_size=ids["vocab_size"], eos_token_id=ids["im_end_id"], pad_token_id=ids["endoftext_id"])
    config = config.replace(**{k: ids[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                                   "vision_end_token_id")})  # fmt: skip
    return create_model(config, rngs_seed=3, remat=remat)


@pytest.mark.parametrize("remat", [False, True])
def test_shared_prompt_hidden_equals_the_teacher_forced_pass(proc, remat):
    """Two left-padded image prompts of different lengths x 3 completions each (one stops early, one at once):
    the completion log-probs and their gradients with respect to every parameter equal those of the teacher-forced
    [N, T + L] completion batch (`sampling.completion_batch`)."""
    import types

    from flax import nnx

    from qponder_jax.sampling import completion_batch
    from qponder_jax.train.grpo_loss import chunked_token_logprobs, completion_logits
    from qponder_jax.train.sft import hidden_and_head, lm_head

    model = _tiny_model(proc, remat)
    images = [decode_image(SyntheticIQA("train", size=2, min_side=56, max_side=56)[i]["image"]) for i in range(2)]
    texts = [PROMPT, PROMPT + " Think about noise, blur and exposure first."]
    encoded = [proc.encode(prompts.image_messages(t), [im], add_generation_prompt=True) for t, im in zip(texts, images)]
    batch = proc.collate(encoded, padding_side="left")
    assert not batch.attention_mask.all()  # the shorter prompt is padded
    k, steps = 3, 7
    rng = np.random.default_rng(0)
    tokens = rng.integers(10, model.config.text.vocab_size, (2 * k, steps)).astype(np.int32)
    lengths = np.array([7, 3, 1, 7, 5, 2])
    mask = np.arange(steps)[None, :] < lengths[:, None]
    graphdef, params = nnx.split(model)

    def shared(p):
        m = nnx.merge(graphdef, p)
        hidden = grpo.shared_prompt_hidden(m, batch, tokens, mask, k)
        return chunked_token_logprobs(hidden, lm_head(m), tokens, 1.0, 512)[0]

    def forced(p):
        full = completion_batch(batch, types.SimpleNamespace(tokens=tokens, mask=mask), k)
        hidden, head = hidden_and_head(nnx.merge(graphdef, p), full)
        return chunked_token_logprobs(completion_logits(hidden, batch.input_ids.shape[1]), head, tokens, 1.0, 512)[0]

    a, b = jax.jit(shared)(params), jax.jit(forced)(params)
    np.testing.assert_allclose(np.where(mask, a, 0), np.where(mask, b, 0), atol=2e-5, rtol=1e-5)
    loss = lambda f: lambda p: jax.numpy.sum(f(p) * mask * np.arange(1, 2 * k + 1)[:, None])  # rows weighted
    ga, gb = jax.jit(jax.grad(loss(shared)))(params), jax.jit(jax.grad(loss(forced)))(params)
    leaves_a, leaves_b = jax.tree.leaves(ga), jax.tree.leaves(gb)
    assert max(float(np.abs(x).max()) for x in leaves_b) > 1e-2  # gradients reach every part of the model
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_allclose(x, y, atol=2e-5, rtol=1e-4)
    vision_grad = ga["visual"]["patch_embed"]["proj"]["kernel"]
    assert float(np.abs(vision_grad[...]).max()) > 0  # the image, run once, still gets the gradient


def test_settings_share_prompts_only_when_minibatches_divide_the_group():
    settings = lambda **kw: grpo.GRPOSettings(**kw)
    assert settings(num_generations=8, num_minibatches=2).completions_per_prompt == 4
    assert settings(num_generations=6, num_minibatches=4).completions_per_prompt == 0  # 4 does not divide 6
    assert settings(num_generations=4, num_minibatches=4).completions_per_prompt == 0  # nothing to share
    assert settings(num_generations=8, share_prompts=False).completions_per_prompt == 0
