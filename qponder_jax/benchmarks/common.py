"""Shared pieces of the benchmarks: the two model sizes, image prompts, timing, the machine's measured matmul peak,
the device peak table (from `train.logging`), the environment record and the ours-vs-reference table."""

from __future__ import annotations

import math
import platform
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from qponder_jax import prompts
from qponder_jax.model.config import Qwen25VLConfig, TextConfig, VisionConfig
from qponder_jax.train.logging import peak_flops_per_device

# text: hidden, layers, heads, kv heads, mlp, vocab, mrope_section; vision: depth, hidden, heads, mlp, full layers
SIZES = {
    "tiny": dict(text=(128, 2, 4, 2, 256, 1024, (4, 6, 6)), vision=(2, 64, 2, 128, (1,))),
    "small": dict(text=(512, 8, 8, 2, 1536, 32000, (8, 12, 12)), vision=(4, 256, 4, 768, (3,))),
    # Qwen2.5-VL-3B's widths and depths (4.07B parameters here: the head is not tied to the embedding), for absolute
    # rates and MFU on an accelerator with --no-reference: its fp32 weights and AdamW state alone are 45 GiB
    "3b": dict(text=(2048, 36, 16, 2, 11008, 151936, (16, 24, 24)), vision=(32, 1280, 16, 3420, (7, 15, 23, 31))),
}
COMPARED_SIZES = ("tiny", "small")  # the two sizes compared against the references on a CPU (`sft --size all`)


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

    images = random_images(batch_size, image_size, seed)
    text = prompt_text(proc, prompt_tokens, images[0])
    encode = lambda text, image: proc.encode(prompts.image_messages(text), [image], add_generation_prompt=True)
    examples = [encode(text, image) for image in images]
    if any(len(ex) != prompt_tokens for ex in examples):
        raise ValueError(f"could not build prompts of exactly {prompt_tokens} tokens")
    patches = max(ex.num_patches for ex in examples)
    buckets = Buckets(tokens=(prompt_tokens,), patches=(patches,), images=(1,))
    return examples, proc.collate(examples, padding_side="left", buckets=buckets)


def random_images(count: int, side: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (side, side, 3), np.uint8)) for _ in range(count)]


def prompt_text(proc, prompt_tokens: int, image) -> str:
    """A prefix of the Q-Ponder prompt whose chat encoding (with `image` and the generation prompt) is
    `prompt_tokens` long."""
    long_text = " ".join([prompts.prompt_text("qponder")] * 8)
    encode = lambda text: proc.encode(prompts.image_messages(text), [image], add_generation_prompt=True)
    return long_text[: _prefix_with_length(lambda n: len(encode(long_text[:n])), prompt_tokens, len(long_text))]


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


def timed(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Wall seconds of `repeats` calls of `fn` after `warmup` untimed calls (which compile ours)."""
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return seconds


def timed_interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1, pause: float = 0.5, prime: bool = True
) -> dict[str, list[float]]:
    """Wall seconds of `repeats` rounds that call each of `fns` once in turn (after `warmup` untimed rounds), so that
    ours and the reference sample the same moments of a shared machine: load that comes and goes slows both sides
    of a ratio instead of one. Each timed call starts after `pause` idle seconds: torch's OpenMP workers and XLA's
    thread pool spin-wait for a while after their work, and without the pause they steal cores from the other
    side's next call (measured: our SFT step 40% slower right after a torch step). With `prime`, an untimed call of
    the same function runs between the pause and the timed one, so each side is timed warm, as in a loop over
    batches: straight after an idle pause the thread pools' workers are asleep and the caches cold (measured: our
    tiny decode 37 ms after a 0.5 s pause, 30 ms back to back)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            time.sleep(pause)
            if prime:
                fn()
            start = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def torch_sync(out):
    """`out`, after torch's queued device work is done (a no-op on the CPU), so that host clocks time the work."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return out


def add_reference_device(parser) -> None:
    parser.add_argument(
        "--reference-device", choices=("cpu", "cuda"), default="cpu",
        help="where the torch reference runs (cuda: on an NVIDIA GPU beside ours, the user's other choice there)",
    )  # fmt: skip


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def matmul_peak(
    n: int = 2048, repeats: int = 3, dtype: str = "float32", torch_side: bool = True, torch_device: str = "cpu"
) -> dict:
    """FLOP/s of one n x n x n matmul with jnp (default device) and, if asked, with torch on `torch_device`
    (median)."""
    flops = 2.0 * n**3
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.dtype(dtype))
    dot = jax.jit(jnp.dot)
    fns = {"jnp": lambda: dot(a, b).block_until_ready()}
    if torch_side:
        import torch

        tdtype = getattr(torch, dtype)
        ta, tb = (torch.randn(n, n, device=torch_device, dtype=tdtype) for _ in range(2))
        fns["torch"] = lambda: torch_sync(torch.mm(ta, tb))
    seconds = timed_interleaved(fns, repeats)
    out = {"n": n, "dtype": dtype, "jnp_flops": flops / median(seconds["jnp"])}
    if torch_side:
        out["torch_flops"] = flops / median(seconds["torch"])
        out["torch_over_jnp"] = out["torch_flops"] / out["jnp_flops"]
    return out


def device_peak() -> dict:
    """The accelerator's dense bf16 peak FLOP/s per device from `train.logging`'s table (None on CPU or unknown)."""
    device = jax.devices()[0]
    return {
        "device_kind": device.device_kind,
        "platform": device.platform,
        "devices": jax.device_count(),
        "peak_flops_per_device": peak_flops_per_device(device=device) if device.platform != "cpu" else None,
    }


def environment(torch_needed: bool = True) -> dict:
    env = {
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "jax_devices": jax.device_count(),
        "machine": platform.processor() or platform.machine(),
        "cpu_count": _cpu_count(),
    }
    if torch_needed:
        import torch
        import transformers

        env.update(
            torch=torch.__version__, torch_threads=torch.get_num_threads(), transformers=transformers.__version__
        )
        if torch.cuda.is_available():
            env["torch_cuda_device"] = torch.cuda.get_device_name(0)
    return env


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def row(metric: str, ours: float | None, reference: float | None, unit: str = "", higher_is_better: bool = True):
    """One table row; ratio = how many times better ours is (ours/ref when higher is better, ref/ours otherwise)."""
    ratio = None
    if ours and reference and math.isfinite(ours) and math.isfinite(reference):
        ratio = ours / reference if higher_is_better else reference / ours
    return {"metric": metric, "ours": ours, "reference": reference, "ratio": ratio, "unit": unit}


def print_table(title: str, rows: list[dict], ours_name: str = "ours", reference_name: str = "reference") -> None:
    """Prints rows of `row(...)` as a fixed-width table (n/a where a side did not run)."""
    fmt = lambda v: "n/a" if v is None else (f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}")
    print(title)
    print(f"{'metric':<34}{ours_name:>14}{reference_name:>16}{'ratio':>9}  unit")
    for r in rows:
        ratio = "n/a" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        print(f"{r['metric']:<34}{fmt(r['ours']):>14}{fmt(r['reference']):>16}{ratio:>9}  {r['unit']}")


def random_setup(size: str, seed: int, tmp, *, with_torch: bool = True, torch_device: str = "cpu", **model_kwargs):
    """(processor, config, our random model, torch model or None): the demo tokenizer, `bench_config(size)`, and
    transformers' model loaded from our weights saved with `save_hf` (so both sides hold the same parameters), in
    fp32 on `torch_device`."""
    from pathlib import Path

    if with_torch and torch_device != "cpu":  # before any model is built or saved
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError(f"--reference-device {torch_device}: torch sees no CUDA device here")

    from qponder_jax.data.processing import Processor
    from qponder_jax.data.tokenizer import build_demo_tokenizer
    from qponder_jax.hf import save_hf
    from qponder_jax.model.qwen2_5_vl import create_model

    proc = Processor.from_pretrained(build_demo_tokenizer(Path(tmp) / "tokenizer"))
    config = bench_config(size, proc)
    model = create_model(config, rngs_seed=seed, **model_kwargs)
    torch_model = None
    if with_torch:
        from transformers import Qwen2_5_VLForConditionalGeneration

        save_hf(model, config, Path(tmp) / "model")
        torch_model = Qwen2_5_VLForConditionalGeneration.from_pretrained(Path(tmp) / "model").to(torch_device)
    return proc, config, model, torch_model
