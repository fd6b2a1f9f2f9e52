"""Video inputs through the whole model: logits parity with transformers' torch Qwen2.5-VL (`pixel_values_videos`,
`video_grid_thw`, `second_per_grid_ts`, explicit M-RoPE positions from its own get_rope_index) for one video sample
and for a batch mixing video, image and text-only samples with right and left padding; KV-cache prefill + one decode
step on a video prompt against the full forward; check_batch on video tokens."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch_ref import make_torch_model, our_model_from_torch

from qponder_jax import prompts
from qponder_jax.data.image import ImageConfig
from qponder_jax.data.processing import Processor
from qponder_jax.data.tokenizer import build_demo_tokenizer
from qponder_jax.data.video import VideoClip
from qponder_jax.data.video_frames import VideoConfig
from qponder_jax.model.config import tiny_config
from qponder_jax.model.qwen2_5_vl import check_batch

TOL = 1e-4
IMAGE = ImageConfig(min_pixels=56 * 56, max_pixels=224 * 224)
VIDEO = VideoConfig(min_pixels=56 * 56, max_pixels=168 * 168, total_pixels=None)


def _clip(frames, h, w, fps, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (frames, h, w, 3), dtype=np.uint8)
    return VideoClip(pixels, fps=fps, path=f"clip{seed}.mp4")


def _image(h, w, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(processor, config, torch model, our model): same random weights, the demo tokenizer's ids."""
    base = Processor.from_pretrained(build_demo_tokenizer(tmp_path_factory.mktemp("tok")))
    proc = Processor(base.tokenizer, IMAGE, video_config=VIDEO, tokens_per_second=2)
    config = tiny_config(vocab_size=len(proc.tokenizer)).replace(
        image_token_id=proc.image_token_id,
        video_token_id=proc.video_token_id,
        vision_start_token_id=proc.vision_start_token_id,
        vision_end_token_id=proc.vision_end_token_id,
    )
    assert config.vision.tokens_per_second == proc.tokens_per_second
    torch_model = make_torch_model(config, seed=5)
    model, _ = our_model_from_torch(torch_model, tmp_path_factory.mktemp("model"))
    return proc, config, torch_model, model


def _vision_kwargs(examples):
    """transformers' vision inputs for a batch: images and videos each concatenated in batch order."""
    images = [ex.split_pixel_values()[0] for ex in examples]
    videos = [ex.split_pixel_values()[1] for ex in examples]
    cat = lambda xs, dtype: torch.as_tensor(np.concatenate(xs).astype(dtype))
    kwargs = {}
    if any(len(ex.image_grid_thw) for ex in examples):
        kwargs["pixel_values"] = cat(images, np.float32)
        kwargs["image_grid_thw"] = cat([ex.image_grid_thw for ex in examples], np.int64)
    if any(len(ex.video_grid_thw) for ex in examples):
        kwargs["pixel_values_videos"] = cat(videos, np.float32)
        kwargs["video_grid_thw"] = cat([ex.video_grid_thw for ex in examples], np.int64)
        kwargs["second_per_grid_ts"] = cat([ex.second_per_grid_ts for ex in examples], np.float32)
    return kwargs


@torch.no_grad()
def _torch_reference(torch_model, config, batch, examples):
    """(logits [B, T, V], position_ids [3, B, T], rope_deltas [B]) of transformers on our batch; positions from its
    own get_rope_index with the video grids and seconds per grid."""
    ids = torch.as_tensor(np.asarray(batch.input_ids, np.int64))
    mask = torch.as_tensor(np.asarray(batch.attention_mask, np.int64))
    types = torch.where(ids == config.image_token_id, 1, torch.where(ids == config.video_token_id, 2, 0))
    kwargs = _vision_kwargs(examples)
    grids = {k: kwargs.get(k) for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")}
    torch_model.model.rope_deltas = None
    positions, deltas = torch_model.model.get_rope_index(ids, mm_token_type_ids=types, attention_mask=mask, **grids)
    out = torch_model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, **kwargs)
    torch_model.model.rope_deltas = None
    return out.logits.float().numpy(), positions.numpy(), deltas.numpy().reshape(-1)


def _parity(setup, examples, padding_side):
    proc, config, torch_model, model = setup
    batch = proc.collate(examples, padding_side=padding_side)
    ref, ref_pos, ref_deltas = _torch_reference(torch_model, config, batch, examples)
    np.testing.assert_array_equal(batch.position_ids, ref_pos)  # our M-RoPE positions are transformers'
    np.testing.assert_array_equal(batch.rope_deltas, ref_deltas)
    mask = np.asarray(batch.attention_mask)
    diff = float(np.abs(np.asarray(model(batch)) - ref)[mask].max())
    print(f"{padding_side}: max abs logits diff {diff:.2e} over {int(mask.sum())} tokens")
    return diff


def test_one_video(setup):
    proc = setup[0]
    reply = "<think>steady, sharp</think><answer>4.0</answer>"
    ex = proc.encode(prompts.video_messages("Rate this video.", response=reply), videos=[_clip(5, 56, 56, 2.5, 0)])
    assert ex.video_grid_thw.tolist() == [[3, 4, 4]]  # 5 frames padded to 6: 3 temporal patches
    t = np.unique(ex.position_ids[0, ex.input_ids == proc.video_token_id])
    assert np.diff(t).tolist() == [1, 2]  # 2 tokens/s * 0.8 s per patch: 0, 1.6, 3.2 truncated
    assert _parity(setup, [ex], "right") <= TOL


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_mixed_video_image_text_batch(setup, padding_side):
    proc = setup[0]
    with_image = prompts.video_messages("Compare the video and the still.", num_images=1, response="Same.")
    examples = [
        proc.encode(with_image, [_image(84, 84, 1)], videos=[_clip(4, 168, 112, 2.0, 2)]),  # 2x12x8: 2 windows
        proc.encode(prompts.image_messages("How good is this image?"), [_image(100, 140, 3)]),
        proc.encode([{"role": "user", "content": "No vision here, just text about quality."}]),
        proc.encode(prompts.video_messages("And this one?"), videos=[_clip(6, 70, 90, 1.5, 4)]),
    ]
    assert examples[0].slot_is_video.tolist() == [True, False]
    assert _parity(setup, examples, padding_side) <= TOL


def test_prefill_and_decode_step_match_full_forward(setup):
    proc, _, _, model = setup
    examples = [
        proc.encode(prompts.video_messages("Rate it."), videos=[_clip(4, 56, 84, 2.0, 5)], add_generation_prompt=True),
        proc.encode([{"role": "user", "content": "Short text."}], add_generation_prompt=True),
    ]
    batch = proc.collate(examples, padding_side="left")
    b, t = batch.input_ids.shape
    full_prompt = np.asarray(model(batch))  # [B, T, V]
    prefill, cache = model.prefill(batch, model.init_cache(b, t + 1))
    mask = np.asarray(batch.attention_mask)
    prefill_diff = float(np.abs(np.asarray(prefill) - full_prompt)[mask].max())
    token = np.asarray(prefill)[:, -1].argmax(-1).astype(np.int32)  # [B] greedy next token
    position = batch.position_ids.max(axis=(0, 2)) + 1  # [B]: real length + rope_deltas
    step, _ = model.decode_step(token[:, None], np.broadcast_to(position[None, :, None], (3, b, 1)), cache)
    longer = batch.replace(
        input_ids=np.concatenate([batch.input_ids, token[:, None]], axis=1),
        attention_mask=np.concatenate([batch.attention_mask, np.ones((b, 1), bool)], axis=1),
        position_ids=np.concatenate([batch.position_ids, np.broadcast_to(position[None, :, None], (3, b, 1))], -1),
        loss_mask=np.concatenate([batch.loss_mask, np.zeros((b, 1), bool)], axis=1),
        image_feature_index=np.concatenate([batch.image_feature_index, np.full((b, 1), -1, np.int32)], axis=1),
    )
    full = np.asarray(model(longer))  # [B, T + 1, V]
    decode_diff = float(np.abs(np.asarray(step)[:, 0] - full[:, -1]).max())
    print(f"prefill vs forward {prefill_diff:.2e}, decode step vs forward {decode_diff:.2e}")
    assert prefill_diff <= 1e-5 and decode_diff <= 1e-5
    assert not np.allclose(full[0, -1], full[1, -1])  # the two rows really differ (video vs text prompt)


def test_check_batch_counts_video_tokens(setup):
    proc, config, _, _ = setup
    ex = proc.encode(prompts.video_messages("Rate it."), videos=[_clip(4, 56, 56, 2.0, 6)])
    batch = proc.collate([ex])
    check_batch(batch, config)  # a consistent video batch passes
    ids = batch.input_ids.copy()
    ids[0, np.flatnonzero(ids[0] == config.video_token_id)[0]] = 5  # one <|video_pad|> lost
    with pytest.raises(ValueError, match=r"sample 0: 0 <\|image_pad\|> \+ 7 <\|video_pad\|> tokens .* but 8 tokens"):
        check_batch(batch.replace(input_ids=ids), config)
    grids = batch.image_grid_thw.copy()
    grids[0, 0] = (1, 4, 4)  # the video's grid now gives 4 merged patches for its 8 tokens
    with pytest.raises(ValueError, match=r"8 <\|video_pad\|> tokens but image_grid_thw .* gives 4"):
        check_batch(batch.replace(image_grid_thw=grids), config)
