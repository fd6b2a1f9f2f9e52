"""Q-Ponder: GRPO from a Q-Ponder-CI checkpoint with the format + accuracy + consistency reward recipe.

    qponder --config=configs/qponder.py:tiny --workdir=runs/qponder_tiny         # CPU, embedded default, minutes
    qponder --config=configs/qponder.py:tiny --workdir=runs/qp --config.init_checkpoint=runs/ci_tiny
    qponder --config=configs/qponder.py:7b --workdir=runs/qponder_7b \
        --config.init_checkpoint=runs/ci_7b --config.data.data_dir=/data/tfds

Variants: `tiny` (the default) samples from the embedded tiny random model (or the Q-Ponder-CI run named by
init_checkpoint) on the synthetic IQA set; `3b` / `7b` start from a Q-Ponder-CI checkpoint (an SFT workdir of
configs/qponder_ci.py or its exported HF folder) and train on KonIQ-10k's train split, built with
`qponder_jax.data.datasets.build("koniq10k", ...)` into data.data_dir.

The paper's rewards and hyper-parameters are not public. The recipe here is ours: format (valid think/answer with a
number), accuracy (Q-Insight's threshold |s_hat - s| < 0.35) and consistency (OUR definition: the reasoning's level
word against the score's level bin, partial credit for a neighbouring bin), G = 8 (Q-Insight), lr 1e-6 and clip 0.2
(VisualQuality-R1). Our GRPO conventions (the README's "GRPO conventions" table compares them with verl,
TRL, Tunix and EasyDeL):
- aggregation `token-mean`: the loss is the mean over every completion token of a minibatch (verl's default; DAPO);
  `seq-mean-token-mean` (Tunix, the original GRPO) and `seq-mean-token-sum-norm` (Dr. GRPO: token sums / the
  constant norm_length, defaulting to max_new_tokens) are the alternatives;
- advantages (r - mean_g) / (std_g + eps) with the UNBIASED group std (ddof 1, as verl, TRL and Tunix) and
  eps 1e-6; `none` is Dr. GRPO's unnormalized r - mean_g; groups with equal rewards get 0 and are counted;
- KL to the frozen starting model with the k3 estimator (log-ratio clamped to +-20, like the policy ratio); beta 0
  skips the reference entirely;
- per-token ratio clipping [1 - eps_low, 1 + eps_high] (0.2 / 0.2; DAPO's clip-higher sets eps_high 0.28).
`configs/preresq.py` reuses the section builders below.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # make `configs` importable from any cwd

import ml_collections  # noqa: E402

from configs import common  # noqa: E402

VARIANTS = ("tiny", "3b", "7b")


def data(**overrides) -> ml_collections.ConfigDict:
    """The prompt data: IQA records -> the scoring prompt with the image, left-padded, plus the normalized MOS."""
    c = ml_collections.ConfigDict()
    c.datasets = "synthetic:train"  # comma-separated "name:split" IQA sources; every batch comes from ONE of them
    c.data_dir = ""  # tfds folder of the built IQA datasets (not needed for "synthetic")
    c.synthetic_size = 256  # images in the synthetic split (0 = its default size)
    c.synthetic_seed = 0  # seed of the synthetic images and distortions
    c.synthetic_min_side = 56  # smallest synthetic image side in pixels
    c.synthetic_max_side = 84  # largest synthetic image side in pixels
    c.synthetic_distortions = ""  # comma-separated synthetic distortions ("" = all: see data/datasets/synthetic.py)
    c.prompt = "qponder"  # prompt name in qponder_jax/prompts.py (use the one the cold start trained on)
    c.prompt_text = ""  # a custom user prompt instead of `prompt` ("" = use `prompt`)
    c.batch_size = 8  # prompts per GRPO step (global, over all devices); each gets grpo.num_generations rollouts
    c.min_pixels = 0  # smallest image area after resize (0 = the preprocessor_config.json value)
    c.max_pixels = 0  # largest image area after resize (0 = the preprocessor_config.json value)
    c.token_buckets = (256, 512, 1024)  # prompt lengths a batch pads to (the smallest that fits)
    c.patch_buckets = (64, 256, 1024, 4096)  # patch rows per image a batch pads to (multiples of 4)
    c.image_buckets = (1,)  # image slots per sample
    c.truncation = False  # cut prompts longer than the largest token bucket instead of raising
    c.seed = 0  # shuffling seed
    c.worker_count = 0  # grain worker processes for decoding and tokenizing (0 = in the main process)
    c.update(overrides)
    return c


def grpo(**overrides) -> ml_collections.ConfigDict:
    """The GRPO step: rollouts, advantages and the clipped, KL-regularized loss."""
    c = ml_collections.ConfigDict()
    c.num_generations = 8  # G rollouts per prompt, from one prefill (the KV cache is tiled G times)
    c.max_new_tokens = 512  # longest completion L (rollouts are [B * G, L])
    c.temperature = 1.0  # sampling temperature (> 0); the loss's log-probs use the same temperature
    c.top_k = 0  # top-k filter while sampling (0 = off)
    c.top_p = 1.0  # nucleus filter while sampling (1 = off)
    c.num_iterations = 1  # mu: passes over the same rollouts (the first update of the first pass has ratio 1)
    c.num_minibatches = 1  # optimizer updates per pass; B * G must be a multiple
    c.share_prompts = True  # when num_minibatches divides G: the update runs each prompt + image once per minibatch
    c.beta = 0.001  # KL coefficient (0 = no reference model at all)
    c.kl_estimator = "k3"  # "k3" (default), "k2" or "k1"
    c.eps_low = 0.2  # ratio clip below 1 - eps_low
    c.eps_high = 0.2  # ratio clip above 1 + eps_high (DAPO's clip-higher: 0.28)
    c.aggregation = "token-mean"  # "token-mean", "seq-mean-token-mean" or "seq-mean-token-sum-norm" (Dr. GRPO)
    c.norm_length = 0  # the constant length of seq-mean-token-sum-norm (0 = max_new_tokens)
    c.advantage_std = "unbiased"  # group std: "unbiased" (ddof 1), "population" (ddof 0) or "none" (Dr. GRPO)
    c.advantage_eps = 1e-6  # added to the group std
    c.score_numbers = 1  # the score is the mean of the answer's first N numbers (PreResQ-R1: 5)
    c.max_numbers = 5  # numbers the on-device parser keeps from the answer (>= score_numbers)
    c.score_range = (1.0, 5.0)  # the prompt's scale: parsed scores outside count in grpo/out_of_range_rate
    c.update(overrides)
    return c


def reward(weight: float, **constants) -> ml_collections.ConfigDict:
    """One reward section: its weight in the sum and its constants (keyword arguments of the registered reward)."""
    c = ml_collections.ConfigDict()
    c.weight = weight  # weight in the total reward (0 = off)
    for key, value in constants.items():
        setattr(c, key, value)
    return c


def qponder_rewards() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.format = reward(1.0)  # 1 when <think>..</think><answer>..</answer> is valid and the answer holds a number
    # 1 when |score - MOS| < eps (mode "threshold", Q-Insight); "linear": 1 - |d| / scale; "gaussian": sigma
    c.accuracy = reward(1.0, mode="threshold", eps=0.35, scale=4.0, sigma=0.5)
    # reasoning level word vs the score's level bin among five equal bins of [lo, hi]: 1 same, `adjacent` next to it
    c.consistency = reward(0.5, adjacent=0.5, lo=1.0, hi=5.0)
    return c


def train(*, total_steps: int) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.total_steps = total_steps  # GRPO steps (each: rollouts + num_iterations * num_minibatches updates)
    c.log_every = 10  # write train/ and grpo/ metrics every N steps (SRCC / PLCC over that window)
    c.sample_every = 10  # log one decoded completion every N steps (0 = never)
    c.checkpoint_every = 100  # save a checkpoint every K steps (and always at the end and on SIGTERM)
    c.keep_checkpoints = 3  # keep the last N checkpoints
    c.async_checkpoints = True  # write checkpoints in a background thread
    c.max_consecutive_nonfinite = 0  # skip up to this many non-finite steps in a row; one more stops the run
    c.progress_bar = True  # show a tqdm progress bar when stdout is a terminal
    return c


def base(variant: str, job_name: str = "grpo") -> ml_collections.ConfigDict:
    """Fields every GRPO config shares (job, seed, mesh, model, init checkpoint)."""
    config = ml_collections.ConfigDict()
    config.job = job_name  # which job `qponder` runs (see qponder_jax/main.py:JOBS)
    config.variant = variant  # the variant this config was built for (informational)
    config.seed = 0  # seed of the train state's RNG (rollout sampling)
    config.mesh = (1, -1, 1)  # mesh shape over ('data', 'fsdp', 'tensor'); -1 takes the remaining devices
    config.sampling_layout = "auto"  # sampler weights: "auto", "decode" (stationary), "decode:T" (groups of T), "train"
    # the starting policy (and KL reference): an orbax SFT workdir (configs/qponder_ci.py) or an HF folder;
    # "" = model.model_path
    config.init_checkpoint = ""
    if variant == "tiny":
        config.model = common.model(model_path="embedded:tiny")
    else:
        # model_path "": the base comes from the SFT workdir
        config.model = common.model(dtype="bfloat16", attn_impl="auto")
        config.model.remat = True
    return config


def optimizer(*, peak_lr: float, warmup_steps: int) -> ml_collections.ConfigDict:
    c = common.optim(peak_lr=peak_lr, warmup_steps=warmup_steps)
    c.end_lr_ratio = 1.0  # constant learning rate after warmup (schedules count inner updates)
    return c


def get_config(arg: str | None = None):
    variant = common.parse_variant(arg, VARIANTS, default="tiny")
    config = base(variant)
    config.rewards = qponder_rewards()
    if variant == "tiny":
        config.data = data(batch_size=8, max_pixels=84 * 84, token_buckets=(160, 192, 256), patch_buckets=(64,))
        config.grpo = grpo(num_generations=4, max_new_tokens=64)
        config.optim = optimizer(peak_lr=1e-4, warmup_steps=0)
        config.train = train(total_steps=10)
        config.train.log_every = 5
        config.train.sample_every = 5
        config.train.checkpoint_every = 5
    else:
        config.data = data(datasets="koniq10k:train", batch_size=64, max_pixels=448 * 448, worker_count=8)
        config.data.patch_buckets = (256, 1024)
        config.grpo = grpo(num_minibatches=4 if variant == "7b" else 2)
        config.optim = optimizer(peak_lr=1e-6, warmup_steps=10)
        config.optim.freeze = ("vision_tower",)
        config.train = train(total_steps=1000)
    return config.lock()
