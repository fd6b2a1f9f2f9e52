"""IQA evaluation of a checkpoint (an HF folder or an orbax training workdir): metrics, tables, plots, predictions.

    qponder --config=configs/eval.py:tiny --workdir=runs/eval_tiny          # tiny random model, synthetic test split
    qponder --config=configs/eval.py:tiny --workdir=runs/eval_ci --config.checkpoint=runs/ci_tiny
    qponder --config=configs/eval.py:koniq_cross --workdir=runs/eval_7b --config.checkpoint=runs/qponder_7b \
        --config.data.data_dir=/data/tfds --config.score.mode=level

Variants: `tiny` (the default: the embedded tiny random model, model.model_path "embedded:tiny", unless
--config.checkpoint is given, on 64 images of the synthetic test split), `koniq_cross` (KonIQ-trained, cross-dataset:
the DeQA-Score protocol), `kadid` (KADID-trained: the VisualQuality-R1 / PreResQ-R1 protocol), `vqa` (PreResQ-R1's
VQA protocol, LSVQ-trained: KoNViD-1k, LIVE-VQC and YouTube-UGC whole, LSVQ test and test_1080p; videos sampled as
data.video says, PreResQ-R1's video prompt and its two ratings) and `vqa_tiny` (the embedded tiny random model on
the synthetic VQA test split, built into <workdir>/data/tfds when data.data_dir lacks it). The protocol variants
read built tfds datasets from --config.data.data_dir (`qponder_jax.data.datasets.build`). Results go to
<workdir>/<name>/.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # make `configs` importable from any cwd

import ml_collections  # noqa: E402

from configs import common, preresq  # noqa: E402

VARIANTS = ("tiny", "koniq_cross", "kadid", "vqa", "vqa_tiny")
VQA_DATASETS = "konvid1k:all,live_vqc:all,youtube_ugc:all,lsvq:test,lsvq:test_1080p"  # the `vqa` variant's sets


def score(**overrides) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.mode = "greedy"  # "greedy" decode, "sample_mean" (mean over num_samples at temperature), "level" (Q-Align)
    c.prompt = "qponder"  # prompt name in qponder_jax/prompts.py (decoding modes); use the one the model trained on
    c.prompt_text = ""  # a custom user prompt instead of `prompt` ("" = use `prompt`)
    c.max_new_tokens = 256  # longest completion (decoding modes)
    c.temperature = 1.0  # sampling temperature of sample_mean
    c.top_k = 0  # top-k filter of sample_mean (0 = off)
    c.top_p = 1.0  # nucleus filter of sample_mean (1 = off)
    c.num_samples = 8  # completions per image in sample_mean
    c.num_ratings = 1  # the score is the mean of the answer's first N numbers (5 for the PreResQ-R1 prompt)
    c.pad_with_first = False  # with fewer numbers than num_ratings, pad with the first (PreResQ-R1's rule)
    c.level_prompt = "How would you rate the quality of this image?"  # level mode: the user prompt (Q-Align's)
    c.level_prefix = "The quality of the image is"  # level mode: assistant text before the scored level word
    c.level_token_policy = "first_token"  # level word of several tokens: score its "first_token", or raise ("single")
    c.seed = 0  # sampling seed of sample_mean
    c.score_range = (1.0, 5.0)  # the prompt's scale: parsed scores outside it count as out of range, not in metrics
    c.update(overrides)
    return c


def data(**overrides) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.data_dir = ""  # tfds folder of the built IQA / VQA datasets (not needed for "synthetic"; "synthetic_vqa" is
    # built into <workdir>/data/tfds when this folder lacks it)
    c.batch_size = 8  # images per forward pass / generate call (global, over all devices)
    c.max_images = 0  # evaluate only the first N images of each dataset (0 = all)
    c.synthetic_size = 0  # images in the synthetic split (0 = its default size, 256 for test)
    c.synthetic_seed = 0  # seed of the synthetic set
    c.synthetic_min_side = 56  # smallest synthetic image side in pixels
    c.synthetic_max_side = 84  # largest synthetic image side in pixels
    c.synthetic_distortions = ""  # comma-separated synthetic distortions ("" = all: see data/datasets/synthetic.py)
    c.min_pixels = 0  # smallest image area after resize (0 = the preprocessor_config.json value)
    c.max_pixels = 0  # largest image area after resize (0 = the preprocessor_config.json value)
    c.token_buckets = (256, 512, 1024, 2048)  # prompt lengths a batch pads to (the smallest that fits)
    c.patch_buckets = (64, 256, 1024, 4096)  # patch rows per image a batch pads to (multiples of 4)
    c.image_buckets = (1,)  # image slots per sample
    c.truncation = False  # cut prompts longer than the largest token bucket instead of raising
    c.strict_images = False  # raise on an undecodable image instead of skipping and counting it
    c.update(overrides)
    return c


def get_config(arg: str | None = None):
    variant = common.parse_variant(arg, VARIANTS, default="tiny")
    config = ml_collections.ConfigDict()
    config.job = "eval"  # which job `qponder` runs (see qponder_jax/main.py:JOBS)
    config.variant = variant  # the variant this config was built for (informational)
    config.name = "eval"  # output folder under the workdir (report.json, table.md, predictions/, plots/)
    config.mesh = (1, -1, 1)  # mesh shape over ('data', 'fsdp', 'tensor'); -1 takes the remaining devices
    config.sampling_layout = "auto"  # sampler weights: "auto", "decode" (stationary), "decode:T" (groups of T), "train"
    config.checkpoint = ""  # HF folder or orbax training workdir to evaluate; "" = model.model_path (tiny if "")
    config.step = -1  # checkpoint step of an orbax workdir (-1 = the latest)
    config.protocol = {"tiny": "synthetic", "vqa_tiny": "synthetic_vqa"}.get(variant, variant)  # datasets + notes
    config.datasets = ""  # comma-separated "name:split" specs overriding the protocol's list ("" = the protocol's)
    if variant in ("tiny", "vqa_tiny"):
        # the model evaluated when checkpoint is "" (and the base of an orbax checkpoint whose run does not say)
        config.model = common.model(model_path="embedded:tiny")
        config.data = data(max_images=64, max_pixels=84 * 84, token_buckets=(128, 160, 192, 256), patch_buckets=(64,))
        config.score = score(max_new_tokens=48, num_samples=2)
        if variant == "vqa_tiny":  # configs/preresq.py:vqa_tiny's prompt and video sampling
            config.score.update(prompt="preresq_r1_video", num_ratings=2, pad_with_first=True)
            config.data.image_buckets = (3,)  # vision slots: the clip and its two crops
            config.data.min_pixels, config.data.max_pixels = 28 * 28, 56 * 56  # crops of 32-48 pixels: <= 16 patches
            config.data.token_buckets = (256,)
            config.data.video = preresq.video(num_frames=4, global_max_pixels=56 * 56, num_crops=2, crop_size=56)
    else:
        # model_path: the base HF folder of an orbax checkpoint ("" = the run's own)
        config.model = common.model(dtype="bfloat16", attn_impl="auto")
        config.data = data(batch_size=32, max_pixels=448 * 448, patch_buckets=(256, 1024))
        config.score = score()
        if variant == "kadid":
            config.score.prompt = "visualquality_r1"
        if variant == "vqa":
            config.datasets = VQA_DATASETS  # = the vqa protocol's sets (evaluation/report.py), listed to override
            config.score.update(prompt="preresq_r1_video", num_ratings=2, pad_with_first=True)  # global, local
            config.data.image_buckets = (4,)  # vision slots: the clip and its three key-frame crops
            config.data.patch_buckets = (4096, 8192)  # as configs/preresq.py:vqa_7b (16 frames + 3 crops of 448)
            config.data.token_buckets = (1536, 2048, 2560)
            config.data.video = preresq.video()  # how each video is sampled (VideoSampling fields)
    return config.lock()
