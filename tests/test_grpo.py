"""GRPO: rewards and advantages from token ids in one jit against a host reference, the configs, the host metrics,
and (slow) the whole step on a (2,2,2) mesh against one device, the tiny job end to end, and learning: after a
cold-start SFT of the tiny model, a few dozen GRPO steps raise the mean accuracy reward."""

import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from qponder_jax import prompts
from qponder_jax.data.datasets import SyntheticIQA, decode_image
from qponder_jax.data.processing import Buckets, Processor
from qponder_jax.data.tokenizer import build_demo_tokenizer, special_token_ids
from qponder_jax.errors import ConfigError
from qponder_jax.model import sharding
from qponder_jax.model.config import tiny_config
from qponder_jax.rewards import iqa, registry
from qponder_jax.rewards.advantages import group_advantages
from qponder_jax.rewards.parse import build_parser, parse_text
from qponder_jax.train import grpo, grpo_job, optim
from qponder_jax.train import state as st
from qponder_jax.train.grpo_loss import LossConfig
from qponder_jax.train.sft import SFTStep

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train_helpers import optim_cfg, random_model  # noqa: E402

from configs import preresq, qponder  # noqa: E402

PROMPT = "Rate the quality."
BUCKETS = Buckets(tokens=(32, 64), patches=(16,), images=(1,))


@pytest.fixture(scope="module")
def proc(tmp_path_factory):
    return Processor.from_pretrained(build_demo_tokenizer(tmp_path_factory.mktemp("tok")), buckets=BUCKETS)


def _ids(proc):
    return special_token_ids(proc.tokenizer)


def _settings(proc, **kw):
    ids = _ids(proc)
    base = dict(
        num_generations=4,
        max_new_tokens=20,
        stop_ids=(ids["im_end_id"],),
        pad_id=ids["endoftext_id"],
        advantage_std="unbiased",
        rewards=(
            grpo.RewardTerm("format", 0.5),
            grpo.RewardTerm("accuracy", 1.0, (("mode", "threshold"), ("eps", 0.35))),
            grpo.RewardTerm("consistency", 0.25, (("adjacent", 0.5),)),
        ),
    )
    base.update(kw)
    return grpo.GRPOSettings(**base)


# ---- rewards + advantages from token ids, in one jit ----
COMPLETIONS = [  # 3 prompts x G = 4, rows b*G .. b*G+3
    ["<think>The quality is good.</think><answer>3.7</answer>"] * 4,  # all equal: a zero-std group
    [
        "<think>The quality is good.</think><answer>3.7</answer>",
        "<think>It looks poor</think> <answer>2.1</answer>",
        "<think>fair, then excellent!</think>\n<answer>4.5 or 1.0</answer>",
        "no tags at all 3.0",
    ],
    [
        "<think>bad</think><answer>none</answer>",
        "<answer>3.2</answer>",
        "<think>good</think><answer>-1.5</answer> trailing",
        "<think>Ünïcode good</think><answer>1.65</answer>",
    ],
]
MOS = np.array([3.6, 2.0, 1.7], np.float32)


def _encode_completions(proc, length):
    end = _ids(proc)["im_end_id"]
    pad = _ids(proc)["endoftext_id"]
    rows = [proc.tokenizer(t, add_special_tokens=False)["input_ids"] + [end] for group in COMPLETIONS for t in group]
    tokens = np.full((len(rows), length), pad, np.int32)
    mask = np.zeros((len(rows), length), bool)
    for i, r in enumerate(rows):
        tokens[i, : len(r)], mask[i, : len(r)] = r, True
    return tokens, mask


def _reference(proc, tokens, mask, settings):
    """Host reference: regexes on the decoded text, the reward formulas and the advantages in numpy."""
    parsed = [parse_text(proc.decode(t[m], skip_special_tokens=True)) for t, m in zip(tokens, mask)]
    score = np.array([p.numbers[0] if p.count else np.nan for p in parsed]).reshape(3, 4)
    level = np.array([p.level for p in parsed]).reshape(3, 4)
    ok = np.isfinite(score)
    fmt = np.array([p.format_ok for p in parsed]).reshape(3, 4) & ok
    acc = ok & (np.abs(np.nan_to_num(score) - MOS[:, None]) < 0.35)
    bins = 1 + np.sum(np.nan_to_num(score)[..., None] >= np.float32([1.8, 2.6, 3.4, 4.2]), axis=-1)
    dist = np.abs(level - bins)
    cons = np.where(ok & (level > 0), np.where(dist == 0, 1.0, np.where(dist == 1, 0.5, 0.0)), 0.0)
    total = 0.5 * fmt + 1.0 * acc + 0.25 * cons
    centered = total - total.mean(1, keepdims=True)
    adv = centered / (np.sqrt((centered**2).sum(1, keepdims=True) / 3) + 1e-6)
    zero = np.all(total == total[:, :1], axis=1)
    return score, {"format": fmt, "accuracy": acc, "consistency": cons}, total, np.where(zero[:, None], 0.0, adv), zero


def test_rewards_and_advantages_from_token_ids_in_one_jit(proc):
    settings = _settings(proc)
    tokens, mask = _encode_completions(proc, 40)
    parser = build_parser(proc.tokenizer, max_numbers=5, vocab_size=1024)

    @jax.jit
    def score(parser, tokens, mask, mos):
        res, scores, rewards, total = grpo.score_rollouts(settings, parser, tokens, mask, mos)
        adv, zero = group_advantages(total, std=settings.advantage_std, eps=settings.advantage_eps)
        return scores, rewards, total, adv, zero

    scores, rewards, total, adv, zero = jax.device_get(score(parser, tokens, mask, MOS))
    want_scores, want_rewards, want_total, want_adv, want_zero = _reference(proc, tokens, mask, settings)
    np.testing.assert_array_equal(np.isnan(scores), np.isnan(want_scores))
    np.testing.assert_allclose(scores, want_scores, rtol=1e-6)
    for name, want in want_rewards.items():
        np.testing.assert_allclose(rewards[name], want, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(total, want_total, atol=1e-6)
    np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(zero, want_zero)
    assert zero.tolist() == [True, False, False]  # the equal group is counted, the others carry signal
    # "no tags at all 3.0" and "<answer>none</answer>" are parse failures (NaN, never a default score); text after
    # </answer> breaks the format but not the score
    assert np.argwhere(np.isnan(scores)).tolist() == [[1, 3], [2, 0]]
    assert rewards["format"][2].tolist() == [0, 0, 0, 1] and rewards["accuracy"][2].tolist() == [0, 0, 0, 1]


def test_settings_reject_bad_values(proc):
    with pytest.raises(ValueError, match="must be distinct registered names"):
        _settings(proc, rewards=(grpo.RewardTerm("nope"),))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        _settings(proc, temperature=0.0)
    with pytest.raises(ValueError, match="advantage_std"):
        _settings(proc, advantage_std="mad")


# ---- configs ----
@pytest.mark.parametrize("module", [qponder, preresq])
@pytest.mark.parametrize("variant", ["tiny", "3b", "7b"])
def test_configs_build_settings(module, variant):
    config = module.get_config(variant)
    with pytest.raises(AttributeError):
        config.grpo.num_generation = 3  # locked: a misspelled key is an error
    settings = grpo_job.settings_from_config(config, stop_ids=(7,), pad_id=0)
    assert settings.updates_per_step == config.grpo.num_iterations * config.grpo.num_minibatches
    if variant == "tiny":
        assert config.model.model_path == "embedded:tiny" and config.data.datasets == "synthetic:train"
    inputs = iqa.RewardInputs(  # every configured constant is accepted by its registered reward
        scores=np.array([[3.0, 4.0, np.nan]] * 2, np.float32),
        mos=np.array([3.2, 2.0], np.float32),
        format_ok=np.ones((2, 3), bool),
        level=np.array([[3, 4, 0]] * 2, np.int32),
        ratings=np.tile(np.array([3.0, 4.0, 3.5, 2.5, 3.0], np.float32), (2, 3, 1)),
    )
    results = registry.compute_rewards(inputs, {t.name: dict(t.params) for t in settings.rewards})
    assert all(np.isfinite(np.asarray(r)).all() for r in results.values())


def test_preresq_config_has_the_papers_settings():
    c = preresq.get_config("7b")
    g = c.grpo
    assert (g.num_generations, g.max_new_tokens, g.temperature, g.beta) == (6, 256, 1.0, 0.04)
    assert c.optim.peak_lr == 1e-6 and c.data.datasets == "kadid10k:train" and c.data.prompt == "preresq_r1"
    assert c.grpo.score_numbers == 5 and c.data.batch_size // 8 * g.num_generations == 48  # 48 completions per GPU
    p = c.rewards.preresq
    assert (p.w_pair, p.w_balance, p.w_triplet, p.divisor, p.lambda_std, p.min_std, p.tol, p.balance_dims) == (
        0.375, 0.5, 0.125, 3.0, 0.5, 0.5, 0.05, 4
    )  # fmt: skip


def test_real_variants_fail_clearly_without_paths(tmp_path):
    config = qponder.get_config("3b")
    with pytest.raises(ConfigError, match="init_checkpoint"):
        grpo_job.run(config, tmp_path)
    config = preresq.get_config("3b").unlock()
    config.init_checkpoint = str(tmp_path / "missing_ci_run")
    with pytest.raises(FileNotFoundError, match="missing_ci_run"):
        grpo_job.run(config, tmp_path)


def test_host_metrics_correlate_group_means_with_mos():
    class Logger:
        def __init__(self):
            self.records, self.lines = [], []

        def write(self, step, scalars, prefix="train"):
            self.records.append((step, prefix, scalars))

        def text(self, line):
            self.lines.append(line)

    class Proc:
        def decode(self, tokens, skip_special_tokens=False):
            return " ".join(map(str, tokens))

    logger = Logger()
    host = grpo_job.HostMetrics(logger, Proc(), log_every=2, sample_every=2, total_steps=2)
    mos = [np.array([1.0, 2.0, 3.0]), np.array([4.0, 5.0, 2.5])]
    scores = [  # group means: [1.5, 2.0 (one NaN ignored), 2.9], [4.2, nan (none parsed), 2.4]
        np.array([[1.0, 2.0], [2.0, np.nan], [2.9, 2.9]]),
        np.array([[4.0, 4.4], [np.nan, np.nan], [2.3, 2.5]]),
    ]
    for step in (1, 2):
        host(step, {"scores": scores[step - 1], "score_in_range": np.ones((3, 2), bool), "mos": mos[step - 1],
                    "sample_tokens": np.array([5, 6, 7]), "sample_mask": np.array([True, True, False]),
                    "loss": float(step), "finite": True})  # fmt: skip
    ((step, prefix, scalars),) = logger.records
    pred, target = np.array([1.5, 2.0, 2.9, 4.2, 2.4]), np.array([1.0, 2.0, 3.0, 4.0, 2.5])
    assert (step, prefix) == (2, "grpo") and scalars["loss"] == 1.5
    np.testing.assert_allclose(scalars["srcc"], 1.0)
    np.testing.assert_allclose(scalars["plcc"], np.corrcoef(pred, target)[0, 1], rtol=1e-9)
    assert logger.lines == ["grpo step 1 sample (MOS 1.00): '5 6'", "grpo step 2 sample (MOS 4.00): '5 6'"]


OUT_OF_RANGE = [  # (completion, in range with score_numbers 1, with 2)
    ("<think>good</think><answer>4009</answer>", False, False),
    ("<think>good</think><answer>3.5</answer>", True, True),
    ("<answer>none</answer>", False, False),  # a parse failure is not "in range" either
    ("<answer>0.5</answer>", False, False),
    ("<answer>5</answer>", True, True),  # the ends belong to the scale
    ("<answer>1.00</answer>", True, True),
    ("<answer>-2</answer>", False, False),
    ("<answer>3 and 7</answer>", True, False),  # the second number counts only when the score uses it
]


def test_out_of_range_scores_are_flagged_in_the_jitted_step_path(proc):
    """Issue 23 item 3: a parsed score outside the prompt's 1-5 scale (`<answer>4009</answer>`) is out of range;
    `score_in_range` (what the rollout and its out_of_range_rate use) agrees with the regex reference."""
    end, pad = _ids(proc)["im_end_id"], _ids(proc)["endoftext_id"]
    rows = [proc.tokenizer(t, add_special_tokens=False)["input_ids"] + [end] for t, _, _ in OUT_OF_RANGE]
    tokens = np.full((len(rows), 24), pad, np.int32)
    mask = np.zeros(tokens.shape, bool)
    for i, r in enumerate(rows):
        tokens[i, : len(r)], mask[i, : len(r)] = r, True
    parser = build_parser(proc.tokenizer, max_numbers=5, vocab_size=1024)
    res = jax.jit(lambda p, t, m: p(t, m))(parser, tokens, mask)
    for numbers, column in ((1, 1), (2, 2)):
        got = jax.jit(grpo.score_in_range, static_argnums=(1, 2))(res, numbers, (1.0, 5.0))
        assert np.asarray(got).tolist() == [row[column] for row in OUT_OF_RANGE], numbers
        reference = []  # from the decoded text: the first `numbers` numbers (padded with the first), all in [1, 5]
        for t, m in zip(tokens, mask):
            p = parse_text(proc.decode(t[m], skip_special_tokens=True))
            used = (p.numbers[:numbers] + p.numbers[:1] * numbers)[:numbers]
            reference.append(p.count > 0 and all(1.0 <= x <= 5.0 for x in used))
        assert np.asarray(got).tolist() == reference


def test_host_metrics_leave_out_of_range_scores_out_of_the_correlations():
    class Logger:
        records = []

        def write(self, step, scalars, prefix="train"):
            self.records.append(scalars)

        def text(self, line):
            pass

    logger = Logger()
    host = grpo_job.HostMetrics(logger, None, log_every=1, sample_every=0, total_steps=1)
    scores = np.array([[1.0, 4009.0], [2.0, 2.0], [3.0, 3.0], [4.5, 3.5]])  # 4009: parsed, out of range
    in_range = np.array([[True, False], [True, True], [True, True], [True, True]])
    host(1, {"scores": scores, "score_in_range": in_range, "mos": np.array([1.0, 2.0, 3.0, 4.0]),
             "out_of_range_rate": 0.125, "finite": True})  # fmt: skip
    (scalars,) = logger.records
    np.testing.assert_allclose(scalars["plcc"], np.corrcoef([1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0])[0, 1])
    assert scalars["srcc"] == pytest.approx(1.0) and scalars["out_of_range_rate"] == 0.125


# ---- the step on a model that writes the format: cold-start SFT of the tiny model ----
class ColdStart:
    """The tiny model on the demo tokenizer, SFT'd on `<think>The quality is <level>.</think><answer>s</answer>`
    with s drawn uniformly in [1, 5] regardless of the image: it learns the format and a broad score distribution,
    not the MOS, so the accuracy reward has room to grow."""

    def __init__(self, proc, num_images=64, sft_steps=80):
        ids = _ids(proc)
        self.proc, self.ids = proc, ids
        self.config = tiny_config(
            vocab_size=ids["vocab_size"], eos_token_id=ids["im_end_id"], pad_token_id=ids["endoftext_id"]
        ).replace(**{k: ids[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                         "vision_end_token_id")})  # fmt: skip
        src = SyntheticIQA("train", size=num_images, min_side=56, max_side=56)
        records = [src[i] for i in range(num_images)]
        self.images = [decode_image(r["image"]) for r in records]
        self.mos = np.array([r["mos"] for r in records], np.float32)
        self.prompts = [
            proc.encode(prompts.image_messages(PROMPT), [im], add_generation_prompt=True) for im in self.images
        ]
        self.parser = build_parser(proc.tokenizer, max_numbers=5, vocab_size=self.config.text.vocab_size)
        mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
        self.graphdef, host, self.rest, shards = random_model(self.config, mesh, seed=0)
        tx, schedule, labels = optim.from_config(
            optim_cfg(peak_lr=3e-3, warmup_steps=5, end_lr_ratio=0.1), host, total_steps=sft_steps
        )
        abstract = st.abstract_train_state(host, tx, shards, mesh)
        state = st.init_train_state(host, tx, abstract, seed=0)
        sft = jax.jit(SFTStep(self.graphdef, self.rest, tx, schedule, labels).__call__, donate_argnums=0)
        rng = np.random.default_rng(0)
        self.sft_losses = []
        for _ in range(sft_steps):
            state, metrics = sft(state, self._sft_batch(rng, rng.integers(0, num_images, 16)))
            self.sft_losses.append(float(metrics["loss"]))
        self.params = jax.device_get(state.params)

    def _sft_batch(self, rng, indices):
        examples = []
        for i in indices:
            s = float(np.round(rng.uniform(1.0, 5.0), 1))
            response = f"<think>The quality is {prompts.level_of_score(s)}.</think><answer>{s:.1f}</answer>"
            examples.append(self.proc.encode(prompts.image_messages(PROMPT, response=response), [self.images[i]]))
        return self.proc.collate(examples)

    def prompt_batch(self, indices):
        return self.proc.collate([self.prompts[i] for i in indices], padding_side="left"), self.mos[indices]

    def grpo_step(self, settings, mesh, *, lr, total_steps, seed=1):
        """(jitted step fn, fresh state on `mesh`, reference params or None)."""
        _, host, _, shards = random_model(self.config, mesh, seed=0)
        cfg = optim_cfg(peak_lr=lr, warmup_steps=0, end_lr_ratio=1.0, weight_decay=0.0)
        tx, schedule, labels = optim.from_config(cfg, host, total_steps=total_steps * settings.updates_per_step)
        abstract = st.abstract_train_state(host, tx, shards, mesh)
        state = st.init_train_state(jax.tree.map(np.copy, self.params), tx, abstract, seed=seed)
        ref = jax.device_put(self.params, st.shardings_of(abstract).params) if settings.loss.beta > 0 else None
        step = grpo.GRPOStep(self.graphdef, self.rest, tx, schedule, labels, settings)
        return grpo.jit_grpo_step(step, st.shardings_of(abstract), mesh), state, ref


@pytest.fixture(scope="module")
def cold_start(proc):
    return ColdStart(proc)


@pytest.mark.slow
def test_step_sharded_matches_single_device(cold_start, proc):
    """mu = 2 passes x 2 minibatches with a k3 KL: rollouts, rewards, the loss and the updated parameters agree
    between one device and the (2,2,2) mesh, and the first update's importance ratio is 1."""
    settings = _settings(proc, loss=LossConfig(beta=0.04, eps_high=0.28), num_iterations=2, num_minibatches=2)
    batch, mos = cold_start.prompt_batch(np.arange(8))
    outs = {}
    for shape in ((1, 1, 1), (2, 2, 2)):
        mesh = sharding.make_mesh(shape, jax.devices()[: int(np.prod(shape))])
        fn, state, ref = cold_start.grpo_step(settings, mesh, lr=1e-3, total_steps=1)
        before = jax.device_get(state.params)
        state, metrics = fn(state, batch, mos, cold_start.parser, ref)
        outs[shape] = jax.device_get((state.params, metrics)) + (before,)
    (p1, m1, before), (p8, m8, _) = outs[(1, 1, 1)], outs[(2, 2, 2)]
    assert m1["finite"] and m8["finite"] and m1["format_rate"] > 0.3
    # some groups carry signal (whether any group is all-equal is sampling luck: the demo tokenizer, trained on a
    # corpus holding the prompts, changes when prompts.py does; zero-std masking is checked against the host reference
    # in test_rewards_and_advantages_from_token_ids_in_one_jit)
    assert m1["zero_std_fraction"] < 1.0
    np.testing.assert_array_equal(m1["sample_tokens"], m8["sample_tokens"])
    np.testing.assert_array_equal(m1["scores"], m8["scores"])
    for key in ("reward_mean", "reward/accuracy_mean", "advantage_abs_mean", "completion_length", "target_tokens"):
        np.testing.assert_allclose(m1[key], m8[key], rtol=1e-6, err_msg=key)
    for key in ("loss", "grad_norm", "kl", "entropy", "clip_fraction"):
        np.testing.assert_allclose(m1[key], m8[key], rtol=1e-4, atol=1e-7, err_msg=key)
    assert m1["first_ratio_max_dev"] < 1e-4 and m8["first_ratio_max_dev"] < 1e-4
    assert m1["kl"] > 0  # later updates moved away from the reference
    moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(before)))
    diff = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)))
    print(f"params moved {moved:.3e}, 1 vs 8 devices {diff:.3e}; loss {m1['loss']:.6e} vs {m8['loss']:.6e}")
    assert moved > 1e-3 and diff < 0.02 * moved, (moved, diff)  # measured: moved 4.0e-3, diff 1.2e-5


@pytest.mark.slow
def test_shared_prompt_step_matches_the_teacher_forced_step(cold_start, proc):
    """G = 4, M = 2, mu = 2 with a KL: the step that runs each prompt once per minibatch gives the same rollouts, loss,
    KL, gradient norm and updated parameters as the one that re-runs the prompt for every completion, and counts
    half the prompt tokens as processed."""
    batch, mos = cold_start.prompt_batch(np.arange(8))
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    outs = {}
    for share in (True, False):
        settings = _settings(proc, loss=LossConfig(beta=0.04), num_iterations=2, num_minibatches=2, share_prompts=share)
        assert settings.completions_per_prompt == (2 if share else 0)
        fn, state, ref = cold_start.grpo_step(settings, mesh, lr=1e-3, total_steps=1)
        before = jax.device_get(state.params)
        state, metrics = fn(state, batch, mos, cold_start.parser, ref)
        outs[share] = jax.device_get((state.params, metrics)) + (before,)
    (p_s, m_s, before), (p_f, m_f, _) = outs[True], outs[False]
    np.testing.assert_array_equal(m_s["scores"], m_f["scores"])
    for key in ("loss", "kl", "grad_norm", "entropy", "ratio_mean", "clip_fraction"):
        np.testing.assert_allclose(m_s[key], m_f[key], rtol=1e-4, atol=1e-7, err_msg=key)
    moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(p_f), jax.tree.leaves(before)))
    diff = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(p_s), jax.tree.leaves(p_f)))
    # fp32 reassociation noise, which AdamW's normalized updates amplify for near-zero gradients (the mesh test above
    # allows 0.02); measured 4.5e-6 of 4.0e-3 moved. A wrong gradient flips updates: diff ~ moved.
    assert moved > 1e-3 and diff < 0.01 * moved, (moved, diff)
    prompt_tokens = float(batch.attention_mask.sum())
    assert m_f["tokens"] - m_s["tokens"] == pytest.approx(
        2 * prompt_tokens * (4 - 2), rel=1e-6
    )  # (G - M) fewer prompt runs per pass, mu = 2 passes


@pytest.mark.slow
@pytest.mark.parametrize("bad", ["first update (nan image)", "second update (blown-up weights)"])
def test_a_nonfinite_update_leaves_the_whole_state_untouched(cold_start, proc, bad):
    """A NaN image makes the only update of a mu = 1 step non-finite (the in-place branch); a learning rate of 1e30
    with mu = 2 keeps the first update finite (checked alone) and makes the second one non-finite, so the first must
    be undone. Either way: `finite` False, and parameters, optimizer state, step and rng are exactly as before."""
    batch, mos = cold_start.prompt_batch(np.arange(8))
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    if bad.startswith("first"):
        pixels = np.array(batch.pixel_values)
        pixels[0] = np.nan  # the first prompt's image
        batch = batch.replace(pixel_values=pixels)
        passes, lr = 1, 1e-3
    else:
        fn, state, _ = cold_start.grpo_step(_settings(proc, loss=LossConfig(beta=0.0)), mesh, lr=1e30, total_steps=1)
        before = jax.device_get(state.params)
        state, metrics = fn(state, batch, mos, cold_start.parser, None)
        assert bool(metrics["finite"])  # the first update alone is finite and applied
        moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(before)))
        assert moved > 1e20
        passes, lr = 2, 1e30
    settings = _settings(proc, loss=LossConfig(beta=0.0), num_iterations=passes)
    fn, state, _ = cold_start.grpo_step(settings, mesh, lr=lr, total_steps=1)
    before = jax.device_get(state)
    state, metrics = fn(state, batch, mos, cold_start.parser, None)
    assert not bool(metrics["finite"]) and not np.isfinite(float(metrics["loss"]))
    after = jax.device_get(state)
    assert int(after.step) == int(before.step) == 0
    for name, a, b in (("params", after.params, before.params), ("opt_state", after.opt_state, before.opt_state)):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)
    np.testing.assert_array_equal(np.asarray(after.rng), np.asarray(before.rng))


@pytest.mark.slow
def test_grpo_raises_the_accuracy_reward(cold_start, proc):
    """30 steps of 8 prompts x 8 rollouts with a linear accuracy reward: the mean accuracy reward of the last 5
    steps beats that of the first 5 by a clear margin (measured: 0.354 -> 0.641)."""
    assert cold_start.sft_losses[-1] < 0.5 * cold_start.sft_losses[0]
    settings = _settings(
        proc,
        num_generations=8,
        loss=LossConfig(beta=0.0, norm_length=20),
        rewards=(grpo.RewardTerm("format", 0.2), grpo.RewardTerm("accuracy", 1.0, (("mode", "linear"),))),
    )
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    steps = 30
    fn, state, _ = cold_start.grpo_step(settings, mesh, lr=1e-3, total_steps=steps)
    rng = np.random.default_rng(1)
    accuracy = []
    for _ in range(steps):
        batch, mos = cold_start.prompt_batch(rng.choice(len(cold_start.mos), 8, replace=False))
        state, metrics = fn(state, batch, mos, cold_start.parser, None)
        accuracy.append(float(metrics["reward/accuracy_mean"]))
        assert bool(metrics["finite"])
    first, last = np.mean(accuracy[:5]), np.mean(accuracy[-5:])
    print(f"accuracy reward: first 5 steps {first:.3f}, last 5 steps {last:.3f}")
    assert last > first + 0.1, (first, last, accuracy)
    assert int(state.step) == steps


@pytest.mark.slow
def test_preresq_tiny_job_runs_out_of_the_box(tmp_path):
    config = preresq.get_config("tiny").unlock()
    config.train.total_steps = 2
    config.train.log_every = 2
    config.grpo.max_new_tokens = 16
    config.grpo.num_generations = 3
    config.data.batch_size = 8  # the tests' 8 simulated devices split the prompts
    config.data.synthetic_size = 16
    result = grpo_job.run(config.lock(), tmp_path)
    assert result.status == "done" and int(result.state.step) == 2
    from qponder_jax.train.logging import read_metrics

    (record,) = read_metrics(tmp_path, prefix="grpo")
    assert record["step"] == 2 and record["parse_failure_rate"] == 1.0  # a random model writes no score
    assert {"reward/preresq_mean", "reward/format_mean", "zero_std_fraction", "kl", "srcc"} <= set(record)
    assert record["out_of_range_rate"] == 0.0  # nothing parsed: nothing out of range either
    assert (tmp_path / "checkpoints" / "2").is_dir()
