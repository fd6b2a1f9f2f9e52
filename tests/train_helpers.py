"""Shared pieces for the trainer tests: tiny model setup, hand-built image+text batches, a resumable list iterator."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from qponder_jax.data.batch import Batch
from qponder_jax.model import sharding
from qponder_jax.model.config import tiny_config
from qponder_jax.model.qwen2_5_vl import Qwen25VL
from qponder_jax.model.vision_layout import sample_layout
from qponder_jax.train import optim
from qponder_jax.train import state as train_state
from qponder_jax.train.sft import SFTStep, jit_train_step

GRID = (1, 4, 4)  # one 56x56 image: 16 patches -> 4 <|image_pad|> tokens


def make_batch(rng: np.random.Generator, config, *, batch_size: int = 8, seq_len: int = 24) -> Batch:
    """One image per sample, a random prompt, then an 'assistant' span that copies the prompt (the loss targets).

    Positions are 1-D (same on the three M-RoPE rows); the model does not care for training purposes.
    """
    v = config.vision
    n_img = int(np.prod(GRID)) // v.merge_unit
    patches = int(np.prod(GRID))
    ids = np.zeros((batch_size, seq_len), np.int32)
    attn = np.zeros((batch_size, seq_len), bool)
    loss = np.zeros((batch_size, seq_len), bool)
    feat = np.full((batch_size, seq_len), -1, np.int32)
    pix = rng.normal(size=(batch_size, patches, v.patch_dim)).astype(np.float32)
    layouts = [
        sample_layout(GRID, patches, spatial_merge_size=v.spatial_merge_size, window_size=v.window_size,
                      patch_size=v.patch_size)
        for _ in range(batch_size)
    ]  # fmt: skip
    for b in range(batch_size):
        prompt_len = int(rng.integers(3, 6))
        prompt = rng.integers(10, 60, size=prompt_len)
        seq = [config.vision_start_token_id] + [config.image_token_id] * n_img + [config.vision_end_token_id]
        seq += list(prompt) + [7] + list(prompt) + [8]
        n = len(seq)
        ids[b, :n] = seq
        attn[b, :n] = True
        loss[b, n - prompt_len - 1 : n] = True  # the copied prompt and the end token
        feat[b, 1 : 1 + n_img] = layouts[b].merged_rows[0]
    pos = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (3, batch_size, seq_len)).copy()
    return Batch(
        input_ids=ids,
        attention_mask=attn,
        position_ids=pos,
        rope_deltas=np.zeros((batch_size,), np.int32),
        loss_mask=loss,
        pixel_values=pix,
        image_grid_thw=np.tile(np.array([[GRID]], np.int32), (batch_size, 1, 1)),
        vision_pos_ids=np.stack([lay.vision_pos_ids for lay in layouts]),
        window_index=np.stack([lay.window_index for lay in layouts]),
        window_segment_ids=np.stack([lay.window_segment_ids for lay in layouts]),
        full_segment_ids=np.stack([lay.full_segment_ids for lay in layouts]),
        image_feature_index=feat,
    )


class ListIterator:
    """Cycles through a list of batches; its position is checkpointable like a grain iterator's."""

    def __init__(self, batches):
        self.batches = list(batches)
        self.index = 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = self.batches[self.index % len(self.batches)]
        self.index += 1
        return batch

    def get_state(self):
        return {"index": self.index}

    def set_state(self, state):
        self.index = int(state["index"])


def optim_cfg(**overrides) -> dict:
    cfg = dict(
        peak_lr=3e-3,
        warmup_steps=2,
        end_lr_ratio=0.1,
        b1=0.9,
        b2=0.99,
        eps=1e-8,
        weight_decay=0.01,
        clip_norm=1.0,
        freeze=(),
        freeze_regex="",
    )
    cfg.update(overrides)
    return cfg


def random_model(config, mesh, *, seed: int = 0):
    """(graphdef, host params, rest, param shardings) for `config`, without compiling an initializer: the model is
    built abstractly and every parameter drawn on the host (N(0, 0.02); RMSNorm scales at 1)."""
    abstract = nnx.eval_shape(lambda: Qwen25VL(config, rngs=nnx.Rngs(0)))
    graphdef, abs_params, rest = train_state.split_model(abstract)
    shards = train_state.param_shardings(abstract, mesh)
    rng = np.random.default_rng(seed)

    def draw(path, x):
        if path[-1].key == "weight":
            return np.ones(x.shape, x.dtype)
        return (0.02 * rng.standard_normal(x.shape)).astype(x.dtype)

    return graphdef, jax.tree_util.tree_map_with_path(draw, abs_params), rest, shards


class Run:
    """The tiny model's SFT step on one mesh. `fresh_state()` gives a new step-0 state (the step donates its input);
    `step_fn` is jitted once per Run and reused."""

    def __init__(self, mesh_shape=(1, 1, 1), *, total_steps=10, grad_accum=1, seed=0, config=None, **optim_kw):
        config = config or tiny_config()
        self.mesh = sharding.make_mesh(mesh_shape, jax.devices()[: int(np.prod(mesh_shape))])
        graphdef, self.host_params, rest, shards = random_model(config, self.mesh, seed=seed)
        self.tx, schedule, labels = optim.from_config(optim_cfg(**optim_kw), self.host_params, total_steps=total_steps)
        self.abstract = train_state.abstract_train_state(self.host_params, self.tx, shards, self.mesh)
        self.step = SFTStep(graphdef, rest, self.tx, schedule, labels, grad_accum=grad_accum)
        self.seed = seed
        self._fn = None

    def fresh_state(self):
        return train_state.init_train_state(self.host_params, self.tx, self.abstract, seed=self.seed)

    def step_fn(self, example_batch):
        if self._fn is None:
            self._fn = jit_train_step(self.step, train_state.shardings_of(self.abstract), self.mesh)
        return self._fn
