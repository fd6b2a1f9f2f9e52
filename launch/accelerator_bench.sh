#!/usr/bin/env bash
# The benchmarks on an accelerator machine (an NVIDIA GPU or a TPU): absolute tokens/s, model FLOP/s and MFU of ours
# and, on an NVIDIA GPU with torch, transformers / torch on the same GPU beside it (--reference-device cuda). On a TPU
# the torch side is skipped (--no-reference). docs/performance.md ("On an accelerator") says how to read the tables.
#
# Usage: launch/accelerator_bench.sh [OUT_DIR] [NAME ...]
#   OUT_DIR   where each benchmark's JSON goes, one folder per NAME (default runs/bench-accelerator)
#   NAME      run only these (default: the first seven, about 5 minutes on one H200):
#             decode-tiny decode-small decode-small-bf16 decode-small-b64 sft-bf16 sft-small-b64 grpo-small
#             sft-3b decode-3b-b64 grpo-3b   (Qwen2.5-VL-3B's shapes, ours only: they need one device of >= 100 GiB)
# Settings (environment): PYTHON (default python3), DRY_RUN=1 (print each benchmark's command, run nothing). A
# benchmark that fails is reported and the others still run; the exit status is the number of failures.
set -uo pipefail

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exit 0
fi

out="${1:-runs/bench-accelerator}"
shift $(($# > 0 ? 1 : 0))
python="${PYTHON:-python3}"
[[ "${DRY_RUN:-0}" == 1 ]] || mkdir -p "$out"

if "$python" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  reference=(--reference-device cuda)
else
  reference=(--no-reference)
fi

declare -A runs=(
  [decode-tiny]="decode --size tiny"
  [decode-small]="decode --size small"
  [decode-small-bf16]="decode --size small --dtype bfloat16"
  [decode-small-b64]="decode --size small --dtype bfloat16 --batch 64"
  [sft-bf16]="sft --dtype bfloat16 --matmul-n 8192"
  [sft-small-b64]="sft --size small --dtype bfloat16 --batch 64 --matmul-n 8192"
  [grpo-small]="grpo --size small --no-reference"
  [sft-3b]="sft --size 3b --dtype bfloat16 --batch 8 --tokens 512 --matmul-n 8192 --no-reference"
  [decode-3b-b64]="decode --size 3b --dtype bfloat16 --batch 64 --no-reference"
  [grpo-3b]="grpo --size 3b --no-reference"
)
order=(decode-tiny decode-small decode-small-bf16 decode-small-b64 sft-bf16 sft-small-b64 grpo-small)
large=(sft-3b decode-3b-b64 grpo-3b)
selected=("${@:-${order[@]}}")

failures=0
for name in "${selected[@]}"; do
  if [[ -z "${runs[$name]+x}" ]]; then
    echo "unknown benchmark $name; choose from: ${order[*]} ${large[*]}" >&2
    exit 2
  fi
  read -r -a args <<<"${runs[$name]}"
  # TRL's GRPO has no GPU setup here (it wants vLLM); the 3b runs are ours alone
  [[ "$name" == grpo-* || "$name" == *-3b* ]] || args+=("${reference[@]}")
  echo "== $name: $python -m qponder_jax.bench ${args[*]} --out $out/$name"
  [[ "${DRY_RUN:-0}" == 1 ]] && continue
  if ! "$python" -m qponder_jax.bench "${args[@]}" --out "$out/$name"; then
    echo "!! $name failed" >&2
    failures=$((failures + 1))
  fi
done
exit "$failures"
