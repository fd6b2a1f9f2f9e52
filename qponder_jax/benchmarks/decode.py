"""`decode`: tokens/s of `qponder_jax.sampling.generate` against transformers' `generate` (torch; on the CPU, or with
`--reference-device cuda` on an NVIDIA GPU).

Same random weights (ours saved with `save_hf`, loaded by transformers), the same left-padded batch of image prompts
(demo tokenizer, one image per prompt), greedy, every sequence run to full length (no stop token), in the same
`--dtype` (ours: the compute dtype over fp32 weights; the reference: its weights cast to that dtype). Both sides are
warmed up, then timed end to end (prefill included; ours with block_until_ready) in `--repeats` alternating rounds
(ours, then the reference, so both see the same machine load), each timed call the second after an idle pause, as
in a loop over batches (`common.timed_interleaved`); the median of each side.
"""

from __future__ import annotations

import argparse
import tempfile

import jax
import numpy as np

from qponder_jax.benchmarks.common import (
    SIZES,
    add_reference_device,
    device_peak,
    environment,
    image_prompts,
    median,
    random_setup,
    timed_interleaved,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=64, help="tokens per prompt, image tokens included")
    parser.add_argument("--image-size", type=int, default=112, help="square image side in pixels")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype, both sides")
    parser.add_argument("--no-reference", action="store_true", help="skip transformers (e.g. on a TPU)")
    add_reference_device(parser)
    parser.add_argument("--seed", type=int, default=0)


def _hf_generate(torch_model, batch, examples, new_tokens: int):
    """transformers' greedy generate over the same batch, on the model's device and in its dtype; returns the new
    tokens [B, L] (numpy, which waits for the device)."""
    import torch

    device, dtype = torch_model.device, torch_model.dtype
    ids = torch.as_tensor(batch.input_ids, dtype=torch.int64, device=device)
    torch_model.model.rope_deltas = None
    with torch.inference_mode():
        out = torch_model.generate(
            input_ids=ids,
            attention_mask=torch.as_tensor(batch.attention_mask, dtype=torch.int64, device=device),
            mm_token_type_ids=(ids == torch_model.config.image_token_id).int(),
            pixel_values=torch.as_tensor(np.concatenate([ex.pixel_values for ex in examples]), device=device).to(dtype),
            image_grid_thw=torch.as_tensor(np.concatenate([ex.image_grid_thw for ex in examples]), device=device),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[:, ids.shape[1] :].cpu().numpy()


def run(args: argparse.Namespace) -> dict:
    import jax.numpy as jnp

    from qponder_jax.sampling import generate

    with tempfile.TemporaryDirectory() as tmp:
        proc, config, model, torch_model = random_setup(
            args.size, args.seed, tmp, with_torch=not args.no_reference, torch_device=args.reference_device,
            dtype=jnp.dtype(args.dtype),
        )  # fmt: skip
    examples, batch = image_prompts(proc, args.batch, args.prompt_tokens, args.image_size, args.seed)

    def ours():
        out = generate(model, batch, max_new_tokens=args.new_tokens, stop_ids=())
        return np.asarray(jax.block_until_ready(out.tokens))

    fns = {"ours": ours}
    if torch_model is not None:
        import torch

        torch_model.eval().to(getattr(torch, args.dtype))
        fns["reference"] = lambda: _hf_generate(torch_model, batch, examples, args.new_tokens)
    seconds = timed_interleaved(fns, args.repeats)
    ours_s = seconds["ours"]
    generated = args.batch * args.new_tokens
    result = {
        "what": "decode",
        "size": args.size,
        "workload": {
            "batch": args.batch,
            "prompt_tokens": int(batch.input_ids.shape[1]),
            "image_size": args.image_size,
            "image_tokens": int((batch.input_ids[0] == config.image_token_id).sum()),
            "new_tokens": args.new_tokens,
            "sampling": "greedy, no stop token",
            "dtype": args.dtype,
            "repeats": args.repeats,
        },
        "ours": {"seconds": median(ours_s), "all_seconds": ours_s},
        "reference": None,
        "tokens_equal": None,
        "ratio": None,
        "device": device_peak(),
        "environment": environment(torch_needed=torch_model is not None),
    }
    result["ours"]["tokens_per_s"] = generated / result["ours"]["seconds"]
    result["ours"].update(_decode_rates(model, result["ours"]["tokens_per_s"], args.batch, result["device"]))
    if torch_model is not None:
        ref_s = seconds["reference"]
        name = f"transformers generate (torch, {args.reference_device})"
        result["reference"] = {"name": name, "device": args.reference_device, "seconds": median(ref_s)}
        result["reference"]["all_seconds"] = ref_s
        result["reference"]["tokens_per_s"] = generated / result["reference"]["seconds"]
        result["ratio"] = result["ours"]["tokens_per_s"] / result["reference"]["tokens_per_s"]
        result["tokens_equal"] = float(np.mean(ours() == fns["reference"]()))
    return result


def _decode_rates(model, tokens_per_s: float, batch: int, dev: dict) -> dict:
    """Absolute rates of our decode: model FLOP/s (2 per weight of the decoder and LM head per generated token; the
    embedding lookup is not a matmul), the weight bytes read per second (every decode step reads those weights once
    for the whole batch, in the compute dtype: the bound on a memory-bound step) and, on an accelerator, MFU against
    its bf16 peak."""
    from flax import nnx

    from qponder_jax.train.optim import named_leaves

    _, params = nnx.split(model, nnx.Param)
    leaves = [
        (path, x)
        for path, x in named_leaves(params)
        if not path.startswith("visual") and not ("embed_tokens" in path and not model.config.tie_word_embeddings)
    ]
    weights = sum(int(np.prod(x.shape)) for _, x in leaves)
    # the sampler casts wider weights to the compute dtype once per call (`sampling.in_compute_dtype`): the loop reads
    # them at the narrower of the two widths
    itemsize = lambda x: min(np.dtype(x.dtype).itemsize, np.dtype(model.dtype).itemsize)
    weight_bytes = sum(int(np.prod(x.shape)) * itemsize(x) for _, x in leaves)
    rates = {
        "decode_weights": weights,
        "model_flops_per_s": 2.0 * weights * tokens_per_s,
        "weight_bytes_per_s": weight_bytes * tokens_per_s / batch,
    }
    if dev["peak_flops_per_device"]:
        rates["mfu"] = rates["model_flops_per_s"] / dev["peak_flops_per_device"]
    return rates


def show(result: dict) -> None:
    w = result["workload"]
    print(
        f"decode [{result['size']}]: batch {w['batch']}, prompt {w['prompt_tokens']} tokens "
        f"({w['image_tokens']} image), {w['new_tokens']} new tokens, {w['sampling']}, {w.get('dtype', 'float32')}, "
        f"median of {w['repeats']}"
    )
    print(f"{'':<36}{'seconds':>10}{'tokens/s':>12}")
    sides = [("ours", "qponder_jax.sampling.generate")]
    if result["reference"]:
        sides.append(("reference", result["reference"]["name"]))
    for side, name in sides:
        print(f"{name:<36}{result[side]['seconds']:>10.3f}{result[side]['tokens_per_s']:>12.1f}")
    ours, dev = result["ours"], result["device"]
    line = (
        f"ours: {ours['model_flops_per_s'] / 1e9:.2f} model GFLOP/s, {ours['weight_bytes_per_s'] / 1e9:.2f} GB/s of "
        f"weights read ({ours['decode_weights'] / 1e6:.1f}M decode weights; {dev['device_kind']})"
    )
    if "mfu" in ours:
        line += f", MFU {ours['mfu']:.2%} of the bf16 peak"
    print(line)
    if result["ratio"] is not None:
        print(f"ratio (ours / reference): {result['ratio']:.2f}x; greedy tokens equal: {result['tokens_equal']:.0%}")
    else:
        print("reference skipped (--no-reference)")
