"""Whole-model logits parity with transformers' torch Qwen2.5-VL on batches made by our Processor.

The issue's cases: one image; a 3-sample batch with images of different sizes (one 56x56), two images in one
sample and one text-only sample, padded together; a vision config whose window size and full-attention layers
differ from the defaults. The torch reference gets explicit M-RoPE positions from its own get_rope_index.
"""

import dataclasses

import numpy as np
import pytest
from PIL import Image
from torch_ref import make_torch_model, our_model_from_torch, torch_logits, torch_rope_index

from qponder_jax.data.image import ImageConfig
from qponder_jax.data.processing import Processor
from qponder_jax.data.tokenizer import build_demo_tokenizer, special_token_ids
from qponder_jax.model.config import tiny_config

TOL = 1e-4


def _image(w, h, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _messages(text, n_images, answer=None):
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
    msgs = [{"role": "user", "content": content}]
    if answer is not None:
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return msgs


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    tok_dir = build_demo_tokenizer(tmp_path_factory.mktemp("tok"))
    proc = Processor.from_pretrained(tok_dir)
    # allow images up to 224x224 so that some span several 112-px attention windows
    return ImageConfig(min_pixels=56 * 56, max_pixels=224 * 224), proc


def _config(proc, **vision_changes):
    ids = special_token_ids(proc.tokenizer)
    cfg = tiny_config(vocab_size=len(proc.tokenizer))
    cfg = cfg.replace(
        image_token_id=proc.image_token_id,
        video_token_id=proc.video_token_id,
        vision_start_token_id=proc.vision_start_token_id,
        vision_end_token_id=proc.vision_end_token_id,
    )
    assert ids["image_token_id"] == proc.image_token_id
    return cfg.replace(vision=dataclasses.replace(cfg.vision, **vision_changes)) if vision_changes else cfg


def _parity(cfg, proc, image_cfg, samples, tmp_path, padding_side="right"):
    """Max |ours - torch| over real tokens for samples [(messages, images)]."""
    proc = Processor(proc.tokenizer, image_cfg, window_size=cfg.vision.window_size)
    examples = [proc.encode(m, imgs) for m, imgs in samples]
    batch = proc.collate(examples, padding_side=padding_side)
    torch_model = make_torch_model(cfg, seed=1)
    model, _ = our_model_from_torch(torch_model, tmp_path)
    pixels = [ex.pixel_values for ex in examples if ex.num_patches]
    grids = np.concatenate([ex.image_grid_thw for ex in examples if len(ex.image_grid_thw)])
    ref_pos, ref_deltas = torch_rope_index(torch_model, batch.input_ids, batch.attention_mask, grids)
    mask = np.asarray(batch.attention_mask)
    np.testing.assert_array_equal(batch.position_ids[:, mask], ref_pos[:, mask])  # our positions are torch's
    np.testing.assert_array_equal(batch.rope_deltas, ref_deltas)
    ref = torch_logits(torch_model, batch.input_ids, mask, ref_pos, np.concatenate(pixels), grids)
    ours = np.asarray(model(batch))
    diff = float(np.abs(ours - ref)[mask].max())
    print(f"max abs logits diff {diff:.2e} over {int(mask.sum())} tokens")
    return diff


def test_one_image(processor, tmp_path):
    image_cfg, proc = processor
    cfg = _config(proc)
    samples = [(_messages("Rate the quality.", 1, "<think>sharp</think><answer>4.2</answer>"), [_image(100, 73, 0)])]
    assert _parity(cfg, proc, image_cfg, samples, tmp_path) <= TOL


def test_mixed_batch_padded_together(processor, tmp_path):
    image_cfg, proc = processor
    cfg = _config(proc)
    samples = [
        (_messages("How good is this small image?", 1), [_image(56, 56, 1)]),
        (_messages("Compare the two pictures, please.", 2, "The first is blurrier."), [_image(200, 120, 2),
                                                                                      _image(60, 180, 3)]),
        (_messages("No image here, just text about quality.", 0, "Fine."), []),
    ]  # fmt: skip
    assert _parity(cfg, proc, image_cfg, samples, tmp_path) <= TOL
    assert _parity(cfg, proc, image_cfg, samples, tmp_path / "left", padding_side="left") <= TOL


def test_custom_window_and_full_attention_layers(processor, tmp_path):
    image_cfg, proc = processor
    cfg = _config(proc, window_size=56, depth=3, fullatt_block_indexes=(0, 2))
    samples = [
        (_messages("Rate it.", 1), [_image(224, 168, 4)]),
        (_messages("And this one?", 1), [_image(84, 140, 5)]),
    ]
    assert _parity(cfg, proc, image_cfg, samples, tmp_path) <= TOL


def test_gqa_ratio_four_with_images(processor, tmp_path):
    image_cfg, proc = processor
    cfg = _config(proc)
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, num_attention_heads=8, num_key_value_heads=2))
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, mrope_section=(1, 1, 2)))  # head_dim 8
    samples = [(_messages("Quality?", 1), [_image(150, 90, 6)])]
    assert _parity(cfg, proc, image_cfg, samples, tmp_path) <= TOL
