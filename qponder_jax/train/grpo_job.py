"""The `grpo` job: `qponder --config=configs/qponder.py[:variant] --workdir=DIR` (also configs/preresq.py).

Wiring only (the step is `grpo.GRPOStep`): the starting model (`init_checkpoint`: a Q-Ponder-CI HF folder or SFT
workdir, else `model.model_path`) is loaded once; it initializes the policy on a fresh run and is the frozen
reference when beta > 0 (also on resume). Prompts come from IQA or VQA sources ("name:split" specs, each batch drawn
from a single source; videos decoded and sampled by `video_inputs`), encoded with the generation prompt and
left-padded, with their normalized MOS. Checkpoints, resume, SIGTERM, non-finite handling and the train/ metrics
are the SFT loop's (`loop.run_loop`); GRPO's own metrics (reward terms, zero-std groups, parse failures, KL,
clipping, entropy, and the SRCC / PLCC of each prompt's mean score against MOS over the logging window) are written
under `grpo/`, and a decoded completion every `sample_every` steps.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from qponder_jax import prompts
from qponder_jax.errors import ConfigError
from qponder_jax.metrics import iqa_metrics
from qponder_jax.train import loop, optim, video_inputs
from qponder_jax.train import state as state_lib
from qponder_jax.train.grpo import GRPOSettings, GRPOStep, RewardTerm, jit_grpo_step
from qponder_jax.train.grpo_loss import LossConfig
from qponder_jax.train.logging import MetricLogger

_HOST_ARRAYS = ("scores", "score_in_range", "mos", "sample_tokens", "sample_mask")  # step outputs that are not scalars


def settings_from_config(config, *, stop_ids: tuple[int, ...], pad_id: int) -> GRPOSettings:
    """GRPOSettings from a config's `grpo` and `rewards` sections."""
    g = config.grpo
    loss = LossConfig(
        eps_low=float(g.eps_low),
        eps_high=float(g.eps_high),
        beta=float(g.beta),
        kl_estimator=str(g.kl_estimator),
        aggregation=str(g.aggregation),
        norm_length=int(g.norm_length or g.max_new_tokens),
        temperature=float(g.temperature),
    )
    rewards = tuple(
        RewardTerm(str(name), float(sec["weight"]), tuple((k, v) for k, v in sec.items() if k != "weight"))
        for name, sec in config.rewards.items()
        if float(sec["weight"]) != 0.0
    )
    try:
        return GRPOSettings(
            num_generations=int(g.num_generations),
            max_new_tokens=int(g.max_new_tokens),
            temperature=float(g.temperature),
            top_k=int(g.top_k),
            top_p=float(g.top_p),
            num_iterations=int(g.num_iterations),
            num_minibatches=int(g.num_minibatches),
            share_prompts=bool(g.get("share_prompts", True)),
            score_range=tuple(float(x) for x in g.get("score_range", (1.0, 5.0))),
            sampling_layout=str(config.get("sampling_layout", "auto")),
            advantage_std=str(g.advantage_std),
            advantage_eps=float(g.advantage_eps),
            score_numbers=int(g.score_numbers),
            stop_ids=tuple(stop_ids),
            pad_id=int(pad_id),
            loss=loss,
            rewards=rewards,
        )
    except ValueError as e:
        raise ConfigError(f"config sections grpo / rewards: {e}") from e


class EncodePrompt:
    """IQA or VQA record -> (the prompt encoded with the generation prompt, {"mos": normalized MOS}); picklable.
    A VQA record comes decoded (`video_inputs.DecodedVideos`): its clip, then its key-frame crops, then the text."""

    def __init__(self, processor, text: str):
        self.processor, self.text = processor, text

    def __call__(self, record: dict):
        from qponder_jax.data.datasets import decode_image

        if video_inputs.is_video_record(record):
            ex = video_inputs.encode_record(self.processor, self.text, record)
            return ex, {"mos": np.float32(record["mos"])}
        name = record.get("image_name", "")
        try:
            image = decode_image(record["image"])
        except (OSError, ValueError) as e:
            raise ValueError(f"grpo data: record {name!r}: undecodable image ({e})") from e
        ex = self.processor.encode(
            prompts.image_messages(self.text), [image], add_generation_prompt=True, example_id=name
        )
        return ex, {"mos": np.float32(record["mos"])}


def dataset_specs(data: Mapping) -> tuple[str, ...]:
    specs = tuple(s.strip() for s in str(data["datasets"]).split(",") if s.strip())
    if not specs:
        raise ConfigError("config field data.datasets is empty: give comma-separated name:split specs")
    return specs


class HostMetrics:
    """`after_step` hook: averages GRPO scalars over the logging window, SRCC / PLCC of each prompt's mean parsed,
    in-range score against MOS over the window, and a decoded completion every `sample_every` steps."""

    def __init__(self, logger: MetricLogger, processor, *, log_every: int, sample_every: int, total_steps: int):
        self.logger, self.processor = logger, processor
        self.log_every, self.sample_every, self.total_steps = log_every, sample_every, total_steps
        self._reset()

    def _reset(self):
        self.sums: dict[str, float] = {}
        self.count = 0
        self.pred: list[np.ndarray] = []
        self.mos: list[np.ndarray] = []

    def __call__(self, step: int, metrics: dict) -> None:
        mos = np.asarray(metrics["mos"], np.float64)  # [B], the global batch's
        scores = np.asarray(metrics["scores"], np.float64)  # [B, G]
        valid = np.isfinite(scores) & np.asarray(metrics["score_in_range"], bool)  # out-of-range scores left out
        total = np.where(valid, scores, 0.0).sum(1)
        group_mean = np.where(valid.any(1), total / np.maximum(valid.sum(1), 1), np.nan)
        self.pred.append(group_mean)
        self.mos.append(mos)
        for k, v in metrics.items():
            if k not in _HOST_ARRAYS and np.ndim(v) == 0:
                self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.count += 1
        if step % self.log_every == 0 or step == self.total_steps:
            m = iqa_metrics(np.concatenate(self.pred), np.concatenate(self.mos))
            scalars = {k: v / self.count for k, v in self.sums.items() if k not in ("finite",)}
            scalars.update(srcc=m.srcc, plcc=m.plcc)
            self.logger.write(step, {k: (None if not np.isfinite(v) else v) for k, v in scalars.items()}, prefix="grpo")
            self._reset()
        if self.sample_every and (step % self.sample_every == 0 or step == 1):
            tokens = np.asarray(metrics["sample_tokens"])[np.asarray(metrics["sample_mask"], bool)]
            text = self.processor.decode(tokens, skip_special_tokens=False)
            self.logger.text(f"grpo step {step} sample (MOS {float(mos[0]):.2f}): {text!r}")


def run(config, workdir) -> loop.LoopResult:
    """GRPO from a configs/qponder.py or configs/preresq.py config; resumes from `<workdir>/checkpoints`."""
    from qponder_jax.data import pipeline
    from qponder_jax.evaluation.scoring import stop_ids as stop_ids_of
    from qponder_jax.loading import load_checkpoint, make_processor
    from qponder_jax.model import sharding
    from qponder_jax.rewards.parse import build_parser

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = sharding.make_mesh(tuple(config.mesh))
    d, t = config.data, config.train
    if not config.init_checkpoint and not config.model.model_path:
        raise ConfigError(
            "config field init_checkpoint is empty (and model.model_path too): GRPO starts from a Q-Ponder-CI "
            "checkpoint. Pass --config.init_checkpoint=<an SFT workdir of configs/qponder_ci.py, or an HF folder>"
        )
    loaded = load_checkpoint(config.init_checkpoint, model_cfg=config.model, workdir=workdir, mesh=mesh)
    proc = make_processor(loaded.tokenizer_dir, d)
    settings = settings_from_config(config, stop_ids=stop_ids_of(proc, loaded.config), pad_id=proc.pad_token_id)
    n_rollouts = d.batch_size * settings.num_generations
    if n_rollouts % settings.num_minibatches:
        raise ConfigError(
            f"config: data.batch_size ({d.batch_size}) x grpo.num_generations ({settings.num_generations}) must be a "
            f"multiple of grpo.num_minibatches ({settings.num_minibatches})"
        )
    parser = build_parser(
        proc.tokenizer, max_numbers=int(config.grpo.max_numbers), vocab_size=loaded.config.text.vocab_size
    )
    parser = jax.device_put(parser, NamedSharding(mesh, PartitionSpec()))  # once, replicated
    text = d.prompt_text or prompts.prompt_text(d.prompt)
    sources = [video_inputs.open_training_source(spec, d, workdir) for spec in dataset_specs(d)]  # videos decoded
    collate = pipeline.collate_pairs(functools.partial(proc.collate, padding_side="left"))
    data = pipeline.make_loader(
        sources if len(sources) > 1 else sources[0],
        batch_size=d.batch_size,
        transform=EncodePrompt(proc, text),
        collate=collate,
        seed=d.seed,
        single_dataset_batches=True,
        worker_count=int(d.worker_count),
        padding=pipeline.Padding("left", proc.pad_token_id),  # processes agree on each batch's buckets
    )

    graphdef, params, rest = state_lib.split_model(loaded.model)
    total_updates = t.total_steps * settings.updates_per_step
    tx, schedule, labels = optim.from_config(config.optim, params, total_steps=total_updates)
    abstract = state_lib.abstract_train_state(params, tx, state_lib.param_shardings(loaded.model, mesh), mesh)
    ckpt = state_lib.Checkpointer(
        workdir / "checkpoints", max_to_keep=t.keep_checkpoints, async_save=t.async_checkpoints
    )
    state = loop.restore_or_keep(ckpt, abstract, data)
    if state is None:  # a copy: the step donates the state, the reference must survive
        state = state_lib.init_train_state(jax.tree.map(lambda x: x.copy(), params), tx, abstract, seed=config.seed)
    ref_params = params if settings.loss.beta > 0 else None
    del loaded
    step_fn = jit_grpo_step(
        GRPOStep(graphdef, rest, tx, schedule, labels, settings), state_lib.shardings_of(abstract), mesh
    )
    train_step = lambda st, item: step_fn(st, item[0], item[1]["mos"], parser, ref_params)

    logger = MetricLogger(
        workdir, total_steps=t.total_steps, initial_step=int(state.step), progress=None if t.progress_bar else False
    )
    host = HostMetrics(logger, proc, log_every=t.log_every, sample_every=int(t.sample_every), total_steps=t.total_steps)
    settings_loop = loop.LoopSettings(
        total_steps=t.total_steps,
        log_every=t.log_every,
        eval_every=0,
        checkpoint_every=t.checkpoint_every,
        max_consecutive_nonfinite=t.max_consecutive_nonfinite,
    )
    logger.text(
        f"grpo: model {config.init_checkpoint or config.model.model_path}, mesh {dict(mesh.shape)}, "
        f"{d.batch_size} prompts x {settings.num_generations} rollouts per step, "
        f"rewards {[(r.name, r.weight) for r in settings.rewards]}, " + loop.start_line(int(state.step), t.total_steps)
    )
    try:
        with state_lib.PreemptionHandler() as preemption:
            return loop.run_loop(
                state, train_step, data, settings_loop, checkpointer=ckpt, logger=logger,
                place=lambda item: pipeline.to_global(item, mesh),
                preemption=preemption, after_step=host,
            )  # fmt: skip
    finally:
        ckpt.close()
        logger.close()
        data.close()
