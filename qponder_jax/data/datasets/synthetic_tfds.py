"""The synthetic IQA set as a tfds builder (array_record), for code that reads every set through tfds.

`SyntheticIQA` is the direct source and needs no build step; this builder writes the same records (same
seed -> byte-identical images) so that `datasets.load("synthetic_iqa", split, data_dir=...)` works too.
"""

from __future__ import annotations

import dataclasses

import tensorflow_datasets as tfds

from qponder_jax.data.datasets.builder import CodePath, record_features
from qponder_jax.data.datasets.synthetic import DEFAULT_SIZES, SyntheticIQA


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
    seed: int = 0  # base seed; each split draws its own stream from (seed, split)
    train_size: int = DEFAULT_SIZES["train"]
    validation_size: int = DEFAULT_SIZES["validation"]
    test_size: int = DEFAULT_SIZES["test"]
    min_side: int = 56  # image sides are drawn uniformly from [min_side, max_side]
    max_side: int = 112


class SyntheticIqaBuilder(tfds.core.GeneratorBasedBuilder):
    """Procedural images with known distortions (see `synthetic`); nothing is downloaded."""

    name = "synthetic_iqa"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        SyntheticConfig(name="default"),
        SyntheticConfig(name="tiny", train_size=64, validation_size=32, test_size=32),
    ]
    code_path = CodePath()

    def __init__(self, **kwargs):
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description=__doc__, features=record_features())

    def _split_generators(self, dl_manager):
        config: SyntheticConfig = self.builder_config
        sizes = {"train": config.train_size, "validation": config.validation_size, "test": config.test_size}
        return {split: self._generate_examples(split, size) for split, size in sizes.items() if size > 0}

    def _generate_examples(self, split: str, size: int):
        config: SyntheticConfig = self.builder_config
        source = SyntheticIQA(split, size, seed=config.seed, min_side=config.min_side, max_side=config.max_side)
        for i in range(size):
            yield i, source[i]
