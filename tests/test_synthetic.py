"""The synthetic IQA set: deterministic, the real record schema, and a MOS that the pixels explain."""

import numpy as np
import pytest
import tensorflow_datasets as tfds
from scipy import ndimage, stats

from qponder_jax.data import datasets
from qponder_jax.data.datasets.common import RECORD_FIELDS
from qponder_jax.data.datasets.synthetic import DISTORTIONS, SyntheticIQA, detail_level, make_content

tfds.disable_progress_bar()


def _gray(record):
    return np.asarray(datasets.decode_image(record["image"]), np.float64).mean(-1) / 255.0  # [H, W]


def _sharpness(gray):
    """Contrast-invariant edge sharpness: a step edge blurred by sigma gives |lap| / |grad| ~ 1 / sigma."""
    gy, gx = np.gradient(gray)
    return np.percentile(np.abs(ndimage.laplace(gray)), 99) / (np.percentile(np.hypot(gy, gx), 99) + 1e-6)


def _noise_energy(gray):
    """Median high-frequency response (a robust noise estimate: edges are a minority of pixels)."""
    kernel = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float64)
    return np.median(np.abs(ndimage.convolve(gray, kernel)))


def test_deterministic_per_index_and_split():
    a, b = SyntheticIQA("train", 16, seed=3), SyntheticIQA("train", 16, seed=3)
    assert a[7] == b[7] and a[7] == a[7]
    assert a[7]["image"] != a[8]["image"]
    assert a[7]["image"] != SyntheticIQA("validation", 16, seed=3)[7]["image"]
    assert a[7]["image"] != SyntheticIQA("train", 16, seed=4)[7]["image"]
    with pytest.raises(IndexError):
        a[16]


def test_record_schema():
    source = SyntheticIQA("test", 40, seed=1, min_side=56, max_side=112)
    kinds = set()
    for i in range(len(source)):
        record = source[i]
        assert set(record) == set(RECORD_FIELDS)
        image = datasets.decode_image(record["image"])
        assert image.mode == "RGB" and image.size == (record["width"], record["height"])
        assert 56 <= record["width"] <= 112 and 56 <= record["height"] <= 112
        assert record["dataset"] == "synthetic" and record["mos"] == record["mos_raw"]
        assert 1.0 <= record["mos"] <= 5.0
        assert (record["distortion_level"] == 0) == (record["distortion_type"] == "none")
        kinds.add(record["distortion_type"])
    assert len(kinds) >= 6  # draws from all distortion types


def test_stronger_distortion_means_lower_mos():
    source = SyntheticIQA("train", 1)
    for kind in DISTORTIONS[1:]:
        for content in range(4):
            mos = [source.render(np.random.default_rng(content), kind, level)["mos"] for level in range(0, 6)]
            assert all(np.diff(mos) < 0), (kind, mos)
    pristine = [source.render(np.random.default_rng(c), "none", 0)["mos"] for c in range(20)]
    assert 4.6 <= min(pristine) and max(pristine) <= 5.0 and np.std(pristine) > 0.02  # content varies a little


@pytest.mark.parametrize(("kind", "feature", "sign"), [("blur", _sharpness, 1), ("noise", _noise_energy, -1)])
def test_mos_is_learnable_from_pixels(kind, feature, sign):
    source = SyntheticIQA("train", 120, seed=5, distortions=(kind,))
    records = [source[i] for i in range(len(source))]
    srcc = stats.spearmanr([feature(_gray(r)) for r in records], [r["mos"] for r in records])[0]
    assert sign * srcc > 0.75, srcc  # measured: blur 0.85, noise -0.95


def test_content_is_varied():
    details = [detail_level(make_content(np.random.default_rng(i), 80, 80)) for i in range(40)]
    assert np.std(details) > 0.1 and min(details) > 0.0


def test_tfds_builder_matches_direct_source(tmp_path):
    builder = datasets.builder_class("synthetic_iqa")(data_dir=str(tmp_path), config="tiny")
    builder.download_and_prepare()
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == {"train": 64, "validation": 32, "test": 32}
    stored = builder.as_data_source("test")
    direct = SyntheticIQA("test", 32, seed=0)
    by_name = {direct[i]["image_name"]: direct[i] for i in range(32)}
    for i in range(0, 32, 5):
        record = stored[i]
        expected = by_name[record["image_name"].decode()]
        assert record["image"] == expected["image"]
        assert float(record["mos"]) == pytest.approx(expected["mos"], abs=1e-6)
