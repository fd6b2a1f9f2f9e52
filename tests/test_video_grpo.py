"""Video in the jobs: the video prompt and the VQA configs (every worst-case clip fits its buckets), the tiny model's
video processor config, decoding with undecodable videos skipped and counted, the synthetic VQA set built into the
workdir, the eval job scoring videos, and (slow) a few GRPO steps of configs/preresq.py:vqa_tiny end to end with the
preresq reward, from a tiny model taught the answer format, on a set with corrupt videos."""

import json
import logging
import math
import pickle
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from qponder_jax import embedded, prompts
from qponder_jax import eval as eval_job
from qponder_jax.data import datasets, sources
from qponder_jax.data.datasets import synthetic_video
from qponder_jax.data.image import ImageConfig, num_patches_for_size
from qponder_jax.data.processing import Processor
from qponder_jax.data.video import VideoError, VideoSampling
from qponder_jax.data.video_frames import VideoConfig, num_video_patches
from qponder_jax.errors import ConfigError
from qponder_jax.evaluation import report
from qponder_jax.train import grpo_job, video_inputs

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from configs import eval as eval_config  # noqa: E402
from configs import preresq  # noqa: E402

VIDEO_PROMPT = prompts.prompt_text("preresq_r1_video")


# ---- shared fixtures: the tiny model folder, and the synthetic VQA set with some videos corrupted ----


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return embedded.build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny_model")


@pytest.fixture(scope="module")
def vqa_dir(tmp_path_factory):
    """A built synthetic VQA set: (tfds folder, {split: corrupted video paths}). Even train records (source order)
    and test record 1 are overwritten with bytes no decoder reads, after the build (as a file damaged later)."""
    data_dir = tmp_path_factory.mktemp("vqa") / "tfds"
    datasets.build("synthetic_vqa", None, data_dir)
    corrupt = {}
    for split, indices in (("train", range(0, 256, 2)), ("test", (1,))):
        source = datasets.load("synthetic_vqa", split, data_dir=data_dir)
        corrupt[split] = [source[i]["video_path"] for i in indices]
    return data_dir, corrupt


def _corrupt(paths):
    for path in paths:
        Path(path).write_bytes(b"\x00not a video\x00" * 64)


def _tiny_vqa_config(data_dir):
    config = preresq.get_config("vqa_tiny").unlock()
    config.data.data_dir = str(data_dir)
    return config


# ---- prompt and configs ----


def test_video_prompt_and_vqa_configs():
    assert "video quality assessment" in VIDEO_PROMPT and "two scores" in VIDEO_PROMPT
    assert VIDEO_PROMPT.endswith(prompts.THINK_ANSWER_INSTRUCTION)
    for variant in ("vqa_tiny", "vqa_7b"):
        config = preresq.get_config(variant)
        sampling = VideoSampling.from_config(config.data.video)
        assert config.data.prompt == "preresq_r1_video" and config.grpo.score_numbers == 2
        assert config.rewards.preresq.balance_dims == 2 <= config.grpo.max_numbers
        assert config.data.image_buckets == (sampling.num_crops + 1,)  # the clip and its crops share the slots
    assert preresq.get_config("7b").grpo.score_numbers == 5  # the image variants keep their five ratings
    vqa = eval_config.get_config("vqa")
    assert vqa.protocol == "vqa" and tuple(vqa.datasets.split(",")) == report.protocol_specs("vqa")
    assert (vqa.score.prompt, vqa.score.num_ratings, vqa.data.image_buckets) == ("preresq_r1_video", 2, (4,))
    tiny = eval_config.get_config("vqa_tiny")
    assert tiny.model.model_path == embedded.EMBEDDED_TINY and eval_job.dataset_specs(tiny) == ("synthetic_vqa:test",)
    settings = eval_job.EvalSettings.from_config(tiny.score, tiny.data)
    assert settings.video == VideoSampling.from_config(tiny.data.video) and settings.user_text == VIDEO_PROMPT


def _downscaled(height, width, max_pixels):
    if height * width <= max_pixels:
        return height, width
    scale = math.sqrt(max_pixels / (height * width))
    return max(1, math.floor(height * scale)), max(1, math.floor(width * scale))


@pytest.mark.parametrize(
    "config", [preresq.get_config("vqa_7b").data, eval_config.get_config("vqa").data], ids=["grpo", "eval"]
)
def test_real_vqa_buckets_hold_the_largest_clip(config):
    """max_frames global frames at Qwen's video defaults (frames upscaled to its minimum) + num_crops crops fit the
    patch and token buckets, whatever the video's size and aspect."""
    sampling = VideoSampling.from_config(config.video)
    crop_config = ImageConfig(max_pixels=config.max_pixels)
    crop = num_patches_for_size(sampling.crop_size, sampling.crop_size, crop_config)
    worst = 0
    for height, width in ((1080, 1920), (1920, 1080), (480, 640), (240, 320), (2160, 3840), (144, 176)):
        h, w = _downscaled(height, width, sampling.global_max_pixels)
        clip = num_video_patches(sampling.max_frames, h, w, VideoConfig())
        worst = max(worst, clip + sampling.num_crops * min(crop, num_patches_for_size(height, width, crop_config)))
    assert worst <= max(config.patch_buckets), (worst, config.patch_buckets)
    assert worst // 4 + 300 <= max(config.token_buckets)  # vision tokens + the question and chat template


def test_tiny_vqa_clips_fit_one_patch_bucket(tiny_folder):
    """Every synthetic clip size (32-48 pixels a side) with the tiny video config: <= 32 rows for the clip, <= 16
    per crop, so vqa_tiny's single patch bucket holds any clip; and the tiny folder's video config is read."""
    proc = Processor.from_pretrained(tiny_folder)
    assert (proc.video_config.min_pixels, proc.video_config.max_pixels) == (
        embedded.TINY_VIDEO_MIN_PIXELS,
        embedded.TINY_VIDEO_MAX_PIXELS,
    )
    data = preresq.get_config("vqa_tiny").data
    crop_config = ImageConfig(min_pixels=data.min_pixels, max_pixels=data.max_pixels)
    frames = data.video.num_frames
    sizes = [(h, w) for h in range(32, 49) for w in range(32, 49)]
    clip = max(num_video_patches(frames, h, w, proc.video_config) for h, w in sizes)
    crop = max(num_patches_for_size(s, s, crop_config) for s in range(32, 49))
    assert (clip, crop) == (32, 16) and clip + data.video.num_crops * crop <= max(data.patch_buckets)
    (tiny_folder / embedded.VIDEO_CONFIG_FILE).unlink()  # a folder built before the video config: rewritten
    embedded.build_tiny_model(tiny_folder)
    assert Processor.from_pretrained(tiny_folder).video_config == proc.video_config


# ---- decoding, skipping, encoding ----


def _write_clips(root, count):
    paths = []
    for i in range(count):
        frames = np.random.default_rng(i).integers(0, 256, size=(6, 40, 44, 3), dtype=np.uint8)
        paths.append(str(synthetic_video.write_video(root / f"clip{i}.mkv", frames, fps=4.0)))
    return paths


def test_decoded_videos_skip_undecodable_and_count(tmp_path, caplog, tiny_folder):
    good = _write_clips(tmp_path, 2)
    bad = tmp_path / "bad.mkv"
    bad.write_bytes(b"garbage" * 100)
    paths = [good[0], str(bad), str(tmp_path / "missing.mkv"), good[1]]
    records = [{"video_path": p, "video_name": Path(p).name, "mos": 1.0 + i} for i, p in enumerate(paths)]
    sampling = VideoSampling(num_frames=4, layout="two_stream", num_crops=2, crop_size=32, global_max_pixels=0)
    skip_file = tmp_path / "skipped.jsonl"
    source = video_inputs.DecodedVideos(records, sampling, skip_file=skip_file, where="fixture:all")
    with caplog.at_level(logging.WARNING):
        first, replaced = source[0], source[1]
    assert first["video_name"] == "clip0.mkv" and first["videos_skipped"] == 0
    assert replaced["video_name"] == "clip1.mkv" and replaced["videos_skipped"] == 2  # bad and missing passed over
    assert source.skipped == [str(bad), str(tmp_path / "missing.mkv")]
    assert [r["path"] for r in video_inputs.read_skipped(skip_file)] == source.skipped
    assert str(bad) in caplog.text and "2 skipped so far" in caplog.text
    clip, crops = replaced["video_inputs"]
    assert clip.frames.shape == (4, 40, 44, 3) and [c.shape for c in crops] == [(32, 32, 3)] * 2
    assert pickle.loads(pickle.dumps(source)).skipped == []  # a worker process counts its own
    with pytest.raises(VideoError, match=r"bad.mkv: video source: 2 undecodable videos in a row"):
        video_inputs.DecodedVideos(records[1:3], sampling)[0]

    proc = Processor.from_pretrained(tiny_folder)
    ex, extras = grpo_job.EncodePrompt(proc, VIDEO_PROMPT)(replaced)
    grid = ex.vision_grid_thw  # the clip, then its two crops
    assert ex.slot_is_video.tolist() == [True, False, False] and grid[0, 0] == 2 and (grid[1:, 0] == 1).all()
    counts = [int((ex.input_ids == token).sum()) for token in (proc.video_token_id, proc.image_token_id)]
    assert counts == [int(np.prod(grid[0])) // 4, int(np.prod(grid[1:], axis=1).sum()) // 4]
    assert VIDEO_PROMPT in proc.decode(ex.input_ids) and extras["mos"] == np.float32(4.0)
    assert ex.example_id == "clip1.mkv" and np.isclose(ex.second_per_grid_ts[0], 2 / clip.fps)
    with pytest.raises(ValueError, match="clip0.mkv.*no decoded inputs"):
        video_inputs.encode_record(proc, VIDEO_PROMPT, records[0])


def test_open_source_finds_or_builds_the_synthetic_vqa_set(tmp_path, vqa_dir):
    data_dir, _ = vqa_dir
    data = dict(_tiny_vqa_config(data_dir).data)
    source = sources.open_source("synthetic_vqa:test", data, workdir=tmp_path / "run")
    assert len(source) == 64 and source[0]["video_path"].startswith(str(data_dir.parent))
    assert not (tmp_path / "run").exists()  # built in data.data_dir: nothing built in the workdir
    with pytest.raises(ConfigError, match="not built in data.data_dir"):
        sources.open_source("synthetic_vqa:test", dict(data, data_dir=""))
    with pytest.raises(ConfigError, match="lsvq.*data.data_dir"):
        sources.open_source("lsvq:test", dict(data, data_dir=""), workdir=tmp_path)
    built = sources.video_data_dir("synthetic_vqa", dict(data, data_dir=""), tmp_path / "run")
    assert Path(built) == tmp_path / "run" / "data" / "tfds"
    stamp = (Path(built) / "synthetic_vqa").stat().st_mtime_ns
    train = video_inputs.open_training_source("synthetic_vqa:train", dict(data, data_dir=""), tmp_path / "run")
    assert isinstance(train, video_inputs.DecodedVideos) and len(train) == 256
    assert train[3]["video_path"].startswith(str(tmp_path / "run")) and "video_inputs" in train[3]
    assert (Path(built) / "synthetic_vqa").stat().st_mtime_ns == stamp  # the second call reused the build


# ---- the eval job on videos ----


def test_eval_job_scores_videos_and_lists_the_corrupt_one(tiny_folder, vqa_dir, tmp_path, capsys):
    data_dir, corrupt = vqa_dir
    _corrupt(corrupt["test"])
    config = eval_config.get_config("vqa_tiny")
    config.checkpoint, config.mesh, config.data.data_dir = str(tiny_folder), (1, 2, 1), str(data_dir)
    config.score.mode, config.data.max_images, config.data.batch_size = "level", 6, 4
    rep = eval_job.run(config, tmp_path)
    summary = rep["datasets"]["synthetic_vqa:test"]
    assert summary["images"] == 5 and [s["index"] for s in summary["skipped_images"]] == [1]
    assert summary["skipped_images"][0]["path"] == corrupt["test"][0]
    rows = report.read_predictions(tmp_path / "eval" / "predictions" / "synthetic_vqa_test.jsonl")
    assert [r["index"] for r in rows] == [0, 2, 3, 4, 5] and all(r["video_name"].endswith(".mkv") for r in rows)
    assert all(1.0 <= r["score"] <= 5.0 and abs(sum(r["level_probs"]) - 1) < 1e-5 for r in rows)
    recomputed = report.metrics_from_predictions(tmp_path / "eval" / "predictions" / "synthetic_vqa_test.jsonl")
    assert recomputed["srcc"] == pytest.approx(summary["srcc"])
    printed = capsys.readouterr().out
    assert "| synthetic_vqa:test |" in printed and report.PROTOCOLS["synthetic_vqa"][1] in printed
    assert json.loads((tmp_path / "eval" / "report.json").read_text())["settings"]["video"]["num_crops"] == 2


# ---- GRPO end to end ----


def _formatted_model(tiny_folder, data_dir, out, *, steps=60, lr=1e-2, seed=0):
    """The tiny model SFT'd on video prompts answered `<think>..</think><answer>g l</answer>` (two random ratings),
    saved as an HF folder: a policy that writes parseable, varied answers, so the preresq reward has signal."""
    from flax import nnx

    from qponder_jax.hf import load_hf, save_hf
    from qponder_jax.model import sharding
    from qponder_jax.train import optim
    from qponder_jax.train import state as st
    from qponder_jax.train.sft import SFTStep, jit_train_step

    config = _tiny_vqa_config(data_dir)
    proc = eval_job.make_processor(tiny_folder, config.data)
    sampling = VideoSampling.from_config(config.data.video)
    source = datasets.load("synthetic_vqa", "train", data_dir=data_dir)
    inputs = [video_inputs.load_video_inputs(source[i]["video_path"], sampling) for i in range(1, 33, 2)]
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    model, model_config = load_hf(tiny_folder, mesh=mesh)
    graphdef, params, rest = st.split_model(model)
    cfg = dict(peak_lr=lr, warmup_steps=5, end_lr_ratio=0.1, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.0,
               clip_norm=1.0, freeze=(), freeze_regex="")  # fmt: skip
    tx, schedule, labels = optim.from_config(cfg, params, total_steps=steps)
    abstract = st.abstract_train_state(params, tx, st.param_shardings(model, mesh), mesh)
    state = st.init_train_state(params, tx, abstract, seed=seed)
    step = jit_train_step(SFTStep(graphdef, rest, tx, schedule, labels), st.shardings_of(abstract), mesh)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        examples = []
        for i in rng.integers(0, len(inputs), 8):
            g, local = rng.uniform(1, 5, 2)
            response = f"<think>The video is {prompts.level_of_score(g)}.</think><answer>{g:.1f} {local:.1f}</answer>"
            clip, crops = inputs[i]
            images = [Image.fromarray(c) for c in crops]
            messages = prompts.video_messages(VIDEO_PROMPT, response=response, num_images=len(crops))
            examples.append(proc.encode(messages, images, videos=[clip]))
        state, metrics = step(state, proc.collate(examples))
    trained = nnx.merge(graphdef, state.params, rest)
    save_hf(trained, model_config, out, tokenizer_dir=tiny_folder)
    # save_hf carries the video processor config along with the tokenizer files
    assert (out / embedded.VIDEO_CONFIG_FILE).read_bytes() == (tiny_folder / embedded.VIDEO_CONFIG_FILE).read_bytes()
    return out, float(metrics["loss"])


@pytest.mark.slow
def test_grpo_on_tiny_videos_end_to_end(tiny_folder, vqa_dir, tmp_path, monkeypatch):
    """configs/preresq.py:vqa_tiny, shrunk to 2 steps of 8 prompts x 3 rollouts, from a tiny model taught the
    answer format, on the synthetic VQA set with every other train video corrupt: the steps run, the prompts are
    video prompts, the preresq reward is finite and varies, the corrupt videos are skipped, counted and listed, and
    a checkpoint is written."""
    from qponder_jax.data import pipeline
    from qponder_jax.train.logging import read_metrics

    data_dir, corrupt = vqa_dir
    init, sft_loss = _formatted_model(tiny_folder, data_dir, tmp_path / "init")
    _corrupt(corrupt["train"])
    config = _tiny_vqa_config(data_dir)
    config.init_checkpoint = str(init)
    config.train.total_steps, config.train.log_every, config.train.checkpoint_every = 2, 2, 2
    config.grpo.max_new_tokens, config.grpo.num_generations = 32, 3  # the taught answers are 19-20 tokens
    batches = []
    to_global = pipeline.to_global
    monkeypatch.setattr(pipeline, "to_global", lambda item, mesh: batches.append(item) or to_global(item, mesh))
    result = grpo_job.run(config.lock(), tmp_path / "run")

    assert result.status == "done" and int(result.state.step) == 2 and len(batches) == 2
    proc = Processor.from_pretrained(init)
    for batch, extras in batches:  # every prompt: one video slot (t = 2) with features, then two crops
        ids, feature = np.asarray(batch.input_ids), np.asarray(batch.image_feature_index)
        video = ids == proc.video_token_id
        assert video.any(axis=1).all() and (feature[video] >= 0).all()
        grids = np.asarray(batch.image_grid_thw)  # [B, 3 slots, 3]
        assert (grids[:, 0, 0] == 2).all() and (grids[:, 1:, 0] == 1).all()
        assert np.isfinite(extras["mos"]).all()
    (record,) = read_metrics(tmp_path / "run", prefix="grpo")
    rewards = {k: record[k] for k in sorted(record) if "reward" in k or "parse" in k}
    print(f"SFT loss {sft_loss:.3f}; grpo {rewards}")
    assert record["parse_failure_rate"] < 0.5 and record["format_rate"] > 0.5
    assert np.isfinite(record["reward/preresq_mean"]) and record["reward/preresq_std"] > 0
    assert record["zero_std_fraction"] < 1 and np.isfinite(record["loss"])
    skipped = video_inputs.read_skipped(tmp_path / "run" / video_inputs.SKIP_FILE)
    assert skipped and {s["path"] for s in skipped} <= set(corrupt["train"])
    assert (tmp_path / "run" / "checkpoints" / "2").is_dir()
