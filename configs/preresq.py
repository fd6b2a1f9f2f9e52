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

VQA variants (PreResQ-R1 carries the same reward to video): `vqa_tiny` (the synthetic VQA set from data.data_dir,
else built into <workdir>/data/tfds, nothing downloaded; the embedded tiny model, or
--config.init_checkpoint=runs/preresq_tiny to continue the tiny image run) and `vqa_7b` (LSVQ's train split,
28,056 videos, from the image run's HF export, init_checkpoint):
    qponder --config=configs/export.py --workdir=runs/preresq_7b_export --config.checkpoint=runs/preresq_7b
    qponder --config=configs/preresq.py:vqa_7b --workdir=runs/preresq_vqa_7b --config.data.data_dir=/data/tfds
`data.video` holds the `qponder_jax.data.video.VideoSampling` fields: the two-stream layout (a global clip of
frames sampled over the whole video, downscaled, plus high-resolution key-frame crops given as images; the video
and its crops fill num_crops + 1 vision slots, data.image_buckets). From PreResQ-R1's public VQA script: 5
rollouts, 5 prompts (25 completions) per GPU, 2 epochs, the vision tower trained (data.batch_size 40 = 5 prompts on
each of 8 devices; they used 4 GPUs), their video question (prompt "preresq_r1_video", adapted to a video global
stream: see qponder_jax/prompts.py) and its two ratings, global and local (score_numbers 2; their reward's
balance term looks at both). Ours, not theirs: 1 frame per second (4-16 frames), 3 crops of 448 pixels.

Conventions as configs/qponder.py, except the advantage eps: 1e-4 with the unbiased std (VisualQuality-R1's
codebase, which PreResQ-R1 builds on). KL: k3; aggregation: token-mean; clip 0.2.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # make `configs` importable from any cwd

import ml_collections  # noqa: E402

from configs import common, qponder  # noqa: E402

VARIANTS = ("tiny", "3b", "7b", "vqa_tiny", "vqa_7b")
KADID_TRAIN_IMAGES = 6125  # the KADID-10k train split (by reference image, 6:2:2, seed 42)
LSVQ_TRAIN_VIDEOS = 28056  # LSVQ's official train split (is_test False in labels_train_test.csv)


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


def video(**overrides) -> ml_collections.ConfigDict:
    """`data.video`: how videos are sampled (the fields of qponder_jax.data.video.VideoSampling)."""
    c = ml_collections.ConfigDict()
    c.fps = 1.0  # target sampled frames per second of the global clip (used when num_frames == 0)
    c.num_frames = 0  # fixed number of global frames (rounded to a multiple of 2); 0 = from fps
    c.min_frames = 4  # fewest global frames sampled from fps
    c.max_frames = 16  # most global frames sampled from fps
    c.layout = "two_stream"  # "two_stream" (global low-res clip + high-res key-frame crops) or "uniform" (clip only)
    c.global_max_pixels = 224 * 224  # two_stream: each global frame downscaled to at most this area (0 = keep)
    c.num_crops = 3  # two_stream: high-resolution crops, one per key frame (centers of equal time segments)
    c.crop_size = 448  # two_stream: crop side in pixels (clamped to the frame)
    c.crop_mode = "detail"  # two_stream: crop at the highest-gradient-energy window ("detail") or the "center"
    c.update(overrides)
    return c


def vqa(config: ml_collections.ConfigDict, size: str) -> None:
    """Turns the image config of `size` into its VQA variant, in place."""
    config.data.prompt = "preresq_r1_video"  # PreResQ-R1's video question: two ratings, global and local
    config.grpo.score_numbers = 2  # the score is the mean of the global and the local rating
    config.rewards.preresq.balance_dims = 2  # the balance term compares both ratings (theirs: num_element_dims 2)
    if size == "tiny":
        config.data.datasets = "synthetic_vqa:train"  # built into <workdir>/data/tfds when data.data_dir lacks it
        config.data.image_buckets = (3,)  # vision slots: the clip and its two crops
        config.data.min_pixels, config.data.max_pixels = 28 * 28, 56 * 56  # crops of 32-48 pixels: <= 16 patches
        config.data.token_buckets = (256,)  # the video question and its 3 slots: 189-199 tokens
        config.data.video = video(num_frames=4, global_max_pixels=56 * 56, num_crops=2, crop_size=56)
        return
    config.init_checkpoint = f"runs/preresq_{size}_export/hf"  # the image run's HF export (see the docstring)
    config.data.datasets = "lsvq:train"
    config.data.batch_size = 40  # 5 prompts x 5 rollouts = 25 completions per device on 8 devices
    config.data.image_buckets = (4,)  # vision slots: the clip and its three crops
    # 16 global frames of at most 224 x 224 are resized up to Qwen's 128 * 28 * 28 video minimum: <= 4608 patch rows,
    # plus 3 crops of 1024 (448 x 448); about 1600-2100 tokens with the question
    config.data.patch_buckets = (4096, 8192)
    config.data.token_buckets = (1536, 2048, 2560)
    config.data.video = video()
    config.grpo.num_generations = 5
    config.grpo.num_minibatches = 4
    config.optim.freeze = ()
    config.train.total_steps = -(-2 * LSVQ_TRAIN_VIDEOS // config.data.batch_size)  # 2 epochs


def get_config(arg: str | None = None):
    variant = common.parse_variant(arg, VARIANTS, default="tiny")
    size = variant.removeprefix("vqa_")
    config = qponder.base(size)
    config.variant = variant  # the variant this config was built for (informational)
    config.rewards = preresq_rewards()
    grpo_fields = dict(num_generations=6, max_new_tokens=256, temperature=1.0, beta=0.04, advantage_eps=1e-4)
    grpo_fields.update(score_numbers=5, max_numbers=5)
    if size == "tiny":
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
        config.grpo = qponder.grpo(**dict(grpo_fields, num_minibatches=4 if size == "7b" else 2))
        config.optim = qponder.optimizer(peak_lr=1e-6, warmup_steps=0)
        config.optim.freeze = ("vision_tower",)
        config.train = qponder.train(total_steps=-(-8 * KADID_TRAIN_IMAGES // 64))  # 8 epochs
        config.train.checkpoint_every = 50
    if variant.startswith("vqa_"):
        vqa(config, size)
    return config.lock()
