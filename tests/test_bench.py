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


def test_layer_fit_is_exact_on_linear_plans():
    a, bt, bv = 5e9, 3e8, 7e7
    points = {p: a + bt * p[0] + bv * p[1] for p in memory.FIT_POINTS}
    assert memory.fit_layers(points, 28, 32) == pytest.approx(a + bt * 28 + bv * 32)


@pytest.mark.slow
def test_memory_smoke_and_fit_validation(tmp_path, capsys):
    argv = ["memory", "--models", "tiny", "--devices", "8", "--scale", "0.1", "--validate"]
    result, printed = _run(tmp_path, capsys, argv, "memory.json")
    assert {(c["step"], c["devices"]) for c in result["cases"]} == {("sft", 8), ("grpo", 8)}
    for case in result["cases"]:
        assert case["bytes"] > 0 and case["gib"] == pytest.approx(case["bytes"] / 2**30)
        assert case["fits"] == {str(h): case["gib"] <= h for h in memory.HBM_GIB}
        # the per-layer fit predicts a directly compiled (3, 3)-layer model's plan
        assert case["validation"]["relative_error"] < 0.1, case["validation"]
    assert "GiB/device" in printed
