"""The demo: the whole Q-Ponder pipeline at toy scale on a CPU, with nothing downloaded.

    qponder --config=configs/demo.py --workdir=runs/demo          # ~5 minutes on 2 CPU cores
    qponder --config=configs/demo.py:test --workdir=/tmp/demo     # the reduced setting tests/test_demo.py runs
    qponder --config=configs/demo.py:smoke --workdir=/tmp/smoke   # every stage in about a minute (CI's bare install)

Seven stages, each in its own sub-folder of the workdir with a `done.json` marker: (1) the demo tokenizer and a tiny
random Qwen2.5-VL as an HF folder, (2) the synthetic IQA set (train / validation / test), (3) cold-start data from the
rule-based teacher (with MLLM-like errors, filtered against the MOS), (4) cold-start SFT -> Q-Ponder-CI, (5) GRPO ->
Q-Ponder, (6) evaluation of the random model, Q-Ponder-CI and Q-Ponder on the test split, next to the teacher's own
scores, (7) export of Q-Ponder as an HF folder. Rerunning the same command skips
finished stages and resumes an interrupted one from its checkpoint.

The stage configs are the `tiny` variants of configs/qponder_ci.py, configs/qponder.py, configs/eval.py and
configs/export.py with the fields below written over them.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # make `configs` importable from any cwd

import ml_collections  # noqa: E402

from configs import common  # noqa: E402

VARIANTS = ("default", "test", "smoke")

# A short user prompt: the demo model is trained from scratch, so the long expert prompt only costs tokens.
DEMO_PROMPT = "Rate the quality of this image."


def get_config(arg: str | None = None):
    variant = common.parse_variant(arg, VARIANTS, default="default")
    config = ml_collections.ConfigDict()
    config.job = "demo"  # which job `qponder` runs (see qponder_jax/main.py:JOBS)
    config.variant = variant  # the variant this config was built for (informational)
    config.seed = 0  # seed of the random model, the synthetic images and the training runs

    m = config.model = common.model(model_path="embedded:demo")
    m.hidden_size = 64  # language model width
    m.intermediate_size = 128  # language model MLP width
    m.num_layers = 2  # language model layers
    m.vision_hidden_size = 32  # vision tower width
    m.vision_depth = 2  # vision tower blocks
    m.patch_init = "dct"  # patch-embedding init: "dct" (a fixed 2-D DCT filter bank, data-free) or "random"

    d = config.data = ml_collections.ConfigDict()
    d.train_size = 4096  # synthetic training images (cold-start SFT and GRPO prompts)
    d.validation_size = 64  # synthetic held-out images (the SFT eval loss)
    d.test_size = 256  # synthetic test images (the table)
    d.min_side = 56  # smallest image side in pixels (56 px = 4 image tokens)
    d.max_side = 84  # largest image side in pixels (84 px = 9 image tokens)
    # comma-separated synthetic distortions ("" = all seven: see data/datasets/synthetic.py). The demo model learns
    # from scratch in minutes; it reads global exposure and contrast changes well, while blur, noise, JPEG and
    # pixelation need a larger vision tower and longer training than a CPU demo affords (see README, demo).
    d.distortions = "none,brightness,contrast"
    d.prompt_text = DEMO_PROMPT  # the user prompt of every stage
    d.response_style = "short"  # teacher response: "short" (`<think>blur, strong; quality poor</think>...`) or "long"

    # The rule-based teacher errs like an MLLM teacher (qponder_jax/data/rule_teacher.py; docs/demo.md says why these
    # values): score = clip(center + scale * (MOS - center) + bias[type] + N(0, noise^2), 1, 5).
    t = config.teacher = ml_collections.ConfigDict()
    t.bias = "contrast:+0.6,brightness:-0.4"  # per-distortion score shift, "type:shift,..." ("" = none)
    t.scale = 0.8  # slope of its score against the MOS (< 1: scores compressed toward `center`)
    t.center = 3.0  # the score the compression pulls toward
    t.noise = 0.3  # std of its per-image score noise
    t.severity_error = 0.15  # probability that it names a severity one step off
    t.level_error = 0.1  # probability that its quality word is one bin off its own score
    t.tolerance = 0.7  # cold-start filter (as the distill job's): keep a response when |score - MOS| <= tolerance

    s = config.sft = ml_collections.ConfigDict()
    s.total_steps = 2500  # cold-start SFT updates
    s.batch_size = 16  # images per update
    s.peak_lr = 3e-3  # learning rate after warmup (cosine decay to 0)
    s.warmup_steps = 20  # linear warmup updates
    s.log_every = 50  # progress line every N updates
    s.checkpoint_every = 500  # checkpoint every K updates (resume point)

    g = config.grpo = ml_collections.ConfigDict()
    g.total_steps = 500  # GRPO steps (rollouts + one update each)
    g.batch_size = 8  # prompts per step
    g.num_generations = 4  # G rollouts per prompt
    g.max_new_tokens = 32  # longest rollout (a short teacher response is ~26 tokens)
    g.temperature = 1.0  # rollout sampling temperature
    g.peak_lr = 2e-4  # learning rate (constant)
    g.beta = 0.01  # KL coefficient to Q-Ponder-CI
    g.accuracy_mode = "gaussian"  # accuracy reward: "gaussian" exp(-(score - MOS)^2 / 2 sigma^2), or "threshold"
    g.accuracy_sigma = 0.5  # width of the "gaussian" accuracy reward
    g.consistency_weight = 0.5  # weight of the reasoning-consistency reward (level word vs score; accuracy weighs 1)
    g.log_every = 50  # progress line every N steps
    g.checkpoint_every = 100  # checkpoint every K steps (resume point)

    e = config.eval = ml_collections.ConfigDict()
    e.batch_size = 32  # images per generate call
    e.max_new_tokens = 32  # longest greedy completion

    config.export_dtype = ""  # safetensors dtype of the exported Q-Ponder ("" = the parameters' own, float32)

    if variant == "test":  # reduced, still meaningful: the quality test of tests/test_demo.py (same cold start)
        d.validation_size, d.test_size = 32, 128
    if variant == "smoke":  # every stage and code path, a few steps each: proves an install works, not quality
        d.train_size, d.validation_size, d.test_size = 64, 16, 16
        s.total_steps, s.warmup_steps, s.log_every, s.checkpoint_every = 10, 2, 5, 10
        g.total_steps, g.batch_size, g.log_every, g.checkpoint_every = 2, 4, 1, 2
        e.batch_size = 16
    return config.lock()
