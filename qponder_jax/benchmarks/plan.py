"""`plan`: what one GRPO step (or one `generate` call) costs per device, read from its compiled program, in the old
layout and the new one side by side; then a roofline MODEL of the step on named chips.

    python -m qponder_jax.bench plan --out runs/plan                    # 7B GRPO on 64 devices, old vs new
    python -m qponder_jax.bench plan --devices 8 --chips h100,h200      # 8 x H100 / H200

Each case compiles the step as `bench memory` does (abstract arrays, N simulated CPU devices in a subprocess, the
per-layer fit from reduced depths unless `--direct`) and reads, per device: the planned memory (`memory_analysis()`),
and from the HLO (`benchmarks.hlo`) matmul FLOPs, HBM bytes and collective bytes by kind, split into phases by the
op metadata: `reshard` (the sampler's once-per-call cast and reshard), `prefill`, `decode step` (ONE iteration of
the early-exit decode loop: per generated token), `reference` (the KL reference's log-probs), `update` (all mu x M
optimizer updates) and `other` (rewards, advantages, the loop's once-per-call work).

The cases, on `--mesh` (default (1, N, 1), every config's mesh): "old" decodes in the training layout, as every
config did before the decode layout; "new" in the layout a run resolves (`--layout`, default auto: for 7B in bf16,
tensor groups of 4). `--old-mesh` puts the old case on another mesh.

The roofline is a model, not a measurement: each phase takes max(FLOPs / peak, HBM bytes / bandwidth, interconnect
bytes / bandwidth) on the named chip, from the CPU program's counts (XLA:CPU fuses differently, so HBM bytes are
its kernels' traffic; it has no bf16 collectives, so a bf16 value it widens to f32 for one is counted at bf16). The
decode step counts `new_tokens` times (no early exit). Interconnect: ring algorithms (`hlo.Cost.wire`), each device
receiving at the chip's one-direction bandwidth; on GPUs, a group larger than one NVLink domain (8) at the
scale-out network's. Nothing overlaps, so the sum is an upper bound of this model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

from qponder_jax.benchmarks import memory

PHASES = ("reshard", "prefill", "decode step", "reference", "update", "other")
# `generate` as configs/eval.py's real variants call it: 32 images per call, 256 new tokens, greedy
GENERATE = {"prompts": 32, "tokens": 512, "patches": 1024, "new_tokens": 256}
FIT_POINTS = {"grpo": memory.FIT_POINTS["grpo"], "generate": memory.FIT_POINTS["sft"]}  # (text layers, vision blocks)


@dataclasses.dataclass(frozen=True)
class Chip:
    """Per-chip peak figures for the roofline model."""

    peak_flops: float  # dense bf16 FLOP/s
    hbm_bandwidth: float  # bytes/s
    hbm_bytes: float  # capacity
    link_bandwidth: float  # interconnect bytes/s one direction (half the bidirectional figure)
    domain: int  # devices reachable at link_bandwidth (TPU: the whole ICI slice; GPU: one NVLink node)
    scale_out_bandwidth: float  # bytes/s per device beyond the domain (GPU: InfiniBand; TPU: unused here)
    source: str


CHIPS = {
    "v5e": Chip(197e12, 819e9, 16e9, 200e9, 256, 0.0,
                "cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16, 16 GB HBM at 819 GB/s, ICI 1,600 Gbit/s "
                "(400 GB/s bidirectional)"),
    "v5p": Chip(459e12, 2765e9, 95e9, 600e9, 8960, 0.0,
                "cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16, 95 GB HBM2e at 2,765 GB/s, ICI 4,800 Gbit/s "
                "(1,200 GB/s bidirectional)"),
    "v6e": Chip(918e12, 1638e9, 32e9, 400e9, 256, 0.0,
                "cloud.google.com/tpu/docs/v6e: 918 TFLOP/s bf16, 32 GB HBM at 1,638 GB/s, ICI 800 GB/s "
                "bidirectional"),
    "h100": Chip(989e12, 3.35e12, 80e9, 450e9, 8, 50e9,
                 "NVIDIA H100 SXM datasheet: 989 TFLOP/s dense bf16, 80 GB HBM3 at 3.35 TB/s, NVLink 900 GB/s "
                 "bidirectional; DGX H100: 8 GPUs per NVLink node, one 400 Gbit/s ConnectX-7 per GPU"),
    "h200": Chip(989e12, 4.8e12, 141e9, 450e9, 8, 50e9,
                 "NVIDIA H200 SXM datasheet: 989 TFLOP/s dense bf16, 141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s "
                 "bidirectional; 8 GPUs per node, 400 Gbit/s per GPU beyond it"),
}  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default="7b", help=f"comma-separated, of {sorted(memory.MODELS)}")
    parser.add_argument("--steps", default="grpo", help="comma-separated, of grpo, generate")
    parser.add_argument("--devices", default="64", help="comma-separated device counts N")
    parser.add_argument("--mesh", default="1,-1,1", help="(data, fsdp, tensor) mesh; -1 takes the rest (FSDP)")
    parser.add_argument("--old-mesh", default="", help="the old case's mesh (default: --mesh)")
    parser.add_argument("--layout", default="auto", help="the new case's sampling layout: auto, decode[:T], train")
    parser.add_argument("--attn-impl", default="xla", help="the model's attention implementation (model.attn_impl)")
    parser.add_argument("--chips", default=",".join(CHIPS), help=f"roofline chips, of {list(CHIPS)}")
    parser.add_argument("--scale", type=float, default=1.0, help="shrink the workloads (batch, lengths) for smoke runs")
    parser.add_argument("--minibatches", type=int, default=0, help="GRPO minibatches per step (default: the config's)")
    parser.add_argument("--direct", action="store_true", help="compile the full depth, no extrapolation (slow)")
    parser.add_argument("--platform", choices=("cpu", "native"), default="cpu", help="as `bench memory --platform`")
    parser.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)


def _check(args: argparse.Namespace) -> None:
    from qponder_jax.model.attention import IMPLEMENTATIONS
    from qponder_jax.model.sharding import parse_layout

    unknown = [m for m in args.models.split(",") if m not in memory.MODELS]
    steps = [s for s in args.steps.split(",") if s not in FIT_POINTS]
    chips = [c for c in args.chips.split(",") if c and c not in CHIPS]
    if unknown or steps or chips:
        raise ValueError(f"plan: unknown model(s) {unknown}, step(s) {steps} or chip(s) {chips}; choose from "
                         f"{sorted(memory.MODELS)}, {list(FIT_POINTS)}, {list(CHIPS)}")  # fmt: skip
    if args.attn_impl not in IMPLEMENTATIONS:
        raise ValueError(f"plan: --attn-impl {args.attn_impl!r} is not one this model knows: {IMPLEMENTATIONS}")
    if args.platform == "cpu" and args.attn_impl not in ("xla", "auto"):
        raise ValueError(f"plan: --attn-impl {args.attn_impl} needs --platform native (a TPU / GPU backend)")
    for n in map(int, args.devices.split(",")):
        memory.mesh_shape(args.mesh, n)
        memory.mesh_shape(args.old_mesh or args.mesh, n)
    parse_layout(args.layout)


# ---- the worker: one subprocess per device count ----


def _compile(name: str, config, step: str, mesh, layout: str, args) -> dict:
    """Planned bytes and per-phase costs of one compiled step."""
    from qponder_jax import sampling
    from qponder_jax.benchmarks import hlo, programs
    from qponder_jax.train import grpo as grpo_lib

    model = programs.ModelSettings(attn_impl=args.attn_impl)
    start = time.perf_counter()
    if step == "grpo":
        _, grpo = memory._workloads(args.scale, args.minibatches)
        compiled = programs.grpo_step(
            config, mesh, model, memory.grpo_settings(name, grpo, layout),
            prompts=grpo["prompts"], tokens=grpo["tokens"], patches=grpo["patches"],
        )  # fmt: skip
    else:
        w = _generate_workload(args.scale)
        sconfig = sampling.SamplingConfig(max_new_tokens=w["new_tokens"])
        compiled = programs.generate(config, mesh, model, sconfig, prompts=w["prompts"], tokens=w["tokens"],
                                     patches=w["patches"], layout=layout)  # fmt: skip
    scopes = [("reshard", sampling.RESHARD_SCOPE), ("prefill", "jit(_prefill)"),
              ("reference", grpo_lib.REFERENCE_SCOPE), ("update", grpo_lib.UPDATE_SCOPE),
              ("other", "jit(_decode)")]  # fmt: skip
    module = hlo.parse(compiled.as_text())
    phases = hlo.phase_costs(module, hlo.phase_by_scope(scopes))
    return {
        "memory": float(memory.planned(compiled)["total"]),
        "phases": {p: phases[p].to_dict() for p in PHASES if p in phases},
        "decode_loops": len(hlo.decode_loops(module)),
        "compile_s": time.perf_counter() - start,
    }


def _flatten(d, prefix=()) -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, (*prefix, k)) if isinstance(v, dict) else {(*prefix, k): float(v)})
    return out


def _unflatten(flat: dict) -> dict:
    out: dict = {}
    for keys, v in flat.items():
        node = out
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = v
    return out


def fit(points: dict[tuple[int, int], dict], text_layers: int, vision_blocks: int, step: str) -> dict:
    """Every number of the compiled points' results fitted as a + b_text * L_text + b_vision * L_vision (the
    `bench memory` fit) and evaluated at the real depths; a number absent at a point counts 0 there."""
    (l1, v1), (l2, _), (_, v3) = FIT_POINTS[step]
    flat = {p: _flatten(r) for p, r in points.items()}
    keys = {k for f in flat.values() for k in f}
    get = lambda p, k: flat[p].get(k, 0.0)
    out = {}
    for k in keys:
        base = get((l1, v1), k)
        b_text = (get((l2, v1), k) - base) / (l2 - l1)
        b_vision = (get((l1, v3), k) - base) / (v3 - v1)
        out[k] = max(base + b_text * (text_layers - l1) + b_vision * (vision_blocks - v1), 0.0)
    fitted = _unflatten(out)
    for r in points.values():
        _keep_sections(r, fitted)  # a section empty at every point (no collectives in a phase) stays, empty
    return fitted


def _keep_sections(source: dict, target: dict) -> None:
    for k, v in source.items():
        if isinstance(v, dict):
            _keep_sections(v, target.setdefault(k, {}))


def worker(args: argparse.Namespace) -> list[dict]:
    import jax

    from qponder_jax.benchmarks.programs import ModelSettings, resolve_layout
    from qponder_jax.model import sharding

    n = args.worker
    if jax.device_count() < n:
        raise ValueError(
            f"plan --platform {args.platform}: {n} devices needed, this {jax.default_backend()} backend has "
            f"{jax.device_count()}"
        )
    out = []
    for name in args.models.split(","):
        config = memory.MODELS[name]
        full = (config.text.num_hidden_layers, config.vision.depth)
        for step in args.steps.split(","):
            for label, spec, asked in (("old", args.old_mesh or args.mesh, "train"), ("new", args.mesh, args.layout)):
                mesh = sharding.make_mesh(memory.mesh_shape(spec, n))
                layout = resolve_layout(config, mesh, ModelSettings(attn_impl=args.attn_impl), asked)
                case = {"model": name, "step": step, "case": label, "devices": n, "mesh": list(mesh.devices.shape),
                        "layout": layout, "layers": list(full)}  # fmt: skip
                if args.direct:
                    result = _compile(name, config, step, mesh, layout, args)
                    case.update(result, method="direct")
                else:
                    points = {p: _compile(name, memory.reduced(config, *p), step, mesh, layout, args)
                              for p in FIT_POINTS[step]}  # fmt: skip
                    fitted = fit({p: {"memory": r["memory"], "phases": r["phases"]} for p, r in points.items()},
                                 *full, step)  # fmt: skip
                    case.update(fitted, method="per-layer fit",
                                fit_points={f"{p[0]}x{p[1]}": r["memory"] for p, r in points.items()},
                                decode_loops=points[FIT_POINTS[step][0]]["decode_loops"],
                                compile_s=sum(r["compile_s"] for r in points.values()))  # fmt: skip
                print(json.dumps(case), flush=True)
                out.append(case)
    return out


def _generate_workload(scale: float) -> dict:
    s = lambda n, q=1: max(q, int(n * scale) // q * q)
    return dict(GENERATE, tokens=s(GENERATE["tokens"], 8), patches=s(GENERATE["patches"], 4),
                new_tokens=s(GENERATE["new_tokens"]))  # fmt: skip


# ---- the roofline model ----


def phase_time(cost: dict, chip: Chip) -> dict:
    """Seconds of one execution of a phase on `chip`: compute, HBM and interconnect bounds, the largest binding."""
    link = lambda group: chip.link_bandwidth if int(group) <= chip.domain else chip.scale_out_bandwidth
    times = {
        "compute": cost.get("flops", 0.0) / chip.peak_flops,
        "hbm": cost.get("hbm_bytes", 0.0) / chip.hbm_bandwidth,
        "interconnect": sum(b / link(g) for g, b in cost.get("by_group", {}).items()),
    }
    bound = max(times, key=times.get)
    return dict(times, seconds=times[bound], bound=bound)


def roofline(case: dict, chip: Chip, new_tokens: int) -> dict:
    """Per phase (the decode step x `new_tokens`) and the whole step, in seconds on `chip`."""
    phases = {}
    for phase in PHASES:
        if phase not in case["phases"]:
            continue
        t = phase_time(case["phases"][phase], chip)
        count = new_tokens if phase == "decode step" else 1
        phases[phase] = dict(t, count=count, total=t["seconds"] * count)
    return {"phases": phases, "step_seconds": sum(p["total"] for p in phases.values()),
            "fits_hbm": case["memory"] <= chip.hbm_bytes}  # fmt: skip


def run(args: argparse.Namespace) -> dict:
    if args.worker:
        return {"what": "plan-worker", "cases": worker(args)}
    _check(args)
    start = time.perf_counter()
    argv = ["--models", args.models, "--steps", args.steps, "--mesh", args.mesh, "--old-mesh", args.old_mesh,
            "--layout", args.layout, "--attn-impl", args.attn_impl, "--scale", str(args.scale),
            "--minibatches", str(args.minibatches)] + ["--direct"] * args.direct  # fmt: skip
    cases = [c for n in map(int, args.devices.split(",")) for c in memory.spawn("plan", argv, n, args.platform)]
    _, grpo = memory._workloads(args.scale, args.minibatches)
    generate = _generate_workload(args.scale)
    chips = [c for c in args.chips.split(",") if c]
    for case in cases:
        tokens = grpo["new_tokens"] if case["step"] == "grpo" else generate["new_tokens"]
        case["roofline"] = {c: roofline(case, CHIPS[c], tokens) for c in chips}
    return {
        "what": "plan",
        "size": None,
        "workload": {
            "grpo": grpo,
            "generate": generate,
            "dtype": "fp32 params + AdamW, bf16 compute, remat",
            "attn_impl": args.attn_impl,
            "scale": args.scale,
        },  # fmt: skip
        "platform": args.platform,
        "chips": {c: dataclasses.asdict(CHIPS[c]) for c in chips},
        "cases": cases,
        "seconds": time.perf_counter() - start,
    }


# ---- printing ----
_KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_SHORT = {"all-gather": "AG", "all-reduce": "AR", "reduce-scatter": "RS", "all-to-all": "A2A",
          "collective-permute": "CP"}  # fmt: skip
MIB, GIB = 2**20, 2**30


def show(result: dict) -> None:
    if result["what"] == "plan-worker":
        return
    w = result["workload"]
    print(f"plan: per device, from the compiled programs ({result['platform']}); {w['dtype']}, attention "
          f"{w['attn_impl']}; GRPO {w['grpo']['prompts']} prompts x G {w['grpo']['generations']}, "
          f"{w['grpo']['tokens']} + {w['grpo']['new_tokens']} tokens")  # fmt: skip
    groups: dict = {}
    for c in result["cases"]:
        groups.setdefault((c["model"], c["step"], c["devices"]), []).append(c)
    for (model, step, n), cases in groups.items():
        print(f"\n{model} {step}, {n} devices")
        header = (
            f"{'case':<22}{'phase':<13}{'TFLOP':>9}{'HBM GiB':>10}"
            + "".join(f"{_SHORT[k] + ' MiB':>11}" for k in _KINDS)
            + f"{'f32 AG MiB':>12}"
        )
        print(header)  # fmt: skip
        for c in cases:
            label = f"{c['case']}: {c['layout']} {'x'.join(map(str, c['mesh']))}"
            print(f"{label:<22}{'memory':<13}{'':>9}{c['memory'] / GIB:>10.2f}  (planned, {c['method']})")
            for phase in PHASES:
                p = c["phases"].get(phase)
                if p is None:
                    continue
                coll = "".join(f"{p['collectives'].get(k, 0.0) / MIB:>11.1f}" for k in _KINDS)
                f32 = p["by_dtype"].get("all-gather f32", 0.0) / MIB
                print(f"{'':<22}{phase:<13}{p['flops'] / 1e12:>9.3f}{p['hbm_bytes'] / GIB:>10.2f}{coll}{f32:>12.1f}")
        by_case = {c["case"]: c for c in cases}
        if {"old", "new"} <= set(by_case):
            print(summary(by_case["old"], by_case["new"]))
        _show_roofline(cases)


def decode_step_bytes(case: dict) -> tuple[float, float]:
    """(bytes the compiled decode step's collectives move, bytes each device receives at the values' width)."""
    step = case["phases"].get("decode step", {})
    return sum(step.get("collectives", {}).values()), sum(step.get("wire", {}).values())


def summary(old: dict, new: dict) -> str:
    """The acceptance figures: per-token decode collectives old vs new, fp32 weight gathers in the new rollout, the
    planned memory ratio."""
    (old_moved, old_wire), (new_moved, new_wire) = decode_step_bytes(old), decode_step_bytes(new)
    ratio = lambda a, b: f"{a / b:.0f}x" if b else "inf"
    f32 = sum(new["phases"].get(p, {}).get("by_dtype", {}).get("all-gather f32", 0.0)
              for p in ("reshard", "prefill", "decode step"))  # fmt: skip
    return (
        f"decode step, per token: collectives as compiled old {old_moved / MIB:.1f} MiB, new {new_moved / MIB:.2f} MiB "
        f"({ratio(old_moved, new_moved)} lower); received per device at the values' width old "
        f"{old_wire / MIB:.1f} MiB, new {new_wire / MIB:.2f} MiB ({ratio(old_wire, new_wire)} lower). New rollout: "
        f"{f32 / MIB:.1f} MiB of fp32 values all-gathered. Planned memory new / old: "
        f"{new['memory'] / old['memory']:.3f}"
    )


def _show_roofline(cases: list[dict]) -> None:
    chips = list(cases[0].get("roofline", {}))
    if not chips:
        return
    print("roofline MODEL (seconds; bound: c = compute, h = HBM, i = interconnect; decode step x new tokens)")
    print(f"{'chip':<6}{'case':<8}" + "".join(f"{p:>16}" for p in PHASES) + f"{'step':>10}{'fits HBM':>10}")
    for chip in chips:
        for c in cases:
            r = c["roofline"][chip]
            cells = "".join(
                f"{r['phases'][p]['total']:>14.3f} {r['phases'][p]['bound'][0]}" if p in r["phases"] else f"{'':>16}"
                for p in PHASES
            )
            print(f"{chip:<6}{c['case']:<8}{cells}{r['step_seconds']:>10.2f}{'yes' if r['fits_hbm'] else 'no':>10}")
