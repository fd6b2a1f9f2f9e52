"""Distillation: a scripted teacher through the real decode/parse path (kept, retried, rejected and dropped images,
counted by reason), JSONL that the cold-start reader and the processor accept, the clear failure of a teacher that
never answers validly (a random tiny model run through the sharded sampler included), and the job from its config."""

import json
import re
import types

import numpy as np
import pytest
from test_eval import DATA, Scripted

from qponder_jax import distill, prompts
from qponder_jax.data.datasets import ColdStartSource, SyntheticIQA, decode_image
from qponder_jax.data.tokenizer import build_demo_tokenizer
from qponder_jax.loading import make_processor

FAKE_MODEL = types.SimpleNamespace(config=types.SimpleNamespace(text=types.SimpleNamespace(eos_token_id=None)))


@pytest.fixture(scope="module")
def proc(tmp_path_factory):
    folder = build_demo_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    return make_processor(folder, {**DATA, "token_buckets": (128, 256, 320)})


def _source(size=10):
    return SyntheticIQA("train", size=size, seed=1, min_side=56, max_side=84)


HINT_PROMPT = "Rate this image; its MOS is {mos:.6f}. Reason in <think> </think>, then the score in <answer> </answer>."


def _mos_hint(prompt: str) -> float:
    """The MOS the teacher prompt gave the teacher."""
    return float(re.search(r"its MOS is (\d\.\d+)", prompt).group(1))


# what a scripted teacher answers for (image j, attempt a); image 9 never gets a valid answer
FAILURES = {
    (1, 0): ("format", "<answer>{m}</answer>"),
    (2, 0): ("no_level", "<think>Nice picture.</think><answer>{m}</answer>"),
    (3, 0): ("tolerance", "<think>It is fair.</think><answer>{far}</answer>"),
    (3, 1): ("answer_count", "<think>It is fair.</think><answer>{m} out of 5</answer>"),
    (4, 0): ("out_of_range", "<think>It is excellent.</think><answer>7.5</answer>"),
    **{(9, a): ("tolerance", "<think>It is bad.</think><answer>{far}</answer>") for a in range(3)},
}


def _teacher(attempts):

    def respond(prompt, row, k):
        mos = _mos_hint(prompt)
        j = next(i for i, r in enumerate(_source()) if abs(r["mos"] - mos) < 1e-6)
        a = attempts.setdefault(j, 0)
        attempts[j] += 1
        values = {"m": f"{mos:.2f}", "far": f"{min(mos + 1.0, 5.0) if mos < 4 else mos - 1.0:.2f}"}
        if (j, a) in FAILURES:
            return FAILURES[(j, a)][1].format(**values)
        return f"<think>The image is {prompts.level_of_score(mos)}.</think> <answer>{values['m']}</answer>"

    return respond


@pytest.mark.parametrize("per_round, drawn", [(1, 9 + 8), (2, 2 * 8 + 3 + 3)])
def test_scripted_teacher_keeps_retries_and_counts(proc, tmp_path, per_round, drawn):
    settings = distill.DistillSettings(
        teacher_prompt=HINT_PROMPT,
        max_samples=3,
        samples_per_round=per_round,
        tolerance=0.3,
        batch_size=4,
        max_new_tokens=64,
    )
    assert len({f"{r['mos']:.6f}" for r in _source()}) == 10  # the hint identifies the image
    attempts = {}
    fake = Scripted(proc, _teacher(attempts))
    sampler = distill.model_sampler(FAKE_MODEL, proc, settings, generate_fn=fake)
    summary = distill.distill({"synthetic:train": _source()}, sampler, proc, settings, tmp_path / "out")

    if per_round == 1:
        assert attempts == {j: 3 if j in (3, 9) else 2 if j in (1, 2, 4) else 1 for j in range(10)}
        assert [c["num_samples"] for c in fake.calls] == [1] * 8  # batches of 4, 4, 2 images: 3 + 2 + 3 rounds
    else:  # rounds of 2 samples, then the last 1 of max_samples=3
        assert attempts == {j: 3 if j in (3, 9) else 2 for j in range(10)}
        assert [c["num_samples"] for c in fake.calls] == [2, 1, 2, 2, 1]
    expected = {"format": 1, "answer_count": 1, "no_level": 1, "out_of_range": 1, "tolerance": 1 + 3}
    assert summary["rejections"] == expected
    assert (summary["images"], summary["kept"], summary["dropped"], summary["samples"]) == (10, 9, 1, drawn)
    assert summary["acceptance_rate"] == pytest.approx(0.9) and summary["status"] == "ok"
    assert all(c["temperature"] == 0.7 for c in fake.calls)
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved["rejections"] == expected and len(saved["rejected_examples"]) == 8

    jsonl = tmp_path / "out" / "cold_start.jsonl"
    assert not (tmp_path / "out" / "cold_start.jsonl.partial").exists()
    source = ColdStartSource(jsonl, verify="decode")
    assert len(source) == 9 and source.num_skipped == 0
    by_name = {r["image_name"]: r for r in _source()}
    for record in source.records:
        original = by_name[record.image.removeprefix("images/")]
        assert record.prompt == prompts.QPONDER and "MOS" not in record.prompt  # the student never sees the hint
        assert record.teacher_score == pytest.approx(original["mos"], abs=0.005)
        assert record.distortion_type == original["distortion_type"]
    item = source[0]
    original = by_name[item["image_name"].removeprefix("images/")]
    np.testing.assert_array_equal(np.asarray(decode_image(item["image"])), np.asarray(decode_image(original["image"])))
    # what the SFT job does with a record: encode prompt + response; the response tokens are the targets
    ex = proc.encode(prompts.image_messages(item["prompt"], response=item["response"]), [decode_image(item["image"])])
    target = proc.tokenizer.decode(ex.input_ids[ex.loss_mask].tolist(), skip_special_tokens=True)
    assert target == item["response"]


def test_never_valid_teacher_fails_clearly(proc, tmp_path):
    settings = distill.DistillSettings(max_samples=2, batch_size=4, abort_after=100, max_new_tokens=32)

    def respond(prompt, row, k):
        assert "mean opinion score (MOS) of" in prompt  # the default expert prompt, with its hint
        return "3.5"

    sampler = distill.model_sampler(FAKE_MODEL, proc, settings, generate_fn=Scripted(proc, respond))
    out = tmp_path / "out"
    with pytest.raises(
        distill.DistillError, match=r"valid answer for 0 of 10 images \(20 samples; rejected by format: 20"
    ):
        distill.distill({"synthetic:train": _source()}, sampler, proc, settings, out)
    assert not (out / "cold_start.jsonl").exists()  # nothing that looks like a result
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["kept"] == 0 and summary["jsonl"].endswith(".partial")
    assert "valid answer for 0 of 10" in summary["error"]
    # early abort: stops after the first batch of `abort_after` images instead of running the whole set
    settings = distill.DistillSettings(max_samples=1, batch_size=4, abort_after=4, temperature=0.0)
    fake = Scripted(proc, lambda p, r, k: "3.5")
    sampler = distill.model_sampler(FAKE_MODEL, proc, settings, generate_fn=fake)
    with pytest.raises(distill.DistillError, match="stopped early after 4 images"):
        distill.distill({"synthetic:train": _source()}, sampler, proc, settings, out)
    assert fake.rows == 4


def test_random_tiny_teacher_through_the_sampler(tmp_path):
    """The distill job with the untrained tiny model as teacher, sharded over 2 devices: every sample is judged and
    counted, and the run ends with the clear error (a random model writes no valid answer)."""
    from configs.distill import get_config

    config = get_config("tiny_model")
    config.mesh = (1, 2, 1)
    config.max_images = 4
    config.batch_size = 4
    config.max_samples = 2
    config.max_new_tokens = 8
    with pytest.raises(distill.DistillError, match="valid answer for 0 of 4 images"):
        distill.run(config, tmp_path)
    summary = json.loads((tmp_path / "cold_start" / "summary.json").read_text())
    assert summary["samples"] == 8 and sum(summary["rejections"].values()) == 8
    assert all(ex["text"] for ex in summary["rejected_examples"])


def test_rule_teacher_job_and_settings_errors(tmp_path, capsys):
    from configs.distill import get_config

    config = get_config("tiny")
    config.max_images = 6
    summary = distill.run(config, tmp_path)
    assert summary["kept"] == 6 and summary["rejections"] == dict.fromkeys(distill.REASONS, 0)
    assert len(ColdStartSource(tmp_path / "cold_start" / "cold_start.jsonl")) == 6
    assert "kept 6 of 6 images" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"\{mos\}"):
        distill.DistillSettings(teacher_prompt="Rate this image.")
    with pytest.raises(ValueError, match="temperature > 0"):
        distill.DistillSettings(temperature=0.0, max_samples=3)
