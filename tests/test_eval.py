"""The eval job: level scoring by hand, scripted and real runs on the synthetic set, every output written, and the
report's numbers recomputed from the per-image predictions with scipy."""

import json
import types

import jax
import numpy as np
import pytest
from scipy import stats

from qponder_jax import eval as eval_job
from qponder_jax import prompts
from qponder_jax.data.datasets import SyntheticIQA, decode_image
from qponder_jax.data.mrope import rope_index
from qponder_jax.embedded import build_tiny_model
from qponder_jax.evaluation import descriptions, report, scoring
from qponder_jax.hf import load_hf
from qponder_jax.metrics import iqa_metrics
from qponder_jax.model.sharding import make_mesh

DATA = dict(
    token_buckets=(128, 160, 192, 256),
    patch_buckets=(64,),
    image_buckets=(1,),
    min_pixels=0,
    max_pixels=84 * 84,
    truncation=False,
)
PHRASES = {  # a defect phrase naming each synthetic distortion
    "blur": "the edges look blurry",
    "noise": "visible noise covers the flat areas",
    "jpeg": "JPEG blocking shows around the edges",
    "contrast": "the tones are washed-out",
    "brightness": "parts are overexposed",
    "saturation": "the colors are desaturated",
    "pixelate": "the detail is pixelated",
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model on a 2-device mesh, processor, mesh, HF folder) of the embedded tiny random model."""
    folder = build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny_model")
    mesh = make_mesh((1, 2, 1), jax.devices()[:2])
    model, _ = load_hf(folder, mesh=mesh)
    return model, eval_job.make_processor(folder, DATA), mesh, folder


def _source(size=12):
    return SyntheticIQA("test", size=size, seed=3, min_side=56, max_side=84)


class Scripted:
    """A fake `generate`: each real prompt row (in call order) and sample k answers `respond(prompt_text, row, k)`,
    tokenized and ended with the end-of-turn token, through the same decode + parse path as the real sampler."""

    def __init__(self, proc, respond):
        self.proc, self.respond, self.rows, self.calls = proc, respond, 0, []

    def __call__(self, model, batch, *, max_new_tokens, temperature, top_k, top_p, num_samples, rng, stop_ids, pad_id):
        self.calls.append(dict(temperature=temperature, num_samples=num_samples, rng=rng, stop_ids=stop_ids))
        n = batch.input_ids.shape[0] * num_samples
        tokens = np.full((n, max_new_tokens), pad_id, np.int32)
        mask = np.zeros((n, max_new_tokens), bool)
        for b, (ids, real) in enumerate(zip(batch.input_ids, batch.attention_mask)):
            if not real.any():
                continue
            prompt = self.proc.tokenizer.decode(ids[real].tolist())
            for k in range(num_samples):
                text = self.respond(prompt, self.rows, k)
                row = self.proc.tokenizer.encode(text, add_special_tokens=False) + [self.proc.end_of_turn_id]
                assert len(row) <= max_new_tokens, text
                tokens[b * num_samples + k, : len(row)] = row
                mask[b * num_samples + k, : len(row)] = True
            self.rows += 1
        return types.SimpleNamespace(tokens=tokens, mask=mask)


def _script(records):
    """Per image j: (response, score or None, names the right distortion, level word agrees with the score)."""
    out = []
    for j, r in enumerate(records):
        if j % 6 == 5:
            out.append(("I cannot tell.", None, False, None))
            continue
        score = round(float(np.clip(r["mos"] + 0.1 * (j % 3 - 1), 1, 5)), 2)
        right = prompts.level_of_score(score)
        word = right if j % 4 else prompts.LEVELS[(prompts.LEVELS.index(right) + 2) % 5]
        kinds = sorted(PHRASES)
        kind = r["distortion_type"] if j % 2 == 0 and r["distortion_type"] in PHRASES else kinds[j % len(kinds)]
        if kind == r["distortion_type"] and j % 2:
            kind = kinds[(j + 1) % len(kinds)]
        text = (
            f"<think>Looking closely, {PHRASES[kind]}. Overall the quality is {word}.</think> <answer>{score}</answer>"
        )
        out.append((text, score, kind == r["distortion_type"], word == right))
    return out


def test_level_score_of_hand_set_logits():
    scores, probs = scoring.level_score(np.log([[1.0, 2.0, 3.0, 4.0, 10.0], [1.0, 1.0, 1.0, 1.0, 1.0]]))
    np.testing.assert_allclose(probs[0], [0.05, 0.1, 0.15, 0.2, 0.5], rtol=1e-12)
    np.testing.assert_allclose(scores, [(1 + 4 + 9 + 16 + 50) / 20, 3.0], rtol=1e-12)  # 4.0 and 3.0
    assert scoring.level_score([40.0, 0.0, 0.0, 0.0, 0.0])[0] == pytest.approx(1.0, abs=1e-12)  # all mass on "bad"
    assert scoring.level_score([0.0, 0.0, 0.0, 0.0, 40.0])[0] == pytest.approx(5.0, abs=1e-12)


def test_level_token_ids_single_and_multi_token(tiny):
    proc = tiny[1]
    ids, info = scoring.level_token_ids(proc.tokenizer, "The quality of the image is")
    tok = proc.tokenizer
    assert [tok.convert_ids_to_tokens(int(i)) for i in ids] == ["Ġbad", "Ġpoor", "Ġfair", "Ġgood", "Ġexcellent"]
    assert all(v["single_token"] for v in info.values())
    # after whitespace the words carry no leading space; in the demo tokenizer most are then several tokens
    ids, info = scoring.level_token_ids(tok, "Quality: ", policy="first_token")
    assert not info["bad"]["single_token"] and ids[0] == tok.encode("bad", add_special_tokens=False)[0]
    with pytest.raises(ValueError, match="'bad' is 3 tokens"):
        scoring.level_token_ids(tok, "Quality: ", policy="single")


def test_level_mode_scores_the_answer_position(tiny, tmp_path):
    """Level scores equal softmax . [1..5] of a full forward pass's logits after prompt + prefix, built
    independently from the rendered chat text and transformers-style M-RoPE positions."""
    model, proc, mesh, _ = tiny
    settings = eval_job.EvalSettings(mode="level", batch_size=4, max_images=4)
    rows, summary = eval_job.evaluate_source(model, proc, _source(), "synthetic:test", settings, mesh=mesh)
    ids, _ = scoring.level_token_ids(proc.tokenizer, settings.level_prefix)
    src = _source()
    for j, row in enumerate(rows):
        image = decode_image(src[j]["image"])
        text = proc.render(prompts.image_messages(settings.level_prompt), True) + settings.level_prefix
        ex = proc.encode(prompts.image_messages(settings.level_prompt), [image], add_generation_prompt=True)
        full = scoring.append_tokens(ex, proc.tokenizer.encode(settings.level_prefix, add_special_tokens=False))
        expected_ids = np.repeat(  # the rendered text tokenized in one go, image pad expanded
            np.asarray(proc.tokenizer(text, add_special_tokens=False)["input_ids"]),
            np.where(np.asarray(proc.tokenizer(text, add_special_tokens=False)["input_ids"]) == proc.image_token_id,
                     ex.image_token_counts[0], 1),
        )  # fmt: skip
        np.testing.assert_array_equal(full.input_ids, expected_ids)
        positions, _ = rope_index(full.input_ids, image_token_id=proc.image_token_id,
                                  image_grid_thw=full.image_grid_thw, spatial_merge_size=2)  # fmt: skip
        np.testing.assert_array_equal(full.position_ids, positions)
        logits = np.asarray(model(proc.collate([full])))[0, len(full) - 1, ids]  # right-padded: the last real token
        assert row["score"] == pytest.approx(float(scoring.level_score(logits)[0]), abs=1e-5)
        assert 1 <= row["score"] <= 5 and sum(row["level_probs"]) == pytest.approx(1.0)
    assert summary["parse_failure_rate"] == 0 and summary["images"] == 4


def _recompute(path):
    """SRCC / PLCC / KRCC / MAE / failure rate of a predictions JSONL, straight from scipy."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    pred = np.array([np.nan if r["score"] is None else r["score"] for r in rows])
    mos = np.array([r["mos"] for r in rows])
    ok = np.isfinite(pred)
    return rows, {
        "srcc": stats.spearmanr(pred[ok], mos[ok])[0],
        "plcc": stats.pearsonr(pred[ok], mos[ok])[0],
        "krcc": stats.kendalltau(pred[ok], mos[ok])[0],
        "mae": np.abs(pred[ok] - mos[ok]).mean(),
        "parse_failure_rate": 1 - ok.mean(),
        "n": ok.sum(),
        "plcc_fitted": iqa_metrics(pred, mos).plcc_fitted,
    }


def test_scripted_eval_writes_outputs_and_numbers_match_predictions(tiny, tmp_path):
    model, proc, mesh, _ = tiny
    records = [_source()[j] for j in range(12)]
    script = _script(records)
    fake = Scripted(proc, lambda prompt, row, k: script[row][0])
    settings = eval_job.EvalSettings(mode="greedy", batch_size=5, max_new_tokens=96)
    out = tmp_path / "eval"
    rep = eval_job.evaluate(model, proc, {"synthetic:test": _source()}, settings, out, mesh=mesh, generate_fn=fake)
    assert [c["temperature"] for c in fake.calls] == [0.0] * 3 and all(c["num_samples"] == 1 for c in fake.calls)
    assert proc.end_of_turn_id in fake.calls[0]["stop_ids"]
    for name in ("report.json", "table.md", "predictions/synthetic_test.jsonl", "plots/synthetic_test.png"):
        assert (out / name).is_file(), name
    assert (out / "plots/synthetic_test.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    rows, expected = _recompute(out / "predictions/synthetic_test.jsonl")
    assert [r["score"] for r in rows] == [s[1] for s in script]  # the scripted scores, parsed back
    assert [r["mos"] for r in rows] == [r["mos"] for r in records]
    saved = json.loads((out / "report.json").read_text())["datasets"]["synthetic:test"]
    for key, value in expected.items():
        assert saved[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
        assert rep["datasets"]["synthetic:test"][key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert saved["parse_failure_rate"] == pytest.approx(2 / 12)

    typed = [s[2] for s, r in zip(script, records) if r["distortion_type"] != "none"]
    leveled = [s[3] for s in script if s[3] is not None]
    assert saved["type_checked"] == len(typed) and saved["level_checked"] == len(leveled) == 10
    assert saved["type_named_rate"] == pytest.approx(np.mean(typed))
    assert saved["level_agreement_rate"] == pytest.approx(np.mean(leveled))
    assert 0 < saved["type_named_rate"] < 1 and 0 < saved["level_agreement_rate"] < 1

    table = (out / "table.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| synthetic:test"))
    assert f"{expected['srcc']:.4f}" in row and "16.7%" in row and "| 10 |" in row
    assert "PLCC_fit" in table and "logistic" in table


def test_sample_mean_averages_parsed_samples(tiny, tmp_path):
    model, proc, mesh, _ = tiny
    records = [_source(4)[j] for j in range(4)]

    def respond(prompt, row, k):
        if row == 0 and k == 2:
            return "no score"
        return f"<think>Fine, good.</think><answer>{records[row]['mos'] + 0.25 * (k - 1):.2f}</answer>"

    fake = Scripted(proc, respond)
    settings = eval_job.EvalSettings(
        mode="sample_mean", num_samples=3, temperature=0.8, batch_size=4, max_new_tokens=64
    )
    rows, summary = eval_job.evaluate_source(model, proc, _source(4), "s", settings, mesh=mesh, generate_fn=fake)
    assert fake.calls[0]["temperature"] == 0.8 and fake.calls[0]["rng"] is not None
    for j, row in enumerate(rows):
        samples = [round(records[j]["mos"] + 0.25 * (k - 1), 2) for k in range(3)]
        if j == 0:
            assert np.isnan(row["sample_scores"][2])
            samples = samples[:2]
        assert row["score"] == pytest.approx(np.mean(samples), abs=1e-9)
    assert summary["parse_failure_rate"] == 0 and summary["sample_parse_failure_rate"] == pytest.approx(1 / 12)


def test_real_greedy_run_writes_everything(tiny, tmp_path):
    model, proc, mesh, _ = tiny
    settings = eval_job.EvalSettings(mode="greedy", batch_size=3, max_images=3, max_new_tokens=8)
    out = tmp_path / "greedy"
    rep = eval_job.evaluate(model, proc, {"synthetic:test": _source()}, settings, out, mesh=mesh)
    rows = report.read_predictions(out / "predictions/synthetic_test.jsonl")
    assert len(rows) == 3 and all(isinstance(r["response"], str) for r in rows)
    recomputed = report.metrics_from_predictions(out / "predictions/synthetic_test.jsonl")
    for key, value in recomputed.items():
        got = rep["datasets"]["synthetic:test"][key]
        assert (np.isnan(value) and np.isnan(got)) or got == pytest.approx(value), key
    assert (out / "plots/synthetic_test.png").stat().st_size > 1000
    assert json.loads((out / "report.json").read_text())["settings"]["mode"] == "greedy"


def test_eval_job_from_config(tiny, tmp_path, capsys):
    """configs/eval.py:tiny end to end through `run` (level mode keeps it quick), on the tiny HF folder."""
    from configs.eval import get_config

    config = get_config("tiny")
    config.checkpoint = str(tiny[3])
    config.mesh = (1, 2, 1)
    config.score.mode = "level"
    config.data.max_images = 4
    config.data.batch_size = 4
    rep = eval_job.run(config, tmp_path)
    printed = capsys.readouterr().out
    assert "| synthetic:test |" in printed and "Q-Align level scoring" in printed
    assert (tmp_path / "eval" / "report.json").is_file()
    assert rep["datasets"]["synthetic:test"]["images"] == 4
    with pytest.raises(ValueError, match="score.mode"):
        eval_job.EvalSettings(mode="beam")


def test_description_checks():
    assert descriptions.named_categories("Heavy noise and a blurry background.") == {"noise", "blur"}
    assert descriptions.named_categories("There is no blur, and it is noise-free.") == set()
    check = descriptions.check_response(
        "<think>It is pixelated. Quality is poor.</think><answer>2.1</answer>", "synthetic", "pixelate", 2.1, 2
    )
    assert check == {"type_named": True, "other_categories": 0, "level_agrees": True, "level": 2}
    check = descriptions.check_response("<think>Blurry.</think>", "kadid10k", "white_noise", float("nan"), 0)
    assert check["type_named"] is False and check["other_categories"] == 1 and check["level_agrees"] is None
    assert descriptions.check_response("x", "koniq10k", "", 3.0, 0)["type_named"] is None


def test_eval_job_notes_follow_the_datasets_and_list_build_skips(tiny, tmp_path, capsys):
    """--config.datasets=csiq:all under the tiny config (protocol "synthetic"): the notes describe CSIQ, not the
    synthetic split, and the image skipped when CSIQ was built is named in the table's notes and report.json."""
    import dataset_fixtures as fx

    from configs.eval import get_config
    from qponder_jax.data import datasets

    fx.write_csiq(tmp_path / "manual")
    missing = sorted((tmp_path / "manual").rglob("*.png"))[0]
    missing.unlink()
    datasets.build("csiq", tmp_path / "manual", tmp_path / "tfds")
    config = get_config("tiny")
    config.checkpoint = str(tiny[3])
    config.mesh = (1, 2, 1)
    config.score.mode = "level"
    config.datasets = "csiq:all"
    config.data.data_dir = str(tmp_path / "tfds")
    rep = eval_job.run(config, tmp_path / "run")
    printed = capsys.readouterr().out
    notes = rep["notes"]
    assert not any("synthetic" in n.lower() for n in notes), notes
    assert any(n.startswith("csiq:all: CSIQ") for n in notes), notes
    assert "| csiq:all |" in printed and "1 file(s) of csiq (all splits) were skipped" in printed
    assert str(missing) in printed
    saved = json.loads((tmp_path / "run" / "eval" / "report.json").read_text())["datasets"]["csiq:all"]
    assert [s["path"] for s in saved["build_skipped"]] == [str(missing)] and saved["images"] == 3
    # the protocol's own datasets keep the protocol's note
    synthetic = report.PROTOCOLS["synthetic"][1]
    assert report.dataset_notes("synthetic", {"synthetic:test": "generated"}) == (synthetic,)
    assert report.dataset_notes("synthetic", {"kadid10k:all": "KADID-10k"}) == ("kadid10k:all: KADID-10k",)


@pytest.mark.parametrize("style", ["short", "long"])
def test_type_named_reads_the_rule_teachers_wording(style):
    """Every distortion and level the rule teacher writes (the demo's short label `contrast, slight; ...` and the long
    reasoning) names its type and nothing else; aspect nouns in ordinary descriptions still name nothing."""
    from qponder_jax.data.datasets.synthetic import DISTORTIONS
    from qponder_jax.data.rule_teacher import response_for, short_response

    write = short_response if style == "short" else response_for
    for kind in DISTORTIONS[1:]:
        for level in range(1, 6):
            check = descriptions.check_response(write(kind, level, 2.5), "synthetic", kind, 2.5, 2)
            assert check["type_named"] and check["other_categories"] == 0, (kind, level, write(kind, level, 2.5))
    assert descriptions.named_categories("Good contrast, moderate noise.") == {"noise"}
    assert descriptions.named_categories("The contrast is strong and the brightness is good.") == set()
    assert descriptions.named_categories("Balanced exposure, strong colors; no contrast, slight;") == set()


def test_eval_on_a_built_dataset(tiny, tmp_path):
    """A tfds-built CSIQ (tiny copy in the official layout) through the job's source opener: records carry CSIQ's
    distortion types, and the description check knows them (awgn -> noise, jpeg2000 -> compression or blur)."""
    import dataset_fixtures as fx

    from qponder_jax.data import datasets

    model, proc, mesh, _ = tiny
    fx.write_csiq(tmp_path / "manual")
    datasets.build("csiq", tmp_path / "manual", tmp_path / "tfds")
    source = eval_job.open_source("csiq", {"data_dir": str(tmp_path / "tfds")})
    types_ = [source[i]["distortion_type"] for i in range(len(source))]
    assert sorted(types_) == ["awgn", "blur", "contrast", "jpeg2000"]
    fake = Scripted(
        proc, lambda p, row, k: "<think>Strong noise everywhere; the quality is poor.</think><answer>2</answer>"
    )
    settings = eval_job.EvalSettings(batch_size=4, max_new_tokens=64)
    rows, summary = eval_job.evaluate_source(model, proc, source, "csiq:all", settings, mesh=mesh, generate_fn=fake)
    assert [r["dataset"] for r in rows] == ["csiq"] * 4 and all(r["score"] == 2.0 for r in rows)
    assert summary["type_checked"] == 4 and summary["type_named_rate"] == 0.25  # only the awgn image is noise
    assert summary["level_agreement_rate"] == 1.0  # "poor" is the level bin of 2.0
    assert np.isnan(summary["srcc"])  # constant predictions: undefined, reported as n/a
    with pytest.raises(ValueError, match="data.data_dir"):
        eval_job.open_source("kadid10k:test", {"data_dir": ""})


def test_out_of_range_answers_are_flagged_and_left_out_of_the_metrics(tiny, tmp_path):
    """Issue 23 item 3: `<answer>4009</answer>` parses, but lies outside the prompt's 1-5 scale: its prediction keeps
    the number with in_range false, the table counts it in Out, and MAE / correlations leave it out (MAE was 365.5)."""
    model, proc, mesh, _ = tiny
    records = [_source()[j] for j in range(12)]
    far = {3: "<think>good</think><answer>4009</answer>", 8: "<think>bad</think><answer>0.2</answer>"}
    near = lambda j: f"<think>fine</think><answer>{records[j]['mos']:.2f}</answer>"
    fake = Scripted(proc, lambda p, row, k: far.get(row) or near(row))
    settings = eval_job.EvalSettings(mode="greedy", batch_size=4, max_new_tokens=48)
    out = tmp_path / "eval"
    eval_job.evaluate(model, proc, {"synthetic:test": _source()}, settings, out, mesh=mesh, generate_fn=fake)
    path = out / "predictions/synthetic_test.jsonl"
    rows = report.read_predictions(path)
    assert [r["in_range"] for r in rows] == [j not in far for j in range(12)]
    assert rows[3]["score"] == 4009.0 and rows[8]["score"] == pytest.approx(0.2)  # kept as written, never clipped
    saved = json.loads((out / "report.json").read_text())["datasets"]["synthetic:test"]
    assert saved["out_of_range_rate"] == pytest.approx(2 / 12) and saved["parse_failure_rate"] == 0 and saved["n"] == 10
    kept = [j for j in range(12) if j not in far]
    mae = np.mean([abs(round(records[j]["mos"], 2) - records[j]["mos"]) for j in kept])
    assert saved["mae"] == pytest.approx(mae, abs=1e-6) and saved["mae"] < 0.01
    for key, value in report.metrics_from_predictions(path).items():
        assert saved[key] == pytest.approx(value, rel=1e-9), key
    table = (out / "table.md").read_text()
    assert "| Fail | Out |" in table and "| 0.0% | 16.7% | 10 |" in table
