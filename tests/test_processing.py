"""Processor: image parity with transformers, chat tokens + loss mask, bucketed collate, errors."""

import json
import shutil

import jax
import numpy as np
import pytest
from PIL import Image
from transformers import AutoTokenizer, Qwen2_5_VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from qponder_jax import prompts
from qponder_jax.data.image import ImageConfig, preprocess_image, smart_resize, to_rgb
from qponder_jax.data.processing import Buckets, Example, Processor
from qponder_jax.data.tokenizer import build_demo_tokenizer
from qponder_jax.model.vision_layout import sample_layout

SMALL = dict(min_pixels=56 * 56, max_pixels=28 * 28 * 64)  # at most 64 patch rows per image
BUCKETS = Buckets(tokens=(64, 128, 256), patches=(0, 64, 128, 256), images=(0, 1, 2, 4))


def _image(h, w, seed=0, channels=3):
    shape = (h, w, channels) if channels > 1 else (h, w)
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8))


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return build_demo_tokenizer(tmp_path_factory.mktemp("demo_tok"))


@pytest.fixture(scope="module")
def proc(demo_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(demo_dir))
    return Processor(tokenizer, ImageConfig(**SMALL), BUCKETS)


class _HFProcessor(Qwen2_5_VLProcessor):
    """transformers' Qwen2.5-VL processor with the PIL image processor and no video processor (needs torchvision)."""

    def check_argument_for_proper_class(self, argument_name, argument):
        return (
            None
            if argument_name == "video_processor"
            else super().check_argument_for_proper_class(argument_name, argument)
        )


@pytest.fixture(scope="module")
def hf_proc(proc):
    image_processor = Qwen2VLImageProcessorPil(**SMALL)
    return _HFProcessor(image_processor=image_processor, tokenizer=proc.tokenizer, video_processor=None)


# ---- images ----
@pytest.mark.parametrize(
    "size",
    [(20, 20), (100, 73), (30, 600), (700, 40), (500, 400), (56, 56), (13, 1000)],
    ids=["tiny", "non-multiple", "wide", "tall", "above-max", "exact", "extreme-wide"],
)
def test_patches_match_transformers(size):
    image = _image(*size, seed=size[0])
    ref = Qwen2VLImageProcessorPil(**SMALL)(images=[image], return_tensors="np")
    patches, grid = preprocess_image(image, ImageConfig(**SMALL))
    assert patches.dtype == np.float32 and patches.shape == ref["pixel_values"].shape
    np.testing.assert_array_equal(grid[None], ref["image_grid_thw"])
    np.testing.assert_allclose(patches, ref["pixel_values"], rtol=0, atol=1e-6)  # measured: 0.0 (bit-equal)
    h, w = smart_resize(*size, factor=28, **SMALL)
    assert SMALL["min_pixels"] <= h * w <= SMALL["max_pixels"] and h % 28 == w % 28 == 0


def test_default_config_large_image_matches_transformers():
    image = _image(1100, 1000, seed=3)  # above the default 1280 * 28 * 28 pixels
    ref = Qwen2VLImageProcessorPil()(images=[image], return_tensors="np")
    patches, grid = preprocess_image(image, ImageConfig())
    np.testing.assert_array_equal(grid[None], ref["image_grid_thw"])
    np.testing.assert_allclose(patches, ref["pixel_values"], rtol=0, atol=1e-6)


def _palette(transparent: bool):
    image = _image(64, 90, seed=5).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    if transparent:
        image.info["transparency"] = 3
    return image


MODE_IMAGES = {
    "L": lambda: _image(70, 50, seed=1, channels=1),
    "LA": lambda: Image.fromarray(np.random.default_rng(2).integers(0, 256, (70, 50, 2), np.uint8), mode="LA"),
    "RGBA": lambda: _image(70, 50, seed=3, channels=4),
    "P": lambda: _palette(False),
    "P+transparency": lambda: _palette(True),
    "1": lambda: _image(70, 50, seed=4, channels=1).convert("1"),
    "CMYK": lambda: _image(70, 50, seed=6, channels=4).convert("RGB").convert("CMYK"),
    "I": lambda: Image.fromarray(np.random.default_rng(7).integers(0, 256, (70, 50), np.int32)),
}


@pytest.mark.parametrize("mode", list(MODE_IMAGES))
def test_mode_conversion_matches_transformers(mode):
    image = MODE_IMAGES[mode]()
    ref = Qwen2VLImageProcessorPil(**SMALL)(images=[image], return_tensors="np")
    patches, _ = preprocess_image(image, ImageConfig(**SMALL))
    np.testing.assert_allclose(patches, ref["pixel_values"], rtol=0, atol=1e-6)
    if mode in ("RGBA", "LA", "P+transparency"):  # transparency is composited onto white, not dropped
        assert not np.array_equal(np.asarray(to_rgb(image)), np.asarray(image.convert("RGB")))


def test_sixteen_bit_is_scaled_not_clipped():
    values = np.random.default_rng(8).integers(0, 65536, (60, 80), dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    eight_bit = Image.fromarray(np.round(values / 257.0).astype(np.uint8))
    rgb = np.asarray(to_rgb(image))
    np.testing.assert_array_equal(rgb, np.asarray(eight_bit.convert("RGB")))
    # our patches equal transformers' on the properly scaled image...
    ref = Qwen2VLImageProcessorPil(**SMALL)(images=[eight_bit], return_tensors="np")
    patches, _ = preprocess_image(image, ImageConfig(**SMALL))
    np.testing.assert_allclose(patches, ref["pixel_values"], rtol=0, atol=1e-6)
    # ...while PIL's own conversion (what transformers does to I;16) saturates nearly every pixel
    assert (np.asarray(image.convert("RGB")) == 255).mean() > 0.99


def test_image_config_reads_preprocessor_json_like_transformers():
    qwen = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2}
    cfg = ImageConfig.from_dict(qwen)
    assert (cfg.min_pixels, cfg.max_pixels) == (3136, 12845056)
    sized = ImageConfig.from_dict({"size": {"shortest_edge": 1000, "longest_edge": 20000}, "resample": 2})
    ref = Qwen2VLImageProcessorPil(size={"shortest_edge": 1000, "longest_edge": 20000}, resample=2)
    assert (sized.min_pixels, sized.max_pixels) == (ref.size["shortest_edge"], ref.size["longest_edge"])
    assert ImageConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="my.json: need 0 < min_pixels"):
        ImageConfig.from_dict({"min_pixels": 10, "max_pixels": 5}, source="my.json")
    with pytest.raises(ValueError, match="aspect ratio"):
        preprocess_image(_image(2, 500), ImageConfig())


# ---- tokens and loss mask ----
REPLY = "<think>Edges are crisp; little noise. Overall, the quality is good.</think><answer>4.12</answer>"
CASES = {
    "single": (prompts.image_messages(prompts.prompt_text("qponder"), response=REPLY), [(90, 140)]),
    "multi": (prompts.image_messages("Compare them.", response="The first.", num_images=2), [(60, 60), (40, 200)]),
    "text-only": ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], []),
    "two-turns": (
        [
            {"role": "system", "content": "Be brief."},
            *prompts.image_messages("Rate it.", response="<answer>3.00</answer>"),
            {"role": "user", "content": [{"type": "text", "text": "Why?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": " It is blurry.\n"}]},
        ],
        [(56, 84)],
    ),
    "prompt-only": (prompts.image_messages(prompts.prompt_text("preresq_r1")), [(300, 200)]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_tokens_match_transformers_processor(proc, hf_proc, case):
    messages, sizes = CASES[case]
    images = [_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    generation = case == "prompt-only"
    ex = proc.encode(messages, images, add_generation_prompt=generation)
    text = proc.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
    ref = hf_proc(text=[text], images=images or None, return_tensors="np")
    np.testing.assert_array_equal(ex.input_ids, ref["input_ids"][0])
    if images:
        np.testing.assert_array_equal(ex.image_grid_thw, ref["image_grid_thw"])
        np.testing.assert_allclose(ex.pixel_values, ref["pixel_values"], rtol=0, atol=1e-6)
    assert ex.image_token_counts.tolist() == [int(np.prod(g)) // 4 for g in ex.image_grid_thw]
    assert (ex.input_ids == proc.image_token_id).sum() == ex.image_token_counts.sum()

    # loss mask: exactly each assistant message's content + its <|im_end|>, one contiguous run per message
    assistant = [m["content"] for m in messages if m["role"] == "assistant"]
    replies = [c if isinstance(c, str) else c[0]["text"] for c in assistant]
    assert proc.decode(ex.input_ids[ex.loss_mask]) == "".join(r + "<|im_end|>" for r in replies)
    edges = np.flatnonzero(np.diff(ex.loss_mask.astype(np.int8)) == 1) + 1
    assert len(edges) == len(replies)
    for start in edges:  # each run starts right after "<|im_start|>assistant\n" (3 tokens)
        assert proc.decode(ex.input_ids[start - 3 : start]) == "<|im_start|>assistant\n"
    ends = np.flatnonzero(np.diff(ex.loss_mask.astype(np.int8)) == -1)
    assert all(ex.input_ids[e] == proc.end_of_turn_id for e in ends)
    assert not ex.loss_mask[ex.input_ids == proc.image_token_id].any()


def test_encode_errors(proc):
    messages = prompts.image_messages("Rate it.")
    with pytest.raises(ValueError, match="1 image placeholders but 0 images"):
        proc.encode(messages, [])
    with pytest.raises(ValueError, match="example 'rec-7': image 0: image size 2x900: aspect ratio 450.0"):
        proc.encode(messages, [_image(2, 900)], example_id="rec-7")
    with pytest.raises(ValueError, match="start with a prompt"):
        proc.encode([{"role": "assistant", "content": "hi"}])


# ---- collate ----
def _encode(proc, seed, sizes, reply=True, generation=False):
    messages = prompts.image_messages(
        f"Rate image set {seed}.", response=REPLY if reply else None, num_images=len(sizes)
    )
    images = [_image(h, w, seed=seed + i) for i, (h, w) in enumerate(sizes)]
    return proc.encode(messages, images, add_generation_prompt=generation, example_id=f"rec-{seed}")


def _shapes(batch):
    return jax.tree.map(lambda x: (x.shape, x.dtype), batch)


def test_same_bucket_same_shapes(proc):
    a = proc.collate([_encode(proc, 0, [(90, 140)]), _encode(proc, 1, [(56, 56)])])
    b = proc.collate([_encode(proc, 2, [(40, 200)]), _encode(proc, 3, [(70, 70)])])
    assert _shapes(a) == _shapes(b)
    assert (
        a.input_ids.shape == (2, 128) and a.pixel_values.shape == (2, 64, 1176) and a.image_grid_thw.shape == (2, 1, 3)
    )
    assert not np.array_equal(a.input_ids, b.input_ids)
    two = proc.collate([_encode(proc, 4, [(56, 56), (100, 100)])])  # 16 + 64 patch rows, 2 images
    assert two.pixel_values.shape == (1, 128, 1176) and two.image_grid_thw.shape == (1, 2, 3)
    text = proc.collate([proc.encode([{"role": "user", "content": "Hi"}])])
    assert text.pixel_values.shape == (1, 0, 1176) and text.image_grid_thw.shape == (1, 0, 3)
    assert (text.image_feature_index == -1).all()


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_collate_fields(proc, padding_side):
    exs = [_encode(proc, 0, [(90, 140)]), _encode(proc, 5, [(60, 60), (40, 200)]), _encode(proc, 9, [])]
    batch = proc.collate(exs, padding_side=padding_side, batch_size=4)
    assert (
        batch.batch_size == 4 and not batch.attention_mask[3].any() and (batch.input_ids[3] == proc.pad_token_id).all()
    )
    if padding_side == "left":  # every prompt ends at the last index
        assert batch.attention_mask[:3, -1].all()
    for b, ex in enumerate(exs):
        real = batch.attention_mask[b]
        assert real.sum() == len(ex) and real[0] == (padding_side == "right" or len(ex) == batch.seq_len)
        np.testing.assert_array_equal(batch.input_ids[b, real], ex.input_ids)
        np.testing.assert_array_equal(batch.loss_mask[b, real], ex.loss_mask)
        np.testing.assert_array_equal(batch.position_ids[:, b, real], ex.position_ids)
        assert (batch.position_ids[:, b, ~real] == 0).all() and not batch.loss_mask[b, ~real].any()
        assert (batch.input_ids[b, ~real] == proc.pad_token_id).all()
        assert batch.rope_deltas[b] == ex.rope_delta
        n = ex.num_patches
        np.testing.assert_array_equal(batch.pixel_values[b, :n], ex.pixel_values)
        assert (batch.pixel_values[b, n:] == 0).all()
        np.testing.assert_array_equal(batch.image_grid_thw[b, : len(ex.image_grid_thw)], ex.image_grid_thw)
        assert (batch.image_grid_thw[b, len(ex.image_grid_thw) :] == 0).all()

        layout = sample_layout(
            ex.image_grid_thw, batch.num_patches, spatial_merge_size=2, window_size=112, patch_size=14
        )
        np.testing.assert_array_equal(batch.window_index[b], layout.window_index)
        np.testing.assert_array_equal(batch.window_segment_ids[b], layout.window_segment_ids)
        np.testing.assert_array_equal(batch.full_segment_ids[b], layout.full_segment_ids)
        np.testing.assert_array_equal(batch.vision_pos_ids[b], layout.vision_pos_ids)
        is_pad = batch.input_ids[b] == proc.image_token_id
        merged = np.concatenate(layout.merged_rows) if layout.merged_rows else np.zeros(0, np.int32)
        np.testing.assert_array_equal(batch.image_feature_index[b, is_pad], merged)
        assert (batch.image_feature_index[b, ~is_pad] == -1).all()

        # semantics: the merged row feeding image token j is the mean of the j-th 2x2 block of patches
        windowed = batch.pixel_values[b][batch.window_index[b]]  # [P, D] window order
        merged_features = windowed.reshape(-1, 4, windowed.shape[-1]).mean(1)  # [P/4, D]
        blocks = batch.pixel_values[b, :n].reshape(-1, 4, windowed.shape[-1]).mean(1)  # processor order
        np.testing.assert_allclose(merged_features[batch.image_feature_index[b, is_pad]], blocks, rtol=0, atol=1e-6)


def test_too_long_errors_or_truncates(proc):
    long_reply = " ".join(["The quality is fair."] * 60)
    ex = proc.encode(prompts.image_messages("Rate it.", response=long_reply), [_image(300, 300)], example_id="long-1")
    assert len(ex) > 256
    with pytest.raises(ValueError, match=rf"example 1 \(long-1\) has {len(ex)} tokens, more than .* 256"):
        proc.collate([_encode(proc, 0, [(56, 56)]), ex])
    cut = Processor(proc.tokenizer, proc.image_config, BUCKETS, truncation=True).collate([ex])
    assert cut.input_ids.shape == (1, 256) and cut.attention_mask.all()
    np.testing.assert_array_equal(cut.input_ids[0], ex.input_ids[:256])
    np.testing.assert_array_equal(cut.position_ids[:, 0], ex.position_ids[:, :256])
    assert cut.rope_deltas[0] == cut.position_ids[:, 0].max() + 1 - 256
    np.testing.assert_array_equal(cut.image_grid_thw[0], ex.image_grid_thw)  # the image before the cut is kept
    np.testing.assert_array_equal(cut.pixel_values[0, : ex.num_patches], ex.pixel_values)

    # a cut that would split an image drops the image, its markers and its patches
    small = Processor(proc.tokenizer, proc.image_config, Buckets(tokens=(40,), patches=(0, 64)), truncation=True)
    first_pad = int(np.flatnonzero(ex.input_ids == proc.image_token_id)[0])
    assert first_pad < 40 < first_pad + 64
    short = small.truncate(ex, 40)
    assert len(short) == first_pad - 1 and short.num_patches == 0 and short.image_grid_thw.shape == (0, 3)
    assert small.collate([ex]).pixel_values.shape == (1, 0, 1176)


def test_bucket_overflow_errors_name_the_example(proc):
    many = Buckets(tokens=(1024,), patches=(64,), images=(4,))
    with pytest.raises(ValueError, match=r"example 1 \(rec-3\): 128 patches exceed the largest patches bucket 64"):
        proc.collate([_encode(proc, 1, [(56, 56)]), _encode(proc, 3, [(100, 100), (100, 100)])], buckets=many)
    with pytest.raises(ValueError, match="multiple of merge_size"):
        proc.collate([_encode(proc, 1, [(56, 56)])], buckets=Buckets(patches=(30,)))


def test_from_pretrained_variants(demo_dir, tmp_path, proc):
    loaded = Processor.from_pretrained(demo_dir)
    assert loaded.image_config == ImageConfig(min_pixels=56 * 56, max_pixels=112 * 112)
    ex = _encode(proc, 0, [(90, 140)])
    assert proc.decode(ex.input_ids) == loaded.decode(ex.input_ids)
    assert proc.decode(np.stack([ex.input_ids] * 2), skip_special_tokens=True)[1].startswith("system\n")

    # transformers 5.x layout: chat template in chat_template.jinja, size dict in the preprocessor config
    folder = tmp_path / "v5"
    shutil.copytree(demo_dir, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "chat_template.jinja").write_text(config.pop("chat_template"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "preprocessor_config.json").write_text(
        json.dumps({"size": {"shortest_edge": 3136, "longest_edge": 50176}})
    )
    v5 = Processor.from_pretrained(folder)
    assert v5.image_config.max_pixels == 50176
    messages, sizes = CASES["single"]
    images = [_image(h, w) for h, w in sizes]
    v5_ids = v5.encode(messages, images).input_ids
    np.testing.assert_array_equal(v5_ids, proc.encode(messages, images).input_ids)

    # transformers 4.x processor layout: the template only in chat_template.json
    (folder / "chat_template.jinja").unlink()
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": proc.tokenizer.chat_template}))
    np.testing.assert_array_equal(Processor.from_pretrained(folder).encode(messages, images).input_ids, v5_ids)

    # a config.json whose token ids disagree with the tokenizer is rejected
    from qponder_jax.model.config import tiny_config

    (folder / "config.json").write_text(json.dumps(tiny_config().to_hf_dict()))
    with pytest.raises(ValueError, match="config.json image_token_id=500 but the tokenizer has"):
        Processor.from_pretrained(folder)
    with pytest.raises(FileNotFoundError):
        Processor.from_pretrained(tmp_path / "missing")


def test_example_is_plain_numpy(proc):
    ex = _encode(proc, 0, [(90, 140)])
    assert isinstance(ex, Example)
    assert ex.input_ids.dtype == np.int32 and ex.position_ids.dtype == np.int32 and ex.loss_mask.dtype == bool
    assert ex.position_ids.shape == (3, len(ex)) and ex.pixel_values.shape == (ex.num_patches, 1176)
