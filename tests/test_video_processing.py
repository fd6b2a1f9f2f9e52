"""Video preprocessing and the video side of `Processor`: patches, grids and resize rules against a numpy/PIL
transcription of transformers' `Qwen2VLVideoProcessor` (which needs torchvision, not installed) and its
`smart_resize`; tokens, `second_per_grid_ts` and M-RoPE positions against transformers' Qwen2.5-VL processor and
`get_rope_index`; loss mask, truncation, collate and errors."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
from transformers.feature_extraction_utils import BatchFeature
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize
from transformers.video_utils import VideoMetadata

from qponder_jax import prompts
from qponder_jax.data.image import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageConfig
from qponder_jax.data.processing import Buckets, Processor
from qponder_jax.data.tokenizer import build_demo_tokenizer, special_token_ids
from qponder_jax.data.video import VideoClip
from qponder_jax.data.video_frames import (
    VIDEO_TOTAL_PIXELS,
    VideoConfig,
    num_video_patches,
    preprocess_video,
    resized_size,
)
from qponder_jax.model.config import tiny_config
from qponder_jax.model.vision_layout import sample_layout

SMALL_IMAGE = ImageConfig(min_pixels=56 * 56, max_pixels=28 * 28 * 16)
SMALL_VIDEO = VideoConfig(min_pixels=56 * 56, max_pixels=28 * 28 * 12, total_pixels=28 * 28 * 40)
BUCKETS = Buckets(tokens=(64, 128, 256), patches=(0, 64, 256, 512), images=(0, 1, 2, 4))
TOKENS_PER_SECOND = 3


def _clip(frames, h, w, fps=2.0, seed=0):
    rng = np.random.default_rng(seed)
    return VideoClip(rng.integers(0, 256, (frames, h, w, 3), dtype=np.uint8), fps=fps, path=f"clip{seed}.mp4")


def _image(h, w, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _reference(clip: VideoClip, cfg: VideoConfig):
    """A transcription of transformers' Qwen2VLVideoProcessor (cap_pixels_per_frame with cfg's total budget):
    per-frame cap, smart_resize, resize (PIL instead of torchvision), fused rescale + normalize in float32, padding
    by the last frame, view + permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9). Returns (patches, grid)."""
    videos = clip.frames[None]  # [1, F, H, W, 3]
    _, frames, height, width, _ = videos.shape
    p, m, tp = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    max_pixels = cfg.max_pixels
    if cfg.total_pixels is not None:
        max_pixels = max(min(max_pixels, cfg.total_pixels * tp // frames), int(cfg.min_pixels * 1.05))
    h, w = hf_smart_resize(height, width, factor=p * m, min_pixels=cfg.min_pixels, max_pixels=max_pixels)
    resized = [np.asarray(Image.fromarray(f).resize((w, h), Image.Resampling.BICUBIC)) for f in videos[0]]
    videos = np.stack(resized)[None].transpose(0, 1, 4, 2, 3).astype(np.float32)  # [1, F, C, H, W]
    mean = np.asarray(OPENAI_CLIP_MEAN, np.float32) * np.float32(1 / cfg.rescale_factor)
    std = np.asarray(OPENAI_CLIP_STD, np.float32) * np.float32(1 / cfg.rescale_factor)
    videos = (videos - mean[:, None, None]) / std[:, None, None]
    if pad := -frames % tp:
        videos = np.concatenate([videos, np.repeat(videos[:, -1:], pad, axis=1)], axis=1)
    grid_t, grid_h, grid_w = videos.shape[1] // tp, h // p, w // p
    patches = videos.reshape(1, grid_t, tp, 3, grid_h // m, m, p, grid_w // m, m, p)
    patches = patches.transpose(0, 1, 4, 7, 5, 8, 3, 2, 6, 9).reshape(grid_t * grid_h * grid_w, 3 * tp * p * p)
    return patches, (grid_t, grid_h, grid_w)


# ---- preprocessing ----
@pytest.mark.parametrize(
    "frames,h,w",
    [(4, 56, 56), (5, 56, 56), (6, 100, 73), (3, 30, 200), (1, 60, 60), (8, 150, 150)],
    ids=["even", "odd-padded", "non-multiple", "wide", "one-frame", "over-budget"],
)
def test_patches_match_transcription_of_transformers(frames, h, w):
    clip = _clip(frames, h, w, seed=frames + h)
    ours, grid, seconds = preprocess_video(clip, SMALL_VIDEO)
    ref, ref_grid = _reference(clip, SMALL_VIDEO)
    assert tuple(grid.tolist()) == ref_grid and grid[0] == math.ceil(frames / 2)
    np.testing.assert_array_equal(ours, ref)  # bit-equal
    assert ours.dtype == np.float32 and seconds == 2 / clip.fps


def test_patch_order_by_index():
    """Patch row r = (t, block row, block col, row in block, col in block); its vector = (channel, frame of the
    temporal patch, y, x). With 5 frames the last temporal patch holds the last frame twice."""
    cfg = VideoConfig(do_resize=False, do_rescale=False, do_normalize=False)
    clip = _clip(5, 56, 84, seed=3)
    patches, grid, _ = preprocess_video(clip, cfg)
    assert grid.tolist() == [3, 4, 6]
    rng = np.random.default_rng(0)
    for row, col in zip(rng.integers(0, len(patches), 300), rng.integers(0, patches.shape[1], 300), strict=True):
        t, rest = divmod(int(row), 4 * 6)
        block, (mh, mw) = rest // 4, divmod(rest % 4, 2)
        bh, bw = divmod(block, 3)  # 4x6 patches = 2x3 merge blocks
        c, rest = divmod(int(col), 2 * 14 * 14)
        k, (py, px) = rest // 196, divmod(rest % 196, 14)
        frame = min(2 * t + k, 4)
        y, x = (2 * bh + mh) * 14 + py, (2 * bw + mw) * 14 + px
        assert patches[row, col] == clip.frames[frame, y, x, c], (row, col)


@pytest.mark.parametrize("frames", [1, 2, 5, 16, 48, 400])
@pytest.mark.parametrize("size", [(224, 224), (90, 500), (1080, 1920), (20, 30)])
def test_resize_rules_match_transformers_smart_resize(frames, size):
    cfg = VideoConfig(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64, total_pixels=28 * 28 * 64 * 4)
    cap = max(min(cfg.max_pixels, cfg.total_pixels * 2 // frames), int(cfg.min_pixels * 1.05))
    expected = hf_smart_resize(*size, factor=28, min_pixels=cfg.min_pixels, max_pixels=cap)
    assert resized_size(frames, *size, cfg) == expected
    grid_t = -(-frames // 2)
    assert num_video_patches(frames, *size, cfg) == grid_t * expected[0] * expected[1] // 196


def test_total_pixel_budget_shrinks_long_clips():
    cfg = VideoConfig(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64, total_pixels=28 * 28 * 64 * 4)
    assert resized_size(4, 224, 224, cfg) == (224, 224)  # share 100352 > max_pixels: the per-frame cap rules
    assert resized_size(16, 224, 224, cfg) == (140, 140)  # share 25088 px per frame
    assert resized_size(400, 224, 224, cfg) == (56, 56)  # share 1003 is floored at 1.05 * min_pixels
    assert resized_size(400, 224, 224, VideoConfig(min_pixels=3136, max_pixels=50176, total_pixels=None)) == (224, 224)
    _, grid, _ = preprocess_video(_clip(16, 224, 224), cfg)
    assert grid.tolist() == [8, 10, 10]


def test_defaults_and_config_files():
    cfg = VideoConfig()
    assert (cfg.min_pixels, cfg.max_pixels, cfg.temporal_patch_size) == (128 * 28 * 28, 768 * 28 * 28, 2)
    assert cfg.total_pixels == VIDEO_TOTAL_PIXELS == 90316800  # qwen-vl-utils' 128000 * 28 * 28 * 0.9
    read = VideoConfig.from_dict({"size": {"shortest_edge": 1000, "longest_edge": 9000}, "max_pixels": 8000})
    assert (read.min_pixels, read.max_pixels, read.total_pixels) == (1000, 8000, VIDEO_TOTAL_PIXELS)
    assert VideoConfig.from_dict({"cap_pixels_per_frame": False}).total_pixels is None
    assert VideoConfig.from_dict({"max_video_tokens": 1000}).total_pixels == int(1000 * 784 * 0.9)
    assert VideoConfig.from_dict({"total_pixels": 5000, "cap_pixels_per_frame": False}).total_pixels == 5000
    with pytest.raises(ValueError, match="v.json: need 0 < min_pixels <= max_pixels"):
        VideoConfig.from_dict({"min_pixels": 9000, "max_pixels": 10}, source="v.json")


def test_bad_clips_raise_naming_the_clip():
    frames = _clip(4, 56, 56).frames
    with pytest.raises(ValueError, match="video 'a.mp4': the clip has 0 frames"):
        preprocess_video(VideoClip(frames[:0], 2.0, "a.mp4"), SMALL_VIDEO)
    with pytest.raises(TypeError, match="video 'a.mp4': frames must be uint8 RGB, got dtype float32"):
        preprocess_video(VideoClip(frames.astype(np.float32), 2.0, "a.mp4"), SMALL_VIDEO)
    with pytest.raises(ValueError, match=r"frames must have shape \[F, H, W, 3\], got \(4, 56, 56\)"):
        preprocess_video(VideoClip(frames[..., 0], 2.0, "a.mp4"), SMALL_VIDEO)
    with pytest.raises(ValueError, match="fps must be positive, got 0"):
        preprocess_video(VideoClip(frames, 0.0, "a.mp4"), SMALL_VIDEO)
    with pytest.raises(TypeError, match="expected a VideoClip, got ndarray"):
        preprocess_video(frames, SMALL_VIDEO)


# ---- Processor ----
@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return build_demo_tokenizer(tmp_path_factory.mktemp("demo_tok"))


@pytest.fixture(scope="module")
def proc(demo_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(demo_dir))
    return Processor(tokenizer, SMALL_IMAGE, BUCKETS, video_config=SMALL_VIDEO, tokens_per_second=TOKENS_PER_SECOND)


@pytest.fixture(scope="module")
def hf_model(proc):
    ids = special_token_ids(proc.tokenizer)
    config = tiny_config(vocab_size=ids["vocab_size"]).replace(
        **{k: ids[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}
    )
    hf = config.to_hf_dict()
    hf["vision_config"]["tokens_per_second"] = TOKENS_PER_SECOND
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_dict(hf)).eval()


class _StubVideoProcessor:
    """Stands in for transformers' torchvision video processor: our patches, its metadata (fps)."""

    merge_size, temporal_patch_size = 2, 2

    def __init__(self, fps):
        self.fps = fps

    def __call__(self, videos, **kwargs):
        pairs = list(zip(videos, self.fps, strict=True))
        out = [preprocess_video(VideoClip(np.asarray(v), f), SMALL_VIDEO) for v, f in pairs]
        metadata = [VideoMetadata(total_num_frames=len(v), fps=f) for v, f in pairs]
        return BatchFeature(
            {
                "pixel_values_videos": np.concatenate([o[0] for o in out]),
                "video_grid_thw": np.stack([o[1] for o in out]),
                "video_metadata": metadata,
            }
        )


class _HFProcessor(Qwen2_5_VLProcessor):
    def check_argument_for_proper_class(self, argument_name, argument):
        return (
            None
            if argument_name == "video_processor"
            else super().check_argument_for_proper_class(argument_name, argument)
        )


def _mixed(proc, response=None):
    """One video, one image, one more video (another fps) in one user turn."""
    clips = [_clip(5, 60, 70, fps=2.0, seed=1), _clip(4, 84, 56, fps=3.0, seed=2)]
    messages = prompts.video_messages("Rate the videos.", num_images=1, response=response)
    messages[-1 if response is None else -2]["content"].insert(2, {"type": "video"})  # video, image, video, text
    return messages, [_image(60, 90, seed=3)], clips


def test_tokens_match_transformers_processor(proc):
    messages, images, clips = _mixed(proc)
    ex = proc.encode(messages, images, videos=clips)
    hf = _HFProcessor(
        image_processor=Qwen2VLImageProcessorPil(min_pixels=SMALL_IMAGE.min_pixels, max_pixels=SMALL_IMAGE.max_pixels),
        tokenizer=proc.tokenizer,
        video_processor=_StubVideoProcessor([c.fps for c in clips]),
    )
    ref = hf(text=[proc.render(messages)], images=images, videos=[c.frames for c in clips], return_tensors="np")
    np.testing.assert_array_equal(ex.input_ids, ref["input_ids"][0])
    types = np.where(ex.input_ids == proc.image_token_id, 1, np.where(ex.input_ids == proc.video_token_id, 2, 0))
    np.testing.assert_array_equal(types, ref["mm_token_type_ids"][0])
    np.testing.assert_allclose(ex.second_per_grid_ts, ref["second_per_grid_ts"], rtol=1e-7)
    np.testing.assert_array_equal(ex.video_grid_thw, ref["video_grid_thw"])
    np.testing.assert_array_equal(ex.image_grid_thw, ref["image_grid_thw"])
    image_rows, video_rows = ex.split_pixel_values()
    np.testing.assert_array_equal(image_rows, ref["pixel_values"])
    np.testing.assert_array_equal(video_rows, ref["pixel_values_videos"])
    assert ex.slot_is_video.tolist() == [True, False, True]
    assert ex.vision_token_counts.tolist() == [int(np.prod(g)) // 4 for g in ex.vision_grid_thw]


def _hf_positions(hf_model, input_ids, attention_mask, examples):
    ids = torch.as_tensor(np.asarray(input_ids, np.int64))
    config = hf_model.config
    types = torch.where(ids == config.image_token_id, 1, torch.where(ids == config.video_token_id, 2, 0))
    cat = lambda xs, shape, dtype: torch.as_tensor(np.concatenate([np.zeros(shape, dtype)] + xs))
    hf_model.model.rope_deltas = None
    pos, deltas = hf_model.model.get_rope_index(
        ids,
        mm_token_type_ids=types,
        image_grid_thw=cat([ex.image_grid_thw for ex in examples], (0, 3), np.int64),
        video_grid_thw=cat([ex.video_grid_thw for ex in examples], (0, 3), np.int64),
        second_per_grid_ts=cat([ex.second_per_grid_ts for ex in examples], (0,), np.float32),
        attention_mask=None if attention_mask is None else torch.as_tensor(np.asarray(attention_mask, np.int64)),
    )
    return pos.numpy(), deltas.numpy().reshape(-1)


def test_positions_match_transformers_get_rope_index(proc, hf_model):
    messages, images, clips = _mixed(proc, response="<think>smooth</think><answer>3.9</answer>")
    ex = proc.encode(messages, images, videos=clips)
    ref, delta = _hf_positions(hf_model, ex.input_ids[None], None, [ex])
    np.testing.assert_array_equal(ex.position_ids, ref[:, 0])
    assert ex.rope_delta == int(delta[0])
    video = ex.input_ids == proc.video_token_id
    # the 2 fps clip: 1 s per temporal patch -> 3 positions per temporal patch; 3 temporal patches
    first_video_t = np.unique(ex.position_ids[0, np.flatnonzero(video)[:12]])
    assert np.diff(first_video_t).tolist() == [3, 3]


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_padded_batch_positions_and_feature_index(proc, hf_model, padding_side):
    messages, images, clips = _mixed(proc)
    examples = [
        proc.encode(messages, images, videos=clips),
        proc.encode(prompts.video_messages("Only a video."), videos=[_clip(6, 56, 56, fps=1.5, seed=4)]),
        proc.encode(prompts.image_messages("An image."), [_image(56, 112, seed=5)]),
        proc.encode([{"role": "user", "content": "Text only."}]),
    ]
    batch = proc.collate(examples, padding_side=padding_side)
    assert batch.image_grid_thw.shape[1] == 4  # the images bucket counts vision slots: 3 -> 4
    ref, deltas = _hf_positions(hf_model, batch.input_ids, batch.attention_mask, examples)
    np.testing.assert_array_equal(batch.position_ids, ref)
    np.testing.assert_array_equal(batch.rope_deltas, deltas)
    for b, ex in enumerate(examples):
        grids = ex.vision_grid_thw
        np.testing.assert_array_equal(batch.image_grid_thw[b, : len(grids)], grids)
        vision = np.isin(batch.input_ids[b], [proc.image_token_id, proc.video_token_id])
        assert ((batch.image_feature_index[b] >= 0) == vision).all()
        layout = sample_layout(grids, batch.num_patches, spatial_merge_size=2, window_size=112, patch_size=14)
        merged = np.concatenate(layout.merged_rows) if len(grids) else np.zeros(0, np.int32)
        np.testing.assert_array_equal(batch.image_feature_index[b, vision], merged)
        np.testing.assert_array_equal(batch.pixel_values[b, : ex.num_patches], ex.pixel_values)


def test_loss_mask_never_on_video_tokens(proc):
    reply = "<think>smooth motion</think><answer>4.1</answer>"
    messages, images, clips = _mixed(proc, response=reply)
    ex = proc.encode(messages, images, videos=clips)
    assert not (ex.loss_mask & np.isin(ex.input_ids, [proc.image_token_id, proc.video_token_id])).any()
    assert proc.decode(ex.input_ids[ex.loss_mask]) == reply + "<|im_end|>"


def test_truncate_never_splits_a_video(proc):
    messages, images, clips = _mixed(proc, response="fine")
    ex = proc.encode(messages, images, videos=clips)
    starts = np.flatnonzero(ex.input_ids == proc.vision_start_token_id)  # video, image, video
    second_video_pad = np.flatnonzero(ex.input_ids == proc.video_token_id)[-1]
    cut = proc.truncate(ex, int(second_video_pad))  # would split the second video: cut before its <|vision_start|>
    assert len(cut) == starts[2] and cut.slot_is_video.tolist() == [True, False]
    assert cut.video_grid_thw.tolist() == ex.video_grid_thw[:1].tolist() and cut.second_per_grid_ts.shape == (1,)
    assert cut.num_patches == int(np.prod(ex.vision_grid_thw[:2], axis=1).sum())
    np.testing.assert_array_equal(cut.pixel_values, ex.pixel_values[: cut.num_patches])
    np.testing.assert_array_equal(cut.position_ids, ex.position_ids[:, : len(cut)])
    inside_first = proc.truncate(ex, int(starts[0]) + 3)  # inside the first video: nothing vision is kept
    assert inside_first.num_patches == 0 and len(inside_first.vision_grid_thw) == 0
    assert len(inside_first.second_per_grid_ts) == 0 and len(inside_first) == starts[0]
    batch = proc.collate([cut, inside_first])
    assert (batch.image_feature_index >= 0).sum() == np.isin(cut.input_ids, proc.vision_token_ids).sum()


def test_encode_errors(proc):
    msgs = prompts.video_messages("Rate it.")
    clip = _clip(4, 56, 56)
    with pytest.raises(ValueError, match="1 video placeholders but 0 videos"):
        proc.encode(msgs)
    with pytest.raises(ValueError, match="0 video placeholders but 1 videos"):
        proc.encode(prompts.image_messages("x"), [_image(56, 56)], videos=[clip])
    with pytest.raises(ValueError, match="1 image placeholders but 0 images"):
        proc.encode(prompts.video_messages("x", num_images=1), videos=[clip])
    with pytest.raises(ValueError, match="example 'r-1': video 0: video 'clip0.mp4': the clip has 0 frames"):
        proc.encode(msgs, videos=[VideoClip(clip.frames[:0], 2.0, "clip0.mp4")], example_id="r-1")
    with pytest.raises(ValueError, match="video 0: frames must be uint8"):
        proc.encode(msgs, videos=[VideoClip(clip.frames.astype(np.int16), 2.0)])
    with pytest.raises(ValueError, match="video 0: expected a VideoClip"):
        proc.encode(msgs, videos=[clip.frames])


def test_from_pretrained_reads_video_config_and_tokens_per_second(demo_dir, tmp_path):
    folder = tmp_path / "proc"
    shutil.copytree(demo_dir, folder)
    image = ImageConfig.from_dict(json.loads((folder / "preprocessor_config.json").read_text()))
    default = Processor.from_pretrained(folder)
    assert default.video_config == VideoConfig() and default.tokens_per_second == 2
    assert default.video_config.patch_size == image.patch_size
    (folder / "video_preprocessor_config.json").write_text(
        json.dumps({"size": {"shortest_edge": 3136, "longest_edge": 9408}, "cap_pixels_per_frame": False})
    )
    tok = AutoTokenizer.from_pretrained(str(folder))
    ids = special_token_ids(tok)
    config = tiny_config(vocab_size=ids["vocab_size"]).replace(
        **{k: ids[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}
    )
    hf = config.to_hf_dict()
    hf["vision_config"]["tokens_per_second"] = 7  # where transformers' get_rope_index reads it
    (folder / "config.json").write_text(json.dumps(hf))
    proc = Processor.from_pretrained(folder)
    assert proc.tokens_per_second == 7
    assert proc.video_config == VideoConfig(min_pixels=3136, max_pixels=9408, total_pixels=None)
    ex = proc.encode(prompts.video_messages("Rate it."), videos=[_clip(4, 56, 56, fps=2.0)])
    t = np.unique(ex.position_ids[0, ex.input_ids == proc.video_token_id])
    assert np.diff(t).tolist() == [7]  # 7 tokens per second * 1 s per temporal patch
    hf["video_token_id"] = 3
    (folder / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match="config.json video_token_id=3 but the tokenizer has"):
        Processor.from_pretrained(folder)
