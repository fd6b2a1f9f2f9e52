"""M-RoPE positions and rope_deltas against transformers' torch `Qwen2_5_VLModel.get_rope_index`."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from qponder_jax import prompts
from qponder_jax.data.mrope import batch_rope_index, rope_index
from qponder_jax.data.processing import Buckets, Processor
from qponder_jax.data.tokenizer import build_demo_tokenizer, special_token_ids
from qponder_jax.model.config import tiny_config


@pytest.fixture(scope="module")
def proc(tmp_path_factory):
    folder = build_demo_tokenizer(tmp_path_factory.mktemp("demo_tok"))
    return Processor.from_pretrained(folder, buckets=Buckets(tokens=(64, 128, 256), patches=(0, 64, 256)))


@pytest.fixture(scope="module")
def hf_model(proc):
    ids = special_token_ids(proc.tokenizer)
    config = tiny_config(vocab_size=ids["vocab_size"]).replace(
        image_token_id=ids["image_token_id"],
        video_token_id=ids["video_token_id"],
        vision_start_token_id=ids["vision_start_token_id"],
        vision_end_token_id=ids["vision_end_token_id"],
    )
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_dict(config.to_hf_dict())).eval()


def _image(h, w, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _examples(proc):
    ask = prompts.prompt_text("qponder")
    reply = "<think>Sharp, clean; the quality is good.</think><answer>4.10</answer>"
    return {
        "single": proc.encode(prompts.image_messages(ask, response=reply), [_image(90, 140)]),
        "multi": proc.encode(
            prompts.image_messages("Which is better?", num_images=3), [_image(60, 60), _image(40, 200), _image(150, 70)]
        ),
        "text": proc.encode([{"role": "user", "content": "No image here, just text."}]),
        "gen": proc.encode(prompts.image_messages(ask), [_image(112, 56)], add_generation_prompt=True),
    }


def _hf_rope(hf_model, proc, input_ids, attention_mask, grids):
    mm_types = torch.from_numpy((input_ids == proc.image_token_id).astype(np.int64))
    grid = torch.from_numpy(np.concatenate(grids).astype(np.int64)) if sum(len(g) for g in grids) else None
    hf_model.model.rope_deltas = None
    pos, deltas = hf_model.model.get_rope_index(
        torch.from_numpy(input_ids.astype(np.int64)),
        mm_token_type_ids=mm_types,
        image_grid_thw=grid,
        attention_mask=None if attention_mask is None else torch.from_numpy(attention_mask.astype(np.int64)),
    )
    return pos.numpy(), deltas.numpy().reshape(-1)


@pytest.mark.parametrize("name", ["single", "multi", "text", "gen"])
def test_single_sequence_matches_transformers(proc, hf_model, name):
    ex = _examples(proc)[name]
    ref_pos, ref_delta = _hf_rope(hf_model, proc, ex.input_ids[None], None, [ex.image_grid_thw])
    np.testing.assert_array_equal(ex.position_ids, ref_pos[:, 0])
    assert ex.rope_delta == int(ref_delta[0])
    if name == "multi":  # three images: a real 3-D layout and a negative delta
        assert ex.rope_delta < 0 and (ex.position_ids[1] != ex.position_ids[2]).any()


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_padded_batch_matches_transformers(proc, hf_model, padding_side):
    exs = list(_examples(proc).values())
    batch = proc.collate(exs, padding_side=padding_side)
    assert batch.input_ids.shape[1] == 256 and not batch.attention_mask.all()
    ref_pos, ref_delta = _hf_rope(
        hf_model, proc, batch.input_ids, batch.attention_mask, [ex.image_grid_thw for ex in exs]
    )
    np.testing.assert_array_equal(batch.position_ids, ref_pos)  # padding positions are 0 in both
    np.testing.assert_array_equal(batch.rope_deltas, ref_delta)
    assert (batch.position_ids[:, ~batch.attention_mask] == 0).all()

    ours, deltas = batch_rope_index(
        batch.input_ids,
        batch.attention_mask,
        [ex.image_grid_thw for ex in exs],
        image_token_id=proc.image_token_id,
    )
    np.testing.assert_array_equal(ours, ref_pos)
    np.testing.assert_array_equal(deltas, ref_delta)


def test_video_tokens_match_transformers(hf_model, proc):
    img, vid = proc.image_token_id, proc.video_token_id
    video_grid = np.array([[3, 4, 6]])  # 3 temporal patches of a 4x6 grid -> 3 * 2 * 3 tokens
    image_grid = np.array([[1, 2, 4]])
    ids = np.array([7, 8] + [vid] * 18 + [9] + [img] * 2 + [10, 11])
    seconds = np.array([0.75], np.float32)
    ours, delta = rope_index(
        ids,
        image_token_id=img,
        image_grid_thw=image_grid,
        video_token_id=vid,
        video_grid_thw=video_grid,
        second_per_grid_ts=seconds,
    )
    types = torch.from_numpy(np.where(ids == img, 1, np.where(ids == vid, 2, 0))[None])
    hf_model.model.rope_deltas = None
    ref, ref_delta = hf_model.model.get_rope_index(
        torch.from_numpy(ids[None]),
        mm_token_type_ids=types,
        image_grid_thw=torch.from_numpy(image_grid),
        video_grid_thw=torch.from_numpy(video_grid),
        second_per_grid_ts=torch.from_numpy(seconds),
    )
    np.testing.assert_array_equal(ours, ref.numpy()[:, 0])
    assert delta == int(ref_delta.reshape(-1)[0])
    assert sorted(set(ours[0, 2:20].tolist())) == [2, 3, 5]  # temporal positions 0, 1.5, 3 truncated


def test_hand_computed_positions():
    # text(2) | image 1x4x6 -> 2x3 merged tokens | text(2)
    ids = np.array([5, 6] + [9] * 6 + [5, 6])
    pos, delta = rope_index(ids, image_token_id=9, image_grid_thw=[[1, 4, 6]])
    np.testing.assert_array_equal(pos[0], [0, 1, 2, 2, 2, 2, 2, 2, 5, 6])
    np.testing.assert_array_equal(pos[1], [0, 1, 2, 2, 2, 3, 3, 3, 5, 6])
    np.testing.assert_array_equal(pos[2], [0, 1, 2, 3, 4, 2, 3, 4, 5, 6])
    assert delta == 7 - 10


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="more image token runs"):
        rope_index(np.array([1, 9, 9, 9, 9]), image_token_id=9, image_grid_thw=np.zeros((0, 3)))
    with pytest.raises(ValueError, match="needs 4 consecutive image tokens"):
        rope_index(np.array([1, 9, 9, 1]), image_token_id=9, image_grid_thw=[[1, 4, 4]])
    with pytest.raises(ValueError, match="2 image grids given but only 1"):
        rope_index(np.array([1, 9, 9, 9, 9]), image_token_id=9, image_grid_thw=[[1, 4, 4], [1, 4, 4]])
