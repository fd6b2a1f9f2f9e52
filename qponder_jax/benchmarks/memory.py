"""`memory`: the per-device memory XLA plans for the SFT and GRPO steps of Qwen2.5-VL 3B / 7B on real mesh shapes.

Nothing is allocated: the model is `nnx.eval_shape`d, the train state and batch are ShapeDtypeStructs carrying their
NamedShardings, and the jitted step is `.lower(...).compile()`d; the figure is the compiled executable's
`memory_analysis()`: arguments + outputs - aliased (donated) + temporaries, per device. Each mesh size runs in its own
subprocess with `XLA_FLAGS=--xla_force_host_platform_device_count=N` (simulated CPU devices), so the plan is XLA's CPU
plan for that SPMD partitioning: the layout (what is sharded, what is saved for the backward pass) is the one a
GPU/TPU run gets; fusion and scheduling details differ per backend, so treat the figures as +-10%.

Per-layer extrapolation: compiling a 28-36 layer model for 64 devices takes minutes on a CPU, so each case compiles the
model at three reduced depths (text layers, vision blocks) and fits bytes = a + b_text * L_text + b_vision *
L_vision (parameters, optimizer state and saved activations all grow per layer; the constant holds embeddings, the LM
head, logits and the batch), then evaluates it at the real depths. SFT fits from (1, 1), (2, 1), (1, 2); GRPO from (4,
1), (8, 1), (4, 2), because its peak moves from the rollout to the update's backward past two layers and only then
grows per layer (`FIT_POINTS`). Against full-depth compiles (`--direct`, 4-10 minutes per case) the GRPO fit is within
-6% / +5%: 7B on 64 devices 37.7 vs 37.2 GiB, 3B on 64 devices 27.8 vs 26.4, 7B on 16 devices 70.3 vs 71.4, 7B on 8
devices 125.4 vs 133.0 (from 1 and 2 layers it said 13.0, 21.2, 79.6 and 227.8). `--validate` also compiles a deeper
model (`VALIDATE_POINTS`) and reports the fit's relative error there.

What the CPU plan counts that an accelerator may not: XLA:CPU has no reduce-scatter, so each FSDP weight gradient is
all-reduced at full size and then sliced, and its memory-minimizing scheduler runs the weight-gradient matmuls of
several layers before their all-reduces. At the 7B GRPO peak (4 layers, 64 devices) 3.7 of 6.4 GiB are full-size fp32
weight gradients; this is most of the per-layer growth of both steps. GPU/TPU compilers turn all-reduce + slice into a
reduce-scatter, so expect less there; the figures are an upper estimate until `--platform native --direct` runs on
the accelerator (its own backend and devices, no simulated CPU devices).

Workloads follow the `3b` / `7b` variants of configs/qponder_ci.py and configs/qponder.py: fp32 parameters and AdamW
state, bf16 compute, per-layer remat, FSDP over all devices (mesh (1, N, 1); `--mesh` for another shape, e.g.
1,-1,4); images of 448x448 (1024 patches). The GRPO rollout decodes in the layout a run would choose for the
full-depth model (`--sampling-layout`, default auto; see `model.sharding.choose_layout`). `--attn-impl` picks the
attention (default xla; the variants' "auto" resolves to it on a CPU); splash and cudnn compile TPU / GPU kernels, so
they need `--platform native` on that accelerator (docs/performance.md: what splash is expected to change).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

from qponder_jax.model.attention import IMPLEMENTATIONS
from qponder_jax.model.config import Qwen25VLConfig, TextConfig, VisionConfig, tiny_config

GIB = 1024**3
HBM_GIB = (16, 32, 80, 95)

_VISION = VisionConfig(  # the same 675M-parameter ViT in 3B and 7B; only the merger's output width differs
    depth=32,
    hidden_size=1280,
    intermediate_size=3420,
    num_heads=16,
    window_size=112,
    fullatt_block_indexes=(7, 15, 23, 31),
)
MODELS: dict[str, Qwen25VLConfig] = {
    "3b": Qwen25VLConfig(  # Qwen/Qwen2.5-VL-3B-Instruct config.json
        text=TextConfig(
            vocab_size=151936,
            hidden_size=2048,
            intermediate_size=11008,
            num_hidden_layers=36,
            num_attention_heads=16,
            num_key_value_heads=2,
            rope_theta=1000000.0,
            mrope_section=(16, 24, 24),
            max_position_embeddings=128000,
        ),
        vision=dataclasses.replace(_VISION, out_hidden_size=2048),
        tie_word_embeddings=True,
    ),  # fmt: skip
    "7b": Qwen25VLConfig(  # Qwen/Qwen2.5-VL-7B-Instruct config.json
        text=TextConfig(
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            rope_theta=1000000.0,
            mrope_section=(16, 24, 24),
            max_position_embeddings=128000,
        ),
        vision=dataclasses.replace(_VISION, out_hidden_size=3584),
        tie_word_embeddings=False,
    ),  # fmt: skip
    "tiny": tiny_config(),  # smoke tests
}
# SFT: configs/qponder_ci.py (global batch 64, up to 1024 tokens, 1024 patches; grad_accum 2 on 7b); the batch grows
# to one sequence per device per micro-batch when the mesh is larger (a micro-batch must split over the devices).
SFT = {"batch": 64, "tokens": 1024, "patches": 1024, "grad_accum": {"3b": 1, "7b": 2, "tiny": 1}, "logprob_chunk": 8192}
# GRPO: configs/qponder.py (64 prompts of 512 tokens x G 8, 512 new tokens, minibatches 2 / 4, beta 0.001).
GRPO = {"prompts": 64, "tokens": 512, "patches": 1024, "generations": 8, "new_tokens": 512,
        "minibatches": {"3b": 2, "7b": 4, "tiny": 2}, "beta": 0.001}  # fmt: skip
# (text layers, vision blocks) compiled per step for the per-layer fit, and the deeper point `--validate` checks it at.
# GRPO fits from 4 and 8 text layers: its per-layer growth starts past two layers (7B on 64 devices: 0.35 GiB from 1 to
# 2 layers, then 1.32, 1.18 and 1.16 per layer from 2 to 4, 4 to 8 and 8 to 14), so a fit from 1 and 2 layers
# planned 13.0 GiB where the full depth compiles to 37.2 (this fit: 37.7). SFT grows linearly from one layer (1.80 GiB
# per 7B layer at 1-2, 2-4 and 4-8 layers).
FIT_POINTS = {"sft": ((1, 1), (2, 1), (1, 2)), "grpo": ((4, 1), (8, 1), (4, 2))}
VALIDATE_POINTS = {"sft": (3, 3), "grpo": (12, 3)}
# XLA:CPU's default concurrency-optimized scheduler starts independent work (every layer's FSDP all-gather) as early as
# it can, which a GPU/TPU's memory-aware scheduler does not: plan with the memory-minimizing order instead.
SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default="7b", help=f"comma-separated, of {sorted(MODELS)} (default: ~3.5 min)")
    parser.add_argument("--steps", default="sft,grpo", help="comma-separated, of sft, grpo")
    parser.add_argument("--devices", default="64", help="comma-separated mesh sizes N")
    parser.add_argument("--mesh", default="1,-1,1", help="(data, fsdp, tensor) mesh; -1 takes the rest of N (FSDP)")
    parser.add_argument("--scale", type=float, default=1.0, help="shrink the workloads (batch, lengths) for smoke runs")
    parser.add_argument(
        "--sampling-layout", default="auto",
        help="the GRPO rollout's weights: auto (as a run resolves it for the full model), decode, decode:T or train",
    )  # fmt: skip
    parser.add_argument("--minibatches", type=int, default=0, help="GRPO minibatches per step (default: the config's)")
    parser.add_argument(
        "--attn-impl",
        choices=IMPLEMENTATIONS,
        default="xla",
        help="attention implementation (auto: by backend; splash / cudnn need --platform native on a TPU / GPU)",
    )
    parser.add_argument(
        "--no-share-prompts", action="store_true", help="GRPO update re-runs each prompt per completion (no sharing)"
    )
    parser.add_argument(
        "--validate", action="store_true", help="also compile a deeper model (VALIDATE_POINTS) and report the fit error"
    )
    parser.add_argument("--direct", action="store_true", help="compile the full depth, no extrapolation (slow)")
    parser.add_argument(
        "--platform",
        choices=("cpu", "native"),
        default="cpu",
        help="cpu: N simulated CPU devices (default); native: this machine's backend (GPU/TPU), its first N devices",
    )
    parser.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)


def reduced(config: Qwen25VLConfig, text_layers: int, vision_blocks: int) -> Qwen25VLConfig:
    """The same widths with fewer text layers and vision blocks (the last vision block does full attention)."""
    vision = dataclasses.replace(config.vision, depth=vision_blocks, fullatt_block_indexes=(vision_blocks - 1,))
    return config.replace(text=dataclasses.replace(config.text, num_hidden_layers=text_layers), vision=vision)


def _workloads(scale: float, minibatches: int = 0, share_prompts: bool = True) -> tuple[dict, dict]:
    s = lambda n, q=1: max(q, int(n * scale) // q * q)
    sft = dict(SFT, tokens=s(SFT["tokens"], 8), patches=s(SFT["patches"], 4))
    grpo = dict(GRPO, tokens=s(GRPO["tokens"], 8), patches=s(GRPO["patches"], 4), new_tokens=s(GRPO["new_tokens"]))
    if minibatches:
        grpo["minibatches"] = {name: minibatches for name in GRPO["minibatches"]}
    grpo["share_prompts"] = share_prompts
    return sft, grpo


# ---- the worker: runs in a subprocess with N simulated devices ----


def _planned_bytes(
    model_name: str,
    config: Qwen25VLConfig,
    step: str,
    mesh,
    sft: dict,
    grpo: dict,
    layout: str = "train",
    attn_impl: str = "xla",
) -> dict:
    """Compile one step for `config` on `mesh` (all abstract; the GRPO rollout in `layout`) and return its per-device
    memory analysis."""
    from qponder_jax.benchmarks import programs

    # both 3b / 7b config variants: bf16 compute, fp32 params, per-layer remat
    model = programs.ModelSettings(attn_impl=attn_impl)
    start = time.perf_counter()
    if step == "sft":
        rows = max(sft["batch"], mesh.size * sft["grad_accum"][model_name])
        compiled = programs.sft_step(
            config, mesh, model, rows=rows, tokens=sft["tokens"], patches=sft["patches"],
            grad_accum=sft["grad_accum"][model_name], logprob_chunk=sft["logprob_chunk"],
        )  # fmt: skip
    else:
        compiled = programs.grpo_step(
            config, mesh, model, grpo_settings(model_name, grpo, layout),
            prompts=grpo["prompts"], tokens=grpo["tokens"], patches=grpo["patches"],
        )  # fmt: skip
    return dict(planned(compiled), compile_s=time.perf_counter() - start)


def planned(compiled) -> dict:
    """Per-device bytes of a compiled executable: total = arguments + outputs - aliased (donated) + temporaries."""
    m = compiled.memory_analysis()
    total = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    return {"total": int(total), "arguments": int(m.argument_size_in_bytes), "temporaries": int(m.temp_size_in_bytes)}


def grpo_settings(model_name: str, grpo: dict, sampling_layout: str = "train"):
    """GRPOSettings of the workload (`GRPO`, scaled), with the rollout in `sampling_layout`."""
    from qponder_jax.train import grpo as grpo_lib
    from qponder_jax.train.grpo_loss import LossConfig

    return grpo_lib.GRPOSettings(
        num_generations=grpo["generations"], max_new_tokens=grpo["new_tokens"],
        num_minibatches=grpo["minibatches"][model_name], loss=LossConfig(beta=grpo["beta"]),
        share_prompts=grpo["share_prompts"], sampling_layout=sampling_layout,
    )  # fmt: skip


def mesh_shape(spec: str, n: int) -> tuple[int, int, int]:
    """A `--mesh` value ("1,-1,4") for n devices, -1 filled in; raises naming the flag when it does not fit."""
    shape = [int(x) for x in spec.split(",")]
    known = 1
    for x in shape:
        known *= x if x != -1 else 1
    if len(shape) != 3 or shape.count(-1) > 1 or n % known or (-1 not in shape and known != n):
        raise ValueError(f"--mesh {spec}: not a (data, fsdp, tensor) shape for {n} devices")
    return tuple(n // known if x == -1 else x for x in shape)


def fit_layers(points: dict[tuple[int, int], float], text_layers: int, vision_blocks: int, step: str) -> float:
    """bytes = a + b_text * L_text + b_vision * L_vision through the step's three FIT_POINTS, evaluated at the real
    depths."""
    (l1, v1), (l2, _), (_, v3) = FIT_POINTS[step]
    base = points[(l1, v1)]
    b_text = (points[(l2, v1)] - base) / (l2 - l1)
    b_vision = (points[(l1, v3)] - base) / (v3 - v1)
    return base + b_text * (text_layers - l1) + b_vision * (vision_blocks - v1)


def worker(args: argparse.Namespace) -> list[dict]:
    """All (model, step) cases on a `--mesh` mesh ((1, N, 1) by default) of this process's first N devices (simulated
    CPU ones by default)."""
    import jax

    from qponder_jax.model import sharding

    n = args.worker
    shape = mesh_shape(args.mesh, n)
    if jax.device_count() < n:
        raise ValueError(
            f"memory --platform {args.platform}: a {shape} mesh needs {n} devices, this {jax.default_backend()} "
            f"backend has {jax.device_count()}"
        )
    mesh = sharding.make_mesh(shape)
    device = jax.devices()[0]
    sft, grpo = _workloads(args.scale, args.minibatches, not args.no_share_prompts)
    out = []
    from qponder_jax.benchmarks.programs import ModelSettings, resolve_layout

    for name in args.models.split(","):
        config = MODELS[name]
        full = (config.text.num_hidden_layers, config.vision.depth)
        layout = resolve_layout(config, mesh, ModelSettings(attn_impl=args.attn_impl), args.sampling_layout)

        def plan(cfg, step, name=name, layout=layout):
            return _planned_bytes(name, cfg, step, mesh, sft, grpo, layout, args.attn_impl)

        for step in args.steps.split(","):
            case = {"model": name, "step": step, "devices": n, "mesh": list(shape), "layers": list(full),
                    "platform": device.platform, "device_kind": device.device_kind}  # fmt: skip
            if step == "grpo":
                case["sampling_layout"] = layout
            if args.direct:
                direct = plan(config, step)
                case.update(bytes=direct["total"], method="direct", compile_s=direct["compile_s"])
            else:
                points = FIT_POINTS[step]
                plans = {p: plan(reduced(config, *p), step) for p in points}
                totals = {p: float(v["total"]) for p, v in plans.items()}
                case.update(
                    bytes=fit_layers(totals, *full, step),
                    method="per-layer fit",
                    fit_points={f"{p[0]}x{p[1]}": v for p, v in totals.items()},
                    compile_s=sum(v["compile_s"] for v in plans.values()),
                )
                if args.validate:
                    at = VALIDATE_POINTS[step]
                    got = plan(reduced(config, *at), step)["total"]
                    want = fit_layers(totals, *at, step)
                    case["validation"] = {"layers": list(at), "compiled": got, "fit": want,
                                          "relative_error": abs(want - got) / got}  # fmt: skip
            case["gib"] = case["bytes"] / GIB
            case["fits"] = {str(h): case["gib"] <= h for h in HBM_GIB}
            print(json.dumps(case), flush=True)
            out.append(case)
    return out


def _spawn(args: argparse.Namespace, n: int) -> list[dict]:
    argv = ["--models", args.models, "--mesh", args.mesh, "--sampling-layout", args.sampling_layout]
    argv += ["--attn-impl", args.attn_impl]
    argv += ["--steps", args.steps, "--scale", str(args.scale), "--minibatches", str(args.minibatches)]
    argv += ["--validate"] * args.validate + ["--direct"] * args.direct + ["--no-share-prompts"] * args.no_share_prompts
    return spawn("memory", argv, n, args.platform)


def spawn(what: str, argv: list[str], n: int, platform: str) -> list[dict]:
    """Runs `python -m qponder_jax.bench <what> --worker n ...` in a subprocess with n simulated CPU devices (or on
    the native backend) and returns the JSON lines it prints."""
    env = dict(os.environ)
    if platform == "cpu":
        flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f and "scheduler" not in f]
        flags += [SCHEDULER_FLAG, f"--xla_force_host_platform_device_count={n}"]
        env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(flags))
    cmd = [sys.executable, "-m", "qponder_jax.bench", what, "--worker", str(n), "--platform", platform, *argv]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        usage = [line for line in proc.stderr.splitlines() if line.startswith(f"ValueError: {what} --platform")]
        if usage:
            raise ValueError(usage[-1].removeprefix("ValueError: "))
        raise RuntimeError(f"{what} worker for {n} devices failed:\n{proc.stderr[-4000:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def run(args: argparse.Namespace) -> dict:
    if args.worker:
        return {"what": "memory-worker", "cases": worker(args)}
    if args.platform == "cpu" and args.attn_impl not in ("xla", "auto"):
        raise ValueError(f"memory: --attn-impl {args.attn_impl} needs --platform native (a TPU / GPU backend)")
    unknown = [m for m in args.models.split(",") if m not in MODELS]
    if unknown:
        raise ValueError(f"memory: unknown model(s) {unknown}; choose from {sorted(MODELS)}")
    start = time.perf_counter()
    for n in map(int, args.devices.split(",")):
        mesh_shape(args.mesh, n)  # a bad --mesh fails here, not in a worker
    cases = [c for n in map(int, args.devices.split(",")) for c in _spawn(args, n)]
    sft, grpo = _workloads(args.scale, args.minibatches, not args.no_share_prompts)
    return {
        "what": "memory",
        "size": None,
        "workload": {
            "sft": sft,
            "grpo": grpo,
            "dtype": "fp32 params + AdamW, bf16 compute, remat",
            "scale": args.scale,
            "attn_impl": args.attn_impl,
        },
        "platform": args.platform,
        "hbm_gib": list(HBM_GIB),
        "cases": cases,
        "seconds": time.perf_counter() - start,
    }


def show(result: dict) -> None:
    if result["what"] == "memory-worker":
        return
    w = result["workload"]
    print(
        f"memory: XLA-planned bytes per device, {w['dtype']}; SFT batch {w['sft']['batch']} x {w['sft']['tokens']} "
        f"tokens; GRPO {w['grpo']['prompts']} prompts x G {w['grpo']['generations']}, {w['grpo']['tokens']} + "
        f"{w['grpo']['new_tokens']} tokens; {w['sft']['patches']} patches per image; attention {w['attn_impl']}"
    )
    hbm = "".join(f"{str(h) + ' GiB':>9}" for h in result["hbm_gib"])
    print(f"{'model':<7}{'step':<6}{'mesh':<12}{'GiB/device':>11}{hbm}  method")
    for c in result["cases"]:
        fits = "".join(f"{'fits' if c['fits'][str(h)] else 'no':>9}" for h in result["hbm_gib"])
        mesh = "x".join(map(str, c["mesh"]))
        note = f"{c['method']}, {c['device_kind']}"
        if "validation" in c:
            note += f" (error at {c['validation']['layers']}: {c['validation']['relative_error']:.1%})"
        print(f"{c['model']:<7}{c['step']:<6}{mesh:<12}{c['gib']:>11.2f}{fits}  {note}")
