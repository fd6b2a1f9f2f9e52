"""Side-by-side benchmarks against transformers (torch, CPU): `python -m qponder_jax.bench <what> [options]`.

    python -m qponder_jax.bench decode --size tiny --out /tmp/bench

decode: tokens/s of `qponder_jax.sampling.generate` against transformers' `generate` on the same random weights
(ours saved with `save_hf`, loaded by transformers), the same left-padded batch of image prompts (demo tokenizer,
one image per prompt), greedy, every sequence run to full length (no stop token). Both sides are warmed up, then
timed end to end (prefill included; ours with block_until_ready); the median of `--repeats` runs is reported.
Results are printed as a table and written as JSON to `--out`. Speed is measured here, never asserted in tests.
torch is imported only inside the reference functions: the package itself never needs it.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np
from PIL import Image

from qponder_jax import prompts
from qponder_jax.model.config import Qwen25VLConfig, TextConfig, VisionConfig

# text: hidden, layers, heads, kv heads, mlp, vocab, mrope_section; vision: depth, hidden, heads, mlp, full layers
SIZES = {
    "tiny": dict(text=(128, 2, 4, 2, 256, 1024, (4, 6, 6)), vision=(2, 64, 2, 128, (1,))),
    "small": dict(text=(512, 8, 8, 2, 1536, 32000, (8, 12, 12)), vision=(4, 256, 4, 768, (3,))),
}


def bench_config(size: str, proc) -> Qwen25VLConfig:
    """A random-model config of `size` using the processor's special token ids."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {sorted(SIZES)}")
    hidden, layers, heads, kv_heads, mlp, vocab, mrope = SIZES[size]["text"]
    depth, v_hidden, v_heads, v_mlp, full = SIZES[size]["vision"]
    text = TextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        rope_theta=10000.0,
        mrope_section=mrope,
        max_position_embeddings=4096,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=proc.pad_token_id,
    )
    vision = VisionConfig(
        depth=depth,
        hidden_size=v_hidden,
        intermediate_size=v_mlp,
        num_heads=v_heads,
        out_hidden_size=hidden,
        fullatt_block_indexes=full,
    )
    return Qwen25VLConfig(
        text=text,
        vision=vision,
        image_token_id=proc.image_token_id,
        video_token_id=proc.video_token_id,
        vision_start_token_id=proc.vision_start_token_id,
        vision_end_token_id=proc.vision_end_token_id,
    )


def image_prompts(proc, batch_size: int, prompt_tokens: int, image_size: int, seed: int = 0):
    """`batch_size` encoded prompts of exactly `prompt_tokens` tokens, each with its own random square image."""
    from qponder_jax.data.processing import Buckets

    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (image_size, image_size, 3), np.uint8)) for _ in range(batch_size)]
    long_text = " ".join([prompts.prompt_text("qponder")] * 8)
    encode = lambda text, image: proc.encode(prompts.image_messages(text), [image], add_generation_prompt=True)
    cut = _prefix_with_length(lambda n: len(encode(long_text[:n], images[0])), prompt_tokens, len(long_text))
    examples = [encode(long_text[:cut], image) for image in images]
    if any(len(ex) != prompt_tokens for ex in examples):
        raise ValueError(f"could not build prompts of exactly {prompt_tokens} tokens")
    patches = max(ex.num_patches for ex in examples)
    buckets = Buckets(tokens=(prompt_tokens,), patches=(patches,), images=(1,))
    return examples, proc.collate(examples, padding_side="left", buckets=buckets)


def _prefix_with_length(length_of: Callable[[int], int], target: int, limit: int) -> int:
    """The shortest character count n <= limit whose encoding has `target` tokens (lengths grow with n)."""
    low, high = 0, limit
    if length_of(low) > target or length_of(high) < target:
        raise ValueError(f"no prompt text gives {target} tokens (range {length_of(low)}..{length_of(high)})")
    while low < high:  # first n with length >= target
        mid = (low + high) // 2
        low, high = (mid + 1, high) if length_of(mid) < target else (low, mid)
    for n in range(low, limit + 1):
        if length_of(n) == target:
            return n
        if length_of(n) > target:
            break
    raise ValueError(f"no prompt text gives exactly {target} tokens")


def _timed(fn: Callable[[], object], repeats: int) -> list[float]:
    fn()  # warm-up (compiles ours)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return seconds


def _hf_generate(torch_model, batch, examples, new_tokens: int):
    """transformers' greedy generate over the same batch; returns the new tokens [B, L] (numpy)."""
    import torch

    ids = torch.as_tensor(batch.input_ids, dtype=torch.int64)
    torch_model.model.rope_deltas = None
    with torch.inference_mode():
        out = torch_model.generate(
            input_ids=ids,
            attention_mask=torch.as_tensor(batch.attention_mask, dtype=torch.int64),
            mm_token_type_ids=(ids == torch_model.config.image_token_id).int(),
            pixel_values=torch.as_tensor(np.concatenate([ex.pixel_values for ex in examples])),
            image_grid_thw=torch.as_tensor(np.concatenate([ex.image_grid_thw for ex in examples])),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[:, ids.shape[1] :].numpy()


def run_decode(args: argparse.Namespace) -> dict:
    from transformers import Qwen2_5_VLForConditionalGeneration

    from qponder_jax.data.processing import Processor
    from qponder_jax.data.tokenizer import build_demo_tokenizer
    from qponder_jax.hf import save_hf
    from qponder_jax.model.qwen2_5_vl import create_model
    from qponder_jax.sampling import generate

    with tempfile.TemporaryDirectory() as tmp:
        proc = Processor.from_pretrained(build_demo_tokenizer(Path(tmp) / "tokenizer"))
        config = bench_config(args.size, proc)
        model = create_model(config, rngs_seed=args.seed)
        save_hf(model, config, Path(tmp) / "model")
        torch_model = Qwen2_5_VLForConditionalGeneration.from_pretrained(Path(tmp) / "model").eval()
    examples, batch = image_prompts(proc, args.batch, args.prompt_tokens, args.image_size, args.seed)

    def ours():
        out = generate(model, batch, max_new_tokens=args.new_tokens, stop_ids=())
        return np.asarray(jax.block_until_ready(out.tokens))

    ours_s = _timed(ours, args.repeats)
    ref_s = _timed(lambda: _hf_generate(torch_model, batch, examples, args.new_tokens), args.repeats)
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
            "repeats": args.repeats,
        },
        "ours": {"seconds": statistics.median(ours_s), "all_seconds": ours_s},
        "reference": {"name": "transformers generate (torch, CPU)", "seconds": statistics.median(ref_s)},
        "tokens_equal": float(np.mean(ours() == _hf_generate(torch_model, batch, examples, args.new_tokens))),
        "environment": _environment(),
    }
    result["reference"]["all_seconds"] = ref_s
    for side in ("ours", "reference"):
        result[side]["tokens_per_s"] = generated / result[side]["seconds"]
    result["ratio"] = result["ours"]["tokens_per_s"] / result["reference"]["tokens_per_s"]
    return result


def _environment() -> dict:
    import torch
    import transformers

    return {
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "jax_devices": len(jax.devices()),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "machine": platform.processor() or platform.machine(),
    }


def print_decode(result: dict) -> None:
    w = result["workload"]
    print(
        f"decode [{result['size']}]: batch {w['batch']}, prompt {w['prompt_tokens']} tokens "
        f"({w['image_tokens']} image), {w['new_tokens']} new tokens, {w['sampling']}, median of {w['repeats']}"
    )
    print(f"{'':<36}{'seconds':>10}{'tokens/s':>12}")
    for side, name in (("ours", "qponder_jax.sampling.generate"), ("reference", result["reference"]["name"])):
        print(f"{name:<36}{result[side]['seconds']:>10.3f}{result[side]['tokens_per_s']:>12.1f}")
    print(f"ratio (ours / reference): {result['ratio']:.2f}x; greedy tokens equal: {result['tokens_equal']:.0%}")


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], dict], Callable[[dict], None]]] = {
    "decode": (run_decode, print_decode),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m qponder_jax.bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    decode = sub.add_parser("decode", help="sampler tokens/s vs transformers generate")
    decode.add_argument("--size", choices=sorted(SIZES), default="tiny")
    decode.add_argument("--batch", type=int, default=8)
    decode.add_argument("--prompt-tokens", type=int, default=64, help="tokens per prompt, image tokens included")
    decode.add_argument("--image-size", type=int, default=112, help="square image side in pixels")
    decode.add_argument("--new-tokens", type=int, default=64)
    decode.add_argument("--repeats", type=int, default=5)
    decode.add_argument("--seed", type=int, default=0)
    decode.add_argument("--out", type=Path, default=None, help="folder for the JSON result")
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    run, show = COMMANDS[args.what]
    result = run(args)
    show(result)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / ("_".join(filter(None, [args.what, getattr(args, "size", None)])) + ".json")
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
