"""The `demo` job: the whole Q-Ponder pipeline at toy scale, resumable (configs/demo.py).

    qponder --config=configs/demo.py --workdir=runs/demo

Each stage runs in its own sub-folder `<workdir>/<i>_<name>/` and ends by writing `done.json` there with its key
outputs. A rerun skips stages with a marker, resumes an unfinished training stage from its orbax checkpoint, and,
when every stage is done, only prints the summary and says the run is complete. Training, evaluation and export
are the `sft`, `grpo`, `eval` and `export` jobs, called with their `tiny` configs overridden from the demo config.

The cold start comes from the rule-based teacher (`data/rule_teacher.py`) with the config's MLLM-like errors, kept
where it passes the same MOS-tolerance filter as the `distill` job (`data/cold_start_filter.py`); the table's first
row is that teacher's own scores on the test images.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import re
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from qponder_jax.errors import Preempted

DONE = "done.json"
MODELS = (("random", "random model (untrained)"), ("qponder_ci", "Q-Ponder-CI (cold-start SFT)"),
          ("qponder", "Q-Ponder (SFT + GRPO)"))  # fmt: skip
TEACHER = ("teacher", "rule-based teacher (its scores)")  # the table's first row: the teacher on the same test images
# The banner's estimate per config variant, measured on 2 CPU cores (default 4.7 min on a fresh clone, 2026-12-07).
EXPECTED_TIME = {"default": ", about 5 minutes on 2 CPU cores", "smoke": ", about a minute on 2 CPU cores"}


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str  # sub-folder suffix and marker name
    title: str  # what the stage does, in a newcomer's words
    fn: Callable[[object, Path, dict], dict]  # (config, stage dir, outputs of earlier stages) -> this stage's outputs


def stage_dir(workdir: Path, index: int, stage: Stage) -> Path:
    return Path(workdir) / f"{index + 1}_{stage.name}"


def read_marker(path: Path) -> dict | None:
    """The outputs recorded in `<path>/done.json`, or None when the stage has not finished."""
    marker = path / DONE
    if not marker.is_file():
        return None
    try:
        return json.loads(marker.read_text())
    except json.JSONDecodeError:
        return None  # a marker cut off mid-write: the stage reruns


def run_stages(config, workdir: Path, stages: list[Stage], *, say=print) -> tuple[dict, list[str]]:
    """Runs the unfinished stages in order; returns ({stage name: outputs}, names of the stages run now)."""
    outputs, ran = {}, []
    start = time.perf_counter()
    for i, stage in enumerate(stages):
        where = stage_dir(workdir, i, stage)
        done = read_marker(where)
        head = f"[stage {i + 1}/{len(stages)}] {stage.title}"
        if done is not None:
            say(f"{head}: already done ({where})")
            outputs[stage.name] = done
            continue
        say(f"{head} ... ({where})")
        t0 = time.perf_counter()
        where.mkdir(parents=True, exist_ok=True)
        result = stage.fn(config, where, outputs)
        if result.get("status") == "preempted":  # exit status EXIT_RESUME, as a preempted training job
            raise Preempted(f"demo: interrupted in stage {i + 1}; rerun the same command to resume from there")
        result["seconds"] = round(time.perf_counter() - t0, 1)
        (where / (DONE + ".partial")).write_text(json.dumps(result, indent=2) + "\n")
        (where / (DONE + ".partial")).rename(where / DONE)
        outputs[stage.name] = result
        ran.append(stage.name)
        say(f"{head}: done in {result['seconds']:.0f} s (total {time.perf_counter() - start:.0f} s)")
    return outputs, ran


class Progress(io.TextIOBase):
    """A stdout filter for a training stage: prefixes its step lines with the stage and appends the time left."""

    _STEP = re.compile(r"^(train|grpo) step (\d+) \|")

    def __init__(self, out, prefix: str, total_steps: int, keep=("loss", "reward_mean", "format_rate", "srcc")):
        self.out, self.prefix, self.total, self.keep = out, prefix, total_steps, keep
        self.first, self.buffer = {}, ""  # line kind ("train", "grpo") -> (its first step, when it was seen)

    def write(self, text: str) -> int:
        self.buffer += text
        while "\n" in self.buffer:
            line, self.buffer = self.buffer.split("\n", 1)
            self.out.write(self._format(line) + "\n")
        self.out.flush()
        return len(text)

    def _format(self, line: str) -> str:
        match = self._STEP.match(line)
        if not match:
            return f"{self.prefix} {line}" if line.strip() else line
        step = int(match.group(2))
        fields = dict(part.strip().split(" ", 1) for part in line.split("|")[1:] if " " in part.strip())
        shown = " | ".join(f"{k} {fields[k]}" for k in self.keep if k in fields)
        kind = match.group(1)
        if kind not in self.first:
            self.first[kind] = (step, time.perf_counter())  # the first line includes compiling
            left = "estimating time left"
        else:
            first_step, t0 = self.first[kind]
            rate = (time.perf_counter() - t0) / max(step - first_step, 1)
            left = f"~{rate * (self.total - step):.0f} s left"
        return f"{self.prefix} {kind} step {step}/{self.total} | {shown} | {left}"


@contextlib.contextmanager
def progress(prefix: str, total_steps: int, **kw):
    stdout = sys.stdout
    sys.stdout = Progress(stdout, prefix, total_steps, **kw)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stdout = stdout


def write_run_config(config, where: Path) -> None:
    """`<where>/config.json` the way `qponder` writes it, so eval and export find the run's base model."""
    where.mkdir(parents=True, exist_ok=True)
    (where / "config.json").write_text(json.dumps(json.loads(config.to_json_best_effort()), indent=2) + "\n")


# ---- the building blocks the stages need (model, synthetic files, teacher records) ----


def dct_patch_kernel(patch_dim_shape: tuple[int, int, int, int], hidden: int) -> np.ndarray:
    """A data-free patch-embedding kernel [C*t*p*p, hidden]: the 3 channel means, then luma 2-D DCT-II filters
    spread from low to high frequency. A tiny ViT trained for minutes from a random projection barely sees blur,
    noise or blocking; with frequency filters in its first layer it does."""
    c, t, p, _ = patch_dim_shape
    n = np.arange(p)
    basis = lambda k: np.cos(np.pi * (n + 0.5) * k / p) * np.sqrt((1.0 if k == 0 else 2.0) / p)  # [p]
    freqs = sorted(((u, v) for u in range(p) for v in range(p) if (u, v) != (0, 0)), key=lambda f: (max(f), f))
    picks = [freqs[int(i)] for i in np.linspace(0, len(freqs) - 1, hidden - c)]
    cols = []
    for ch in range(c):
        w = np.zeros((c, t, p, p))
        w[ch] = 1.0 / (p * np.sqrt(t))  # channel mean
        cols.append(w.reshape(-1))
    for u, v in picks:
        w = np.broadcast_to(np.outer(basis(u), basis(v)), (c, t, p, p)) / np.sqrt(c * t)
        cols.append(w.reshape(-1))
    return np.stack(cols, axis=1).astype(np.float32)  # [c*t*p*p, hidden]


def build_demo_model(out_dir: Path, *, seed: int, sizes, patch_init: str = "random") -> Path:
    """The demo tokenizer + a random Qwen2.5-VL of the config's sizes as an HF folder (reused when complete)."""
    import jax.numpy as jnp

    from qponder_jax.data.tokenizer import build_demo_tokenizer
    from qponder_jax.embedded import demo_model_config
    from qponder_jax.hf import save_hf
    from qponder_jax.loading import is_hf_folder
    from qponder_jax.model.qwen2_5_vl import create_model

    if is_hf_folder(out_dir):
        return out_dir
    if patch_init not in ("random", "dct"):
        raise ValueError(f"config field model.patch_init={patch_init!r}: choose 'random' or 'dct'")
    tok_dir = build_demo_tokenizer(out_dir.parent / "tokenizer")
    hidden, heads = int(sizes.hidden_size), 4
    half = hidden // heads // 2  # M-RoPE splits half the head dim over (t, h, w)
    section = (half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8)
    vision_hidden, depth = int(sizes.vision_hidden_size), int(sizes.vision_depth)
    config = demo_model_config(
        tok_dir, hidden_size=hidden, intermediate_size=int(sizes.intermediate_size),
        num_hidden_layers=int(sizes.num_layers), num_attention_heads=heads, num_key_value_heads=2,
        mrope_section=section,
        vision=dict(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, depth=depth,
                    fullatt_block_indexes=(depth - 1,)),
    )  # fmt: skip
    model = create_model(config, rngs_seed=seed)
    if patch_init == "dct":
        v = config.vision
        kernel = dct_patch_kernel((v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size), v.hidden_size)
        model.visual.patch_embed.proj.kernel[...] = jnp.asarray(kernel)
    staging = out_dir.with_name(out_dir.name + ".partial")
    save_hf(model, config, staging, tokenizer_dir=tok_dir)
    staging.rename(out_dir)
    return out_dir


def write_synthetic_split(
    where: Path, split: str, size: int, *, seed: int, min_side: int, max_side: int, distortions: str = ""
) -> Path:
    """Renders `size` records of the synthetic IQA split as PNGs in `<where>/<split>/` and an index
    `<where>/<split>.jsonl` (image, MOS, distortion type and level). Returns the index."""
    from qponder_jax.data.datasets.synthetic import SyntheticIQA

    source = SyntheticIQA(split, size, seed=seed, min_side=min_side, max_side=max_side, distortions=distortions)
    (where / split).mkdir(parents=True, exist_ok=True)
    index = where / f"{split}.jsonl"
    with open(index.with_suffix(".partial"), "w") as f:
        for i in range(size):
            record = source[i]
            image = where / split / f"{i:06d}.png"
            image.write_bytes(record["image"])
            keep = {k: record[k] for k in ("mos", "distortion_type", "distortion_level", "dataset")}
            f.write(json.dumps({"image": str(image.relative_to(where)), **keep}) + "\n")
    index.with_suffix(".partial").rename(index)
    return index


def teacher_errors(config) -> object:
    """The rule teacher's imperfections (`rule_teacher.TeacherErrors`) from the demo config's `teacher` section."""
    from qponder_jax.data.rule_teacher import TeacherErrors, parse_bias

    t = config.teacher
    return TeacherErrors(bias=parse_bias(t.bias), scale=t.scale, center=t.center, noise=t.noise,
                         severity_error=t.severity_error, level_error=t.level_error, seed=int(config.seed))  # fmt: skip


def write_cold_start(
    index: str | Path, out_jsonl: Path | None, prompt: str, *, split: str, style: str = "short", errors=None,
    tolerance: float = float("inf"),
) -> dict:  # fmt: skip
    """Runs the rule-based teacher (`data/rule_teacher.py`) over a synthetic split index and keeps the responses that
    pass the cold-start filter (`data/cold_start_filter.py`, as the `distill` job does), written with the cold-start
    JSONL writer to `out_jsonl` (None: write nothing). Returns the counts and the teacher's metrics on every record."""
    from qponder_jax.data.cold_start_filter import REASONS, judge
    from qponder_jax.data.datasets.cold_start import ColdStartRecord, ColdStartWriter
    from qponder_jax.data.datasets.synthetic import SPLITS
    from qponder_jax.data.rule_teacher import respond

    index = Path(index)
    rows = [json.loads(line) for line in index.read_text().splitlines()]
    scores, rejections = [], dict.fromkeys(REASONS, 0)
    partial = out_jsonl.with_suffix(".partial") if out_jsonl else None
    with contextlib.nullcontext() if partial is None else ColdStartWriter(partial) as writer:
        for i, row in enumerate(rows):
            kind, level, mos = row["distortion_type"], int(row["distortion_level"]), float(row["mos"])
            text, said = respond(kind, level, mos, errors=errors, key=(SPLITS[split], i), style=style)
            scores.append(said.score)
            reason, score = judge(text, mos, tolerance=tolerance)
            if reason != "ok":
                rejections[reason] += 1
            elif writer is not None:
                image = str((index.parent / row["image"]).resolve())
                writer.write(ColdStartRecord(image=image, prompt=prompt, response=text, mos=mos,
                                             dataset=str(row.get("dataset", "synthetic")), distortion_type=kind,
                                             distortion_level=level, teacher_score=score))  # fmt: skip
    if partial is not None:
        partial.rename(out_jsonl)
    kept = len(rows) - sum(rejections.values())
    teacher = metrics_row(np.asarray(scores), np.asarray([float(r["mos"]) for r in rows]))
    return {"records": len(rows), "kept": kept, "rejections": rejections, "teacher": teacher}


def metrics_row(pred: np.ndarray, mos: np.ndarray) -> dict:
    """The table's metrics of predicted scores against MOS (NaN predictions are parse failures)."""
    from qponder_jax.metrics import iqa_metrics

    m = iqa_metrics(pred, mos).as_dict()
    return {**{k: m[k] for k in ("srcc", "plcc", "krcc", "mae", "parse_failure_rate")}, "images": len(mos)}


# ---- the stages ----


def _model_stage(config, where: Path, _) -> dict:
    m = config.model
    out = build_demo_model(where / "hf", seed=int(config.seed), sizes=m, patch_init=m.patch_init)
    return {"model_dir": str(out), "note": "demo tokenizer + random Qwen2.5-VL, an HF folder"}


def _data_stage(config, where: Path, _) -> dict:
    d = config.data
    sizes = {"train": d.train_size, "validation": d.validation_size, "test": d.test_size}
    kw = dict(seed=config.seed, min_side=d.min_side, max_side=d.max_side, distortions=d.distortions)
    files = {split: str(write_synthetic_split(where, split, n, **kw)) for split, n in sizes.items()}
    return {"splits": files, "sizes": sizes}


def _cold_start_stage(config, where: Path, outputs) -> dict:
    d, t, splits = config.data, config.teacher, outputs["data"]["splits"]
    kw = dict(style=d.response_style, errors=teacher_errors(config), tolerance=t.tolerance)
    made = {split: write_cold_start(splits[split], where / f"{split}.jsonl", d.prompt_text, split=split, **kw)
            for split in ("train", "validation")}  # fmt: skip
    train = made["train"]
    test = write_cold_start(splits["test"], None, d.prompt_text, split="test", **kw)["teacher"]
    rejected = ", ".join(f"{k} {v}" for k, v in train["rejections"].items() if v) or "none"
    print(f"  [3/7 cold start] kept {train['kept']} of {train['records']} training records, those within "
          f"{t.tolerance} of the MOS (rejected: {rejected}); the teacher's SRCC on all of them "
          f"{train['teacher']['srcc']:.3f}, MAE {train['teacher']['mae']:.3f}", flush=True)  # fmt: skip
    first = json.loads((where / "train.jsonl").read_text().split("\n", 1)[0])
    return {"jsonl": {split: str(where / f"{split}.jsonl") for split in made}, "example_response": first["response"],
            "filter": {split: {k: m[k] for k in ("records", "kept", "rejections")} for split, m in made.items()},
            "teacher": {k: t[k] for k in ("bias", "scale", "center", "noise", "tolerance")},
            "teacher_train": train["teacher"], "teacher_test": test}  # fmt: skip


def _sft_stage(config, where: Path, outputs) -> dict:
    from configs import qponder_ci
    from qponder_jax.train import sft_job

    c = qponder_ci.get_config("tiny").unlock()
    c.seed = config.seed
    c.model.model_path = outputs["model"]["model_dir"]
    s, d = config.sft, config.data
    c.data.source = "jsonl"
    jsonl = outputs["cold_start"]["jsonl"]
    c.data.train_jsonl, c.data.eval_jsonl = jsonl["train"], jsonl["validation"]
    c.data.batch_size, c.data.eval_batch_size, c.data.seed = s.batch_size, 8, config.seed
    c.data.max_pixels, c.data.token_buckets = d.max_side**2, (64, 80, 96, 128)
    c.optim.peak_lr, c.optim.warmup_steps = s.peak_lr, s.warmup_steps
    c.train.total_steps, c.train.log_every, c.train.eval_every = s.total_steps, s.log_every, 0
    c.train.checkpoint_every, c.train.progress_bar = s.checkpoint_every, False
    c.lock()
    write_run_config(c, where)
    with progress("  [4/7 sft]", s.total_steps):
        result = sft_job.run(c, where)
    losses = list(result.losses.values())
    return {"status": result.status, "checkpoint": str(where), "step": int(result.state.step),
            "final_loss": float(np.mean(losses[-s.log_every:])) if losses else None}  # fmt: skip


def _grpo_stage(config, where: Path, outputs) -> dict:
    from configs import qponder
    from qponder_jax.train import grpo_job

    c = qponder.get_config("tiny").unlock()
    c.seed = config.seed
    c.init_checkpoint = outputs["sft"]["checkpoint"]
    c.model.model_path = outputs["model"]["model_dir"]
    g, d = config.grpo, config.data
    c.data.batch_size, c.data.synthetic_size, c.data.synthetic_seed = g.batch_size, d.train_size, config.seed
    c.data.synthetic_min_side, c.data.synthetic_max_side = d.min_side, d.max_side
    c.data.synthetic_distortions = d.distortions
    c.data.prompt_text, c.data.max_pixels, c.data.token_buckets = d.prompt_text, d.max_side**2, (48, 64, 96)
    c.data.seed = config.seed
    c.grpo.num_generations, c.grpo.max_new_tokens = g.num_generations, g.max_new_tokens
    c.grpo.temperature, c.grpo.beta = g.temperature, g.beta
    c.optim.peak_lr = g.peak_lr
    c.rewards.accuracy.mode, c.rewards.accuracy.sigma = g.accuracy_mode, g.accuracy_sigma
    c.rewards.consistency.weight = g.consistency_weight
    c.train.total_steps, c.train.log_every, c.train.sample_every = g.total_steps, g.log_every, g.total_steps
    c.train.checkpoint_every, c.train.progress_bar = g.checkpoint_every, False
    c.lock()
    write_run_config(c, where)
    with progress("  [5/7 grpo]", g.total_steps):
        result = grpo_job.run(c, where)
    return {"status": result.status, "checkpoint": str(where), "step": int(result.state.step)}


def _eval_stage(config, where: Path, outputs) -> dict:
    from configs import eval as eval_config
    from qponder_jax import eval as eval_lib

    d, e = config.data, config.eval
    checkpoints = {"random": outputs["model"]["model_dir"], "qponder_ci": outputs["sft"]["checkpoint"],
                   "qponder": outputs["grpo"]["checkpoint"]}  # fmt: skip
    results = {}
    for name, label in MODELS:
        report_path = where / name / "report.json"
        if not report_path.is_file():  # resume: a model already evaluated is not evaluated again
            c = eval_config.get_config("tiny").unlock()
            c.name, c.checkpoint, c.datasets = name, checkpoints[name], "synthetic:test"
            c.model.model_path = outputs["model"]["model_dir"]
            c.data.batch_size, c.data.max_images, c.data.synthetic_size = e.batch_size, d.test_size, d.test_size
            c.data.synthetic_seed = config.seed
            c.data.synthetic_min_side, c.data.synthetic_max_side = d.min_side, d.max_side
            c.data.synthetic_distortions = d.distortions
            c.data.max_pixels, c.data.token_buckets = d.max_side**2, (48, 64, 96)
            c.score.prompt_text, c.score.max_new_tokens = d.prompt_text, e.max_new_tokens
            c.lock()
            print(f"  [6/7 eval] scoring {d.test_size} test images with the {label} ...", flush=True)
            with contextlib.redirect_stdout(io.StringIO()):  # the job prints its own table; ours comes at the end
                eval_lib.run(c, where)
        summary = json.loads(report_path.read_text())["datasets"]["synthetic:test"]
        results[name] = {k: summary.get(k) for k in ("srcc", "plcc", "krcc", "mae", "parse_failure_rate", "images")}
        results[name]["report"] = str(report_path)
    results[TEACHER[0]] = outputs["cold_start"]["teacher_test"]
    print(results_table(results), flush=True)
    return {"results": results}


def _export_stage(config, where: Path, outputs) -> dict:
    from configs import export as export_config
    from qponder_jax import export

    c = export_config.get_config("tiny").unlock()
    c.checkpoint, c.out_dir, c.dtype = outputs["grpo"]["checkpoint"], str(where / "hf"), config.export_dtype
    c.eval_report = outputs["eval"]["results"]["qponder"]["report"]
    c.lock()
    with contextlib.redirect_stdout(io.StringIO()):
        result = export.run(c, where)
    print(f"  [7/7 export] Q-Ponder written to {result['out_dir']}", flush=True)
    return {"hf_dir": result["out_dir"], "step": result["step"]}


STAGES = [
    Stage("model", "build the demo tokenizer and a tiny random Qwen2.5-VL", _model_stage),
    Stage("data", "generate the synthetic IQA set (train / validation / test)", _data_stage),
    Stage("cold_start", "cold-start data: the rule-based teacher's answers near the MOS", _cold_start_stage),
    Stage("sft", "cold-start SFT -> Q-Ponder-CI", _sft_stage),
    Stage("grpo", "GRPO with the Q-Ponder reward -> Q-Ponder", _grpo_stage),
    Stage("eval", "evaluate random / Q-Ponder-CI / Q-Ponder on the test split", _eval_stage),
    Stage("export", "export Q-Ponder as a Hugging Face folder", _export_stage),
]


# ---- the summary ----


def _num(v, pct: bool = False) -> str:
    if v is None or not np.isfinite(v):
        return "n/a"
    return f"{100 * v:.1f}%" if pct else f"{v:.3f}"


def results_table(results: dict) -> str:
    rows = ["| model | SRCC | PLCC | KRCC | MAE | parse failures |", "|---|---|---|---|---|---|"]
    for name, label in (TEACHER, *MODELS):
        r = results.get(name, {})
        rows.append(f"| {label} | {_num(r.get('srcc'))} | {_num(r.get('plcc'))} | {_num(r.get('krcc'))} | "
                    f"{_num(r.get('mae'))} | {_num(r.get('parse_failure_rate'), pct=True)} |")  # fmt: skip
    return "\n".join(rows)


def _teacher_note(cold_start: dict) -> list[str]:
    """What the summary says about the teacher and the filter (older run folders lack these fields)."""
    t, train = cold_start.get("teacher"), cold_start.get("filter", {}).get("train")
    if not t or not train:
        return []
    text = (
        "The teacher row is the rule-based teacher's own scores on the same test images. Like an MLLM teacher it "
        f"errs: it shifts some distortions' scores ({t['bias'] or 'none'}), squeezes them toward {t['center']} (slope "
        f"{t['scale']}) and adds noise (std {t['noise']}). The cold start keeps its answers within {t['tolerance']} "
        f"of the MOS ({train['kept']} of {train['records']} training images), so Q-Ponder-CI inherits the errors "
        "that survive that filter; GRPO's accuracy reward scores every rollout against the MOS itself, so the second "
        "stage moves the scores of each kind of image toward the truth."
    )
    return [*textwrap.wrap(text, 112), ""]


def summary(workdir: Path, outputs: dict) -> str:
    results = outputs["eval"]["results"]
    n = results["qponder"].get("images")
    total = sum(float(o.get("seconds", 0.0)) for o in outputs.values())
    return "\n".join([
        "",
        f"Q-Ponder demo: results on {n} held-out synthetic test images (stages took {total / 60:.1f} min in all)",
        "",
        results_table(results),
        "",
        "How to read it: each model looks at an image, writes its reasoning in <think>, then a score from 1 (bad) to",
        "5 (excellent) in <answer>. SRCC / KRCC: rank correlation of the scores with the true quality (MOS); 1 means",
        "the images are put in exactly the right order, 0 means no relation. PLCC: linear correlation. MAE: mean",
        "absolute error on the 1-5 scale. Parse failures: answers with no readable score (counted, never guessed).",
        "",
        *_teacher_note(outputs["cold_start"]),
        f"Example reasoning the model was taught: {outputs['cold_start']['example_response']}",
        "",
        "Where things are:",
        f"  Q-Ponder (HF folder, loads in transformers): {outputs['export']['hf_dir']}",
        f"  evaluation reports, predictions and plots:   {Path(workdir) / '6_eval'}",
        f"  training runs (checkpoints, metrics.jsonl, TensorBoard): {outputs['sft']['checkpoint']}, "
        f"{outputs['grpo']['checkpoint']}",
    ])  # fmt: skip


def run(config, workdir) -> dict:
    """The demo job; returns {stage name: outputs}."""
    from qponder_jax.loading import orbax_warnings_hidden

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with orbax_warnings_hidden():  # orbax warns on every read-only restore; a damaged checkpoint's notice stays
        return _run(config, workdir)


def _run(config, workdir: Path) -> dict:
    if not all(read_marker(stage_dir(workdir, i, s)) is not None for i, s in enumerate(STAGES)):
        took = EXPECTED_TIME.get(config.get("variant", "default"), "")
        print(f"Q-Ponder demo in {workdir}: 7 stages{took}", flush=True)
    outputs, ran = run_stages(config, workdir, STAGES, say=lambda s: print(s, flush=True))
    print(summary(workdir, outputs), flush=True)
    if not ran:
        print(f"\nThe run in {workdir} is complete: every stage has its done.json, so nothing was run again. "
              "Use a new --workdir to start over.", flush=True)  # fmt: skip
    return outputs
