"""`benchmarks.hlo` against XLA's own accounting (cost_analysis FLOPs, loop trip counts, each collective kind with its
groups, bf16 values XLA:CPU widens for a collective) and `bench plan` end to end at the smallest size."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from qponder_jax import bench
from qponder_jax.benchmarks import hlo, plan


def _compiled(fn, *args):
    return jax.jit(fn).lower(*args).compile()


def test_matmul_flops_equal_xla_cost_analysis_and_loops_count_their_trips():
    x, w = jnp.ones((64, 256)), jnp.ones((256, 512))
    plain = _compiled(lambda x, w: jnp.tanh(x @ w) @ w.T, x, w)
    ours, xla = hlo.cost(hlo.parse(plain.as_text())), plain.cost_analysis()
    assert ours.flops == 2 * (64 * 256 * 512) * 2
    assert ours.flops == pytest.approx(xla["flops"], rel=0.01)  # XLA adds the elementwise ops: under 1% here
    assert ours.hbm_bytes == pytest.approx(xla["bytes accessed"], rel=0.25)

    def scanned(x, w):  # 7 iterations: XLA's cost_analysis counts the body once
        return jax.lax.scan(lambda c, _: (jnp.tanh(c @ w[:, :256]), None), x, None, length=7)[0]

    looped = _compiled(scanned, x, w)
    assert hlo.cost(hlo.parse(looped.as_text())).flops == 7 * 2 * 64 * 256 * 256
    assert looped.cost_analysis()["flops"] < 2 * 2 * 64 * 256 * 256

    def early_exit(x, w):  # no known trip count: counted once, as the decode step
        cond = lambda c: (c[1] < 5) & (c[0][0, 0] < 1e6)
        return jax.lax.while_loop(cond, lambda c: (jnp.tanh(c[0] @ w[:, :256]), c[1] + 1), (x, 0))[0]

    module = hlo.parse(_compiled(early_exit, x, w).as_text())
    (loop,) = hlo.decode_loops(module)
    phases = hlo.phase_costs(module, lambda _: "")
    assert phases[hlo.DECODE_STEP].flops == 2 * 64 * 256 * 256
    assert hlo.cost(module, loop.body).flops == 2 * 64 * 256 * 256


def test_collectives_by_kind_with_their_groups():
    """Each kind once, under shard_map on a (2, 4) mesh, f32 [4, 64] per device = 1 KiB."""
    mesh = jax.make_mesh((2, 4), ("a", "b"), axis_types=(jax.sharding.AxisType.Auto,) * 2)

    def body(x):
        gathered = jax.lax.all_gather(x, "b", tiled=True)  # [16, 64], groups of 4
        summed = jax.lax.psum(x, "a")  # groups of 2
        scattered = jax.lax.psum_scatter(gathered, "b", tiled=True)  # [16, 64] -> [4, 64]
        swapped = jax.lax.all_to_all(x, "b", 0, 0, tiled=True)
        shifted = jax.lax.ppermute(x, "b", [(i, (i + 1) % 4) for i in range(4)])
        return gathered.sum() + summed + scattered + swapped + shifted

    fn = jax.shard_map(body, mesh=mesh, in_specs=P(("a", "b")), out_specs=P(("a", "b")))
    c = hlo.cost(hlo.parse(_compiled(fn, jnp.ones((32, 64))).as_text()))
    kib = 1024.0
    assert c.collectives == {"all-gather": 4 * kib, "all-reduce": kib, "reduce-scatter": 4 * kib, "all-to-all": kib,
                             "collective-permute": kib}  # fmt: skip
    # ring traffic received per device: (n-1)/n of the array, twice for an all-reduce; a permute moves it once
    assert c.wire == {"all-gather": 3 * kib, "all-reduce": kib, "reduce-scatter": 3 * kib, "all-to-all": 0.75 * kib,
                      "collective-permute": kib}  # fmt: skip
    assert c.by_group["4"] == 3 * kib + 3 * kib + 0.75 * kib
    assert c.by_dtype["all-gather f32"] == 4 * kib


def test_a_bf16_value_widened_for_a_collective_counts_as_bf16():
    """XLA:CPU has no bf16 all-gather: it widens the cast value to f32, gathers and narrows. An accelerator gathers
    the bf16 value, so the reader counts it at bf16 size; a gather of f32 values stays f32."""
    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    x = jax.device_put(jnp.ones((1024, 256)), jax.NamedSharding(mesh, P("x")))

    def gathered(dtype):
        def f(x):
            y = jax.lax.with_sharding_constraint(x.astype(dtype), P("x"))
            return jax.lax.with_sharding_constraint(y, P()) * 2

        with jax.set_mesh(mesh):
            return hlo.cost(hlo.parse(_compiled(f, x).as_text()))

    narrow, wide = gathered(jnp.bfloat16), gathered(jnp.float32)
    assert narrow.by_dtype == {"all-gather bf16 (as f32)": 1024 * 256 * 4}  # what the CPU program moves
    assert narrow.wire == {"all-gather": 1024 * 256 * 2 * 7 / 8}  # what an accelerator would: the bf16 values
    assert wide.by_dtype == {"all-gather f32": 1024 * 256 * 4}
    assert wide.wire == {"all-gather": 1024 * 256 * 4 * 7 / 8}


def test_bf16_weights_widened_for_a_cpu_matmul_count_as_read_once_narrow():
    """XLA:CPU converts bf16 matmul operands to f32 first (a convert kernel: read bf16, write f32; then the matmul
    reads f32). An accelerator's matmul reads the bf16 weights once: that is what the HBM model counts."""
    x, w = jnp.ones((32, 512), jnp.bfloat16), jnp.ones((512, 1024), jnp.bfloat16)
    compiled = _compiled(lambda x, w: jnp.tanh(x @ w), x, w)
    assert "convert" in compiled.as_text()
    ours = hlo.cost(hlo.parse(compiled.as_text())).hbm_bytes
    narrow = (32 * 512 + 512 * 1024 + 32 * 1024) * 2  # read x and w, write the result, all bf16
    assert narrow <= ours <= narrow + 32 * 1024 * 4 * 2  # plus at most an f32 [32, 1024] intermediate, out and in
    assert compiled.cost_analysis()["bytes accessed"] > 1.5 * ours  # XLA:CPU's own count has the converts


def test_fit_and_roofline_arithmetic():
    points = {p: {"memory": 1.0 + 2 * p[0] + 3 * p[1], "phases": {"update": {"flops": 10.0 * p[0], "collectives": {}}}}
              for p in plan.FIT_POINTS["grpo"]}  # fmt: skip
    fitted = plan.fit(points, 28, 32, "grpo")
    assert fitted["memory"] == pytest.approx(1 + 2 * 28 + 3 * 32)
    assert fitted["phases"]["update"] == {"flops": pytest.approx(280.0), "collectives": {}}  # empty sections stay
    chip = plan.CHIPS["h100"]
    cost = {"flops": 989e12, "hbm_bytes": 3.35e12 * 2, "by_group": {"8": 450e9, "16": 50e9 * 4}}
    t = plan.phase_time(cost, chip)  # 1 s compute, 2 s HBM, 1 s NVLink + 4 s beyond the node
    assert (t["compute"], t["hbm"], t["interconnect"]) == pytest.approx((1.0, 2.0, 5.0))
    assert t["bound"] == "interconnect" and t["seconds"] == pytest.approx(5.0)


def test_plan_generate_smoke(tmp_path, capsys):
    """The tiny model's `generate` on 8 devices, full depth, decoding in tensor groups of 4: both cases compile, the
    new layout's decode step gathers no weights, the JSON and the roofline add up."""
    argv = ["plan", "--models", "tiny", "--steps", "generate", "--devices", "8", "--layout", "decode:4", "--scale",
            "0.1", "--direct", "--chips", "v5p,h100", "--out", str(tmp_path)]  # fmt: skip
    bench.main(argv)
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "plan.json").read_text())
    old, new = result["cases"]
    assert (old["case"], old["layout"], old["mesh"]) == ("old", "train", [1, 8, 1])
    assert (new["case"], new["layout"], new["mesh"]) == ("new", "decode:4", [1, 8, 1])
    assert old["decode_loops"] == new["decode_loops"] == 1
    assert set(new["phases"]) >= {"reshard", "prefill", "decode step"}
    old_step, new_step = old["phases"]["decode step"], new["phases"]["decode step"]
    assert old_step["collectives"]["all-gather"] > 10 * new_step["collectives"].get("all-gather", 0.0)  # activations
    assert old_step["flops"] == pytest.approx(new_step["flops"], rel=0.05)  # the same decode, laid out differently
    for case in result["cases"]:
        r = case["roofline"]["h100"]
        tokens = result["workload"]["generate"]["new_tokens"]
        assert r["phases"]["decode step"]["count"] == tokens
        assert r["step_seconds"] == pytest.approx(sum(p["total"] for p in r["phases"].values()))
    assert "decode step, per token" in printed and "roofline MODEL" in printed


def test_plan_rejects_unknown_settings():
    with pytest.raises(ValueError, match="--attn-impl 'nope'"):
        bench.main(["plan", "--models", "tiny", "--attn-impl", "nope"])
    with pytest.raises(ValueError, match="--attn-impl splash needs --platform native"):
        bench.main(["plan", "--models", "tiny", "--attn-impl", "splash"])
    with pytest.raises(ValueError, match="--mesh 1,3,1"):
        bench.main(["plan", "--models", "tiny", "--devices", "8", "--mesh", "1,3,1"])
    with pytest.raises(ValueError, match="sampling layout 'decode:x'"):
        bench.main(["plan", "--models", "tiny", "--layout", "decode:x"])
    with pytest.raises(ValueError, match="chip"):
        bench.main(["plan", "--models", "tiny", "--chips", "tpu9"])


@pytest.mark.slow
def test_plan_grpo_smoke(tmp_path):
    """The tiny model's GRPO step (scaled down) on 8 devices by the per-layer fit: every phase is there, the decode
    step moves no weights in the new layout, and the planned memory stays within 10% of the old."""
    argv = ["plan", "--models", "tiny", "--devices", "8", "--scale", "0.1", "--chips", "v5p", "--out", str(tmp_path)]
    bench.main(argv)
    old, new = json.loads((tmp_path / "plan.json").read_text())["cases"]
    assert set(old["phases"]) >= {"prefill", "decode step", "reference", "update"}
    assert (
        new["phases"]["decode step"]["collectives"].get("all-gather", 0.0)
        < 0.01 * (old["phases"]["decode step"]["collectives"]["all-gather"])
    )
    assert new["memory"] <= 1.1 * old["memory"]
    assert np.isfinite(new["roofline"]["v5p"]["step_seconds"])


def test_a_lookup_reads_its_rows_not_the_table():
    table, ids = jnp.ones((4096, 256)), jnp.arange(8, dtype=jnp.int32) * 7
    compiled = _compiled(lambda t, i: jnp.take(t, i, axis=0) * 2, table, ids)
    ours = hlo.cost(hlo.parse(compiled.as_text())).hbm_bytes
    assert ours <= 4 * (8 * 256 * 4) + 64  # the rows read and written (a gather and its multiply), the ids
