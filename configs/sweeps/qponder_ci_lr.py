"""Example sweep: the Q-Ponder-CI cold start (configs/qponder_ci.py) over three learning rates.

    python launch/sweep.py --config=configs/sweeps/qponder_ci_lr.py:tiny --root=runs/ci_lr --dry_run
    python launch/sweep.py --config=configs/sweeps/qponder_ci_lr.py:tiny --root=runs/ci_lr
    python launch/collect.py --root=runs/ci_lr --metric=eval/loss

`get_config(arg)` is the qponder_ci config of that variant (`tiny` here is shortened to a few steps so the whole sweep
runs in minutes on a CPU); `get_sweep(arg)` lists one override dict per run (keys are dotted config fields).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # make `configs` importable from any cwd

from configs import qponder_ci  # noqa: E402


def get_config(arg: str | None = None):
    config = qponder_ci.get_config(arg)
    if config.variant == "tiny":  # a few steps on a small synthetic set: a CPU sweep in minutes
        config.train.total_steps = 4
        config.optim.warmup_steps = 1
        config.train.log_every = 1
        config.train.eval_every = 0
        config.train.checkpoint_every = 4
        config.data.synthetic_train_size = 16
        config.data.synthetic_eval_size = 16
    return config


def get_sweep(arg: str | None = None) -> list[dict]:
    lrs = (1e-3, 3e-3, 1e-2) if (arg or "tiny") == "tiny" else (5e-6, 1e-5, 2e-5)
    return [{"optim.peak_lr": lr} for lr in lrs]
