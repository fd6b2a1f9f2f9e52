"""Smoke tests of `python -m qponder_jax.bench` at the smallest sizes: each subcommand runs, prints its table and
writes well-formed JSON whose figures are consistent with each other (never its speed); the memory plan's per-layer
fit is exact on linear data and matches a direct compile of a deeper model."""

import json
import math

import pytest

from qponder_jax import bench
from qponder_jax.benchmarks import memory


def _run(tmp_path, capsys, argv, name):
    bench.main([*argv, "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    return json.loads((tmp_path / name).read_text()), printed


def _check_rows(rows, metrics):
    by_metric = {r["metric"]: r for r in rows}
    assert set(metrics) <= set(by_metric), by_metric.keys()
    for r in rows:
        assert r["ours"] is not None and math.isfinite(r["ours"])
    return by_metric


def test_sft_smoke(tmp_path, capsys):
    argv = ["sft", "--size", "tiny", "--batch", "2", "--tokens", "40", "--repeats", "1", "--matmul-n", "256"]
    result, printed = _run(tmp_path, capsys, argv, "sft_tiny.json")
    (res,) = result["results"]
    rows = _check_rows(res["table"], ["step seconds (median)", "tokens/s", "model FLOP/s", "first-step loss"])
    step = rows["step seconds (median)"]
    assert step["ratio"] == pytest.approx(step["reference"] / step["ours"])
    assert rows["tokens/s"]["ours"] == pytest.approx(2 * 40 / step["ours"])
    assert rows["model FLOP/s"]["ours"] == pytest.approx(res["flops_per_step"] / step["ours"])
    # same weights and batch on both sides: the first step's losses agree (the same work is timed)
    assert rows["first-step loss"]["ours"] == pytest.approx(rows["first-step loss"]["reference"], rel=1e-4)
    m = result["matmul"]
    assert m["jnp_flops"] > 0 and m["torch_over_jnp"] == pytest.approx(m["torch_flops"] / m["jnp_flops"])
    assert "fraction of machine matmul peak" in printed and "torch / jnp" in printed


def test_bench_decode_smoke(tmp_path, capsys):
    argv = ["decode", "--size", "tiny", "--batch", "2", "--new-tokens", "4", "--repeats", "1", "--out", str(tmp_path)]
    bench.main(argv)
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "decode_tiny.json").read_text())
    assert result["ours"]["tokens_per_s"] > 0 and result["reference"]["tokens_per_s"] > 0
    assert result["ratio"] == pytest.approx(result["ours"]["tokens_per_s"] / result["reference"]["tokens_per_s"])
    assert result["workload"]["batch"] == 2 and result["workload"]["new_tokens"] == 4
    assert result["workload"]["prompt_tokens"] == 64 and result["tokens_equal"] is not None
    assert "tokens/s" in printed and "ratio" in printed
    # absolute rates: 2 FLOPs per decoder + LM-head weight per token (tiny: 0.43M weights, no embedding, no vision)
    ours = result["ours"]
    assert 0.3e6 < ours["decode_weights"] < 0.6e6
    assert ours["model_flops_per_s"] == pytest.approx(2 * ours["decode_weights"] * ours["tokens_per_s"])
    assert ours["weight_bytes_per_s"] == pytest.approx(4 * ours["decode_weights"] * ours["tokens_per_s"] / 2)
    assert "mfu" not in ours and result["device"]["platform"] == "cpu"  # MFU only against an accelerator's peak

    bench.main(["decode", "--size", "tiny", "--batch", "2", "--new-tokens", "4", "--repeats", "1", "--no-reference",
                "--out", str(tmp_path / "alone")])  # fmt: skip
    alone = json.loads((tmp_path / "alone" / "decode_tiny.json").read_text())
    assert alone["reference"] is None and alone["ratio"] is None and alone["ours"]["tokens_per_s"] > 0
    assert "reference skipped" in capsys.readouterr().out


def test_decode_smoke_in_bf16(tmp_path, capsys):
    """Both sides in bf16 (the reference's weights cast); the sampler casts the fp32 weights once, so the weight bytes
    read per step are 2 per weight."""
    argv = ["decode", "--size", "tiny", "--batch", "2", "--new-tokens", "4", "--repeats", "1", "--dtype", "bfloat16"]
    result, printed = _run(tmp_path, capsys, argv, "decode_tiny.json")
    ours = result["ours"]
    assert result["workload"]["dtype"] == "bfloat16" and "bfloat16" in printed
    assert ours["weight_bytes_per_s"] == pytest.approx(2 * ours["decode_weights"] * ours["tokens_per_s"] / 2)
    assert result["reference"]["device"] == "cpu" and "torch, cpu" in result["reference"]["name"]
    assert 0.0 <= result["tokens_equal"] <= 1.0


def test_reference_on_cuda_without_a_gpu_is_a_clear_error(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    with pytest.raises(RuntimeError, match="--reference-device cuda: torch sees no CUDA device"):
        bench.main(["decode", "--size", "tiny", "--batch", "2", "--new-tokens", "2", "--reference-device", "cuda"])


@pytest.mark.slow
def test_grpo_smoke_against_trl(tmp_path, capsys):
    pytest.importorskip("trl")
    argv = ["grpo", "--prompts", "2", "--generations", "2", "--new-tokens", "4", "--repeats", "1"]
    result, printed = _run(tmp_path, capsys, argv, "grpo_tiny.json")
    ours, ref = result["ours"], result["reference"]
    for side in (ours, ref):
        assert min(side["step"], side["rollout"], side["reward"]) > 0
        assert side["rollout"] + side["reward"] + side["update"] == pytest.approx(side["step"], rel=0.5, abs=0.05)
    _check_rows(result["table"], ["step seconds", "rollout seconds", "reward seconds", "update seconds"])
    assert "TRL" in printed


def test_grpo_smoke_without_reference(tmp_path, capsys):
    argv = ["grpo", "--prompts", "2", "--generations", "2", "--new-tokens", "4", "--repeats", "1", "--no-reference"]
    result, printed = _run(tmp_path, capsys, argv, "grpo_tiny.json")
    assert result["reference"] is None and "skipped" in result["reference_note"]
    rows = _check_rows(result["table"], ["step seconds", "rollout seconds", "update seconds"])
    assert rows["step seconds"]["reference"] is None and rows["step seconds"]["ratio"] is None
    assert "n/a" in printed


@pytest.mark.parametrize("step", ["sft", "grpo"])
def test_layer_fit_is_exact_on_linear_plans(step):
    a, bt, bv = 5e9, 3e8, 7e7
    points = {p: a + bt * p[0] + bv * p[1] for p in memory.FIT_POINTS[step]}
    assert memory.fit_layers(points, 28, 32, step) == pytest.approx(a + bt * 28 + bv * 32)


def test_grpo_layer_fit_starts_past_the_knee():
    """GRPO's plan is flat from one to two layers and grows per layer only after (7B on 64 devices, GiB, compiled):
    the fit must come from the linear part, or it predicts a third of the full-depth plan (37.2 GiB compiled)."""
    compiled = {(1, 1): 3.418, (2, 1): 3.766, (4, 1): 6.414, (8, 1): 11.121, (14, 1): 18.056, (4, 2): 6.512}
    fit = memory.fit_layers({p: compiled[p] for p in memory.FIT_POINTS["grpo"]}, 28, 32, "grpo")
    assert 37.2 <= fit <= 37.2 * 1.1
    assert memory.fit_layers({p: compiled[p] for p in memory.FIT_POINTS["grpo"]}, 14, 1, "grpo") == pytest.approx(
        compiled[(14, 1)], rel=0.02
    )


def test_memory_native_platform(tmp_path, capsys):
    """`--platform native` compiles on this machine's own backend (here the test process's 8 CPU devices, inherited
    through XLA_FLAGS) and says plainly when the mesh is larger than the machine."""
    argv = ["memory", "--models", "tiny", "--steps", "sft", "--scale", "0.1", "--direct", "--platform", "native"]
    result, printed = _run(tmp_path, capsys, [*argv, "--devices", "2"], "memory.json")
    assert result["platform"] == "native" and [c["platform"] for c in result["cases"]] == ["cpu"]
    assert result["cases"][0]["bytes"] > 0 and "direct, cpu" in printed
    with pytest.raises(ValueError, match="needs 4096 devices, this cpu backend has 8"):
        bench.main([*argv, "--devices", "4096", "--out", str(tmp_path / "too_many")])


def test_memory_attn_impl_reaches_the_planned_model(tmp_path, monkeypatch):
    """`--attn-impl splash` reaches the worker's model: on this CPU (not in Pallas interpret mode) its first attention
    call refuses to trace the TPU kernel; the simulated CPU devices refuse a kernel before any worker starts."""
    monkeypatch.delenv("QPONDER_SPLASH_INTERPRET", raising=False)
    argv = ["memory", "--models", "tiny", "--steps", "sft", "--scale", "0.1", "--direct", "--devices", "2"]
    argv += ["--attn-impl", "splash"]
    with pytest.raises(ValueError, match="--attn-impl splash needs --platform native"):
        bench.main([*argv, "--out", str(tmp_path / "cpu")])
    with pytest.raises(RuntimeError, match="attn_impl 'splash' runs a TPU kernel and this backend is 'cpu'"):
        bench.main([*argv, "--platform", "native", "--out", str(tmp_path / "native")])


@pytest.mark.slow
def test_memory_smoke_and_fit_validation(tmp_path, capsys):
    argv = ["memory", "--models", "tiny", "--devices", "8", "--scale", "0.1", "--validate"]
    result, printed = _run(tmp_path, capsys, argv, "memory.json")
    assert {(c["step"], c["devices"]) for c in result["cases"]} == {("sft", 8), ("grpo", 8)}
    for case in result["cases"]:
        assert (case["platform"], case["devices"]) == ("cpu", 8)
        assert case["bytes"] > 0 and case["gib"] == pytest.approx(case["bytes"] / 2**30)
        assert case["fits"] == {str(h): case["gib"] <= h for h in memory.HBM_GIB}
        # the per-layer fit predicts the plan of a directly compiled deeper model
        assert case["validation"]["layers"] == list(memory.VALIDATE_POINTS[case["step"]])
        assert case["validation"]["relative_error"] < 0.1, case["validation"]
    assert "GiB/device" in printed
    # the same GRPO plan without prompt sharing (G 8 / M 2: shared by default) is a different program; both compiled
    # at full depth (the tiny model's 2 layers), one compile each
    argv = [*argv[:-1], "--steps", "grpo", "--direct"]
    shared, _ = _run(tmp_path / "shared", capsys, argv, "memory.json")
    unshared, _ = _run(tmp_path / "unshared", capsys, [*argv, "--no-share-prompts"], "memory.json")
    assert unshared["workload"]["grpo"]["share_prompts"] is False and shared["workload"]["grpo"]["share_prompts"]
    assert [c["method"] for c in shared["cases"] + unshared["cases"]] == ["direct", "direct"]
    assert unshared["cases"][0]["bytes"] != shared["cases"][0]["bytes"]


# ---- the memory fixes the plan relies on: chunked log-probs, weights tied to their loop / layer ----


@pytest.mark.parametrize("temperature,chunk", [(1.0, 16), (0.7, 16), (0.7, 25), (1.0, 64)])
def test_chunked_logprobs_equal_dense(temperature, chunk):
    """Vocab 50 in chunks of 16 (the last one padded), 25 (no padding) or one chunk: same log-probs, entropies and
    gradients (the hand-written backward) as dense logits."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from qponder_jax.train import grpo_loss as gl

    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.standard_normal((3, 5, 8)), jnp.float32)  # [N, L, D]
    w = jnp.asarray(rng.standard_normal((8, 50)), jnp.float32)  # [D, V]
    tokens = jnp.asarray(rng.integers(0, 50, (3, 5)), jnp.int32)
    weights = jnp.asarray(rng.standard_normal((3, 5)), jnp.float32)

    def dense(h, w):
        logits = jnp.einsum("nld,dv->nlv", h, w)
        return gl.token_logprobs(logits, tokens, temperature), gl.token_entropy(logits, temperature)

    chunked = lambda h, w: gl.chunked_token_logprobs(h, w, tokens, temperature, chunk=chunk)
    (logp_d, ent_d), (logp_c, ent_c) = dense(hidden, w), jax.jit(chunked)(hidden, w)
    np.testing.assert_allclose(logp_c, logp_d, atol=1e-5)
    np.testing.assert_allclose(ent_c, ent_d, atol=1e-5)
    assert float(jnp.max(jnp.abs(logp_d))) > 1.0  # non-trivial log-probs
    grad = lambda f: jax.grad(lambda h, w: jnp.sum(f(h, w)[0] * weights), argnums=(0, 1))(hidden, w)
    for got, want in zip(jax.jit(lambda: grad(chunked))(), grad(dense), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_grpo_update_logprobs_equal_dense_model_logits():
    """The GRPO update's log-probs (hidden states -> chunked head, completion positions only) equal the dense
    `model(batch)` logits path for the completion tokens."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from qponder_jax.model.config import tiny_config
    from qponder_jax.model.qwen2_5_vl import create_model
    from qponder_jax.train import grpo as grpo_lib
    from qponder_jax.train import grpo_loss as gl
    from qponder_jax.train import state as state_lib

    config = tiny_config()
    model = create_model(config, rngs_seed=1)
    graphdef, params, rest = state_lib.split_model(model)
    # the teacher-forced path (the shared-prompt one is checked against it in test_grpo.py); vocab 512 -> 6 chunks
    settings = grpo_lib.GRPOSettings(max_new_tokens=6, logprob_chunk=100, share_prompts=False)
    step = grpo_lib.GRPOStep(graphdef, rest, optax.sgd(0.0), optax.constant_schedule(0.0), {}, settings)
    batch = _text_batch(config, rows=2, prompt=5, completion=6)
    tokens = jnp.asarray(batch.input_ids[:, 5:])
    mb = grpo_lib.Minibatch(batch=batch, tokens=tokens, mask=None, old_logp=None, advantages=None, ref_logp=None)
    prompts = batch.replace(input_ids=batch.input_ids[:, :5])  # only the prompt length is read
    logp, entropy = jax.jit(lambda p: step._completion_logp(p, mb, prompts))(params)
    logits = gl.completion_logits(model(batch), 5)  # [2, 6, V]
    np.testing.assert_allclose(logp, gl.token_logprobs(logits, tokens), atol=1e-5)
    np.testing.assert_allclose(entropy, gl.token_entropy(logits), atol=1e-5)


def _text_batch(config, rows: int, prompt: int, completion: int):
    """A text-only batch of prompt + completion tokens (no image rows)."""
    import numpy as np

    from qponder_jax.data.batch import Batch

    t = prompt + completion
    rng = np.random.default_rng(3)
    i32 = np.int32
    empty = lambda *shape: np.zeros((rows, 0, *shape), i32)
    return Batch(
        input_ids=rng.integers(0, 400, (rows, t)).astype(i32), attention_mask=np.ones((rows, t), bool),
        position_ids=np.broadcast_to(np.arange(t, dtype=i32), (3, rows, t)).copy(), rope_deltas=np.zeros(rows, i32),
        loss_mask=np.ones((rows, t), bool), pixel_values=np.zeros((rows, 0, config.vision.patch_dim), np.float32),
        image_grid_thw=np.zeros((rows, 0, 3), i32), vision_pos_ids=empty(2), window_index=empty(),
        window_segment_ids=empty(), full_segment_ids=empty(), image_feature_index=np.full((rows, t), -1, i32),
    )  # fmt: skip


def test_layer_weight_all_gathers_stay_inside_a_loop():
    """A loop that runs the decoder with invariant FSDP-sharded weights (the decode loop, the reference log-prob map,
    gradient accumulation): every weight all-gather stays in the loop body. Without the per-layer tie, XLA hoists
    them out and keeps every layer's unsharded weights live for the whole loop."""
    import re

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from qponder_jax.model import sharding
    from qponder_jax.model.config import tiny_config
    from qponder_jax.model.text import TextModel

    config = tiny_config().text
    mesh = sharding.make_mesh((1, 8, 1))
    model = sharding.create_sharded(lambda: TextModel(config, rngs=nnx.Rngs(0)), mesh)
    graphdef, state = nnx.split(model)
    b, t = 8, 4

    def run(state, x):
        positions = jnp.broadcast_to(jnp.arange(t), (3, b, t))
        body = lambda i, x: nnx.merge(graphdef, state)(x, positions, jnp.ones((b, t), jnp.int32))[0]
        return jax.lax.fori_loop(0, 3, body, x)

    x = jax.ShapeDtypeStruct((b, t, config.hidden_size), jnp.float32)
    with jax.set_mesh(mesh):
        hlo = jax.jit(run).lower(state, x).compile().as_text()
    computations = re.split(r"\n(?=\S)", hlo)
    entry = next(c for c in computations if c.startswith("ENTRY"))
    gathers = [c for c in computations if "all-gather(" in c]
    assert gathers, "the weights should be all-gathered (FSDP)"
    assert "all-gather(" not in entry, "a weight all-gather was hoisted out of the loop"


def test_sft_chunked_loss_equals_dense_model_logits():
    """The SFT step's loss (hidden states -> chunked head) equals `next_token_loss` on `model(batch)`'s logits."""
    import jax
    import numpy as np

    from qponder_jax.model.config import tiny_config
    from qponder_jax.model.qwen2_5_vl import create_model
    from qponder_jax.train import sft

    config = tiny_config()
    model = create_model(config, rngs_seed=2)
    batch = _text_batch(config, rows=2, prompt=5, completion=6)
    batch = batch.replace(loss_mask=np.arange(11)[None, :].repeat(2, 0) >= 4)
    want = sft.next_token_loss(model(batch), batch.input_ids, batch.loss_mask)
    got = jax.jit(lambda: sft.chunked_next_token_loss(model, batch, chunk=100))()
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    assert float(got[1]) == float(want[1]) == 14.0
