"""A rule-based teacher for the synthetic IQA set: cold-start records without a teacher model.

It knows each synthetic image's distortion (type, level) and normalized MOS, and writes a teacher's response:
`<think>` reasoning that names the distortion, its severity and one overall quality word, then `<answer>` with its
score rounded to 2 decimals. The quality word follows the score: [1, 5] cut into five equal bins
(bad, poor, fair, good, excellent; `prompts.level_of_score`), and it is the only quality word in the reasoning, so
the on-device parser's "last level word in the first <think> block" reads it back.

By default the teacher is exact (score = MOS). `TeacherErrors` makes it err the way an MLLM teacher does
(`answer`):
    score = clip(center + scale * (MOS - center) + bias[distortion type] + N(0, noise^2), 1, 5)
- `scale` < 1 compresses its scores toward the middle of the scale (MLLMs hedge: few 1s and 5s);
- `bias` shifts all images of one distortion type (MLLMs misjudge some distortions more than others);
- `noise` is independent per image (sampling noise);
- with probability `severity_error` it names a severity one step off (its score does not change), and with
  probability `level_error` a quality word one bin off its own score.
Only the systematic errors (scale, bias) survive a student's averaging over many records; noise and wrong words
mostly average out. Each image's draws come from `(seed, *key)`, so a record's answer does not depend on the others.

Records go through the same cold-start JSONL writer as the real distillation (`datasets/cold_start.py`), with the
images written as PNG files next to the JSONL.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from qponder_jax import distributed, prompts
from qponder_jax.data.datasets.cold_start import ColdStartRecord, ColdStartWriter
from qponder_jax.data.datasets.synthetic import SyntheticIQA, parse_distortions

SEVERITY = ("very slight", "slight", "moderate", "strong", "severe")  # distortion level 1..5

# What each distortion does to an image, in the teacher's words (no quality words here: see the module docstring).
EFFECTS = {
    "blur": "blur softens the edges and washes out the fine detail",
    "noise": "random noise speckles the flat regions and the shape edges",
    "jpeg": "JPEG compression leaves blocking and ringing around the edges",
    "contrast": "reduced contrast flattens the tones so the shapes stand out less",
    "brightness": "a brightness shift moves the exposure away from the midtones",
    "saturation": "desaturation drains the colors toward gray",
    "pixelate": "pixelation replaces the detail with coarse square blocks",
}


@dataclasses.dataclass(frozen=True)
class TeacherErrors:
    """How the rule teacher errs (module docstring); the defaults make an exact teacher."""

    bias: Mapping[str, float] = dataclasses.field(default_factory=dict)  # distortion type -> score shift
    scale: float = 1.0  # slope of the score against the MOS around `center` (< 1: compressed)
    center: float = 3.0  # the score the compression pulls toward
    noise: float = 0.0  # std of the per-image Gaussian score noise
    severity_error: float = 0.0  # probability of naming a severity one step off
    level_error: float = 0.0  # probability of a quality word one bin off the teacher's own score
    seed: int = 0  # seed of the per-image draws

    def __post_init__(self):
        unknown = sorted(set(self.bias) - set(EFFECTS) - {"none"})
        if unknown:
            raise ValueError(f"rule teacher: bias names unknown distortion types {unknown}; known: {sorted(EFFECTS)}")
        if self.scale <= 0 or self.noise < 0:
            raise ValueError(f"rule teacher: need scale > 0 and noise >= 0, got {self.scale}, {self.noise}")
        for name in ("severity_error", "level_error"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"rule teacher: {name}={getattr(self, name)} is not a probability")


def parse_bias(spec: str) -> dict[str, float]:
    """A bias table from a config string "contrast:+0.45,brightness:-0.25" ("" = no bias)."""
    table = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, value = item.partition(":")
        try:
            table[name.strip()] = float(value)
        except ValueError:
            raise ValueError(
                f"rule teacher bias {spec!r}: write 'type:shift' items separated by commas, not {item!r}"
            ) from None
    return table


@dataclasses.dataclass(frozen=True)
class Answer:
    """What the teacher says about one image."""

    score: float  # its score, rounded to 2 decimals
    severity: int  # the distortion level its reasoning names (0 for a pristine image)
    word: str  # its overall quality word (bad .. excellent)


def _one_off(value: int, low: int, high: int, up: bool) -> int:
    """`value` moved one step (up when `up`), or the other way where that step leaves [low, high]."""
    step = 1 if up else -1
    return value + step if low <= value + step <= high else value - step


def answer(
    kind: str, level: int, mos: float, *, errors: TeacherErrors | None = None, key: Sequence[int] = ()
) -> Answer:
    """The teacher's score, named severity and quality word for an image of distortion (`kind`, `level`) and `mos`.
    `key` (e.g. split id, image index) and `errors.seed` seed the image's draws, the same ones whatever the settings."""
    errors = errors or TeacherErrors()
    rng = np.random.default_rng([errors.seed, *key])
    z, (wrong_severity, severity_up, wrong_word, word_up) = rng.normal(), rng.random(4)
    raw = errors.center + errors.scale * (mos - errors.center) + errors.bias.get(kind, 0.0) + errors.noise * z
    score = round(float(np.clip(raw, 1.0, 5.0)), 2)
    severity = int(level)
    if severity > 0 and wrong_severity < errors.severity_error:
        severity = _one_off(severity, 1, len(SEVERITY), severity_up < 0.5)
    word = prompts.LEVELS.index(prompts.level_of_score(score)) + 1
    if wrong_word < errors.level_error:
        word = _one_off(word, 1, len(prompts.LEVELS), word_up < 0.5)
    return Answer(score, severity, prompts.LEVELS[word - 1])


def response_for(distortion_type: str, distortion_level: int, mos: float, word: str | None = None) -> str:
    """The teacher's `<think>...</think><answer>...</answer>` text for one synthetic record: the reasoning names
    `distortion_level` and `word` (default: the level word of `mos`), the answer holds `mos`."""
    word = word or prompts.level_of_score(mos)
    if distortion_type in ("", "none") or distortion_level <= 0:
        reasoning = (
            "The edges of the shapes are crisp, the flat regions are clean and the colors look natural. "
            "I see no blur, noise, compression blocks or exposure problems."
        )
    else:
        if distortion_type not in EFFECTS:
            raise ValueError(f"rule teacher: unknown distortion type {distortion_type!r}; known: {sorted(EFFECTS)}")
        if not 1 <= distortion_level <= len(SEVERITY):
            raise ValueError(f"rule teacher: distortion level {distortion_level} is outside 1..{len(SEVERITY)}")
        severity = SEVERITY[distortion_level - 1]
        reasoning = (
            f"The main problem is {distortion_type}: {EFFECTS[distortion_type]}. "
            f"The {distortion_type} is {severity} (level {distortion_level} of 5)."
        )
    return f"<think>{reasoning} Overall, the quality is {word}.</think><answer>{mos:.2f}</answer>"


def short_response(distortion_type: str, distortion_level: int, score: float, word: str | None = None) -> str:
    """The short form of a response (the demo's): the distortion and its severity, a quality word (default: the
    level word of `score`), then the score."""
    if distortion_type in ("", "none") or distortion_level <= 0:
        seen = "no distortion"
    else:
        seen = f"{distortion_type}, {SEVERITY[distortion_level - 1]}"
    return f"<think>{seen}; quality {word or prompts.level_of_score(score)}</think><answer>{score:.2f}</answer>"


def respond(
    kind: str, level: int, mos: float, *, errors: TeacherErrors | None = None, key: Sequence[int] = (), style="long"
) -> tuple[str, Answer]:
    """(the teacher's response text in `style` "long" or "short", its `Answer`) for one image (see `answer`)."""
    if style not in ("short", "long"):
        raise ValueError(f"rule teacher: response style {style!r}: choose 'short' or 'long'")
    said = answer(kind, level, mos, errors=errors, key=key)
    write = short_response if style == "short" else response_for
    return write(kind, said.severity, said.score, said.word), said


def record_for(example: dict, image_path: str | Path, prompt: str) -> ColdStartRecord:
    """A cold-start record for a synthetic example (a `SyntheticIQA` record) whose image is saved at `image_path`."""
    mos = float(example["mos"])
    kind, level = str(example["distortion_type"]), int(example["distortion_level"])
    return ColdStartRecord(
        image=str(image_path),
        prompt=prompt,
        response=response_for(kind, level, mos),
        mos=mos,
        dataset=str(example.get("dataset", "synthetic")),
        distortion_type=kind,
        distortion_level=level,
        teacher_score=round(mos, 2),
    )


def write_synthetic_cold_start(
    out_dir: str | Path,
    split: str,
    size: int,
    *,
    seed: int = 0,
    prompt_name: str = "qponder",
    min_side: int = 56,
    max_side: int = 112,
    distortions: str = "",
) -> Path:
    """Writes `size` synthetic records of `split` as `<out_dir>/<split>.jsonl` plus PNGs in `<out_dir>/<split>/`.

    Idempotent: a folder already written with the same settings (recorded in `<split>.settings.json`) is reused.
    In a multi-process run, process 0 writes it and the others wait. Returns the JSONL path.
    """
    out = Path(out_dir)
    settings = dict(split=split, size=size, seed=seed, prompt_name=prompt_name, min_side=min_side, max_side=max_side)
    if distortions:  # only when set, so folders written before this field existed are still reused
        settings["distortions"] = ",".join(parse_distortions(distortions))
    distributed.run_once(lambda: _write(out, settings), name=f"synthetic_cold_start:{out}:{split}")
    return out / f"{split}.jsonl"


def _write(out: Path, settings: dict) -> None:
    split = settings["split"]
    jsonl = out / f"{split}.jsonl"
    manifest = out / f"{split}.settings.json"
    if jsonl.is_file() and manifest.is_file() and json.loads(manifest.read_text()) == settings:
        return
    source = SyntheticIQA(
        split,
        settings["size"],
        seed=settings["seed"],
        min_side=settings["min_side"],
        max_side=settings["max_side"],
        distortions=settings.get("distortions", ""),
    )
    prompt = prompts.prompt_text(settings["prompt_name"])
    images = out / split
    images.mkdir(parents=True, exist_ok=True)
    with ColdStartWriter(jsonl) as writer:
        for i in range(len(source)):
            example = source[i]
            image_path = images / f"{i:06d}.png"
            image_path.write_bytes(example["image"])
            writer.write(record_for(example, image_path, prompt))
    manifest.write_text(json.dumps(settings, indent=2) + "\n")
