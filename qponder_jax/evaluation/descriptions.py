"""Description checks: measurable stand-ins for "description accuracy and reasonableness".

For datasets that know each image's (or video's) distortion (KADID-10k, CSIQ, TID2013, the synthetic IQA and VQA
sets):
- **type named**: the reasoning names a category the distortion belongs to (`DISTORTION_CATEGORIES`), found with
  the synonym patterns of `CATEGORY_PATTERNS`; `other_categories` counts the categories it names that the
  distortion does not belong to (a response that lists every defect scores high on the first, and badly here);
- **level agrees**: the reasoning's level word (the last of bad/poor/fair/good/excellent in the first `<think>`
  block, as the reward parser reads it) equals the level bin of the predicted score (`prompts.level_of_score`).

The patterns are a heuristic of ours: defect words ("blurry", "noisy", "blocking"), not aspect nouns
("sharpness", "exposure") that any description mentions, and a match does not count when a negation ("no",
"not", "without", "free of", ...) precedes it within three words of the same clause, or "-free" follows it. An aspect
noun counts only as a label with a severity ending its phrase, the rule teacher's short wording
(`contrast, slight;`, `data/rule_teacher.py` and the demo), never in "good contrast, moderate noise".
The reasoning is the first `<think>` block, or the whole response when there is none.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

from qponder_jax import prompts
from qponder_jax.data.rule_teacher import SEVERITY

# "<distortion>, <severity>" ending its phrase: the rule teacher's label ("brightness, strong; quality poor")
_LABEL = r", (?:" + "|".join(SEVERITY) + r")(?=\s*(?:[;.(]|$))"

# category -> regular expressions (case-insensitive, matched on word boundaries)
CATEGORY_PATTERNS: dict[str, tuple[str, ...]] = {
    "blur": (r"blur\w*", r"out[- ]of[- ]focus", r"defocus\w*", r"unfocused", r"fuzzy", r"smear\w*",
             r"soft(?:ened|ness)?", r"lacks? (?:of )?(?:sharpness|detail)", r"not sharp", r"hazy"),
    "noise": (r"nois(?:e|y|iness)", r"grain(?:y|iness)?", r"speckl\w*", r"salt[- ]and[- ]pepper", r"specks?"),
    "compression": (r"jpe?g\w*", r"compress\w*", r"block(?:y|ing|iness)", r"ringing", r"mosquito"),
    "contrast": (r"(?:low|reduced|poor|weak|flat|lost|lacking) contrast", r"contrast (?:is )?(?:low|reduced|weak|"
                 r"poor|change[sd]?)", r"washed[- ]out", r"flat(?:tened)? tones?", r"lacks? contrast",
                 r"contrast" + _LABEL),
    "brightness": (r"(?:over|under)[- ]?expos(?:ed|ure)", r"too (?:bright|dark)", r"bright(?:ened|ening)",
                   r"dark(?:ened|ening)", r"brightness (?:shift|change|increase|decrease)", r"dim", r"gloomy",
                   r"(?:brightness|exposure)" + _LABEL),
    "color": (r"(?:de|over|under)?saturat\w*", r"colou?r (?:shift|cast|distortion|bleed\w*|change|diffusion)",
              r"(?:faded|dull|washed[- ]out|unnatural|drained) colou?rs?", r"gr[ae]y(?:ish|scale)", r"monochrome",
              r"tint(?:ed)?"),
    "pixelation": (r"pixelat\w*", r"pixel(?:ized|isation|ization)", r"jagged", r"aliasing", r"staircase", r"mosaic"),
    "quantization": (r"quantiz\w*", r"banding", r"posteriz\w*", r"false contours?", r"dither\w*"),
    "sharpening": (r"over[- ]?sharpen\w*", r"sharpen(?:ed|ing)", r"halos?", r"oversharp\w*"),
    "geometric": (r"jitter\w*", r"misalign\w*", r"displace\w*", r"warp\w*", r"geometric distortions?"),
    "patch": (r"patch(?:es)?", r"local (?:artifacts?|distortions?)", r"block[- ]wise"),
    "transmission": (r"transmission", r"corrupt(?:ed|ion)", r"glitch\w*", r"packet loss"),
    "chromatic": (r"chromatic aberrations?", r"colou?r fringing", r"fring(?:e|es|ing)"),
    "stutter": (r"stutter\w*", r"judder\w*", r"choppy", r"jerky", r"(?:dropped|frozen|repeated|held) frames?",
                r"frame (?:drops?|freez\w*|skipp\w*)", r"not smooth", r"lag(?:gy|ging)?"),
    "flicker": (r"flicker\w*", r"(?:brightness|luminance|exposure) (?:fluctuat\w*|oscillat\w*|puls\w*)",
                r"puls(?:ing|ating)", r"strob\w*"),
    "shake": (r"shak(?:e|y|ing|iness)", r"wobbl\w*", r"unst(?:able|eady)", r"camera (?:motion|movement) jitter"),
}  # fmt: skip

_SYNTHETIC = {
    "blur": ("blur",), "noise": ("noise",), "jpeg": ("compression",), "contrast": ("contrast",),
    "brightness": ("brightness",), "saturation": ("color",), "pixelate": ("pixelation",),
}  # fmt: skip
_KADID = {
    "gaussian_blur": ("blur",), "lens_blur": ("blur",), "motion_blur": ("blur",), "color_diffusion": ("color", "blur"),
    "color_shift": ("color", "chromatic", "geometric"), "color_quantization": ("quantization", "color"),
    "color_saturation_1": ("color",), "color_saturation_2": ("color",), "jpeg2000": ("compression", "blur"),
    "jpeg": ("compression",), "white_noise": ("noise",), "white_noise_color_component": ("noise",),
    "impulse_noise": ("noise",), "multiplicative_noise": ("noise",), "denoise": ("blur", "noise"),
    "brighten": ("brightness",), "darken": ("brightness",), "mean_shift": ("brightness",), "jitter": ("geometric",),
    "non_eccentricity_patch": ("patch", "geometric"), "pixelate": ("pixelation",), "quantization": ("quantization",),
    "color_block": ("patch", "color"), "high_sharpen": ("sharpening",), "contrast_change": ("contrast",),
}  # fmt: skip
_TID2013 = {
    "additive_gaussian_noise": ("noise",), "additive_noise_color_components": ("noise",),
    "spatially_correlated_noise": ("noise",), "masked_noise": ("noise",), "high_frequency_noise": ("noise",),
    "impulse_noise": ("noise",), "quantization_noise": ("noise", "quantization"), "gaussian_blur": ("blur",),
    "image_denoising": ("blur", "noise"), "jpeg": ("compression",), "jpeg2000": ("compression", "blur"),
    "jpeg_transmission_errors": ("transmission", "compression", "patch"),
    "jpeg2000_transmission_errors": ("transmission", "compression", "patch"),
    "non_eccentricity_pattern_noise": ("noise", "patch"), "local_block_wise_distortions": ("patch",),
    "mean_shift": ("brightness",), "contrast_change": ("contrast",), "change_of_color_saturation": ("color",),
    "multiplicative_gaussian_noise": ("noise",), "comfort_noise": ("noise",),
    "lossy_compression_of_noisy_images": ("compression", "noise"),
    "color_quantization_with_dither": ("quantization", "color", "noise"),
    "chromatic_aberrations": ("chromatic", "color", "blur"),
    "sparse_sampling_and_reconstruction": ("blur", "compression"),
}  # fmt: skip
_CSIQ = {
    "awgn": ("noise",), "jpeg": ("compression",), "jpeg2000": ("compression", "blur"), "fnoise": ("noise",),
    "blur": ("blur",), "contrast": ("contrast",),
}  # fmt: skip
_SYNTHETIC_VQA = {
    "blur": ("blur",), "noise": ("noise",), "compression": ("compression",), "stutter": ("stutter",),
    "flicker": ("flicker", "brightness"), "shake": ("shake", "geometric"),
}  # fmt: skip
# dataset name (the record's `dataset` field) -> distortion type -> the categories that name it
DISTORTION_CATEGORIES: dict[str, dict[str, tuple[str, ...]]] = {
    "synthetic": _SYNTHETIC,
    "synthetic_vqa": _SYNTHETIC_VQA,
    "kadid10k": _KADID,
    "tid2013": _TID2013,
    "csiq": _CSIQ,
}

_NEGATION = re.compile(
    r"\b(?:no|not|without|never|hardly|barely|nor|absent|free (?:of|from)|absence of|lacks? any)\b|n't\b", re.I
)
_CLAUSE_BREAK = re.compile(r"[.;:!?]|\bbut\b|\bwhile\b|\bhowever\b", re.I)


@functools.cache
def _compiled() -> dict[str, re.Pattern]:
    return {
        name: re.compile(r"\b(?:" + "|".join(patterns) + r")\b", re.I) for name, patterns in CATEGORY_PATTERNS.items()
    }


def _negated(text: str, start: int, end: int) -> bool:
    """True when the match at text[start:end] is negated (see the module docstring)."""
    if re.match(r"-?free\b", text[end:], re.I):
        return True
    before = _CLAUSE_BREAK.split(text[max(0, start - 80) : start])[-1]  # the current clause
    last_words = " ".join(re.findall(r"[\w'-]+", before)[-4:])  # three words, four for "free of" / "lacks any"
    return bool(_NEGATION.search(last_words))


def reasoning_of(response: str) -> str:
    """The first `<think>` block of a response, or the whole response when it has none."""
    match = re.search(r"<think>(.*?)</think>", response, re.S)
    return match.group(1) if match else response


def named_categories(text: str) -> set[str]:
    """The distortion categories `text` names without negating them."""
    found = set()
    for name, pattern in _compiled().items():
        if any(not _negated(text, m.start(), m.end()) for m in pattern.finditer(text)):
            found.add(name)
    return found


def expected_categories(dataset: str, distortion_type: str) -> tuple[str, ...] | None:
    """The categories that name `distortion_type` of `dataset`, or None when unknown (or pristine)."""
    table = DISTORTION_CATEGORIES.get(dataset)
    if table is None or not distortion_type or distortion_type == "none":
        return None
    return table.get(distortion_type)


def level_word(level: int) -> str:
    """'bad' .. 'excellent' for the parser's level 1..5, '' for 0 (no level word)."""
    return prompts.LEVELS[level - 1] if 1 <= level <= len(prompts.LEVELS) else ""


def check_response(response: str, dataset: str, distortion_type: str, score: float, level: int) -> dict:
    """Per-response checks: {'type_named': bool | None, 'other_categories': int | None, 'level_agrees': bool | None,
    'level': int} (None where a check does not apply: unknown distortion, or no level word / no score)."""
    text = reasoning_of(response)
    out: dict = {"type_named": None, "other_categories": None, "level_agrees": None, "level": int(level)}
    expected = expected_categories(dataset, distortion_type)
    if expected is not None:
        named = named_categories(text)
        out["type_named"] = bool(named & set(expected))
        out["other_categories"] = len(named - set(expected))
    if level > 0 and score == score:  # a level word and a parsed score
        clipped = min(max(float(score), 1.0), 5.0)
        out["level_agrees"] = level_word(level) == prompts.level_of_score(clipped)
    return out


def summarize(checks: Iterable[dict]) -> dict:
    """Rates over per-response checks: type_named_rate, other_categories_mean, level_present_rate,
    level_agreement_rate, and the counts they are over (rates are None when nothing applies)."""
    checks = list(checks)
    typed = [c for c in checks if c["type_named"] is not None]
    leveled = [c for c in checks if c["level_agrees"] is not None]
    mean = lambda xs: float(sum(xs) / len(xs)) if xs else None
    return {
        "type_named_rate": mean([c["type_named"] for c in typed]),
        "other_categories_mean": mean([c["other_categories"] for c in typed]),
        "type_checked": len(typed),
        "level_agreement_rate": mean([c["level_agrees"] for c in leveled]),
        "level_checked": len(leveled),
        "level_present_rate": mean([c.get("level", 0) > 0 for c in checks]),
        "responses": len(checks),
    }
