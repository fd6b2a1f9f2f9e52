"""Score image files, folders and CSV manifests with a checkpoint (the `score` job; `qponder-score` is the same as a
command of its own).

    qponder --config=configs/score.py --workdir=runs/score --config.checkpoint=runs/demo/7_export/hf \
        --config.inputs=runs/demo/2_data/test
    qponder-score --model runs/demo/7_export/hf runs/demo/2_data/test      # the same, without a config

Writes <workdir>/predictions.jsonl (or config.out) and <workdir>/summary.json. Settings left at "" / 0 / () take the
model's own (its qponder_scoring.json, or the training run's config), else the defaults of the `qponder` prompt.
"""

import ml_collections


def get_config(arg: str | None = None):
    del arg  # one variant
    config = ml_collections.ConfigDict()
    config.job = "score"  # which job `qponder` runs (see qponder_jax/main.py:JOBS)
    config.checkpoint = ""  # HF folder or orbax training workdir to score with (required)
    config.step = -1  # checkpoint step of an orbax workdir (-1 = the latest)
    config.inputs = ""  # comma-separated image files, folders (searched recursively) and CSV manifests (image,mos)
    config.out = ""  # predictions file, .jsonl or .csv ("" = <workdir>/predictions.jsonl)
    config.explain = False  # print each image's reasoning under its score
    config.strict = False  # fail (exit 1) when any image is skipped, does not parse or scores out of range
    config.mesh = (1, -1, 1)  # mesh shape over ('data', 'fsdp', 'tensor'); -1 takes the remaining devices
    config.sampling_layout = "auto"  # sampler weights: "auto", "decode" (stationary), "decode:T" (groups of T), "train"
    config.model = ml_collections.ConfigDict()
    config.model.dtype = "float32"  # compute dtype of matmuls: "float32" or "bfloat16"
    s = config.score = ml_collections.ConfigDict()
    s.mode = "greedy"  # "greedy" decode, "level" (Q-Align level probabilities) or "sample_mean" (mean of samples)
    s.batch_size = 8  # images per batch (rounded up to a multiple of the mesh's data devices)
    s.prompt = ""  # prompt name in qponder_jax/prompts.py ("" = the model's own, else "qponder")
    s.prompt_text = ""  # a custom user prompt ("" = the model's own)
    s.max_new_tokens = 0  # longest answer (0 = the model's own, else 256)
    s.max_pixels = 0  # largest image area after resizing (0 = the model's own, else the preprocessor's)
    s.score_range = ()  # the prompt's scale (low, high) (() = the model's own, else (1, 5))
    s.num_samples = 8  # answers per image in sample_mean
    s.temperature = 1.0  # sampling temperature of sample_mean
    s.seed = 0  # sampling seed of sample_mean
    return config.lock()
