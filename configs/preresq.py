"""PreResQ-R1: GRPO with the dual-branch (response + preference) reward on five-part ratings.

    qponder --config=configs/preresq.py:tiny --workdir=runs/preresq_tiny        # CPU, embedded default
    qponder --config=configs/preresq.py:7b --workdir=runs/preresq_7b \
        --config.init_checkpoint=/ckpt/Qwen2.5-VL-7B-Instruct --config.data.data_dir=/data/tfds

PreResQ-R1's settings (arXiv 2511.05393; github DanceSkyCode/General-Visual-Quality-RL): 6 rollouts,
48 completions per GPU
(8 prompts x 6; data.batch_size 64 on 8 GPUs), 8 epochs of the KADID-10k train split, lr 1e-6, beta 0.04, max
completion 256, temperature 1.0, the PreResQ-R1 prompt (five ratings; the score is their mean, missing ratings
padded with the first, none = a parse failure, never their default of 3), and a 0/1 format reward next to the
preresq reward (0.375 R - P + 0.5 T + 0.125 F + rank) / 3 with every constant a field of rewards.preresq. The
ranking terms compare images within a batch, so every batch comes from one dataset. The 3b / 7b variants start
from the base Qwen2.5-VL-Instruct HF folder, as the paper does (init_checkpoint), and read KADID-10k from
data.data_dir (`qponder_jax.data.datasets.build("kadid10k", ...)`, split by reference image 6:2:2, seed 42).

Conventions as configs/qponder.py, except the advantage eps: 1e-4 with the unbiased std (VisualQuality-R1's
codebase, which PreResQ-R1 builds on). KL: k3; aggregation: token-mean; clip 0.2.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # make `configs` importable from any cwd

import ml_collections  # noqa: E402

from configs import common, qponder  # noqa: E402

VARIANTS = ("tiny", "3b", "7b")
KADID_TRAIN_IMAGES = 6125  # the KADID-10k train split (by reference image, 6:2:2, seed 42)


def preresq_rewards() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.format = qponder.reward(1.0)  # 0/1: valid <think>..</think><answer>..</answer> holding a number
    c.preresq = qponder.reward(
        1.0,
        w_pair=0.375,  # weight of the pairwise score-and-rank term R (c)
        w_balance=0.5,  # weight of the triplet response-balance term T (b)
        w_triplet=0.125,  # weight of the triplet ranking term F (d)
        lambda_rank=1.0,  # weight of the rank reward (e)
        divisor=3.0,  # the sum is divided by this (f)
        lambda_std=0.5,  # std penalty P = lambda_std * (min_std - sigma) when sigma < min_std (a)
        min_std=0.5,  # rating std below which the penalty applies (a)
        lambda_triple=0.5,  # scale of the balance term (b)
        tol=0.05,  # an extreme of a triple gains 1 when within tol of the median (b)
        balance_dims=4,  # the balance term looks at the first 4 of the 5 ratings (b)
        rank_tol=0.02,  # rank reward is 1 when |mean rating - MOS| < rank_tol (e)
    )  # rewards.preresq.<constant> (weight: its weight in the total)
    return c


def get_config(arg: str | None = None):
    variant = common.parse_variant(arg, VARIANTS, default="tiny")
    config = qponder.base(variant)
    config.rewards = preresq_rewards()
    grpo_fields = dict(num_generations=6, max_new_tokens=256, temperature=1.0, beta=0.04, advantage_eps=1e-4)
    grpo_fields.update(score_numbers=5, max_numbers=5)
    if variant == "tiny":
        config.data = qponder.data(prompt="preresq_r1", batch_size=8, max_pixels=84 * 84)
        config.data.token_buckets = (160, 192, 256)
        config.data.patch_buckets = (64,)
        config.grpo = qponder.grpo(**dict(grpo_fields, max_new_tokens=64))
        config.optim = qponder.optimizer(peak_lr=1e-4, warmup_steps=0)
        config.train = qponder.train(total_steps=10)
        config.train.log_every = 5
        config.train.sample_every = 5
        config.train.checkpoint_every = 5
    else:
        config.data = qponder.data(
            datasets="kadid10k:train", prompt="preresq_r1", batch_size=64, max_pixels=448 * 448, worker_count=8
        )
        config.data.patch_buckets = (256, 1024)
        config.grpo = qponder.grpo(**dict(grpo_fields, num_minibatches=4 if variant == "7b" else 2))
        config.optim = qponder.optimizer(peak_lr=1e-6, warmup_steps=0)
        config.optim.freeze = ("vision_tower",)
        config.train = qponder.train(total_steps=-(-8 * KADID_TRAIN_IMAGES // 64))  # 8 epochs
        config.train.checkpoint_every = 50
    return config.lock()
