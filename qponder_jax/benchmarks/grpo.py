"""`grpo`: one whole GRPO step (rollout of G samples per prompt, rewards, advantages, update) of ours against TRL's
`GRPOTrainer` on the same random model, prompts (one image each), G, completion length and beta.

Ours: `train.grpo.GRPOStep` under `jit_grpo_step` (one jit). The split is measured with its own pieces, jitted
alone on the same inputs: `rollout` (sampling + scoring) and `score_rollouts` + `group_advantages` (reward); rollout =
rollout piece - reward piece, update = whole step - rollout piece (reference log-probs + the optimizer updates).
TRL (`pip install trl`, CPU, transformers generation, as a user without vLLM runs it): `_generate` is timed as the
rollout, `_calculate_rewards` as the reward (a Python regex reward of the same format + accuracy terms), and the rest
of each optimizer step (reference and policy forward/backward, AdamW) as the update. Both sides sample at
temperature 1 and are forced to full length (no stop token; TRL with min_new_tokens), so they do the same work.
TRL is skipped with a clear message when it is not installed.
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from qponder_jax.benchmarks.common import (
    SIZES,
    device_peak,
    environment,
    image_prompts,
    median,
    print_table,
    prompt_text,
    random_images,
    random_setup,
    row,
    timed,
)  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--generations", type=int, default=4, help="G samples per prompt")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--beta", type=float, default=0.04, help="KL coefficient (> 0 runs the reference model)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-reference", action="store_true", help="skip TRL")
    parser.add_argument("--seed", type=int, default=0)


def _ours(args, proc, config, model, batch, mos) -> dict:
    import optax

    from qponder_jax.model import sharding
    from qponder_jax.rewards.advantages import group_advantages
    from qponder_jax.rewards.parse import build_parser
    from qponder_jax.train import grpo, optim
    from qponder_jax.train import state as state_lib
    from qponder_jax.train.grpo_loss import LossConfig

    settings = grpo.GRPOSettings(
        num_generations=args.generations, max_new_tokens=args.new_tokens, temperature=1.0, stop_ids=(),
        pad_id=proc.pad_token_id, loss=LossConfig(beta=args.beta),
        rewards=(grpo.RewardTerm("format"), grpo.RewardTerm("accuracy")),
    )  # fmt: skip
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    graphdef, params, rest = state_lib.split_model(model)
    labels = jax.tree.map(lambda _: optim.TRAIN, params)
    tx = optim.adamw(labels, learning_rate=1e-6)
    abstract = state_lib.abstract_train_state(params, tx, state_lib.param_shardings(model, mesh), mesh)
    state = state_lib.init_train_state(params, tx, abstract, seed=args.seed)
    ref = jax.tree.map(jnp.copy, state.params) if args.beta > 0 else None  # not aliased to the donated state
    step = grpo.GRPOStep(graphdef, rest, tx, optax.constant_schedule(1e-6), labels, settings)
    fn = grpo.jit_grpo_step(step, state_lib.shardings_of(abstract), mesh)
    parser = build_parser(proc.tokenizer, max_numbers=5, vocab_size=config.text.vocab_size)
    batch, mos = jax.device_put((batch, jnp.asarray(mos)))
    holder = {"state": state}

    def whole():
        holder["state"], metrics = fn(holder["state"], batch, mos, parser, ref)
        jax.block_until_ready(metrics["loss"])

    rollout_fn = jax.jit(step.rollout)

    def reward_pieces(parser, tokens, mask, mos):
        _, _, _, total = grpo.score_rollouts(settings, parser, tokens, mask, mos)
        return group_advantages(total, std=settings.advantage_std, eps=settings.advantage_eps)

    reward_fn = jax.jit(reward_pieces)
    key = jax.random.key(args.seed)
    with jax.set_mesh(mesh):
        ro = rollout_fn(holder["state"].params, batch, mos, key, parser)
        rollout_s = timed(lambda: jax.block_until_ready(rollout_fn(holder["state"].params, batch, mos, key, parser)),
                          args.repeats)  # fmt: skip
        reward_s = timed(lambda: jax.block_until_ready(reward_fn(parser, ro.tokens, ro.mask, mos)), args.repeats)
    step_s = timed(whole, args.repeats)
    step_m, roll_m, rew_m = median(step_s), median(rollout_s), median(reward_s)
    return {"step": step_m, "rollout": roll_m - rew_m, "reward": rew_m, "update": max(step_m - roll_m, 0.0),
            "all_step_seconds": step_s}  # fmt: skip


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_FORMAT = re.compile(r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", re.S)


def _trl_rewards(completions, mos, **_):
    """format + accuracy (|score - MOS| < 0.35) from the completion text, like ours."""
    out = []
    for completion, target in zip(completions, mos, strict=True):
        text = completion if isinstance(completion, str) else completion[-1]["content"]
        answers = re.findall(r"<answer>(.*?)</answer>", text, re.S)
        numbers = _NUMBER.findall(answers[-1]) if answers else []
        score = float(numbers[0]) if numbers else None
        fmt = float(bool(_FORMAT.fullmatch(text)) and score is not None)
        out.append(fmt + float(score is not None and abs(score - target) < 0.35))
    return out


def _trl(args, proc, torch_model, mos, tmp) -> dict | str:
    """TRL's GRPOTrainer timings, or a message saying why it did not run."""
    try:
        import trl
    except ImportError:
        return "TRL is not installed (pip install trl): reference side skipped"
    from datasets import Dataset
    from transformers import AutoTokenizer, Qwen2_5_VLProcessor, TrainerCallback
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    class ImageOnlyProcessor(Qwen2_5_VLProcessor):  # no video processor (it would need torchvision)
        def check_argument_for_proper_class(self, name, arg):
            return None

    tok = AutoTokenizer.from_pretrained(tmp + "/tokenizer")
    cfg = proc.image_config
    image_proc = Qwen2VLImageProcessorPil(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    processor = ImageOnlyProcessor(image_processor=image_proc, tokenizer=tok, video_processor=None,
                                   chat_template=tok.chat_template)  # fmt: skip
    images = random_images(args.prompts, args.image_size, args.seed)
    text = prompt_text(proc, args.prompt_tokens, images[0])
    steps = args.repeats + 1
    rows = [{"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}],
             "image": images[i % args.prompts], "mos": float(mos[i % args.prompts])}
            for i in range(args.prompts * steps)]  # fmt: skip
    config = trl.GRPOConfig(
        output_dir=tmp + "/trl", per_device_train_batch_size=args.prompts * args.generations,
        num_generations=args.generations, max_completion_length=args.new_tokens, beta=args.beta,
        learning_rate=1e-6, temperature=1.0, max_steps=steps, use_cpu=True, report_to="none", save_strategy="no",
        logging_steps=1, bf16=False, fp16=False, generation_kwargs={"min_new_tokens": args.new_tokens},
        disable_tqdm=True, seed=args.seed, shuffle_dataset=False, dataloader_num_workers=0,
    )  # fmt: skip
    trainer = trl.GRPOTrainer(model=torch_model, reward_funcs=_trl_rewards, args=config,
                              train_dataset=Dataset.from_list(rows), processing_class=processor)  # fmt: skip
    times = {"rollout": [], "reward": [], "step": []}

    def timing(name, fn):
        def wrapped(*a, **kw):
            start = time.perf_counter()
            out = fn(*a, **kw)
            times[name].append(time.perf_counter() - start)
            return out

        return wrapped

    trainer._generate = timing("rollout", trainer._generate)
    trainer._calculate_rewards = timing("reward", trainer._calculate_rewards)

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **kw):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **kw):
            times["step"].append(time.perf_counter() - self.start)

    trainer.add_callback(StepTimer())
    trainer.train()
    pick = lambda name: median(times[name][1:])  # the first step warms up
    step_m, roll_m, rew_m = pick("step"), pick("rollout"), pick("reward")
    return {"step": step_m, "rollout": roll_m, "reward": rew_m, "update": step_m - roll_m - rew_m,
            "all_step_seconds": times["step"][1:], "trl": trl.__version__}  # fmt: skip


def run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        proc, config, model, torch_model = random_setup(args.size, args.seed, tmp, with_torch=not args.no_reference)
        _, batch = image_prompts(proc, args.prompts, args.prompt_tokens, args.image_size, args.seed)
        mos = np.random.default_rng(args.seed).uniform(1.0, 5.0, args.prompts).astype(np.float32)
        ours = _ours(args, proc, config, model, batch, mos)
        ref = "skipped (--no-reference)" if args.no_reference else _trl(args, proc, torch_model, mos, tmp)
    completions = args.prompts * args.generations
    ref_d = ref if isinstance(ref, dict) else {}
    rows = [row(f"{k} seconds", ours[k], ref_d.get(k), "s", higher_is_better=False)
            for k in ("step", "rollout", "reward", "update")]  # fmt: skip
    rows.append(row("completion tokens/s (whole step)", completions * args.new_tokens / ours["step"],
                    completions * args.new_tokens / ref_d["step"] if ref_d else None, "tokens/s"))  # fmt: skip
    return {
        "what": "grpo",
        "size": args.size,
        "workload": {
            "prompts": args.prompts,
            "generations": args.generations,
            "prompt_tokens": args.prompt_tokens,
            "image_size": args.image_size,
            "new_tokens": args.new_tokens,
            "beta": args.beta,
            "repeats": args.repeats,
            "sampling": "temperature 1, full length",
        },  # fmt: skip
        "ours": ours,
        "reference": ref_d or None,
        "reference_note": None if ref_d else ref,
        "table": rows,
        "device": device_peak(),
        "environment": environment(torch_needed=not args.no_reference),
    }


def show(result: dict) -> None:
    w = result["workload"]
    title = (
        f"grpo [{result['size']}]: {w['prompts']} prompts x G {w['generations']}, prompt {w['prompt_tokens']} tokens, "
        f"{w['new_tokens']} new tokens, beta {w['beta']}, median of {w['repeats']}"
    )
    print_table(title, result["table"], "ours", "TRL")
    if result["reference_note"]:
        print(result["reference_note"])
