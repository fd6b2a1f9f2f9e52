"""The `sft` job: cold-start SFT (Q-Ponder-CI) from a configs/qponder_ci.py config.

    qponder --config=configs/qponder_ci.py[:variant] --workdir=DIR

Wires the cold-start records (a JSONL from `distill`, or the rule teacher's synthetic set), the processor, the grain
loader and the model to the jitted step of `train/sft.py`, and runs the shared training loop (checkpoints, resume,
preemption, metrics).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax

from qponder_jax.errors import ConfigError
from qponder_jax.model import sharding
from qponder_jax.train import loop, optim
from qponder_jax.train import state as state_lib
from qponder_jax.train.logging import FlopModel, MetricLogger, peak_flops_per_device
from qponder_jax.train.sft import SFTStep, jit_eval_step, jit_train_step


class EncodeColdStart:
    """Cold-start record (image bytes, prompt, response) -> an encoded `Example` (picklable for grain workers)."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, record: dict):
        from qponder_jax import prompts
        from qponder_jax.data.datasets.images import decode_image

        messages = prompts.image_messages(record["prompt"], response=record["response"])
        image = decode_image(record["image"])
        return self.processor.encode(messages, [image], example_id=record["image_name"])


def cold_start_sources(data_cfg, workdir: Path):
    """(train source, eval source or None) of cold-start records for a config's `data` section."""
    from qponder_jax.data.datasets.cold_start import ColdStartSource
    from qponder_jax.data.rule_teacher import write_synthetic_cold_start

    if data_cfg.source == "synthetic":
        kw = dict(
            seed=data_cfg.synthetic_seed,
            prompt_name=data_cfg.prompt,
            min_side=data_cfg.synthetic_min_side,
            max_side=data_cfg.synthetic_max_side,
            distortions=data_cfg.get("synthetic_distortions", ""),
        )
        train_path = write_synthetic_cold_start(workdir / "data", "train", data_cfg.synthetic_train_size, **kw)
        eval_path = write_synthetic_cold_start(workdir / "data", "validation", data_cfg.synthetic_eval_size, **kw)
    elif data_cfg.source == "jsonl":
        if not data_cfg.train_jsonl:
            raise ConfigError("config field data.train_jsonl is empty: data.source='jsonl' needs a cold-start JSONL")
        train_path, eval_path = Path(data_cfg.train_jsonl), Path(data_cfg.eval_jsonl) if data_cfg.eval_jsonl else None
    else:
        raise ConfigError(f"config field data.source={data_cfg.source!r}: choose 'synthetic' or 'jsonl'")
    strict = bool(data_cfg.strict_images)
    train = ColdStartSource(train_path, strict=strict)
    return train, (ColdStartSource(eval_path, strict=strict) if eval_path else None)


def run(config, workdir) -> loop.LoopResult:
    """Cold-start SFT from a `configs/qponder_ci.py` config; resumes from `<workdir>/checkpoints` if present."""
    import itertools

    from qponder_jax import embedded
    from qponder_jax.data import pipeline
    from qponder_jax.data.processing import Buckets, Processor
    from qponder_jax.hf import load_hf

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = sharding.make_mesh(tuple(config.mesh))
    d, t = config.data, config.train
    batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
    if d.batch_size % (t.grad_accum * batch_devices) or d.eval_batch_size % batch_devices:
        raise ConfigError(
            f"config: data.batch_size={d.batch_size} must be a multiple of train.grad_accum ({t.grad_accum}) x the "
            f"{batch_devices} data*fsdp devices, and data.eval_batch_size={d.eval_batch_size} of the devices"
        )
    model_dir, tok_dir = embedded.resolve_model_dir(config.model, workdir)
    train_src, eval_src = cold_start_sources(d, workdir)
    buckets = Buckets(tokens=tuple(d.token_buckets), patches=tuple(d.patch_buckets), images=tuple(d.image_buckets))
    proc = Processor.from_pretrained(tok_dir, buckets=buckets, truncation=bool(d.truncation))
    pixels = {k: int(v) for k, v in (("min_pixels", d.min_pixels), ("max_pixels", d.max_pixels)) if v > 0}
    proc.image_config = dataclasses.replace(proc.image_config, **pixels)
    loader_kw = dict(transform=EncodeColdStart(proc), collate=proc.collate, worker_count=int(d.worker_count))
    loader_kw["padding"] = pipeline.Padding("right", proc.pad_token_id)  # processes agree on each batch's buckets
    data = pipeline.make_loader(train_src, batch_size=d.batch_size, seed=d.seed, **loader_kw)

    abstract_model, model_config = embedded.abstract_model(config.model, model_dir)
    graphdef, abs_params, rest = state_lib.split_model(abstract_model)
    if jax.tree.leaves(rest):
        raise NotImplementedError(f"{model_dir}: the model has non-parameter state, which SFT does not carry")
    tx, schedule, labels = optim.from_config(config.optim, abs_params, total_steps=t.total_steps)
    abstract = state_lib.abstract_train_state(abs_params, tx, state_lib.param_shardings(abstract_model, mesh), mesh)
    ckpt = state_lib.Checkpointer(
        workdir / "checkpoints", max_to_keep=t.keep_checkpoints, async_save=t.async_checkpoints
    )
    state = loop.restore_or_keep(ckpt, abstract, data)
    if state is None:
        model, _ = load_hf(model_dir, mesh=mesh, **embedded.model_kwargs(config.model))
        state = state_lib.init_train_state(state_lib.split_model(model)[1], tx, abstract, seed=config.seed)
        del model
    step = SFTStep(
        graphdef, rest, tx, schedule, labels, grad_accum=t.grad_accum, logprob_chunk=int(t.get("logprob_chunk", 0))
    )
    train_step = jit_train_step(step, state_lib.shardings_of(abstract), mesh)
    place = lambda b: pipeline.to_global(b, mesh)

    eval_fn = None
    if eval_src is not None:
        eval_step = jit_eval_step(step, state_lib.shardings_of(abstract).params, mesh)

        def eval_fn(st):
            batches = pipeline.make_loader(
                eval_src, batch_size=d.eval_batch_size, shuffle=False, num_epochs=1, **loader_kw
            )
            limited = itertools.islice(batches, d.eval_max_batches or None)
            return loop.mean_eval_loss(jax.device_get([eval_step(st.params, place(b)) for b in limited]))

    flops = FlopModel.from_params(abs_params, labels, merge_unit=model_config.vision.merge_unit)
    logger = MetricLogger(
        workdir, total_steps=t.total_steps, initial_step=int(state.step), progress=None if t.progress_bar else False
    )
    settings = loop.LoopSettings(
        total_steps=t.total_steps,
        log_every=t.log_every,
        eval_every=t.eval_every,
        checkpoint_every=t.checkpoint_every,
        max_consecutive_nonfinite=t.max_consecutive_nonfinite,
    )
    logger.text(f"sft: model {model_dir}, mesh {dict(mesh.shape)}, {loop.start_line(int(state.step), t.total_steps)}")
    try:
        with state_lib.PreemptionHandler() as preemption:
            return loop.run_loop(
                state, train_step, data, settings, checkpointer=ckpt, logger=logger, place=place, eval_fn=eval_fn,
                flop_model=flops, peak_flops=peak_flops_per_device(t.peak_flops_per_device), preemption=preemption,
            )  # fmt: skip
    finally:
        ckpt.close()
        logger.close()
        data.close()
