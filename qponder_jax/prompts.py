"""Every prompt template, in one place, and the helpers that build a chat `messages` list for one image or video.

The Q-Ponder paper's exact prompts are not public; `QPONDER` and `TEACHER` are ours. The VisualQuality-R1 and
PreResQ-R1 questions and the think/answer instruction are the wording of those projects (github
TianheWu/VisualQuality-R1, DanceSkyCode/General-Visual-Quality-RL).
"""

from __future__ import annotations

from typing import Any

LEVELS = ("bad", "poor", "fair", "good", "excellent")  # level 1..5, Q-Align's five quality words
SCORE_RANGE = (1.0, 5.0)  # the scale every scoring prompt below asks for; parsed scores outside it are out of range

THINK_ANSWER_INSTRUCTION = (
    "First output the thinking process in <think> </think> tags and then output the final answer with only one "
    "score in <answer> </answer> tags."
)

QPONDER = (
    "You are an expert in image quality assessment. Look carefully at this image and judge its visual quality. "
    "Inside <think> </think>, reason step by step about the quality aspects you see (such as sharpness, noise, "
    "exposure, color, composition and artifacts) and end your reasoning with one overall quality level: bad, "
    "poor, fair, good or excellent. Then give the quality score inside <answer> </answer>: a float between 1 and "
    "5, rounded to two decimal places, where 1 means very poor quality and 5 means excellent quality."
)

VISUALQUALITY_R1 = (
    "You are doing the image quality assessment task. Here is the question: What is your overall rating on the "
    "quality of this picture? The rating should be a float between 1 and 5, rounded to two decimal places, with 1 "
    "representing very poor quality and 5 representing excellent quality."
)

PRERESQ_R1 = (
    "You are doing the image quality assessment task. Please describe and rate the picture in five parts: "
    "saturation rating; granularity rating; sharpness rating; foreground rating; and background rating. All "
    "ratings should be floats between 1 and 5, rounded to two decimals, where 1 represents very poor quality and "
    "5 represents excellent quality."
)

PRERESQ_R1_VIDEO = (
    "You are doing the video quality assessment task. Please compare the frames of the video and describe its "
    "global multiframe quality in the temporal dimension and the global scene. Then compare and describe the local "
    "single frame pictures that follow in five parts: saturation rating; granularity rating; sharpness rating; "
    "foreground rating; and background rating. Finally, please rate two scores in the global multiframe and local "
    "single frame dimension. All ratings should be floats between 1 and 5, rounded to two decimal places, where 1 "
    "represents very poor quality and 5 represents excellent quality."
)  # adapted from PreResQ-R1's VQA question (src/grpo_preres_VQA_r1.py): their global stream is a packed mosaic of
# frames ("the internal packed video frames in the first picture"), ours is the video itself

TEACHER = (
    "You are an expert in image quality assessment, writing a worked example for a student. Human raters gave "
    "this image a mean opinion score (MOS) of {mos:.2f} on a scale from 1 (very poor) to 5 (excellent). Use this "
    "score only as a hint: never mention it or the raters. Explain what in the image leads to this quality, "
    "going through its sharpness, noise, exposure, color, composition and artifacts, as if you judged them "
    "yourself. Write your reasoning inside <think> </think> and end it with one overall quality level: bad, "
    "poor, fair, good or excellent. Then give the quality score inside <answer> </answer>: a float between 1 and "
    "5, rounded to two decimal places."
)

# name -> the user text of a scoring prompt (the teacher prompt needs `mos=`, see `prompt_text`)
PROMPTS = {
    "qponder": QPONDER,
    "visualquality_r1": f"{VISUALQUALITY_R1} {THINK_ANSWER_INSTRUCTION}",
    "preresq_r1": f"{PRERESQ_R1} {THINK_ANSWER_INSTRUCTION}",
    "preresq_r1_video": f"{PRERESQ_R1_VIDEO} {THINK_ANSWER_INSTRUCTION}",  # two ratings: global, local
    "teacher": TEACHER,
}


def prompt_text(name: str, **fields: Any) -> str:
    """The user text of prompt `name` (one of PROMPTS), with its fields (e.g. `mos=` for "teacher") filled in."""
    if name not in PROMPTS:
        raise KeyError(f"unknown prompt {name!r}; known prompts: {sorted(PROMPTS)}")
    template = PROMPTS[name]
    try:
        return template.format(**fields) if "{" in template else template
    except KeyError as e:
        raise KeyError(f"prompt {name!r} needs the field {e.args[0]!r}") from e


def level_of_score(score: float, low: float = 1.0, high: float = 5.0) -> str:
    """The quality word of a score: [low, high] cut into five equal bins, bad .. excellent."""
    if not low <= score <= high:
        raise ValueError(f"score {score} is outside [{low}, {high}]")
    index = min(int((score - low) / (high - low) * len(LEVELS)), len(LEVELS) - 1)
    return LEVELS[index]


def image_messages(
    text: str, *, response: str | None = None, system: str | None = None, num_images: int = 1
) -> list[dict[str, Any]]:
    """HF chat `messages` for one user turn (`num_images` images, then `text`) and an optional assistant reply."""
    messages: list[dict[str, Any]] = []
    if system is not None:
        messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
    content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": text}]
    messages.append({"role": "user", "content": content})
    if response is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": response}]})
    return messages


def video_messages(
    text: str, *, response: str | None = None, system: str | None = None, num_images: int = 0
) -> list[dict[str, Any]]:
    """HF chat `messages` for one user turn (one video, then `num_images` images, e.g. high-res crops, then `text`)
    and an optional assistant reply. `Processor.encode(messages, images, videos=[clip])` fills them in order."""
    messages = image_messages(text, response=response, system=system, num_images=num_images)
    messages[-1 if response is None else -2]["content"].insert(0, {"type": "video"})
    return messages
