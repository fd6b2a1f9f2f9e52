"""The demo job: stage markers and resume (fast, with stand-in stages), its building blocks, and the real pipeline
end to end through the `qponder` CLI in a fresh process (slow)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from qponder_jax import demo
from qponder_jax.data.datasets.cold_start import ColdStartSource
from qponder_jax.data.rule_teacher import TeacherErrors, answer, short_response
from qponder_jax.rewards.parse import parse_text

REPO = Path(__file__).resolve().parents[1]


def _stages(calls: list, fail_at: str | None = None):
    def make(name):
        def fn(config, where, outputs):
            calls.append(name)
            if name == fail_at:
                raise KeyboardInterrupt  # an interrupted run: no marker is written
            (where / "artifact").write_text(name)
            return {"artifact": str(where / "artifact"), "seen": sorted(outputs)}

        return demo.Stage(name, f"stage {name}", fn)

    return [make(n) for n in ("a", "b", "c")]


def test_run_stages_writes_markers_and_skips_finished_stages(tmp_path):
    calls = []
    outputs, ran = demo.run_stages(None, tmp_path, _stages(calls), say=lambda s: None)
    assert calls == ran == ["a", "b", "c"]
    assert outputs["c"]["seen"] == ["a", "b"]  # each stage gets the outputs of the earlier ones
    assert json.loads((tmp_path / "2_b" / demo.DONE).read_text())["artifact"] == str(tmp_path / "2_b" / "artifact")

    calls.clear()
    lines = []
    again, ran = demo.run_stages(None, tmp_path, _stages(calls), say=lines.append)
    assert calls == ran == []  # nothing reruns
    assert again["b"]["artifact"] == outputs["b"]["artifact"]
    assert all("already done" in line for line in lines)


def test_run_stages_resumes_after_an_interruption(tmp_path):
    calls = []
    with pytest.raises(KeyboardInterrupt):
        demo.run_stages(None, tmp_path, _stages(calls, fail_at="b"), say=lambda s: None)
    assert calls == ["a", "b"] and not (tmp_path / "2_b" / demo.DONE).exists()
    calls.clear()
    _, ran = demo.run_stages(None, tmp_path, _stages(calls), say=lambda s: None)
    assert calls == ran == ["b", "c"]  # a stays done; b runs again, then c


def test_a_preempted_training_stage_stops_the_demo_without_a_marker(tmp_path):
    stage = demo.Stage("t", "train", lambda c, w, o: {"status": "preempted"})
    with pytest.raises(SystemExit, match="rerun the same command to resume") as stopped:
        demo.run_stages(None, tmp_path, [stage], say=lambda s: None)
    assert stopped.value.code == 75  # "resume later", as a preempted training job (errors.EXIT_RESUME); not 1 or 0
    assert demo.read_marker(tmp_path / "1_t") is None


def test_progress_lines_get_the_stage_step_of_total_and_time_left():
    class Out:
        text = ""

        def write(self, s):
            self.text += s

        def flush(self):
            pass

    out = Out()
    p = demo.Progress(out, "[4/7 sft]", total_steps=100)
    p.write("train step 10 | loss 1.5000 | learning_rate 0.0030 | grad_norm 0.1\n")
    p.write("train step 20 | loss 0.7500 | learning_rate 0.0030 | grad_norm 0.1\nsome other line\n")
    lines = out.text.splitlines()
    assert lines[0] == "[4/7 sft] train step 10/100 | loss 1.5000 | estimating time left"
    assert lines[1].startswith("[4/7 sft] train step 20/100 | loss 0.7500 | ~") and lines[1].endswith(" s left")
    assert lines[2] == "[4/7 sft] some other line"

    out = Out()  # GRPO prints a grpo line and a train line per logged step: each kind estimates from its own first
    p = demo.Progress(out, "[5/7 grpo]", total_steps=500)
    p.write("grpo step 50 | loss 0.1 | reward_mean 2.0\ntrain step 50 | loss 0.1\n")
    p.write("grpo step 100 | loss 0.1 | reward_mean 2.1\ntrain step 100 | loss 0.1\n")
    lines = out.text.splitlines()
    assert lines[0] == "[5/7 grpo] grpo step 50/500 | loss 0.1 | reward_mean 2.0 | estimating time left"
    assert lines[1] == "[5/7 grpo] train step 50/500 | loss 0.1 | estimating time left"
    assert all(line.endswith(" s left") and "estimating" not in line for line in lines[2:])


def test_short_response_names_distortion_severity_and_level_and_parses():
    text = short_response("blur", 4, 2.1049)
    assert text == "<think>blur, strong; quality poor</think><answer>2.10</answer>"
    parsed = parse_text(text)
    assert parsed.format_ok and parsed.numbers[0] == pytest.approx(2.10) and parsed.level == 2
    assert short_response("none", 0, 4.9) == "<think>no distortion; quality excellent</think><answer>4.90</answer>"
    assert (
        short_response("contrast", 1, 4.9, "good")
        == "<think>contrast, very slight; quality good</think><answer>4.90</answer>"
    )


def test_dct_patch_kernel_is_an_orthonormal_filter_bank():
    k = demo.dct_patch_kernel((3, 2, 14, 14), 32)
    assert k.shape == (3 * 2 * 14 * 14, 32)
    np.testing.assert_allclose(k.T @ k, np.eye(32), atol=1e-5)
    flat = np.ones((3, 2, 14, 14)).reshape(-1)  # a flat gray patch: only the channel means respond
    response = flat @ k
    assert np.all(response[:3] > 0) and np.abs(response[3:]).max() < 1e-5


def test_synthetic_split_and_cold_start_go_through_the_cold_start_jsonl_path(tmp_path):
    index = demo.write_synthetic_split(tmp_path / "data", "train", 6, seed=0, min_side=56, max_side=56)
    rows = [json.loads(line) for line in index.read_text().splitlines()]
    assert len(rows) == 6 and all((tmp_path / "data" / r["image"]).is_file() for r in rows)
    made = demo.write_cold_start(index, tmp_path / "cs" / "train.jsonl", "Rate it.", split="train")
    assert (made["records"], made["kept"]) == (6, 6) and made["teacher"]["srcc"] == pytest.approx(1.0)
    source = ColdStartSource(tmp_path / "cs" / "train.jsonl")  # the reader the SFT job uses validates every line
    assert len(source) == 6 and source.num_skipped == 0
    for row, i in zip(rows, range(6), strict=True):
        record = source[i]
        assert record["prompt"] == "Rate it." and record["mos"] == pytest.approx(row["mos"])
        assert record["response"] == short_response(row["distortion_type"], row["distortion_level"], row["mos"])


def test_cold_start_keeps_only_teacher_answers_within_the_tolerance(tmp_path):
    index = demo.write_synthetic_split(tmp_path / "data", "train", 40, seed=1, min_side=28, max_side=28,
                                       distortions="none,brightness,contrast")  # fmt: skip
    rows = [json.loads(line) for line in index.read_text().splitlines()]
    errors = TeacherErrors(bias={"contrast": 0.45, "none": -0.3}, scale=0.75, noise=0.2, seed=3)
    said = [answer(r["distortion_type"], r["distortion_level"], r["mos"], errors=errors, key=(0, i))
            for i, r in enumerate(rows)]  # fmt: skip
    near = [abs(a.score - r["mos"]) <= 0.3 for a, r in zip(said, rows, strict=True)]
    assert 0 < sum(near) < len(rows)  # the setting keeps some and drops some

    made = demo.write_cold_start(index, tmp_path / "train.jsonl", "Rate it.", split="train", errors=errors,
                                 tolerance=0.3)  # fmt: skip
    assert made["kept"] == sum(near) and made["rejections"]["tolerance"] == len(rows) - sum(near)
    source = ColdStartSource(tmp_path / "train.jsonl")
    kept = [(r, a) for r, a, ok in zip(rows, said, near, strict=True) if ok]
    assert len(source) == len(kept)
    for i, (row, a) in enumerate(kept):
        assert source[i]["response"] == short_response(row["distortion_type"], a.severity, a.score, a.word)
        assert source[i]["teacher_score"] == pytest.approx(a.score)
    scores = np.array([a.score for a in said])
    mos = np.array([r["mos"] for r in rows])
    assert made["teacher"]["srcc"] == pytest.approx(stats.spearmanr(scores, mos)[0])  # on all records, not the kept
    assert made["teacher"]["mae"] == pytest.approx(np.abs(scores - mos).mean())

    table = demo.results_table({"teacher": made["teacher"], "qponder": {"srcc": 0.9, "parse_failure_rate": 0.0}})
    assert table.splitlines()[2].startswith(f"| rule-based teacher (its scores) | {made['teacher']['srcc']:.3f} |")
    assert table.splitlines()[-1].startswith("| Q-Ponder (SFT + GRPO) | 0.900 |")


def _cli(workdir: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the CLI's own process: one CPU device
    cmd = [sys.executable, "-m", "qponder_jax.main", "--config=configs/demo.py:test", f"--workdir={workdir}"]
    return subprocess.run(
        cmd + list(overrides), cwd=REPO, env=env, capture_output=True, text=True, timeout=1800, check=False
    )


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The reduced demo (configs/demo.py:test) from nothing to an exported Q-Ponder, then the same command again."""
    workdir = tmp_path_factory.mktemp("demo")
    first = _cli(workdir)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    markers = {p: p.stat().st_mtime_ns for p in workdir.glob(f"*/{demo.DONE}")}
    second = _cli(workdir)
    assert second.returncode == 0, second.stderr[-3000:]
    return workdir, first, second, markers


@pytest.mark.slow
def test_demo_runs_every_stage_and_a_rerun_reports_complete(demo_run):
    workdir, first, second, markers = demo_run
    assert len(markers) == 7 and "[stage 7/7]" in first.stdout and "Q-Ponder (SFT + GRPO)" in first.stdout
    assert "| rule-based teacher (its scores) |" in first.stdout and "The teacher row is" in first.stdout
    assert (workdir / "7_export" / "hf" / "model.safetensors").is_file()
    results = json.loads((workdir / "6_eval" / demo.DONE).read_text())["results"]
    assert set(results) == {"teacher", "random", "qponder_ci", "qponder"}
    assert "is complete" in second.stdout and second.stdout.count("already done") == 7
    assert {p: p.stat().st_mtime_ns for p in workdir.glob(f"*/{demo.DONE}")} == markers  # nothing ran again


@pytest.mark.slow
def test_demo_quality_grpo_lifts_the_cold_start_from_an_imperfect_teacher(demo_run):
    workdir, first = demo_run[0], demo_run[1]
    results = json.loads((workdir / "6_eval" / demo.DONE).read_text())["results"]
    teacher, ci, qp = results["teacher"], results["qponder_ci"], results["qponder"]
    kept = json.loads((workdir / "3_cold_start" / demo.DONE).read_text())["filter"]["train"]
    assert 0.5 * kept["records"] < kept["kept"] < kept["records"], kept  # the MOS filter dropped some, not most
    assert f"kept {kept['kept']} of {kept['records']} training records" in first.stdout
    assert 0.65 <= teacher["srcc"] <= 0.85, results  # an MLLM-like teacher, not the exact MOS
    assert qp["srcc"] >= 0.80, results
    assert qp["srcc"] >= ci["srcc"] + 0.03, results  # the second stage adds what the teacher could not give
    assert qp["mae"] < ci["mae"], results
    assert qp["parse_failure_rate"] <= 0.05, results


@pytest.mark.slow
def test_the_exported_qponder_scores_the_test_pngs_as_the_eval_job_did(demo_run, tmp_path):
    """Issue 24: the demo's export scores the test split's PNGs through `qponder-score` (a fresh process, one device)
    and through `Scorer` (here, on 8 simulated devices) with the eval job's numbers and responses on the same images
    (the eval stage read them from the `synthetic:test` records: the same bytes)."""
    import csv

    from qponder_jax import Scorer
    from qponder_jax.scorer import SCORING_FILE

    workdir = demo_run[0]
    hf, folder = workdir / "7_export" / "hf", workdir / "2_data" / "test"
    predictions = workdir / "6_eval" / "qponder" / "predictions" / "synthetic_test.jsonl"
    evaluated = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert json.loads((hf / SCORING_FILE).read_text())["prompt_text"] == "Rate the quality of this image."
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = tmp_path / "preds.csv"
    cmd = [sys.executable, "-m", "qponder_jax.score", "--model", str(hf), str(folder), "--out", str(out), "--strict"]
    cli = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert cli.returncode == 0, cli.stdout[-3000:] + cli.stderr[-3000:]
    assert f"{len(evaluated)} images scored" in cli.stdout and "parse failures 0 | out of range 0" in cli.stdout
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    results = Scorer.from_pretrained(hf)(sorted(folder.glob("*.png")))
    assert len(rows) == len(results) == len(evaluated) == 128
    for row, result, ev in zip(rows, results, evaluated, strict=True):
        assert Path(row["image"]).name == Path(result.source).name == f"{ev['index']:06d}.png"
        assert float(row["score"]) == result.score == ev["score"], (row, ev)
        assert row["response"] == result.response == ev["response"]
        assert row["in_range"] == "True" and result.in_range and ev["in_range"]
    # the GRPO run's orbax workdir itself: the same model, prompted from the run's config.json
    from_run = Scorer.from_pretrained(workdir / "5_grpo")(sorted(folder.glob("*.png"))[:16])
    assert [(r.score, r.response) for r in from_run] == [(r.score, r.response) for r in results[:16]]
