"""The VQA tfds builders on tiny copies of each official release (generated videos, one corrupt file per set),
the synthetic VQA set, the CLI, and the VQA config variants."""

import csv
import logging
import sys
from pathlib import Path

import numpy as np
import openpyxl
import pytest
import scipy.io
import tensorflow_datasets as tfds

from qponder_jax.data import datasets
from qponder_jax.data.datasets import synthetic_video, videos
from qponder_jax.data.datasets.__main__ import main as datasets_cli
from qponder_jax.data.video import VideoSampling, load_video_inputs

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from configs import eval as eval_config  # noqa: E402
from configs import preresq  # noqa: E402

tfds.disable_progress_bar()


def write_clip(path: Path, seed: int, num_frames: int = 8, size: tuple[int, int] = (32, 32)) -> None:
    frames = np.random.default_rng(seed).integers(0, 256, size=(num_frames, size[1], size[0], 3), dtype=np.uint8)
    synthetic_video.write_video(path, frames, fps=8, codec="mpeg4")


def write_corrupt(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x00\x00\x00\x18ftypmp42" + np.random.default_rng(1).bytes(1000))


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


# Each writer returns ({video_name: raw score} of the good videos, the corrupt video's name).


def write_konvid(root: Path):
    ids, mos = [3339962845, 2999049224, 4883133490, 8536919744], [1.22, 2.5, 4.64, 3.0]
    _write_csv(root / "KoNViD_1k_attributes.csv", ["flickr_id", "file_name", "MOS", "SD"],
               [[i, f"{i}_original_centercrop_960x540_8s.mp4", m, 0.5] for i, m in zip(ids, mos)])  # fmt: skip
    for k, i in enumerate(ids[:3]):
        write_clip(root / "KoNViD_1k_videos" / f"{i}.mp4", k, size=(48, 32))
    write_corrupt(root / "KoNViD_1k_videos" / f"{ids[3]}.mp4")
    return {f"KoNViD_1k_videos/{i}.mp4": m for i, m in zip(ids[:3], mos[:3])}, f"KoNViD_1k_videos/{ids[3]}.mp4"


def write_live_vqc(root: Path):
    names, mos = ["A001.mp4", "A002.mp4", "B103.mp4", "B104.mp4"], [12.5, 80.0, 55.25, 40.0]
    video_list = np.empty((4, 1), dtype=object)
    for i, n in enumerate(names):
        video_list[i, 0] = np.array([n])  # a MATLAB cell array of strings
    root.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(root / "data.mat", {"video_list": video_list, "mos": np.array(mos)[:, None]})
    for k, n in enumerate(names[:3]):
        write_clip(root / "Video" / n, 10 + k)
    write_corrupt(root / "Video" / names[3])
    return {f"Video/{n}": m for n, m in zip(names[:3], mos[:3])}, f"Video/{names[3]}"


def write_youtube_ugc(root: Path):
    vids = ["Animation_360P-08c9", "Gaming_720P-25aa", "Sports_1080P-0063", "Vlog_480P-7237", "Lecture_360P-03bc"]
    mos = [2.1, 4.7, 3.3, 1.8, None]  # the last one has no rating
    book = openpyxl.Workbook()
    sheet = book.active
    sheet.title = "MOS"
    sheet.append(["vid", "category", "resolution", "MOS full", "MOS chunk 00"])
    for vid, m in zip(vids, mos):
        sheet.append([vid, vid.split("_")[0], vid.split("_")[1].split("-")[0], m, m])
    book.create_sheet("diff2").append(["vid", "MOS full"])
    root.mkdir(parents=True, exist_ok=True)
    book.save(root / "original_videos_MOS_for_YouTube_UGC_dataset.xlsx")

    def path(vid):
        category, rest = vid.split("_")
        return f"original_videos/{category}/{rest.split('-')[0]}/{vid}.mkv"

    for k, vid in enumerate(vids[:3]):
        write_clip(root / path(vid), 20 + k)
    write_corrupt(root / path(vids[3]))
    return {path(v): m for v, m in zip(vids[:3], mos[:3])}, path(vids[3])


def write_lsvq(root: Path):
    rows = [("ia-batch1/0001", 20.0, "False"), ("ia-batch1/0002", 75.5, "False"), ("yfcc-batch2/11", 60.0, "False"),
            ("ia-batch3/0101", 35.0, "True"), ("yfcc-batch4/21", 90.0, "True")]  # fmt: skip
    rows_1080p = [("ia-batch9/1080a", 45.0), ("ia-batch9/1080b", 10.0)]
    header = ["name", "p1", "height", "width", "mos", "frame_number", "is_test"]
    _write_csv(root / "labels_train_test.csv", header, [[n, 0, 32, 32, m, 8, t] for n, m, t in rows])
    _write_csv(root / "labels_test_1080p.csv", header[:-1], [[n, 0, 32, 32, m, 8] for n, m in rows_1080p])
    good = [r[:2] for r in rows] + rows_1080p[:1]
    for k, (name, _) in enumerate(good):
        write_clip(root / f"{name}.mp4", 30 + k)
    write_corrupt(root / f"{rows_1080p[1][0]}.mp4")
    return {f"{n}.mp4": m for n, m in good}, f"{rows_1080p[1][0]}.mp4"


WRITERS = {"konvid1k": write_konvid, "live_vqc": write_live_vqc, "youtube_ugc": write_youtube_ugc,
           "lsvq": write_lsvq}  # fmt: skip
ALL_SCORES = {  # every annotated raw score (min/max of the normalization, skipped videos included)
    "konvid1k": (1.22, 4.64), "live_vqc": (12.5, 80.0), "youtube_ugc": (1.8, 4.7), "lsvq": (10.0, 90.0)
}  # fmt: skip
SPLITS = {"konvid1k": {"test": 3}, "live_vqc": {"test": 3}, "youtube_ugc": {"test": 3},
          "lsvq": {"train": 3, "test": 2, "test_1080p": 1}}  # fmt: skip


def _records(source) -> dict[str, dict]:
    return {r["video_name"]: r for r in (source[i] for i in range(len(source)))}


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_official_layout(name, tmp_path, caplog):
    expected, corrupt = WRITERS[name](tmp_path / "manual")
    with caplog.at_level(logging.WARNING):
        builder = datasets.build(name, tmp_path / "manual", tmp_path / "tfds")
    corrupt_path = str(tmp_path / "manual" / corrupt)
    assert [s["path"] for s in builder.info.metadata["skipped"]] == [corrupt_path]  # skipped and counted
    assert f"{name}: skipping {corrupt_path}" in caplog.text  # logged with its path
    assert {s: i.num_examples for s, i in builder.info.splits.items()} == SPLITS[name]
    records = _records(datasets.load(name, "all", data_dir=tmp_path / "tfds"))
    assert set(records) == set(expected)
    lo, hi = ALL_SCORES[name]
    for video_name, raw in expected.items():
        r = records[video_name]
        assert r["mos_raw"] == pytest.approx(raw) and r["mos"] == pytest.approx(1 + 4 * (raw - lo) / (hi - lo), 1e-6)
        assert r["dataset"] == name and Path(r["video_path"]) == tmp_path / "manual" / video_name
        assert (r["num_frames"], r["fps"], r["duration"]) == (8, pytest.approx(8.0), pytest.approx(1.0))
        assert (r["width"], r["height"]) == ((48, 32) if name == "konvid1k" else (32, 32))
    clip, crops = load_video_inputs(r["video_path"], VideoSampling(num_frames=4, layout="two_stream", num_crops=1))
    assert clip.frames.shape[0] == 4 and len(crops) == 1  # what a job does with a record


def test_lsvq_splits_and_youtube_unrated_rows(tmp_path, caplog):
    write_lsvq(tmp_path / "lsvq")
    datasets.build("lsvq", tmp_path / "lsvq", tmp_path / "tfds")
    train = _records(datasets.load("lsvq", "train", data_dir=tmp_path / "tfds"))
    assert sorted(train) == ["ia-batch1/0001.mp4", "ia-batch1/0002.mp4", "yfcc-batch2/11.mp4"]
    write_youtube_ugc(tmp_path / "ugc")
    with caplog.at_level(logging.WARNING):
        builder = datasets.build("youtube_ugc", tmp_path / "ugc", tmp_path / "tfds")
    assert builder.info.metadata["num_annotations"] == 4  # the unrated video is not an annotation
    assert "1 videos without 'MOS full'" in caplog.text and "Lecture_360P-03bc" in caplog.text


def test_strict_mode_raises_naming_the_corrupt_video(tmp_path):
    _, corrupt = write_live_vqc(tmp_path / "manual")
    with pytest.raises(datasets.ImageError, match=str(tmp_path / "manual" / corrupt)):
        datasets.build("live_vqc", tmp_path / "manual", tmp_path / "tfds", strict=True)


def test_bad_annotations_name_file_and_line(tmp_path):
    write_konvid(tmp_path / "k")
    scores = tmp_path / "k" / "KoNViD_1k_attributes.csv"
    scores.write_text(scores.read_text().replace("4.64", "7.5"))
    with pytest.raises(ValueError, match=r"KoNViD_1k_attributes.csv:4: score 7.5 is outside"):
        datasets.build("konvid1k", tmp_path / "k", tmp_path / "tfds")
    write_lsvq(tmp_path / "l")
    labels = tmp_path / "l" / "labels_train_test.csv"
    labels.write_text(labels.read_text().replace("True", "maybe", 1))
    with pytest.raises(ValueError, match=r"labels_train_test.csv:5: is_test 'maybe'"):
        datasets.build("lsvq", tmp_path / "l", tmp_path / "tfds")
    with pytest.raises(ValueError, match="videos are stored by path"):
        datasets.get_builder("lsvq", tmp_path / "tfds", max_short_side=512)


def test_synthetic_vqa(tmp_path):
    builder = videos.prepare_video_builder(videos.SyntheticVqa(data_dir=str(tmp_path), config="tiny"), None)
    assert {s: i.num_examples for s, i in builder.info.splits.items()} == {"train": 32, "validation": 8, "test": 16}
    records = _records(videos.VideoSource(builder.as_data_source("train")))
    for name, r in list(records.items())[:4]:
        split, index = Path(name).stem.split("_")
        params = synthetic_video.clip_params(0, split, int(index))
        assert r["mos_raw"] == pytest.approx(params["mos"], abs=1e-5)
        assert (r["distortion_type"], r["distortion_level"]) == (params["distortion_type"], params["distortion_level"])
        clip = synthetic_video.make_clip(params, 32, 48, 16)
        decoded, _ = load_video_inputs(r["video_path"], VideoSampling(num_frames=16))
        np.testing.assert_array_equal(decoded.frames, clip)  # stored losslessly
        assert r["fps"] == pytest.approx(8.0) and r["num_frames"] == 16


@pytest.mark.parametrize("kind", [k for k in synthetic_video.DISTORTIONS if k != "none"])
def test_synthetic_distortions_grow_with_level(kind):
    clean = synthetic_video.make_clip({"content_seed": 3, "distortion_type": "none", "distortion_level": 0}, 40, 40, 16)
    errors, scores = [], []
    for level in (1, 3, 5):
        params = {"content_seed": 3, "distortion_type": kind, "distortion_level": level}
        distorted = synthetic_video.make_clip(params, 40, 40, 16)
        errors.append(np.abs(distorted.astype(float) - clean).mean())
        scores.append(1 - synthetic_video.MAX_SEVERITY[kind] * (level / 5) ** 0.8)
    assert 0 < errors[0] < errors[2] and errors[1] <= errors[2] and scores == sorted(scores, reverse=True)


def test_cli_builds_synthetic_vqa_without_manual_dir(tmp_path, capsys):
    assert datasets_cli(["build", "synthetic_vqa", f"--data_dir={tmp_path}"]) == 0
    assert "synthetic_vqa train: 256 records" in capsys.readouterr().out
    assert len(datasets.load("synthetic_vqa", "test", data_dir=tmp_path)) == 64
    assert datasets_cli(["build", "lsvq", f"--manual_dir={tmp_path / 'nope'}", f"--data_dir={tmp_path}"]) == 1
    assert "error:" in capsys.readouterr().err


def test_vqa_config_variants():
    for variant in ("vqa_tiny", "vqa_7b"):
        config = preresq.get_config(variant)
        sampling = VideoSampling.from_config(config.data.video)  # every field is a VideoSampling field
        assert sampling.layout == "two_stream" and config.variant == variant
        assert config.data.image_buckets == (sampling.num_crops + 1,)  # the clip and its crops share slots
        assert config.data.batch_size * config.grpo.num_generations % config.grpo.num_minibatches == 0
        with pytest.raises(AttributeError):
            config.data.video.fsp = 1.0  # locked
    tiny, big = preresq.get_config("vqa_tiny"), preresq.get_config("vqa_7b")
    assert tiny.data.datasets == "synthetic_vqa:train" and tiny.model.model_path == "embedded:tiny"
    assert big.data.datasets == "lsvq:train" and big.init_checkpoint.endswith("export/hf")
    assert (big.grpo.num_generations, big.train.total_steps, big.optim.freeze) == (5, 1403, ())  # 2 epochs
    assert preresq.get_config("7b").data.datasets == "kadid10k:train"  # image variants unchanged
    config = eval_config.get_config("vqa")
    specs = config.datasets.split(",")
    assert {s.split(":")[0] for s in specs} <= set(datasets.VIDEO_DATASETS)
    assert {"lsvq:test", "lsvq:test_1080p", "konvid1k:all", "live_vqc:all", "youtube_ugc:all"} == set(specs)
    assert VideoSampling.from_config(config.data.video).num_crops == 3 and config.score.num_ratings == 2
