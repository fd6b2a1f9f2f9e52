"""`sft`: one SFT step (forward, backward, AdamW) of ours against the same step in torch with transformers' model.

Both sides start from the same random weights (ours saved with `save_hf`, loaded by transformers) and see the same
batch: `--batch` prompts of exactly `--tokens` tokens, each with one image, the loss on every non-image token (ours:
`train.sft.SFTStep` under `jit_train_step`, state donated; torch: `labels=` with -100 on image tokens, `loss.backward`,
`torch.optim.AdamW`). The first step's losses are reported side by side (the same work is being timed), then one
untimed round and `--repeats` timed rounds of one step per side in turn, each timed step the second after an idle
pause (`common.timed_interleaved`); the median of each side. torch's first steps in a process are slow (allocator
warm-up), which the untimed round absorbs.

FLOPs are the model FLOPs of `train.logging.FlopModel` (6 per trainable parameter per token / patch; attention scores
left out), the same count for both sides. They are reported as a fraction of the machine's matmul peak, measured in
the same run: an `--matmul-n`^3 matmul in `--dtype` timed with jnp and with torch (the larger is "the machine's
peak"; their ratio separates our design from the BLAS each library calls). On a GPU/TPU, ours also reports tokens/s
and MFU against the device's dense bf16 peak (`train.logging.PEAK_FLOPS_BY_DEVICE_KIND`); with `--reference-device
cuda`, torch's too.
"""

from __future__ import annotations

import argparse
import tempfile

import jax
import numpy as np

from qponder_jax.benchmarks.common import (
    COMPARED_SIZES,
    SIZES,
    add_reference_device,
    device_peak,
    environment,
    image_prompts,
    matmul_peak,
    median,
    print_table,
    random_setup,
    row,
    timed_interleaved,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", choices=[*sorted(SIZES), "all"], default="all", help="all: tiny and small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=80, help="tokens per sequence, 16 image tokens included")
    parser.add_argument("--image-size", type=int, default=112, help="square image side in pixels")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--matmul-n", type=int, default=2048, help="side of the square matmul that measures the peak")
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default="float32",
        help="compute dtype over fp32 weights (torch: autocast)",
    )  # fmt: skip
    parser.add_argument("--no-reference", action="store_true", help="skip torch (e.g. on a TPU)")
    add_reference_device(parser)
    parser.add_argument("--seed", type=int, default=0)


def _ours(model, config, batch, dtype_name: str, lr: float):
    """(step function, initial state, placed batch, FLOPs of one step) for our jitted SFT step on all devices."""
    import optax

    from qponder_jax.model import sharding
    from qponder_jax.train import optim
    from qponder_jax.train import state as state_lib
    from qponder_jax.train.logging import FlopModel
    from qponder_jax.train.sft import SFTStep, batch_shardings, jit_train_step

    fsdp = int(np.gcd(jax.device_count(), batch.input_ids.shape[0]))
    mesh = sharding.make_mesh((1, fsdp, 1), jax.devices()[:fsdp])
    graphdef, params, rest = state_lib.split_model(model)
    labels = jax.tree.map(lambda _: optim.TRAIN, params)
    tx = optim.adamw(labels, learning_rate=lr, weight_decay=0.01)
    abstract = state_lib.abstract_train_state(params, tx, state_lib.param_shardings(model, mesh), mesh)
    state = state_lib.init_train_state(params, tx, abstract)
    step = SFTStep(graphdef, rest, tx, optax.constant_schedule(lr), labels)
    fn = jit_train_step(step, state_lib.shardings_of(abstract), mesh)
    placed = jax.device_put(batch, batch_shardings(batch, mesh))
    flops = FlopModel.from_params(params, labels, merge_unit=config.vision.merge_unit).step_flops(
        tokens=float(batch.attention_mask.sum()), patches=float((batch.window_segment_ids != 0).sum())
    )
    return fn, state, placed, flops


def _torch_step(torch_model, batch, examples, image_token_id: int, lr: float, dtype_name: str):
    """A closure running one transformers forward + backward + AdamW step on the model's device; returns the loss
    (float, which waits for the device). With bfloat16, the forward and backward run under `torch.autocast` over the
    fp32 weights, as ours computes in bf16 over fp32 weights."""
    import contextlib

    import torch

    device = torch_model.device
    as_tensor = lambda x, **kw: torch.as_tensor(x, device=device, **kw)
    ids = as_tensor(batch.input_ids, dtype=torch.int64)
    labels = torch.where(as_tensor(batch.loss_mask), ids, torch.full_like(ids, -100))
    inputs = dict(
        input_ids=ids,
        attention_mask=as_tensor(batch.attention_mask, dtype=torch.int64),
        mm_token_type_ids=(ids == image_token_id).int(),
        pixel_values=as_tensor(np.concatenate([ex.pixel_values for ex in examples])),
        image_grid_thw=as_tensor(np.concatenate([ex.image_grid_thw for ex in examples])),
        labels=labels,
    )
    torch_model.train()
    opt = torch.optim.AdamW(torch_model.parameters(), lr=lr, weight_decay=0.01)
    if dtype_name == "float32":
        compute = contextlib.nullcontext
    else:
        compute = lambda: torch.autocast(device.type, dtype=getattr(torch, dtype_name))

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        torch_model.model.rope_deltas = None
        with compute():
            loss = torch_model(**inputs).loss
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def run_size(args: argparse.Namespace, size: str, peak: dict, dev: dict) -> dict:
    import jax.numpy as jnp

    lr = 1e-4
    with tempfile.TemporaryDirectory() as tmp:
        proc, config, model, torch_model = random_setup(
            size, args.seed, tmp, with_torch=not args.no_reference, torch_device=args.reference_device,
            dtype=jnp.dtype(args.dtype),
        )  # fmt: skip
    examples, batch = image_prompts(proc, args.batch, args.tokens, args.image_size, args.seed)
    batch = batch.replace(loss_mask=batch.attention_mask & (batch.input_ids != config.image_token_id))
    fn, state, placed, flops = _ours(model, config, batch, args.dtype, lr)
    holder = {"state": state}

    def ours() -> float:
        holder["state"], metrics = fn(holder["state"], placed)
        return float(jax.block_until_ready(metrics["loss"]))

    ours_loss = ours()  # compiles
    fns = {"ours": ours}
    tokens = args.batch * args.tokens
    res = {"size": size, "flops_per_step": flops, "ours": {"loss": ours_loss}}
    ref_s = None
    if torch_model is not None:
        fns["reference"] = _torch_step(torch_model, batch, examples, config.image_token_id, lr, args.dtype)
        res["reference"] = {"loss": fns["reference"]()}
    seconds = timed_interleaved(fns, args.repeats)  # alternating rounds: both sides see the same load
    ours_s = seconds["ours"]
    res["ours"]["all_seconds"] = ours_s
    if torch_model is not None:
        res["reference"]["all_seconds"] = seconds["reference"]
        ref_s = median(seconds["reference"])
    ours_m = median(ours_s)
    machine_peak = max(peak["jnp_flops"], peak.get("torch_flops", 0.0))
    rows = [
        row("step seconds (median)", ours_m, ref_s, "s", higher_is_better=False),
        row("tokens/s", tokens / ours_m, ref_s and tokens / ref_s, "tokens/s"),
        row("model FLOP/s", flops / ours_m, ref_s and flops / ref_s, "FLOP/s"),
        row("fraction of machine matmul peak", flops / ours_m / machine_peak, ref_s and flops / ref_s / machine_peak),
        row("first-step loss", ours_loss, res.get("reference", {}).get("loss"), "nats"),
    ]
    if dev["peak_flops_per_device"]:
        used = int(np.gcd(jax.device_count(), args.batch))
        mfu = lambda seconds: flops / seconds / (used * dev["peak_flops_per_device"])
        on_gpu = ref_s is not None and args.reference_device == "cuda"  # torch then runs on one of the same devices
        rows.append(row("MFU vs device bf16 peak", mfu(ours_m), mfu(ref_s) if on_gpu else None))
    res["table"] = rows
    return res


def run(args: argparse.Namespace) -> dict:
    peak = matmul_peak(
        args.matmul_n, dtype=args.dtype, torch_side=not args.no_reference, torch_device=args.reference_device
    )
    dev = device_peak()
    sizes = list(COMPARED_SIZES) if args.size == "all" else [args.size]
    return {
        "what": "sft",
        "size": None if args.size == "all" else args.size,
        "workload": {
            "batch": args.batch,
            "tokens": args.tokens,
            "image_size": args.image_size,
            "repeats": args.repeats,
            "dtype": args.dtype,
            "optimizer": "AdamW lr 1e-4, weight decay 0.01",
        },
        "matmul": peak,
        "device": dev,
        "results": [run_size(args, size, peak, dev) for size in sizes],
        "reference_name": None if args.no_reference else f"transformers + torch AdamW ({args.reference_device})",
        "environment": environment(torch_needed=not args.no_reference),
    }


def show(result: dict) -> None:
    w, m = result["workload"], result["matmul"]
    line = f"matmul peak ({m['n']}^3 {m['dtype']}): jnp {m['jnp_flops'] / 1e9:.1f} GFLOP/s"
    if "torch_flops" in m:
        line += f", torch {m['torch_flops'] / 1e9:.1f} GFLOP/s, torch / jnp {m['torch_over_jnp']:.2f}"
    print(line)
    for res in result["results"]:
        title = (
            f"sft [{res['size']}]: batch {w['batch']} x {w['tokens']} tokens, {w['dtype']}, "
            f"{res['flops_per_step'] / 1e9:.1f} GFLOP/step, median of {w['repeats']}"
        )
        print_table(title, res["table"], "ours", "torch")
