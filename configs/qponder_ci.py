"""Q-Ponder-CI: the cold-start SFT recipe (cross-entropy on distilled reasoning).

    qponder --config=configs/qponder_ci.py:tiny --workdir=runs/ci_tiny    # CPU, embedded default, minutes
    qponder --config=configs/qponder_ci.py:7b --workdir=runs/ci_7b \
        --config.model.model_path=/ckpt/Qwen2.5-VL-7B-Instruct \
        --config.data.train_jsonl=/data/cold_start/train.jsonl --config.data.eval_jsonl=/data/cold_start/val.jsonl

Variants: `tiny` (the default) trains a tiny random model on rule-teacher records of the synthetic IQA set, all
made in the workdir; `3b` / `7b` fine-tune real Qwen2.5-VL checkpoints and need the local paths above.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # make `configs` importable from any cwd

import ml_collections  # noqa: E402

from configs import common  # noqa: E402

VARIANTS = ("tiny", "3b", "7b")


def get_config(arg: str | None = None):
    variant = common.parse_variant(arg, VARIANTS, default="tiny")
    config = ml_collections.ConfigDict()
    config.job = "sft"  # which job `qponder` runs (see qponder_jax/main.py:JOBS)
    config.variant = variant  # the variant this config was built for (informational)
    config.seed = 0  # seed of the train state's RNG
    config.mesh = (1, -1, 1)  # mesh shape over ('data', 'fsdp', 'tensor'); -1 takes the remaining devices

    if variant == "tiny":
        config.model = common.model(model_path="embedded:tiny")
        config.data = common.cold_start_data(source="synthetic", batch_size=8)
        config.data.token_buckets = (160, 192, 256)
        config.data.patch_buckets = (64,)
        config.data.max_pixels = 84 * 84
        config.optim = common.optim(peak_lr=3e-3, warmup_steps=5)
        config.train = common.train(total_steps=40)
        config.train.log_every = 5
        config.train.eval_every = 20
        config.train.checkpoint_every = 20
    else:
        config.model = common.model(dtype="bfloat16", attn_impl="auto")
        config.model.remat = True
        config.data = common.cold_start_data(source="jsonl", batch_size=64)
        config.data.max_pixels = 448 * 448
        config.data.patch_buckets = (256, 1024)
        config.data.token_buckets = (512, 1024, 2048)
        config.data.worker_count = 8
        config.optim = common.optim(peak_lr=1e-5 if variant == "7b" else 2e-5, warmup_steps=50, weight_decay=0.0)
        config.optim.b2 = 0.95
        config.optim.freeze = ("vision_tower",)
        config.train = common.train(total_steps=2000, grad_accum=2 if variant == "7b" else 1)
        config.train.logprob_chunk = 8192  # the memory plan's setting (docs/performance.md): no full-vocab logits
        config.train.log_every = 10
        config.train.eval_every = 200
        config.train.checkpoint_every = 200
    return config.lock()
