"""Side-by-side benchmarks against the references a user would otherwise pick: `python -m qponder_jax.bench <what>`.

    python -m qponder_jax.bench decode --size tiny --out /tmp/bench   # sampler vs transformers generate
    python -m qponder_jax.bench sft --out /tmp/bench                  # train step vs transformers + torch AdamW
    python -m qponder_jax.bench grpo --out /tmp/bench                 # GRPO step vs TRL GRPOTrainer
    python -m qponder_jax.bench memory --out /tmp/bench               # XLA's per-device plan for 3B / 7B
    python -m qponder_jax.bench plan --out /tmp/bench                 # 7B GRPO per phase, old vs new layout, roofline

Each prints a table (ours, the reference, the ratio) and, with `--out`, writes `<what>[_<size>].json` there. Speed is
measured here, never asserted in tests. torch, transformers' torch model and TRL are imported only inside the
reference functions: the package itself never needs them. The code lives in `qponder_jax.benchmarks`.
"""

from __future__ import annotations

import argparse
import importlib
import json
from collections.abc import Sequence
from pathlib import Path

from qponder_jax.benchmarks.common import SIZES, bench_config, image_prompts  # noqa: F401  (public re-exports)

COMMANDS = {
    "decode": "sampler tokens/s vs transformers generate",
    "sft": "SFT step (forward, backward, AdamW) vs transformers + torch AdamW, and the matmul peak",
    "grpo": "whole GRPO step vs TRL GRPOTrainer: rollout / reward / update split",
    "memory": "XLA's planned per-device memory of the SFT and GRPO steps for Qwen2.5-VL 3B / 7B meshes",
    "plan": "per device and phase: memory, FLOPs, HBM and collective bytes, old vs new layout; a roofline model",
}


def _module(what: str):
    return importlib.import_module(f"qponder_jax.benchmarks.{what}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m qponder_jax.bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    for what, help_text in COMMANDS.items():
        p = sub.add_parser(what, help=help_text)
        _module(what).add_arguments(p)
        p.add_argument("--out", type=Path, default=None, help="folder for the JSON result")
    return parser


def output_name(result: dict) -> str:
    """`<what>[_<size>].json` for a result dict."""
    return "_".join(filter(None, [result["what"], result.get("size")])) + ".json"


def main(argv: Sequence[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    module = _module(args.what)
    result = module.run(args)
    module.show(result)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / output_name(result)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
