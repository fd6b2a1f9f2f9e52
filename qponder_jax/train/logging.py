"""Training metrics: stdout lines, TensorBoard event files, a JSONL copy, a progress bar on a terminal, and MFU.

MFU (model FLOPs utilization) = model FLOPs per second / (number of devices * peak FLOP/s per device), with the
model FLOPs of a training step estimated as

    FLOPs/step = (6 * N_text_train + 2 * N_text_frozen) * T  +  (6 * N_vis_train + 2 * N_vis_frozen) * P

where T is the number of non-padding text tokens and P the number of non-padding vision patches in the global step,
N_* are parameter counts of the text stack (embedding table excluded unless it doubles as the output head) and the
vision tower (the merger counted once per merged token, i.e. divided by spatial_merge_size**2). A trainable
parameter costs 2 FLOPs per token forward and 4 backward; a frozen one 2 (forward only). Attention-score FLOPs
(~ 12 * layers * T^2 * width) and padding are left out, so this is a lower bound on the work the device does.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

from qponder_jax.train.optim import FROZEN, named_leaves

# Dense bf16 peak FLOP/s per device, matched as a substring of jax's `device_kind` (first match wins).
PEAK_FLOPS_BY_DEVICE_KIND: tuple[tuple[str, float], ...] = (
    ("TPU v6", 918e12),
    ("TPU v5p", 459e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v4", 275e12),
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L4", 121e12),
)


def peak_flops_per_device(override: float = 0.0, device: jax.Device | None = None) -> float | None:
    """`override` if > 0, else the table entry for the device kind; None when unknown (e.g. CPU)."""
    if override > 0:
        return float(override)
    kind = (device or jax.devices()[0]).device_kind
    for key, flops in PEAK_FLOPS_BY_DEVICE_KIND:
        if key.lower() in kind.lower():
            return flops
    return None


@dataclasses.dataclass(frozen=True)
class FlopModel:
    """Training FLOPs per non-padding text token and per non-padding vision patch (see the module docstring)."""

    per_text_token: float
    per_patch: float

    @classmethod
    def from_params(cls, params, labels, *, merge_unit: int = 4) -> FlopModel:
        paths = dict(named_leaves(params))
        has_head = any("lm_head" in p for p in paths)
        per_token = per_patch = 0.0
        for (path, x), (_, label) in zip(named_leaves(params), named_leaves(labels), strict=True):
            if "embed_tokens" in path and has_head:
                continue  # a table lookup, not a matmul
            cost = (2.0 if label == FROZEN else 6.0) * float(np.prod(x.shape))
            if "visual/" in path or path.startswith("visual"):
                per_patch += cost / merge_unit if "merger" in path else cost
            else:
                per_token += cost
        return cls(per_text_token=per_token, per_patch=per_patch)

    def step_flops(self, tokens: float, patches: float) -> float:
        return self.per_text_token * tokens + self.per_patch * patches


class MetricLogger:
    """Writes scalars to stdout, TensorBoard (`<workdir>/tensorboard`) and `<workdir>/metrics.jsonl` on process 0.

    A run resumed at `initial_step` replays the steps after it, so the rows of `metrics.jsonl` past that step (logged
    before an interruption that lost them) are dropped first, and TensorBoard is told to hide its events past it
    (`purge_step`): one row per step and prefix, the replayed values."""

    def __init__(
        self,
        workdir: str | Path,
        *,
        total_steps: int,
        initial_step: int = 0,
        progress: bool | None = None,
        tensorboard: bool = True,
    ):
        self.active = jax.process_index() == 0
        self.workdir = Path(workdir)
        self._writer = self._bar = self._jsonl = None
        if not self.active:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        dropped = _drop_rows_after(self.workdir / "metrics.jsonl", initial_step)
        self._jsonl = open(self.workdir / "metrics.jsonl", "a")  # closed in close()
        if tensorboard:
            from tensorboardX import SummaryWriter

            purge = initial_step + 1 if dropped else None  # hide the events of the steps about to be replayed
            self._writer = SummaryWriter(logdir=str(self.workdir / "tensorboard"), purge_step=purge)
        if progress is None:
            progress = sys.stdout.isatty()
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True)

    def write(self, step: int, scalars: dict[str, float | None], *, prefix: str = "train") -> None:
        """Logs `scalars` at `step` under `prefix/` (None values print as n/a and are not sent to TensorBoard)."""
        if not self.active:
            return
        parts = [f"{prefix} step {step}"] + [f"{k} {_fmt(v)}" for k, v in scalars.items()]
        line = " | ".join(parts)
        if self._bar is not None:
            self._bar.write(line)
        else:
            print(line, flush=True)
        record = {"step": step, "prefix": prefix, "time": time.time()}
        record.update({k: (None if v is None else float(v)) for k, v in scalars.items()})
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._writer is not None:
            for k, v in scalars.items():
                if v is not None:
                    self._writer.add_scalar(f"{prefix}/{k}", float(v), step)
            self._writer.flush()

    def text(self, message: str) -> None:
        """A free-form line on stdout (through the progress bar when there is one)."""
        if not self.active:
            return
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def advance(self, step: int) -> None:
        """Moves the progress bar to `step`."""
        if self._bar is not None:
            self._bar.update(step - self._bar.n)

    def close(self) -> None:
        for thing in (self._bar, self._writer, self._jsonl):
            if thing is not None:
                thing.close()
        self._bar = self._writer = self._jsonl = None


def _drop_rows_after(path: Path, step: int) -> int:
    """Rewrites the metrics JSONL at `path` without its rows past `step` (and lines cut off by a crash); returns how
    many lines it dropped."""
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            if int(json.loads(line)["step"]) <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    if len(kept) < len(lines):
        partial = path.with_name(path.name + ".partial")
        partial.write_text("".join(line + "\n" for line in kept))
        partial.replace(path)
    return len(lines) - len(kept)


def _fmt(v: float | None) -> str:
    if v is None:
        return "n/a"
    v = float(v)
    if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
        return f"{v:.3e}"
    return f"{v:.4f}"


def read_metrics(workdir: str | Path, prefix: str = "train") -> list[dict]:
    """The JSONL records written under `prefix` (for tests and reports)."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("prefix") == prefix]
