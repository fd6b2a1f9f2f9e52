"""A rule-based teacher for the synthetic IQA set: cold-start records without a teacher model.

It knows each synthetic image's distortion (type, level) and normalized MOS, and writes the response a good teacher
would: `<think>` reasoning that names the distortion, its severity and one overall quality word, then `<answer>`
with the MOS rounded to 2 decimals. The quality word follows the MOS: [1, 5] cut into five equal bins
(bad, poor, fair, good, excellent; `prompts.level_of_score`), and it is the only quality word in the reasoning, so
the on-device parser's "last level word in the first <think> block" reads it back.

Records go through the same cold-start JSONL writer as the real distillation (`datasets/cold_start.py`), with the
images written as PNG files next to the JSONL.
"""

from __future__ import annotations

import json
from pathlib import Path

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


def response_for(distortion_type: str, distortion_level: int, mos: float) -> str:
    """The teacher's `<think>...</think><answer>...</answer>` text for one synthetic record."""
    word = prompts.level_of_score(mos)
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
