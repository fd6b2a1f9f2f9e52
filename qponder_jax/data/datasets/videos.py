"""Builders for the VQA sets: KoNViD-1k, LIVE-VQC, YouTube-UGC, LSVQ, and the synthetic VQA set.

They share the image builders' machinery (`builder.IQABuilder`): annotations are read and validated first
(a malformed row, a score that is not a number or outside the documented range, a duplicate name: ValueError
naming file:line), scores are normalized per dataset over all splits (`common.normalize_scores`), and a video
that is missing or that PyAV cannot open and decode is skipped, counted and logged with its path (listed in
`builder.info.metadata["skipped"]`), or raises in strict mode. Videos are large, so a record stores the video
by path and the metadata `probe_video` found; decode it with `qponder_jax.data.video.load_video_inputs`:

    video_path        str    absolute path of the video file at build time
    video_name        str    path relative to the release root (its official name)
    mos_raw, mos      float  the published score; normalized to [1, 5], higher is better
    dataset           str    e.g. "konvid1k"
    num_frames        int    frames in the stream (from packet timestamps)
    fps, duration     float  average frame rate (num_frames / duration); seconds covered
    width, height     int    displayed size (after the container's rotation)
    distortion_type, distortion_level, ref_name   as in image records (synthetic set only; else "", -1, "")

Official layouts (checked against public loaders of each set; what could not be checked is said per class).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from qponder_jax.data.datasets.authentic import _load_mat, _mat_text
from qponder_jax.data.datasets.builder import Annotation, IQABuilder, IQAConfig, IQASource, prepare
from qponder_jax.data.datasets.common import (
    FileIndex,
    cell_text,
    find_annotation_file,
    parse_int,
    parse_score,
    read_csv,
    read_xlsx,
)
from qponder_jax.data.datasets.synthetic_video import LABEL_COLUMNS, LABELS_FILE, write_synthetic_vqa
from qponder_jax.data.video import VideoError, probe_video

log = logging.getLogger(__name__)

VIDEO_TEXT_FIELDS = ("video_path", "video_name", "dataset", "distortion_type", "ref_name")
VIDEO_FLOAT_FIELDS = ("mos_raw", "mos", "fps", "duration")
VIDEO_INT_FIELDS = ("num_frames", "width", "height", "distortion_level")
VIDEO_RECORD_FIELDS = VIDEO_TEXT_FIELDS + VIDEO_FLOAT_FIELDS + VIDEO_INT_FIELDS


def video_record_features() -> tfds.features.FeaturesDict:
    """The tfds features of a VQA record (see the module docstring)."""
    features: dict[str, object] = {k: tfds.features.Text() for k in VIDEO_TEXT_FIELDS}
    features.update({k: tfds.features.Scalar(dtype=np.float32) for k in VIDEO_FLOAT_FIELDS})
    features.update({k: tfds.features.Scalar(dtype=np.int32) for k in VIDEO_INT_FIELDS})
    return tfds.features.FeaturesDict(features)


class VQABuilder(IQABuilder, skip_registration=True):
    """Base VQA builder: probes each video with PyAV instead of loading an image."""

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            features=video_record_features(),
            homepage=self.HOMEPAGE,
            metadata=tfds.core.MetadataDict(),
        )

    STORES_PATHS = True  # records hold each video's absolute path

    def _generate_examples(self, split: str, items: list[tuple[Annotation, float, Path | None]], root: Path):
        written = 0
        for a, mos, path in items:  # path: the video under root (config.image_dir searched first), None = missing
            if path is None:
                self.skip_log.skip(root / a.paths[0], f"missing video file (annotation {a.where})")
                continue
            try:
                info = probe_video(path)
            except VideoError as e:
                self.skip_log.skip(path, e.reason)
                continue
            name = path.relative_to(root).as_posix()
            written += 1
            yield (
                name,
                {
                    "video_path": str(path.resolve()),
                    "video_name": name,
                    "mos_raw": a.score,
                    "mos": mos,
                    "dataset": self.name,
                    "fps": info.fps,
                    "duration": info.duration,
                    "num_frames": info.num_frames,
                    "width": info.width,
                    "height": info.height,
                    "distortion_type": a.distortion_type,
                    "distortion_level": a.distortion_level,
                    "ref_name": a.ref_name,
                },
            )
        if not written:
            raise ValueError(f"{self.name}: every one of the {len(items)} videos of split {split!r} was skipped")


class Konvid1k(VQABuilder):
    """KoNViD-1k: 1200 Flickr videos (8 s, 960x540), MOS 1-5; no official split (one split, "test").

    `KoNViD_1k_attributes.csv` (columns `flickr_id`, `MOS`, and in some copies `file_name`), videos
    `KoNViD_1k_videos/<flickr_id>.mp4` (else `file_name`, else found by name anywhere under manual_dir).
    """

    name = "konvid1k"
    SCORE_RANGE = (1.0, 5.0)
    HOMEPAGE = "https://database.mmsp-kn.de/konvid-1k-database.html"
    DESCRIPTION = "KoNViD-1k in-the-wild video quality (MOS 1-5)."
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Put KoNViD_1k_attributes.csv and the folder KoNViD_1k_videos/ in manual_dir."
    SCORES_FILE = "KoNViD_1k_attributes.csv"
    VIDEO_DIR = "KoNViD_1k_videos"

    def read_annotations(self, root: Path) -> list[Annotation]:
        annotations = []
        for where, row in read_csv(find_annotation_file(root, self.SCORES_FILE), ["flickr_id", "MOS"]):
            paths = (f"{self.VIDEO_DIR}/{row['flickr_id']}.mp4",)
            if row.get("file_name"):
                paths += (f"{self.VIDEO_DIR}/{row['file_name']}",)
            annotations.append(Annotation(paths, parse_score(row["MOS"], where, self.SCORE_RANGE), where))
        return annotations


class LiveVqc(VQABuilder):
    """LIVE-VQC: 585 mobile videos, MOS 0-100; one split, "test".

    `data.mat` with `video_list` (cell array of names such as A001.mp4) and `mos` ([N, 1]); videos `Video/`.
    `LiveVQCData.mat` is read when `data.mat` is absent, with the same variable names (not verified: a copy
    with other names fails with the list of variables it holds).
    """

    name = "live_vqc"
    SCORE_RANGE = (0.0, 100.0)
    HOMEPAGE = "https://live.ece.utexas.edu/research/LIVEVQC/index.html"
    DESCRIPTION = "LIVE Video Quality Challenge (LIVE-VQC): 585 videos captured with mobile devices."
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Put data.mat (or LiveVQCData.mat) and the folder Video/ in manual_dir."
    SCORES_FILES = ("data.mat", "LiveVQCData.mat")

    def read_annotations(self, root: Path) -> list[Annotation]:
        index = FileIndex(root)
        path = next((p for p in map(index.resolve, self.SCORES_FILES) if p is not None), None)
        if path is None:
            raise FileNotFoundError(f"annotation file {' or '.join(self.SCORES_FILES)} not found under {root}")
        names = [_mat_text(v) for v in _load_mat(path, "video_list").ravel()]
        scores = _load_mat(path, "mos").ravel()
        if len(names) != len(scores):
            raise ValueError(f"{path}: video_list has {len(names)} entries but mos has {len(scores)}")
        return [
            Annotation((f"Video/{name}",), parse_score(score, f"{path}:entry {i + 1}", self.SCORE_RANGE),
                       f"{path}:entry {i + 1}")
            for i, (name, score) in enumerate(zip(names, scores))
        ]  # fmt: skip


class YoutubeUgc(VQABuilder):
    """YouTube-UGC: original videos with MOS 1-5 ("MOS full"); one split, "test".

    `original_videos_MOS_for_YouTube_UGC_dataset.xlsx`, sheet "MOS", columns `vid` (e.g. Gaming_720P-25aa) and
    `MOS full`; videos `original_videos/<category>/<resolution>/<vid>.mkv` (or anywhere under manual_dir by
    name). Rows with an empty `MOS full` are videos without a rating: they are counted and logged, not built
    (we could not verify how many the release has).
    """

    name = "youtube_ugc"
    SCORE_RANGE = (1.0, 5.0)
    HOMEPAGE = "https://media.withyoutube.com/"
    DESCRIPTION = "YouTube-UGC user-generated videos (original .mkv files, MOS full)."
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put original_videos_MOS_for_YouTube_UGC_dataset.xlsx and the folder original_videos/ in manual_dir."
    )
    SCORES_FILE = "original_videos_MOS_for_YouTube_UGC_dataset.xlsx"
    SHEET = "MOS"

    def read_annotations(self, root: Path) -> list[Annotation]:
        path = find_annotation_file(root, self.SCORES_FILE)
        annotations, unrated = [], []
        for where, row in read_xlsx(path, sheet=self.SHEET, header_row=1, required=["vid"]):
            if "MOS full" not in row:
                raise ValueError(f"{where}: header lacks column 'MOS full' (columns: {sorted(row)})")
            vid = cell_text(row["vid"])
            if row["MOS full"] is None or not str(row["MOS full"]).strip():
                unrated.append(vid)
                continue
            category, _, rest = vid.partition("_")
            resolution = rest.split("-")[0]
            paths = (f"original_videos/{category}/{resolution}/{vid}.mkv", f"original_videos/{vid}.mkv")
            annotations.append(Annotation(paths, parse_score(row["MOS full"], where, self.SCORE_RANGE), where))
        if unrated:
            log.warning("%s: %d videos without 'MOS full' in %s are not built: %s", self.name, len(unrated), path,
                        unrated[:10])  # fmt: skip
        return annotations


class Lsvq(VQABuilder):
    """LSVQ (LIVE Large-Scale Social Video Quality): MOS 0-100; splits train, test and test_1080p.

    `labels_train_test.csv` (columns `name`, `mos`, `is_test`: the official train/test split) and
    `labels_test_1080p.csv` (`name`, `mos`); videos `<name>.mp4` (names such as ia-batch1/xxx), relative to
    manual_dir or to its `videos/` folder.
    """

    name = "lsvq"
    SCORE_RANGE = (0.0, 100.0)
    HOMEPAGE = "https://github.com/baidut/PatchVQ"
    DESCRIPTION = "LSVQ: ~39k user-generated videos; official train / test / test_1080p splits."
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put labels_train_test.csv, labels_test_1080p.csv and the video folders (ia-batch*/, yfcc-batch*/) in "
        "manual_dir."
    )
    TRAIN_TEST_FILE = "labels_train_test.csv"
    TEST_1080P_FILE = "labels_test_1080p.csv"
    TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")

    def read_annotations(self, root: Path) -> list[Annotation]:
        annotations = []
        for where, row in read_csv(find_annotation_file(root, self.TRAIN_TEST_FILE), ["name", "mos", "is_test"]):
            flag = row["is_test"].lower()
            if flag not in self.TRUE + self.FALSE:
                raise ValueError(f"{where}: is_test {row['is_test']!r} is not True/False")
            annotations.append(self._annotation(row, where, "test" if flag in self.TRUE else "train"))
        for where, row in read_csv(find_annotation_file(root, self.TEST_1080P_FILE), ["name", "mos"]):
            annotations.append(self._annotation(row, where, "test_1080p"))
        return annotations

    def _annotation(self, row: dict[str, str], where: str, split: str) -> Annotation:
        name = row["name"]
        paths = (f"{name}.mp4", f"videos/{name}.mp4")
        return Annotation(paths, parse_score(row["mos"], where, self.SCORE_RANGE), where, split=split)


@dataclasses.dataclass(eq=False)
class SyntheticVqaConfig(IQAConfig):
    """The synthetic release this config writes (see `synthetic_video`)."""

    seed: int = 0  # base seed; clip i of a split is made from (seed, split, i)
    train_size: int = 256
    validation_size: int = 32
    test_size: int = 64
    min_side: int = 32  # clip sides are drawn uniformly from [min_side, max_side]
    max_side: int = 48
    num_frames: int = 16
    fps: float = 8.0


class SyntheticVqa(VQABuilder):
    """Moving-pattern clips with known distortions; `build("synthetic_vqa", None, data_dir)` writes them first."""

    name = "synthetic_vqa"
    SCORE_RANGE = (1.0, 5.0)
    DESCRIPTION = "Synthetic VQA: procedural moving clips with known spatial and temporal distortions."
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Nothing to download: `prepare_video_builder` writes the clips (any manual_dir)."
    BUILDER_CONFIGS = [
        SyntheticVqaConfig(name="default"),
        SyntheticVqaConfig(name="tiny", train_size=32, validation_size=8, test_size=16),
    ]

    def read_annotations(self, root: Path) -> list[Annotation]:
        annotations = []
        for where, row in read_csv(find_annotation_file(root, LABELS_FILE), LABEL_COLUMNS):
            level = parse_int(row["distortion_level"], where, "distortion_level")
            annotations.append(
                Annotation((row["name"],), parse_score(row["mos"], where, self.SCORE_RANGE), where,
                           distortion_type=row["distortion_type"], distortion_level=level,
                           ref_name=row["ref_name"], split=row["split"])
            )  # fmt: skip
        return annotations

    def release_dir(self) -> Path:
        """Where this config's clips are written: next to the built dataset, under data_dir."""
        return Path(self.data_dir_root) / f"{self.name}_videos" / self.builder_config.name

    def write_release(self, manual_dir: str | Path | None = None) -> Path:
        config: SyntheticVqaConfig = self.builder_config
        sizes = {"train": config.train_size, "validation": config.validation_size, "test": config.test_size}
        sizes = {split: size for split, size in sizes.items() if size > 0}
        return write_synthetic_vqa(
            manual_dir or self.release_dir(), sizes, seed=config.seed, min_side=config.min_side,
            max_side=config.max_side, num_frames=config.num_frames, fps=config.fps,
        )  # fmt: skip


def prepare_video_builder(builder: VQABuilder, manual_dir: str | Path | None, *, rebuild: bool = False) -> VQABuilder:
    """Builds a VQA set (see `builder.prepare`); the synthetic set needs no manual_dir (it writes its clips under
    data_dir)."""
    if isinstance(builder, SyntheticVqa):
        return prepare(builder, builder.write_release(manual_dir), rebuild=rebuild)
    if manual_dir is None:
        raise FileNotFoundError(f"{builder.name}: needs manual_dir (the official release in its original layout)")
    return prepare(builder, manual_dir, rebuild=rebuild)


class VideoSource(IQASource):
    """Random access over a built VQA split: records as plain dicts (`str` text, Python numbers)."""

    @staticmethod
    def convert(example: dict) -> dict:
        return _to_video_record(example)


def _to_video_record(example: dict) -> dict:
    record = {k: v.decode("utf-8") if isinstance(v, bytes) else str(v) for k, v in
              ((k, example[k]) for k in VIDEO_TEXT_FIELDS)}  # fmt: skip
    record.update({k: float(example[k]) for k in VIDEO_FLOAT_FIELDS})
    record.update({k: int(example[k]) for k in VIDEO_INT_FIELDS})
    return record
