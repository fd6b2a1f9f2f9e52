"""The IQA tfds builders on tiny copies of each official release; bad input; image mode conversion."""

import io
import logging
import struct
import zlib

import dataset_fixtures as fx
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from qponder_jax.data import datasets
from qponder_jax.data.datasets.distorted import split_by_reference
from qponder_jax.data.datasets.images import ImageError, decode_image, load_image

tfds.disable_progress_bar()


def _build(name, tmp_path, **kwargs):
    manual = tmp_path / "manual"
    expected = fx.WRITERS[name](manual)
    builder = datasets.build(name, manual, tmp_path / "tfds", **kwargs)
    return builder, expected


def _by_name(source):
    return {r["image_name"]: r for r in (source[i] for i in range(len(source)))}


def _norm(s, lo, hi):
    return 1 + 4 * (s - lo) / (hi - lo)


# exact normalized MOS for a few records of each set (raw scores in tests/dataset_fixtures.py)
SPOT_CHECKS = {
    "koniq10k": {"1024x768/1000.jpg": 1.0, "1024x768/1005.jpg": 5.0, "1024x768/1002.jpg": 3.0},
    "spaq": {"TestImage/00001.jpg": 1.0, "TestImage/00004.jpg": 5.0, "TestImage/00002.jpg": 2.7},
    "kadid10k": {"images/I01_01_01.png": 1.0, "images/I10_01_01.png": 5.0, "images/I05_01_01.png": _norm(2.5, 1.3, 4)},
    "pipal": {"Train_Dis/A0001_00_00.bmp": 1.0, "Train_Dis/A0001_10_02.bmp": _norm(1500, 1100.5, 1700)},
    "live_challenge": {"Images/10.bmp": 1.0, "Images/1000.JPG": 5.0, "Images/100.bmp": _norm(55, 12.5, 90.25)},
    "agiqa3k": {"AGIQA-3K/AttnGAN_normal_000.jpg": 1.0, "AGIQA-3K/midjourney_lowstep_001.jpg": _norm(3.5, 1.25, 4.75)},
    # DMOS, lower is better: 0.1 -> 5, 0.9 -> 1, 0.3 -> 1 + 4 * (0.9 - 0.3) / 0.8 = 4
    "csiq": {
        "dst_imgs/awgn/1600.AWGN.1.png": 5.0,
        "dst_imgs/blur/1600.BLUR.4.png": 1.0,
        "dst_imgs/jpeg2000/shroom.jpeg2000.2.png": 4.0,
        "dst_imgs/contrast/shroom.contrast.3.png": 3.0,
    },
    "tid2013": {"distorted_images/I01_08_5.BMP": 1.0, "distorted_images/I25_17_3.bmp": 5.0},
}
SPLIT_COUNTS = {
    "koniq10k": {"train": 3, "validation": 1, "test": 2},
    "kadid10k": {"train": 12, "validation": 4, "test": 4},
}


@pytest.mark.parametrize("name", sorted(fx.WRITERS))
def test_official_layout(name, tmp_path):
    builder, expected = _build(name, tmp_path, max_short_side=16 if name == "spaq" else None)
    splits = {k: v.num_examples for k, v in builder.info.splits.items()}
    assert splits == SPLIT_COUNTS.get(name, {"test": len(expected)})
    records = _by_name(
        datasets.load(name, "all", data_dir=tmp_path / "tfds", max_short_side=16 if name == "spaq" else None)
    )
    assert sorted(records) == sorted(expected)
    for image_name, raw in expected.items():
        assert records[image_name]["mos_raw"] == pytest.approx(raw, rel=1e-6)
        assert records[image_name]["dataset"] == name
        assert 1.0 <= records[image_name]["mos"] <= 5.0
    for image_name, mos in SPOT_CHECKS[name].items():
        assert records[image_name]["mos"] == pytest.approx(mos, abs=1e-5), image_name
    meta = builder.info.metadata
    assert (meta["score_min"], meta["score_max"]) == (min(expected.values()), max(expected.values()))
    assert meta["skipped"] == []
    for record in records.values():  # every stored image decodes to 8-bit RGB of the recorded size
        image = decode_image(record["image"])
        assert image.mode == "RGB" and image.size == (record["width"], record["height"])


def test_records_keep_pixels_and_metadata(tmp_path):
    _build("tid2013", tmp_path)
    records = _by_name(datasets.load("tid2013", data_dir=tmp_path / "tfds"))
    record = records["distorted_images/I01_08_5.BMP"]
    assert (record["distortion_type"], record["distortion_level"], record["ref_name"]) == ("gaussian_blur", 5, "i01")
    original = np.asarray(Image.open(tmp_path / "manual" / "distorted_images" / "I01_08_5.BMP"))
    np.testing.assert_array_equal(np.asarray(decode_image(record["image"])), original)  # BMP -> lossless PNG


def test_koniq_splits_and_jpeg_bytes_kept(tmp_path):
    _build("koniq10k", tmp_path)
    test = _by_name(datasets.load("koniq10k", "test", data_dir=tmp_path / "tfds"))
    assert sorted(test) == ["1024x768/1001.jpg", "1024x768/1005.jpg"]
    record = test["1024x768/1001.jpg"]
    assert record["image"] == (tmp_path / "manual" / "1024x768" / "1001.jpg").read_bytes()  # not recompressed
    assert (record["distortion_type"], record["distortion_level"], record["resized"]) == ("", -1, False)


def test_spaq_resized_at_build_time(tmp_path):
    _build("spaq", tmp_path, max_short_side=16)
    records = _by_name(datasets.load("spaq", data_dir=tmp_path / "tfds", max_short_side=16))
    big, small = records["TestImage/00001.jpg"], records["TestImage/00002.jpg"]
    assert (big["orig_width"], big["orig_height"], big["width"], big["height"], big["resized"]) == (
        40,
        30,
        21,
        16,
        True,
    )
    assert decode_image(big["image"]).size == (21, 16)
    assert (small["width"], small["height"], small["resized"]) == (12, 10, False)


def test_csiq_order_is_flipped(tmp_path):
    _build("csiq", tmp_path)
    records = list(_by_name(datasets.load("csiq", data_dir=tmp_path / "tfds")).values())
    dmos = np.array([r["mos_raw"] for r in records])
    mos = np.array([r["mos"] for r in records])
    assert np.argmin(dmos) == np.argmax(mos) and np.argmax(dmos) == np.argmin(mos)
    assert all(np.diff(mos[np.argsort(dmos)]) < 0)
    kinds = {r["distortion_type"] for r in records}
    assert kinds == {"awgn", "blur", "jpeg2000", "contrast"}


def test_kadid_split_by_reference(tmp_path):
    _build("kadid10k", tmp_path)
    refs = {}
    for split in ("train", "validation", "test"):
        source = datasets.load("kadid10k", split, data_dir=tmp_path / "tfds")
        refs[split] = {source[i]["ref_name"] for i in range(len(source))}
    assert [len(refs[s]) for s in ("train", "validation", "test")] == [6, 2, 2]
    assert not (refs["train"] & refs["validation"] or refs["train"] & refs["test"] or refs["validation"] & refs["test"])
    # KADID-10k's 81 references -> 49/16/16, i.e. 49 * 125 = 6125 training images as PreResQ-R1 reports
    split = split_by_reference([f"I{i:02d}" for i in range(1, 82)], seed=42)
    assert [list(split.values()).count(s) for s in ("train", "validation", "test")] == [49, 16, 16]
    assert split == split_by_reference([f"I{i:02d}" for i in range(81, 0, -1)], seed=42)  # order-independent


# ---- bad input -------------------------------------------------------------------------------------------


def _break_koniq(manual):
    fx.write_koniq(manual)
    (manual / "1024x768" / "1001.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    (manual / "1024x768" / "1004.jpg").unlink()


def test_corrupt_and_missing_images_are_skipped_counted_logged(tmp_path, caplog):
    _break_koniq(tmp_path / "manual")
    with caplog.at_level(logging.WARNING):
        builder = datasets.build("koniq10k", tmp_path / "manual", tmp_path / "tfds")
    skipped = builder.info.metadata["skipped"]
    assert sorted(s["path"].rsplit("/", 1)[-1] for s in skipped) == ["1001.jpg", "1004.jpg"]
    assert any("corrupt" in s["reason"] for s in skipped) and any("missing" in s["reason"] for s in skipped)
    assert "1001.jpg" in caplog.text and "1004.jpg" in caplog.text
    assert len(datasets.load("koniq10k", data_dir=tmp_path / "tfds")) == 4
    # the skip list survives in metadata.json for a later reader
    reread = datasets.get_builder("koniq10k", tmp_path / "tfds")
    assert len(reread.info.metadata["skipped"]) == 2


def test_strict_mode_raises_on_bad_image(tmp_path):
    _break_koniq(tmp_path / "manual")
    with pytest.raises(ImageError, match=r"100[14]\.jpg"):
        datasets.build("koniq10k", tmp_path / "manual", tmp_path / "tfds", strict=True)


def _koniq_with_mos(manual, row, value):
    fx.write_koniq(manual)
    path = manual / "koniq10k_scores_and_distributions.csv"
    lines = path.read_text().splitlines()
    fields = lines[row].split(",")
    fields[7] = value
    lines[row] = ",".join(fields)
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    ("value", "message"), [("nan", "score is nan"), ("7.5", "outside"), ("abc", "not a number"), ("", "not a number")]
)
def test_bad_mos_names_file_and_line(tmp_path, value, message):
    path = _koniq_with_mos(tmp_path / "manual", 3, value)
    with pytest.raises(ValueError, match=rf"{path.name}:4: .*{message}"):
        datasets.build("koniq10k", tmp_path / "manual", tmp_path / "tfds")


def test_malformed_csv_line(tmp_path):
    manual = tmp_path / "manual"
    fx.write_kadid(manual)
    with open(manual / "dmos.csv", "a") as f:
        f.write("I99_01_01.png,I99.png,2.0,0.1,extra\n")
    with pytest.raises(ValueError, match=r"dmos\.csv:22: malformed row"):
        datasets.build("kadid10k", manual, tmp_path / "tfds")


def test_malformed_txt_line(tmp_path):
    manual = tmp_path / "manual"
    fx.write_tid2013(manual)
    text = (manual / "mos_with_names.txt").read_text().splitlines()
    text[2] = "6.0"
    (manual / "mos_with_names.txt").write_text("\n".join(text) + "\n")
    with pytest.raises(ValueError, match=r"mos_with_names\.txt:3: malformed line"):
        datasets.build("tid2013", manual, tmp_path / "tfds")


def test_bad_xlsx_cell_and_duplicate(tmp_path):
    import openpyxl

    manual = tmp_path / "manual"
    fx.write_csiq(manual)
    book = openpyxl.load_workbook(manual / "csiq.DMOS.xlsx")
    book["all_by_image"]["F6"] = "n/a"
    book.save(manual / "csiq.DMOS.xlsx")
    with pytest.raises(ValueError, match=r"csiq\.DMOS\.xlsx\[all_by_image\]:6: score 'n/a' is not a number"):
        datasets.build("csiq", manual, tmp_path / "tfds")
    fx.write_pipal(manual)
    with open(manual / "Train_Label" / "A0002.txt", "a") as f:
        f.write("A0001_00_00.bmp,1200\n")
    with pytest.raises(ValueError, match=r"A0002\.txt:3: duplicate image"):
        datasets.build("pipal", manual, tmp_path / "tfds2")


# ---- image modes -----------------------------------------------------------------------------------------


def _stored_pixels(path):
    return np.asarray(decode_image(load_image(path).data))


def _png16_rgb(pixels: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one)."""
    h, w, _ = pixels.shape
    raw = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def test_image_modes_convert_to_rgb8(tmp_path):
    gray = np.array([[0, 17, 128, 255]], np.uint8)
    Image.fromarray(gray, "L").save(tmp_path / "gray.png")
    np.testing.assert_array_equal(_stored_pixels(tmp_path / "gray.png"), np.repeat(gray[..., None], 3, -1))

    rgba = np.array([[[10, 20, 30, 255], [10, 20, 30, 0], [0, 0, 0, 128], [200, 100, 50, 255]]], np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    out = _stored_pixels(tmp_path / "rgba.png").astype(int)
    np.testing.assert_array_equal(out[0, [0, 1, 3]], [[10, 20, 30], [255, 255, 255], [200, 100, 50]])
    assert np.abs(out[0, 2] - 255 * (1 - 128 / 255)).max() <= 1  # composited over white

    palette = Image.new("P", (3, 1))
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    palette.putdata([2, 0, 1])
    palette.save(tmp_path / "palette.png")
    np.testing.assert_array_equal(_stored_pixels(tmp_path / "palette.png")[0], [[0, 0, 255], [255, 0, 0], [0, 255, 0]])
    palette.save(tmp_path / "palette_t.png", transparency=1)  # palette entry 1 (green) is transparent
    np.testing.assert_array_equal(_stored_pixels(tmp_path / "palette_t.png")[0, 2], [255, 255, 255])

    sixteen = np.array([[0, 1000, 25700, 65535]], np.uint16)
    Image.fromarray(sixteen).save(tmp_path / "gray16.png")
    assert Image.open(tmp_path / "gray16.png").mode.startswith("I")
    out = _stored_pixels(tmp_path / "gray16.png")[0, :, 0]
    np.testing.assert_array_equal(out, [0, 4, 100, 255])  # scaled by 255/65535, not clipped

    rgb16 = np.array([[[0, 32768, 65535], [1000, 65280, 25700]]], np.uint16)
    (tmp_path / "rgb16.png").write_bytes(_png16_rgb(rgb16))
    out = _stored_pixels(tmp_path / "rgb16.png").astype(int)
    assert np.abs(out - np.round(rgb16.astype(np.float64) * 255 / 65535)).max() <= 1


def test_load_image_errors_name_the_path(tmp_path):
    with pytest.raises(ImageError, match="nope.png"):
        load_image(tmp_path / "nope.png")
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buffer, "PNG")
    (tmp_path / "truncated.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageError, match="truncated.png"):
        load_image(tmp_path / "truncated.png")


def test_bad_image_reasons_carry_no_buffer_address(tmp_path):
    """Pillow names the in-memory buffer it read (`<_io.BytesIO object at 0x...>`); skip reasons must not."""
    (tmp_path / "junk.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    with pytest.raises(ImageError) as load_error:
        load_image(tmp_path / "junk.jpg")
    with pytest.raises(ValueError) as decode_error:
        decode_image(b"\xff\xd8 this is not a jpeg")
    for message in (str(load_error.value), str(decode_error.value)):
        assert "BytesIO" not in message and " at 0x" not in message, message
        assert "corrupt or unsupported image (UnidentifiedImageError: no known image format)" in message
