"""Cold-start data from a teacher: the expert prompt (MOS as a hint) -> kept reasoning -> cold-start JSONL.

    qponder --config=configs/distill.py:tiny --workdir=runs/distill_tiny      # rule-based teacher, synthetic set
    qponder --config=configs/distill.py:teacher --workdir=runs/distill_72b \
        --config.model.model_path=/ckpt/Qwen2.5-VL-72B-Instruct \
        --config.data.datasets=koniq10k:train --config.data.data_dir=/data/tfds

Variants: `tiny` (the default: the synthetic set's rule-based teacher through the same acceptance and JSONL path;
no model), `tiny_model` (the embedded tiny random model as the teacher: it shows the sharded sampler path and, being
untrained, ends with the clear "no valid answer" error unless --config.checkpoint points at a trained tiny run) and
`teacher` (a real Qwen2.5-VL folder, e.g. 72B on a pod). The output <workdir>/cold_start/cold_start.jsonl is what
configs/qponder_ci.py reads with --config.data.source=jsonl --config.data.train_jsonl=...
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # make `configs` importable from any cwd

import ml_collections  # noqa: E402

from configs import common  # noqa: E402
from qponder_jax import prompts  # noqa: E402

VARIANTS = ("tiny", "tiny_model", "teacher")


def get_config(arg: str | None = None):
    variant = common.parse_variant(arg, VARIANTS, default="tiny")
    tiny = variant != "teacher"
    config = ml_collections.ConfigDict()
    config.job = "distill"  # which job `qponder` runs (see qponder_jax/main.py:JOBS)
    config.variant = variant  # the variant this config was built for (informational)
    config.mesh = (1, -1, 1)  # mesh shape over ('data', 'fsdp', 'tensor'); -1 takes the remaining devices
    config.sampling_layout = "auto"  # sampler weights: "auto", "decode" (stationary), "decode:T" (groups of T), "train"
    config.teacher = "rule" if variant == "tiny" else "model"  # "model" (model section / checkpoint) or "rule"
    config.model = common.model(
        model_path="embedded:tiny" if tiny else "",
        dtype="float32" if tiny else "bfloat16",
        attn_impl="xla" if tiny else "auto",
    )
    config.checkpoint = ""  # an orbax training workdir or HF folder used as the teacher ("" = model.model_path)
    config.out_dir = ""  # output folder ("" = <workdir>/cold_start): cold_start.jsonl, images/, summary.json

    config.teacher_prompt = prompts.TEACHER  # expert prompt shown to the teacher; must contain {mos} (the hint)
    config.student_prompt = prompts.QPONDER  # prompt stored in the JSONL: what the student trains (and is eval'd) on
    config.tolerance = 0.5 if tiny else 0.35  # keep a sample when |teacher score - MOS| <= tolerance (1-5 scale)
    config.num_ratings = 1  # numbers the answer must hold (their mean is the teacher's score)
    config.require_level = True  # the reasoning must name a level word (bad, poor, fair, good, excellent)
    config.max_samples = 4  # samples per image before it is dropped and counted
    config.samples_per_round = 1  # samples drawn per image per round (raise on a pod to batch the retries)
    config.max_new_tokens = 64 if tiny else 512  # longest teacher answer
    config.temperature = 0.7  # sampling temperature (> 0 when max_samples > 1)
    config.top_k = 0  # top-k filter (0 = off)
    config.top_p = 1.0  # nucleus filter (1 = off)
    config.batch_size = 8 if tiny else 64  # images per generate call (global, over all devices)
    config.max_images = 32 if tiny else 0  # distill only the first N images of each dataset (0 = all)
    config.abort_after = 16 if tiny else 256  # stop with an error when this many images gave no valid answer
    config.min_acceptance_rate = 0.0  # fail when the share of kept images ends below this (0 = only when none)
    config.seed = 0  # sampling seed

    config.data = ml_collections.ConfigDict()  # the images to distill and how they are preprocessed
    config.data.datasets = "synthetic:train" if tiny else "koniq10k:train"  # comma-separated "name:split" specs
    config.data.data_dir = ""  # tfds folder of the built IQA datasets (not needed for "synthetic")
    config.data.synthetic_size = 0  # images in the synthetic split (0 = its default size)
    config.data.synthetic_seed = 0  # seed of the synthetic set
    config.data.synthetic_min_side = 56  # smallest synthetic image side in pixels
    config.data.synthetic_max_side = 84  # largest synthetic image side in pixels
    config.data.synthetic_distortions = ""  # comma-separated synthetic distortions ("" = all)
    config.data.min_pixels = 0  # smallest image area after resize (0 = the preprocessor_config.json value)
    config.data.max_pixels = 84 * 84 if tiny else 448 * 448  # largest image area after resize (0 = the file's)
    config.data.token_buckets = (256, 320) if tiny else (512, 1024, 2048)  # prompt lengths a batch pads to
    config.data.patch_buckets = (64,) if tiny else (256, 1024)  # patch rows per image a batch pads to
    config.data.image_buckets = (1,)  # image slots per sample
    config.data.truncation = False  # cut prompts longer than the largest token bucket instead of raising
    return config.lock()
