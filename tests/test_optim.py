"""The optimizer: warmup + cosine schedule, frozen-parameter masks, weight-decay mask, clipping."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from qponder_jax.model.config import tiny_config
from qponder_jax.model.qwen2_5_vl import Qwen25VL
from qponder_jax.train import optim


def _tiny_abstract_params():
    model = nnx.eval_shape(lambda: Qwen25VL(tiny_config(), rngs=nnx.Rngs(0)))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def test_schedule_warmup_then_cosine():
    sched = optim.warmup_cosine(peak_lr=1.0, total_steps=12, warmup_steps=4, end_lr_ratio=0.1)
    lrs = np.array([float(sched(s)) for s in range(12)])
    np.testing.assert_allclose(lrs[:4], [0.25, 0.5, 0.75, 1.0], rtol=1e-6)  # first update already moves
    assert lrs[4] == pytest.approx(1.0)  # cosine starts at the peak
    assert np.all(np.diff(lrs[4:]) < 0)
    # half way through the decay (step 4 + 8 / 2): the mean of peak and end
    assert float(sched(8)) == pytest.approx(0.55, abs=1e-6)
    # the end value is reached just past the last update, which still has a rate above it
    assert float(sched(12)) == pytest.approx(0.1, abs=1e-6)
    assert lrs[11] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 7 / 8)), abs=1e-6)
    assert float(sched(100)) == pytest.approx(0.1)  # clamped after the end
    zero_end = optim.warmup_cosine(peak_lr=1.0, total_steps=5, warmup_steps=0)
    assert float(zero_end(0)) == pytest.approx(1.0) and float(zero_end(4)) > 0.0
    with pytest.raises(ValueError, match="warmup_steps"):
        optim.warmup_cosine(peak_lr=1.0, total_steps=3, warmup_steps=5)


def test_freeze_presets_select_the_right_parameters():
    params = _tiny_abstract_params()
    labels = dict(optim.named_leaves(optim.param_labels(params, optim.freeze_patterns(freeze=("vision_tower",)))))
    frozen = {p for p, lab in labels.items() if lab == optim.FROZEN}
    assert frozen, "the vision tower preset froze nothing"
    assert all(p.startswith("visual/") and not p.startswith("visual/merger/") for p in frozen)
    assert "visual/patch_embed/proj/kernel" in frozen
    assert "visual/blocks/1/mlp/up_proj/kernel" in frozen
    assert all(lab == optim.TRAIN for p, lab in labels.items() if not p.startswith("visual/") or "merger" in p)

    labels = dict(optim.named_leaves(optim.param_labels(params, optim.freeze_patterns(freeze=("merger",)))))
    frozen = {p for p, lab in labels.items() if lab == optim.FROZEN}
    assert frozen and all(p.startswith("visual/merger/") for p in frozen)


def test_freeze_errors_are_clear():
    params = _tiny_abstract_params()
    with pytest.raises(ValueError, match="unknown group.*'vison'"):
        optim.freeze_patterns(freeze=("vison",))
    with pytest.raises(ValueError, match="matches no parameter"):
        optim.param_labels(params, ["^nothing_like_this/"])


def test_frozen_parameters_do_not_move_and_have_no_adam_state():
    params = {"visual": {"w": jnp.ones((3, 4))}, "text": {"w": jnp.ones((4, 2)), "b": jnp.ones((2,))}}
    labels = optim.param_labels(params, [r"^visual/"])
    tx = optim.adamw(labels, learning_rate=0.1, weight_decay=0.5, clip_norm=0.0)
    opt_state = tx.init(params)
    # Adam moments exist only for the trainable leaves: 3 trainable arrays x (mu, nu) + counts.
    moment_shapes = sorted(tuple(x.shape) for x in jax.tree.leaves(opt_state) if x.ndim > 0)
    assert moment_shapes == sorted([(4, 2), (4, 2), (2,), (2,)])
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, opt_state, params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(new["visual"]["w"], params["visual"]["w"])
    assert np.all(np.asarray(new["text"]["w"]) < 1.0)


def test_weight_decay_only_on_matrices():
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,))}
    labels = optim.param_labels(params, [])
    tx = optim.adamw(labels, learning_rate=0.1, weight_decay=1.0)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    # With zero gradients only decoupled weight decay moves a parameter: -lr * wd * p on matrices, nothing on biases.
    np.testing.assert_allclose(updates["w"], -0.1 * np.ones((2, 2)), rtol=1e-6)
    np.testing.assert_array_equal(updates["b"], np.zeros(2))


def test_clipping_bounds_the_global_norm_and_norm_ignores_frozen():
    params = {"a": jnp.zeros((3,)), "frozen": jnp.zeros((3,))}
    labels = {"a": optim.TRAIN, "frozen": optim.FROZEN}
    grads = {"a": jnp.array([3.0, 4.0, 0.0]), "frozen": jnp.array([100.0, 0.0, 0.0])}
    assert float(optim.trainable_global_norm(grads, labels)) == pytest.approx(5.0)
    clip = optax.multi_transform(
        {optim.TRAIN: optax.clip_by_global_norm(1.0), optim.FROZEN: optax.set_to_zero()}, labels
    )
    clipped, _ = clip.update(grads, clip.init(params))
    assert float(optax.tree.norm(clipped["a"])) == pytest.approx(1.0, rel=1e-6)


def test_from_config_labels_and_schedule_match_the_config():
    params = {"visual": {"merger": {"w": jnp.ones((2, 2))}}, "lm_head": {"kernel": jnp.ones((2, 3))}}
    cfg = dict(
        peak_lr=2e-3, warmup_steps=1, end_lr_ratio=0.0, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, clip_norm=1.0,
        freeze=("merger",), freeze_regex="",
    )  # fmt: skip
    tx, sched, labels = optim.from_config(cfg, params, total_steps=5)
    assert labels == {"visual": {"merger": {"w": optim.FROZEN}}, "lm_head": {"kernel": optim.TRAIN}}
    assert float(sched(0)) == pytest.approx(2e-3)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_array_equal(updates["visual"]["merger"]["w"], 0.0)
    # First Adam step moves every trainable entry by lr (the normalized step is 1 before clipping effects).
    np.testing.assert_allclose(updates["lm_head"]["kernel"], -2e-3, rtol=1e-4)


def test_update_if_applies_the_step_or_returns_the_state_unchanged():
    params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
    labels = jax.tree.map(lambda _: optim.TRAIN, params)
    tx = optim.adamw(labels, learning_rate=0.1, weight_decay=0.01)
    opt = tx.init(params)
    grads = {"w": jnp.full((2, 3), 0.5), "b": jnp.array([1.0, -1.0, 2.0])}
    updates, want_opt = tx.update(grads, opt, params)
    want = optax.apply_updates(params, updates)
    step = jax.jit(lambda ok: optim.update_if(ok, tx, params, opt, grads))
    got, got_opt = step(jnp.bool_(True))
    for x, y in zip(jax.tree.leaves((got, got_opt)), jax.tree.leaves((want, want_opt)), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert float(jnp.abs(got["w"] - params["w"]).max()) > 0.05
    same, same_opt = step(jnp.bool_(False))
    for x, y in zip(jax.tree.leaves((same, same_opt)), jax.tree.leaves((params, opt)), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
