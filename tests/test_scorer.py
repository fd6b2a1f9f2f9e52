"""The Scorer and `qponder-score` on the embedded tiny model: batch invariance (alone, in a batch of 8 of other sizes,
from a folder), NaN for an unparsed answer and out-of-range flags, the input walk (folders, CSV manifests, skipped
files), --strict, CSV / JSONL outputs, metrics against a manifest's MOS, the `score` job and the scoring record."""

import csv
import json
import math
import types
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image
from scipy import stats

from qponder_jax import Scorer, ScoreResult, prompts, score
from qponder_jax.data.image_files import find_images
from qponder_jax.embedded import build_tiny_model
from qponder_jax.evaluation import image_scoring, scoring
from qponder_jax.scorer import SCORING_FILE, scoring_record, summarize, write_scoring_record

MAX_PIXELS = 200 * 200  # lets the 200 x 150 images need a larger patch bucket than the small ones
SIZES = [(56, 56), (84, 70), (200, 150), (120, 300), (64, 96), (90, 90), (150, 60), (70, 84), (300, 200)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny_model")


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in SIZES]


def _same(a: ScoreResult, b: ScoreResult):
    assert (a.score == b.score) or (math.isnan(a.score) and math.isnan(b.score)), (a.score, b.score)
    assert (a.response, a.parsed, a.in_range, a.level, a.level_probs) == (
        b.response, b.parsed, b.in_range, b.level, b.level_probs
    )  # fmt: skip


@pytest.mark.parametrize("mode", ["greedy", "level"])
def test_an_image_scores_the_same_alone_in_a_batch_and_from_a_folder(tiny, images, tmp_path, mode, capsys):
    scorer = Scorer.from_pretrained(tiny, mode, max_new_tokens=12, max_pixels=MAX_PIXELS)
    buckets = {scorer._batches.bucket_key(scorer._batches.image_prompt(im)) for im in images}
    assert len(buckets) == 2  # the batch below mixes prompts of two shapes
    target, others = images[0], images[1:]
    alone = scorer([target])[0]
    batch = scorer(others[:4] + [target] + others[4:7])  # 8 images, the target 5th, other sizes around it
    _same(alone, batch[4])
    assert alone.response if mode == "greedy" else alone.level_probs is not None

    folder = tmp_path / "shots"
    for i, im in enumerate(images):
        (folder / f"part{i % 2}").mkdir(parents=True, exist_ok=True)
        im.save(folder / f"part{i % 2}" / f"img{i}.png")
    out = tmp_path / "preds.jsonl"
    argv = ["--model", str(tiny), str(folder), "--out", str(out), "--mode", mode, "--max-new-tokens", "12",
            "--max-pixels", str(MAX_PIXELS)]  # fmt: skip
    assert score.main(argv) == 0
    rows = {Path(r["image"]).name: r for r in map(json.loads, out.read_text().splitlines())}
    row = rows["img0.png"]
    assert row["response"] == alone.response and row["level"] == alone.level
    assert row["score"] == (alone.score if math.isfinite(alone.score) else None)
    assert row.get("level_probs") == (list(alone.level_probs) if mode == "level" else None)
    assert len(rows) == len(images) and f"{len(images)} images scored" in capsys.readouterr().out


def test_a_level_score_does_not_depend_on_the_other_rows():
    logits = np.random.default_rng(4).normal(0, 2, (8, 5))
    scores, probs = scoring.level_score(logits)
    for i in range(8):  # bit for bit (a BLAS matrix-vector product differed in the last bit for some rows)
        alone = scoring.level_score(logits[i : i + 1])
        assert alone[0][0] == scores[i] and (alone[1][0] == probs[i]).all()


class Scripted:
    """A fake `generate`: real prompt row r (in call order) answers texts[r], through the real decode + parse path."""

    def __init__(self, proc, texts):
        self.proc, self.texts, self.rows = proc, texts, 0

    def __call__(self, model, batch, *, max_new_tokens, temperature, top_k, top_p, num_samples, rng, stop_ids, pad_id):
        n = batch.input_ids.shape[0] * num_samples
        tokens, mask = np.full((n, max_new_tokens), pad_id, np.int32), np.zeros((n, max_new_tokens), bool)
        for b, real in enumerate(batch.attention_mask):
            if real.any():
                ids = self.proc.tokenizer.encode(self.texts[self.rows], add_special_tokens=False)
                ids = ids + [self.proc.end_of_turn_id]
                tokens[b, : len(ids)], mask[b, : len(ids)] = ids, True
                self.rows += 1
        return types.SimpleNamespace(tokens=tokens, mask=mask)


def test_unparsed_answers_are_nan_and_out_of_range_scores_are_flagged(tiny, images):
    """Never a made-up score: no number -> NaN; 4009 on the 1-5 scale is kept, flagged, left out of the mean and MOS
    metrics (issue 23 item 3)."""
    base = Scorer.from_pretrained(tiny, "greedy", max_new_tokens=40)
    texts = ["<think>Sharp, good.</think><answer>3.5</answer>", "I cannot tell.",
             "<think>fine</think><answer>4009</answer>", "<think>poor</think><answer>2</answer>"]  # fmt: skip
    fake = Scripted(base.processor, texts)
    scorer = Scorer(base.model, base.processor, base.settings, mesh=base.mesh, generate_fn=fake)
    good, unparsed, far, two = scorer([images[0], images[1], images[4], images[5]])
    assert (good.score, good.parsed, good.in_range, good.level, good.reasoning) == (
        3.5,
        True,
        True,
        "good",
        "Sharp, good.",
    )
    assert math.isnan(unparsed.score) and not unparsed.parsed and not unparsed.in_range
    assert unparsed.reasoning == "I cannot tell." and unparsed.level == ""
    assert (far.score, far.parsed, far.in_range) == (4009.0, True, False)
    summary = summarize([good, unparsed, far, two], [3.0, 1.0, 4.0, 2.5])
    assert summary["mean_score"] == pytest.approx(2.75) and summary["parse_failures"] == summary["out_of_range"] == 1
    assert summary["mos"]["n"] == 2 and summary["mos"]["srcc"] == pytest.approx(1.0)  # (3.5, 3.0), (2, 2.5) only
    assert "(out of range)" in score.format_result(far) and "n/a" in score.format_result(unparsed)


def test_combine_averages_the_in_range_samples():
    c = lambda s, ok=True: scoring.Completion("x", s, True, 0, 0 if math.isnan(s) else 1, ok and math.isfinite(s))
    mixed = image_scoring.combine([c(3.0), c(4009.0, False), c(float("nan")), c(4.0)])
    assert (mixed.score, mixed.parsed, mixed.in_range) == (3.5, True, True)
    far = image_scoring.combine([c(0.0, False), c(9.0, False)])
    assert (far.score, far.parsed, far.in_range) == (4.5, True, False)
    none = image_scoring.combine([c(float("nan")), c(float("nan"))])
    assert math.isnan(none.score) and not none.parsed and not none.in_range


def test_find_images_walks_folders_and_reads_manifests(tmp_path):
    (tmp_path / "a" / "deep").mkdir(parents=True)
    for name in ("a/z.png", "a/deep/b.JPG", "a/c.webp", "a/notes.txt", "one.bmp"):
        (tmp_path / name).write_bytes(b"x")
    manifest = tmp_path / "m.csv"
    manifest.write_text("image,mos\none.bmp,3.5\nmissing.png,2\n,4\na/z.png,abc\n/abs/x.png,\n")
    found = find_images([tmp_path / "a", manifest, tmp_path / "nope.jpg", tmp_path / "one.bmp"])
    assert [(p.path, p.mos) for p in found.images] == [
        (tmp_path / "a/c.webp", None), (tmp_path / "a/deep/b.JPG", None), (tmp_path / "a/z.png", None),
        (tmp_path / "one.bmp", 3.5), (tmp_path / "missing.png", 2.0), (Path("/abs/x.png"), None),
        (tmp_path / "one.bmp", None),
    ]  # fmt: skip
    reasons = dict(found.skipped)
    assert reasons[f"{manifest}:4"] == "no image path in the 'image' column"
    assert "not a finite number" in reasons[f"{manifest}:5 {tmp_path / 'a/z.png'}"]
    assert reasons[str(tmp_path / "nope.jpg")] == "no such file or folder"
    (tmp_path / "bad.csv").write_text("path,score\nx.png,1\n")
    assert "no 'image' column" in find_images([tmp_path / "bad.csv"]).skipped[0][1]
    index = tmp_path / "a" / "index.jsonl"  # the demo's split index: {"image": ..., "mos": ..., ...} per line
    index.write_text('{"image": "z.png", "mos": 4.25, "dataset": "x"}\n\n{"image": "c.webp"}\n{"mos": 2}\n')
    found = find_images([index])
    assert [(p.path, p.mos) for p in found.images] == [(tmp_path / "a/z.png", 4.25), (tmp_path / "a/c.webp", None)]
    assert found.skipped == [(f"{index}:4", "no image path in the 'image' column")]
    index.write_text('["not", "an", "object"]\n')
    assert "line 1 is not a JSON object" in find_images([index]).skipped[0][1]


def _write_set(folder: Path, images) -> Path:
    folder.mkdir(parents=True)
    for i, im in enumerate(images):
        im.save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    (folder / "readme.txt").write_text("not an image: ignored")
    manifest = folder / "labels.csv"
    rows = [f"{i}.png,{mos}" for i, mos in enumerate([1.5, 4.0, 2.0, 3.0, 4.5][: len(images)])]
    manifest.write_text("image,mos\n" + "\n".join(rows + ["gone.png,3.0"]) + "\n")
    return manifest


def test_cli_skips_unreadable_files_writes_csv_and_jsonl_and_correlates_with_mos(tiny, images, tmp_path, capsys):
    manifest = _write_set(tmp_path / "set", images[:5])
    base = ["--model", str(tiny), "--mode", "level"]  # level: every image parses, so only skipped files fail
    assert score.main(base + [str(manifest), "--out", str(tmp_path / "p.jsonl"), "--explain"]) == 0
    printed = capsys.readouterr().out
    assert "skipped 1" in printed and f"skipped {tmp_path / 'set' / 'gone.png'}: cannot read the file" in printed
    assert "against MOS (5 images): SRCC" in printed
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [Path(r["image"]).name for r in rows] == ["0.png", "1.png", "2.png", "3.png", "4.png", "gone.png"]
    assert rows[-1]["score"] is None and rows[-1]["error"]
    pred, mos = np.array([r["score"] for r in rows[:5]]), np.array([r["mos"] for r in rows[:5]])
    assert f"SRCC {stats.spearmanr(pred, mos)[0]:.4f} | PLCC {stats.pearsonr(pred, mos)[0]:.4f}" in printed
    assert f"KRCC {stats.kendalltau(pred, mos)[0]:.4f}" in printed

    assert score.main(base + [str(tmp_path / "set"), "--out", str(tmp_path / "p.csv")]) == 0  # the folder walk
    printed = capsys.readouterr().out
    assert "5 images scored" in printed and "readme" not in printed and "broken.png: not a decodable image" in printed
    with open(tmp_path / "p.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [Path(r["image"]).name for r in table] == ["0.png", "1.png", "2.png", "3.png", "4.png", "broken.png"]
    assert [float(r["score"]) for r in table[:5]] == pytest.approx(pred, abs=1e-12)
    assert table[-1]["score"] == "" and table[-1]["in_range"] == "False" and "decodable" in table[-1]["error"]

    assert score.main(base + [str(tmp_path / "set"), "--strict"]) == 1  # one skipped file
    assert "--strict: 1 skipped" in capsys.readouterr().err
    assert score.main(base + [str(tmp_path / "set" / "0.png"), "--strict"]) == 0
    assert score.main(base + [str(tmp_path / "set"), "--out", "preds.txt"]) == 2
    assert score.main(base + [str(tmp_path / "empty_nothing")]) == 2
    assert "nothing to score" in capsys.readouterr().err
    assert score.main(base + [str(tmp_path / "set"), "--layout", "decode:two"]) == 2
    assert "--layout decode:two: sampling layout 'decode:two' is not one of" in capsys.readouterr().err
    with pytest.raises(SystemExit) as help_exit:
        score.main(["--help"])
    assert help_exit.value.code == 0 and "exit status" in capsys.readouterr().out


def test_score_job_through_main_jobs(tiny, images, tmp_path, capsys):
    from configs.score import get_config
    from qponder_jax import main

    _write_set(tmp_path / "set", images[:2])
    config = get_config().unlock()
    config.checkpoint, config.inputs, config.mesh = str(tiny), str(tmp_path / "set" / "labels.csv"), (1, 2, 1)
    config.score.mode = "level"
    summary = main.get_job("score")(config.lock(), tmp_path / "run")
    assert summary["images"] == 2 and len(summary["skipped"]) == 1 and summary["mos"]["n"] == 2
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["images"] == 2
    assert len((tmp_path / "run" / "predictions.jsonl").read_text().splitlines()) == 3
    config = config.unlock()
    config.strict = True
    with pytest.raises(SystemExit, match="strict: 1 skipped"):
        main.get_job("score")(config.lock(), tmp_path / "run2")


def test_the_scoring_record_travels_with_the_model(tiny, tmp_path):
    from configs import qponder, qponder_ci

    record = scoring_record(json.loads(qponder.get_config("tiny").to_json()))
    assert record["prompt_text"] == prompts.QPONDER and record["max_new_tokens"] == 64
    assert record["score_range"] == [1.0, 5.0] and record["num_ratings"] == 1
    ci = json.loads(qponder_ci.get_config("tiny").to_json())
    assert scoring_record(ci)["prompt_text"] == prompts.QPONDER  # synthetic cold start: its prompt is known
    ci["data"]["source"] = "jsonl"
    assert scoring_record(ci) == {}  # JSONL records carry their own prompts: nothing to say

    folder = tmp_path / "hf"
    folder.mkdir()
    for f in Path(tiny).iterdir():
        (folder / f.name).symlink_to(f)
    run = {"job": "grpo", "data": {"prompt": "qponder", "prompt_text": "Rate it.", "max_pixels": 84 * 84,
                                   "token_buckets": [300, 400], "patch_buckets": [64]},
           "grpo": {"max_new_tokens": 32, "score_numbers": 1, "score_range": [0, 10]}}  # fmt: skip
    assert write_scoring_record(folder, run, source="a test") == folder / SCORING_FILE
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    scorer = Scorer.from_pretrained(folder, mesh=mesh)
    s = scorer.settings
    assert (s.user_text, s.max_new_tokens, scorer.score_range) == ("Rate it.", 32, (0.0, 10.0))
    assert scorer.processor.image_config.max_pixels == 84 * 84 and scorer.lower_better is False
    assert (scorer.processor.buckets.tokens, scorer.processor.buckets.patches) == ((300, 400), (64,))
    named = Scorer.from_pretrained(folder, prompt="visualquality_r1", max_new_tokens=8, mesh=mesh)
    assert named.settings.user_text == prompts.PROMPTS["visualquality_r1"] and named.settings.max_new_tokens == 8


def test_the_sampling_layout_reaches_generate_and_leaves_the_scores(tiny, images):
    """The Scorer decodes in the layout it is given (auto: the decode layout on 8 devices); the scores are the same."""
    decode = Scorer.from_pretrained(tiny, "greedy", max_new_tokens=12, layout="decode")
    train = Scorer.from_pretrained(tiny, "greedy", max_new_tokens=12, layout="train")
    assert (decode._batches.generate_fn.keywords, train._batches.generate_fn.keywords) == (
        {"layout": "decode"}, {"layout": "train"}
    )  # fmt: skip
    for a, b in zip(decode(images[:4]), train(images[:4]), strict=True):
        _same(a, b)
    with pytest.raises(ValueError, match="sampling layout 'decode:x' is not one of"):
        Scorer.from_pretrained(tiny, layout="decode:x")
