"""Config builders shared by the config files (big_vision style: a config is code; variants pick the sizes).

Each builder returns an unlocked ConfigDict section; the config file assembles them, applies its variant and
returns `config.lock()`-ed, so a misspelled `--config.<key>` override is an error. Every field has a comment.
"""

from __future__ import annotations

import ml_collections


def parse_variant(arg: str | None, variants: tuple[str, ...], default: str) -> str:
    """The variant named by the `:arg` suffix of `--config=file.py:arg` (default when empty); raises if unknown."""
    variant = (arg or default).strip()
    if variant not in variants:
        raise ValueError(f"unknown config variant {variant!r}; choose one of {list(variants)}")
    return variant


def model(
    *, model_path: str = "", tokenizer_path: str = "", dtype: str = "float32", attn_impl: str = "xla"
) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model_path = model_path  # local HF Qwen2.5-VL folder, or "embedded:tiny" (tiny random model in the workdir)
    c.tokenizer_path = tokenizer_path  # tokenizer + preprocessor folder; "" = the model folder
    c.dtype = dtype  # compute dtype of matmuls: "float32" or "bfloat16"
    c.param_dtype = "float32"  # dtype the parameters (and optimizer state) are stored in
    c.remat = False  # rematerialize each layer's activations in the backward pass (saves memory, costs ~1/3 FLOPs)
    c.attn_impl = attn_impl  # attention: "xla" (anywhere), "cudnn" (NVIDIA GPU), "splash" (TPU) or "auto" (by device)
    c.seed = 0  # seed of the tiny random model (only used with model_path "embedded:tiny")
    return c


def cold_start_data(*, source: str = "synthetic", batch_size: int = 8) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.source = source  # "synthetic": rule-teacher records written into <workdir>/data; "jsonl": the two paths below
    c.train_jsonl = ""  # cold-start JSONL for training (source "jsonl")
    c.eval_jsonl = ""  # held-out cold-start JSONL for the eval loss (source "jsonl"; "" = no eval)
    c.synthetic_train_size = 256  # synthetic records in the training split
    c.synthetic_eval_size = 32  # synthetic records in the held-out split
    c.synthetic_seed = 0  # seed of the synthetic images and distortions
    c.synthetic_min_side = 56  # smallest synthetic image side in pixels
    c.synthetic_max_side = 84  # largest synthetic image side in pixels
    c.synthetic_distortions = ""  # comma-separated synthetic distortions ("" = all: see data/datasets/synthetic.py)
    c.prompt = "qponder"  # prompt name in qponder_jax/prompts.py for the synthetic records
    c.batch_size = batch_size  # global batch size (all devices, all accumulation micro-batches)
    c.eval_batch_size = batch_size  # global batch size of the eval loss
    c.eval_max_batches = 16  # cap on eval batches per evaluation (0 = the whole held-out split)
    c.min_pixels = 0  # smallest image area after resize (0 = the preprocessor_config.json value)
    c.max_pixels = 0  # largest image area after resize (0 = the preprocessor_config.json value)
    c.token_buckets = (256, 512, 1024, 2048)  # sequence lengths a batch pads to (the smallest that fits)
    c.patch_buckets = (64, 256, 1024, 4096)  # patch rows per sample a batch pads to (multiples of 4)
    c.image_buckets = (1, 2)  # image slots per sample a batch pads to
    c.truncation = False  # cut examples longer than the largest token bucket instead of raising
    c.seed = 0  # shuffling seed
    c.worker_count = 0  # grain worker processes for decoding and tokenizing (0 = in the main process)
    c.strict_images = False  # raise on a missing or corrupt image or a malformed JSONL response instead of skipping
    return c


def optim(*, peak_lr: float, warmup_steps: int, weight_decay: float = 0.0) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.peak_lr = peak_lr  # learning rate after warmup
    c.warmup_steps = warmup_steps  # linear warmup updates (the first update uses peak_lr / warmup_steps)
    c.end_lr_ratio = 0.0  # the cosine decays to end_lr_ratio * peak_lr at the last update
    c.b1 = 0.9  # AdamW beta1
    c.b2 = 0.999  # AdamW beta2
    c.eps = 1e-8  # AdamW epsilon
    c.weight_decay = weight_decay  # decoupled weight decay, on matrices only (not norms or biases)
    c.clip_norm = 1.0  # clip the global gradient norm of the trainable parameters to this (0 = off)
    c.freeze = ()  # parameter groups to freeze: "vision_tower" (patch embed + ViT blocks), "merger", "language_model"
    c.freeze_regex = ""  # also freeze parameters whose path (e.g. visual/blocks/0/attn/qkv/kernel) matches this
    return c


def train(*, total_steps: int, grad_accum: int = 1) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.total_steps = total_steps  # optimizer updates to run
    c.grad_accum = grad_accum  # micro-batches per update (inside the jitted step; batch_size must divide evenly)
    c.log_every = 10  # write train metrics every N updates
    c.eval_every = 100  # eval loss on the held-out split every M updates (0 = only at the end)
    c.checkpoint_every = 100  # save a checkpoint every K updates (and always at the end and on SIGTERM)
    c.keep_checkpoints = 3  # keep the last N checkpoints
    c.async_checkpoints = True  # write checkpoints in a background thread
    c.logprob_chunk = 0  # > 0: the SFT loss applies the LM head in vocab chunks of this size (no [B, T, V] logits)
    c.max_consecutive_nonfinite = 0  # skip up to this many non-finite steps in a row; one more stops the run
    c.peak_flops_per_device = 0.0  # peak FLOP/s of one device for MFU (0 = look up the device kind; n/a on CPU)
    c.progress_bar = True  # show a tqdm progress bar when stdout is a terminal
    return c
