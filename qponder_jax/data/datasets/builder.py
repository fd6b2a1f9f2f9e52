"""The tfds builder base for the IQA sets, and `build` / `load` helpers. No TensorFlow needed.

Each dataset is a `tfds.core.GeneratorBasedBuilder` that reads the official release from a local
`manual_dir` and writes array_record files; `tfds.data_source` / `builder.as_data_source(split)` read them
back with random access (what grain needs). Storage choice: the image is a `tfds.features.Tensor(shape=(),
dtype=np.object_)` holding encoded bytes, not `tfds.features.Image`. Without TensorFlow, `Image` can only
store bytes you already encoded (encoding a numpy array goes through a TF graph), and it decodes with
OpenCV when that happens to be installed (BGR order, 16-bit passthrough) or PIL otherwise. Storing the
bytes ourselves keeps one explicit path: every image is converted to 8-bit RGB at build time
(`images.load_image`) and decoded with PIL by `decode_image`, identically for every source.

`strict` is a builder argument rather than a `BuilderConfig` field: a config names the data directory
(`<name>/<config>/<version>`), and strictness only decides whether a bad image raises or is skipped; it
never changes what a successful build writes. The build-time resize (`max_short_side`) does change the
data, so it is a config: `IQAConfig(name="short512", max_short_side=512)`.

Build metadata (`builder.info.metadata`, saved as metadata.json): the raw score min/max used for
normalization, the score direction, the number of annotated images, the list of skipped images, and what the build
was made from (`provenance`: annotation files' hashes, the image list, the builder version and options). `prepare`
reuses a build only when that source is unchanged; otherwise it stops and says what changed (`SourceChangedError`),
or rebuilds with `rebuild=True`.
"""

from __future__ import annotations

import abc
import collections
import dataclasses
import inspect
import logging
import shutil
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from qponder_jax.data.datasets.common import (
    FLOAT_FIELDS,
    INT_FIELDS,
    TEXT_FIELDS,
    FileIndex,
    SkipLog,
    normalize_scores,
)
from qponder_jax.data.datasets.images import ImageError, load_image
from qponder_jax.data.datasets.provenance import SOURCE_KEY, recording_reads, source_changes, source_record
from qponder_jax.errors import DataError

log = logging.getLogger(__name__)

ALL_SPLITS = "all"  # tfds' name for the union of all splits (reserved: no split may be called that)
SINGLE_SPLIT = "test"  # the one split of a set without an official split (used whole for evaluation)


@dataclasses.dataclass(eq=False)
class IQAConfig(tfds.core.BuilderConfig):
    """Build options that change the written data."""

    max_short_side: int = 0  # downscale images whose short side is larger than this (0 = keep the size)
    image_dir: str = ""  # look for images in this folder of manual_dir first ("" = the official layout)


class SourceChangedError(DataError):
    """A build exists in data_dir but its release (annotations, image list, builder version or options) changed."""


@dataclasses.dataclass(frozen=True)
class Annotation:
    """One annotated image, as read from the official annotation file."""

    paths: tuple[str, ...]  # candidate image paths relative to manual_dir, the official one first
    score: float  # raw score as published
    where: str  # "file:line" of the annotation, for messages
    distortion_type: str = ""
    distortion_level: int = -1
    ref_name: str = ""
    split: str = SINGLE_SPLIT


def record_features() -> tfds.features.FeaturesDict:
    """The tfds features of an IQA record (see `common` for the meaning of each key)."""
    features: dict[str, object] = {"image": tfds.features.Tensor(shape=(), dtype=np.object_)}
    features.update({k: tfds.features.Text() for k in TEXT_FIELDS})
    features.update({k: tfds.features.Scalar(dtype=np.float32) for k in FLOAT_FIELDS})
    features.update({k: tfds.features.Scalar(dtype=np.int32) for k in INT_FIELDS})
    features["resized"] = tfds.features.Scalar(dtype=np.bool_)
    return tfds.features.FeaturesDict(features)


class CodePath:
    """`code_path` of a builder class: its source file.

    tfds' own lookup goes through `importlib_resources`, a package tfds does not install, and fails for a
    builder defined inside a package; the file path is what that lookup returns anyway.
    """

    def __get__(self, instance, owner) -> epath.Path:
        return epath.Path(inspect.getfile(owner))


class IQABuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base builder: subclasses read their annotation files; this class validates, normalizes and writes."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [IQAConfig(name="default")]
    SCORE_RANGE: tuple[float, float] = (-np.inf, np.inf)  # documented raw score range; outside it = error
    LOWER_IS_BETTER = False  # DMOS: flipped before normalization
    HOMEPAGE = ""
    DESCRIPTION = ""
    code_path = CodePath()

    def __init__(self, *, strict: bool = False, **kwargs):
        self.strict = strict  # raise on a missing/corrupt image instead of skipping it
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            features=record_features(),
            homepage=self.HOMEPAGE,
            metadata=tfds.core.MetadataDict(),
        )

    @abc.abstractmethod
    def read_annotations(self, root: Path) -> list[Annotation]:
        """All annotated images of the release under `root`, validated (ValueError naming file:line)."""

    STORES_PATHS = False  # records hold absolute file paths (videos): the release must stay where it was built from

    def read_source(self, root: Path) -> tuple[list[Annotation], list[Path | None], dict]:
        """(annotations, each one's file under `root` or None when missing, the provenance record) of the release in
        `root`: annotations validated (ValueError naming file:line); no image is opened."""
        root = Path(root)
        with recording_reads() as annotation_files:
            annotations = self.read_annotations(root)
        if not annotations:
            raise ValueError(f"{self.name}: no annotated images found under {root}")
        first_seen: dict[str, str] = {}
        for a in annotations:
            key = a.paths[0].lower()
            if key in first_seen:
                raise ValueError(f"{a.where}: duplicate image {a.paths[0]!r} (first at {first_seen[key]})")
            first_seen[key] = a.where
        index = FileIndex(root)
        image_dir = self.builder_config.image_dir
        files = [
            index.resolve(*((f"{image_dir}/{Path(a.paths[0]).name}",) if image_dir else ()), *a.paths)
            for a in annotations
        ]
        base = {f.name for f in dataclasses.fields(tfds.core.BuilderConfig)}
        config = self.builder_config
        options = {"config": config.name, **{f.name: getattr(config, f.name) for f in dataclasses.fields(config)
                                             if f.name not in base}}  # fmt: skip
        record = source_record(
            builder=f"{self.name} {self.version}",
            options=options,
            root=index.root,
            annotation_files=annotation_files,
            media=[(a.paths[0], f) for a, f in zip(annotations, files)],
            stores_paths=self.STORES_PATHS,
        )
        return annotations, files, record

    def _split_generators(self, dl_manager):
        root = Path(dl_manager.manual_dir)
        annotations, files, source = self.read_source(root)
        mos, lo, hi = normalize_scores(np.array([a.score for a in annotations]), self.LOWER_IS_BETTER)
        self.skip_log = SkipLog(self.name, self.strict)
        self.info.metadata.update(
            score_min=lo,
            score_max=hi,
            lower_is_better=self.LOWER_IS_BETTER,
            num_annotations=len(annotations),
            skipped=self.skip_log.skipped,  # filled while generating; saved after
            **{SOURCE_KEY: source},
        )
        by_split: dict[str, list[tuple[Annotation, float, Path | None]]] = collections.defaultdict(list)
        for a, m, f in zip(annotations, mos, files):
            by_split[a.split].append((a, float(m), f))
        return {split: self._generate_examples(split, items, root) for split, items in by_split.items()}

    def _generate_examples(self, split: str, items: list[tuple[Annotation, float, Path | None]], root: Path):
        config: IQAConfig = self.builder_config
        written = 0
        for a, mos, path in items:
            if path is None:
                self.skip_log.skip(root / a.paths[0], f"missing image file (annotation {a.where})")
                continue
            try:
                image = load_image(path, config.max_short_side)
            except ImageError as e:
                self.skip_log.skip(path, e.reason)
                continue
            name = path.relative_to(root).as_posix()
            written += 1
            yield (
                name,
                {
                    "image": image.data,
                    "image_name": name,
                    "mos_raw": a.score,
                    "mos": mos,
                    "dataset": self.name,
                    "distortion_type": a.distortion_type,
                    "distortion_level": a.distortion_level,
                    "ref_name": a.ref_name,
                    "height": image.height,
                    "width": image.width,
                    "orig_height": image.orig_height,
                    "orig_width": image.orig_width,
                    "resized": image.resized,
                },
            )
        if not written:
            raise ValueError(f"{self.name}: every one of the {len(items)} images of split {split!r} was skipped")


class IQASource:
    """Random access over a built split: records as plain dicts with `str` text fields."""

    def __init__(self, data_source):
        self._source = data_source

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        return self.convert(self._source[index])

    def __getitems__(self, indices) -> list[dict]:
        return [self.convert(r) for r in self._source.__getitems__(indices)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._source!r})"

    @property
    def build_info(self) -> tuple[str, list[dict]]:
        """(the builder's description, the files skipped when the dataset was built: [{"path", "reason"}], all
        splits), as the build recorded them (metadata.json)."""
        info = getattr(self._source, "dataset_info", None)
        if info is None:
            return "", []
        return str(info.description or ""), list((info.metadata or {}).get("skipped", []))

    @staticmethod
    def convert(example: dict) -> dict:
        """A stored example -> the record the jobs read."""
        return _to_record(example)


def _to_record(example: dict) -> dict:
    record = dict(example)
    for key in TEXT_FIELDS:
        value = record.get(key)
        if isinstance(value, bytes):
            record[key] = value.decode("utf-8")
    for key in FLOAT_FIELDS:
        record[key] = float(record[key])
    for key in INT_FIELDS:
        record[key] = int(record[key])
    record["resized"] = bool(record["resized"])
    return record


def make_builder(
    cls: type[IQABuilder], data_dir: str | Path, *, strict: bool = False, max_short_side: int | None = None
) -> IQABuilder:
    """A builder instance; `max_short_side` other than the default config's selects config `short<N>`."""
    default: IQAConfig = cls.BUILDER_CONFIGS[0]
    config: IQAConfig | str = default.name
    if max_short_side is not None and max_short_side != default.max_short_side:
        name = f"short{max_short_side}" if max_short_side else "original_size"
        config = IQAConfig(name=name, max_short_side=max_short_side)
    return cls(data_dir=str(data_dir), config=config, strict=strict)


def prepare(builder: IQABuilder, manual_dir: str | Path, *, rebuild: bool = False) -> IQABuilder:
    """Builds the array_record files from the release in `manual_dir`; returns the builder of the build.

    An existing build is reused only when it was made from the same source (see `provenance`): a changed release
    raises SourceChangedError saying what changed, and `rebuild=True` deletes the build and makes it again. A build
    made before sources were recorded is reused with a warning. The skipped total is logged at the end.
    """
    manual_dir = Path(manual_dir)
    if not manual_dir.is_dir():
        raise FileNotFoundError(f"{builder.name}: manual_dir {manual_dir} does not exist")
    if builder.is_prepared():
        recorded = builder.info.metadata.get(SOURCE_KEY)
        if rebuild:
            log.warning("%s: rebuilding %s", builder.name, builder.data_path)
        elif recorded is None:
            log.warning("%s: %s records no source (built by an older qponder_jax); reusing it unchecked, pass "
                        "--rebuild to rebuild it", builder.name, builder.data_path)  # fmt: skip
            return builder
        else:
            changes = source_changes(recorded, builder.read_source(manual_dir)[2])
            if not changes:
                return builder
            raise SourceChangedError(
                f"{builder.name}: the build in {builder.data_path} was made from another source ({'; '.join(changes)})"
                f"; rebuild it (--rebuild, or datasets.build(..., rebuild=True)) or build into another data_dir"
            )
        shutil.rmtree(builder.data_path)
        builder = type(builder)(data_dir=builder.data_dir_root, config=builder.builder_config, strict=builder.strict)
    builder.download_and_prepare(
        file_format="array_record", download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir))
    )
    skipped = builder.info.metadata.get("skipped", [])
    if skipped:
        total = builder.info.metadata.get("num_annotations")
        log.warning("%s: built, %d of %d annotated files skipped (listed above)", builder.name, len(skipped), total)
    return builder


def as_source(builder: tfds.core.DatasetBuilder, split: str = ALL_SPLITS) -> IQASource:
    """Random-access records of `split` ("all" = the union of every split) of a built dataset."""
    return IQASource(builder.as_data_source(split))
