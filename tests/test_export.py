"""Export: a tiny model trained a few SFT steps on a (1,2,2) mesh, checkpointed with orbax, restored sharded on another
mesh and exported; transformers loads the folder with logits equal to ours, AutoTokenizer loads its tokenizer, and the
model card carries the run's config and eval table. Plus the errors on bad checkpoints."""

import json
import shutil

import jax
import numpy as np
import pytest
import torch
from PIL import Image
from torch_ref import torch_logits
from train_helpers import Run, make_batch
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

from qponder_jax import export, loading, prompts
from qponder_jax.data.processing import Processor
from qponder_jax.embedded import build_tiny_model
from qponder_jax.model.config import Qwen25VLConfig, tiny_config
from qponder_jax.model.qwen2_5_vl import Qwen25VL
from qponder_jax.model.sharding import make_mesh
from qponder_jax.train import state as ts

STEPS = 3
TABLE = "| synthetic:test | 0.8123 | 0.8001 |"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(run folder, initial params, trained params, SFT Run) after STEPS updates on a (1,2,2) mesh, checkpointed."""
    run_dir = tmp_path_factory.mktemp("run")
    base = build_tiny_model(run_dir / "tiny_model")
    config = Qwen25VLConfig.from_json_file(base / "config.json")
    run = Run((1, 2, 2), total_steps=STEPS, config=config, peak_lr=1e-2)
    rng = np.random.default_rng(0)
    batches = [make_batch(rng, config) for _ in range(STEPS)]
    state = run.fresh_state()
    initial = jax.device_get(state.params)
    step = run.step_fn(batches[0])
    for batch in batches:
        state, metrics = step(state, batch)
        assert bool(metrics["finite"])
    ckpt = ts.Checkpointer(run_dir / "checkpoints")
    ckpt.save(state, {"index": STEPS})
    ckpt.close()
    run_config = {"job": "sft", "model": {"model_path": "embedded:tiny", "tokenizer_path": "", "seed": 0}}
    run_config["optim"] = {"peak_lr": 1e-2}
    (run_dir / "config.json").write_text(json.dumps(run_config))
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "report.json").write_text(json.dumps({"table_markdown": f"### eval\n\n{TABLE}\n"}))
    return run_dir, initial, jax.device_get(state.params), run


def _image_example(proc):
    pixels = np.random.default_rng(5).integers(0, 256, (70, 98, 3), np.uint8)
    messages = prompts.image_messages("Rate it.", response="<think>It is fair.</think><answer>3.10</answer>")
    return proc.encode(messages, [Image.fromarray(pixels)])


def test_export_round_trip_matches_transformers(trained, tmp_path):
    from configs.export import get_config

    run_dir, initial, params, run = trained
    config = get_config("tiny")
    config.checkpoint = str(run_dir)
    config.mesh = (1, 4, 2)  # not the training mesh
    config.max_shard_gb = 60_000 / 2**30  # several shards
    result = export.run(config, tmp_path)
    out = tmp_path / "hf"
    assert result == {"out_dir": str(out), "step": STEPS}
    for name in ("model.safetensors.index.json", "config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "preprocessor_config.json", "README.md"):  # fmt: skip
        assert (out / name).is_file(), name
    shards = set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert len(shards) > 2

    moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(initial), jax.tree.leaves(params)))
    assert moved > 1e-3  # training changed the weights, so the export is not the initial model

    proc = Processor.from_pretrained(out)  # exported tokenizer, chat template and preprocessor config
    ex = _image_example(proc)
    batch = proc.collate([ex])
    ours_model = jax.tree.map(np.asarray, params)
    from flax import nnx

    ours = np.asarray(nnx.merge(run.step.graphdef, ours_model, run.step.rest)(batch))[0, : len(ex)]
    torch_model = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, attn_implementation="eager").eval()
    assert next(torch_model.parameters()).dtype == torch.float32
    ref = torch_logits(torch_model, ex.input_ids[None], np.ones((1, len(ex)), bool), ex.position_ids[:, None],
                       pixel_values=ex.pixel_values, image_grid_thw=ex.image_grid_thw)[0]  # fmt: skip
    diff = float(np.abs(ours - ref).max())
    print(f"export round trip: transformers vs ours max abs logit diff {diff:.2e}")
    assert diff <= 1e-4

    tok = AutoTokenizer.from_pretrained(out)
    text = "<think>The image is slightly blurry; quality is good.</think><answer>3.85</answer>"
    assert tok.encode(text, add_special_tokens=False) == proc.tokenizer.encode(text, add_special_tokens=False)
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text and tok.chat_template
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == proc.end_of_turn_id

    card = (out / "README.md").read_text()
    assert f"step {STEPS}" in card and TABLE in card and '"peak_lr": 0.01' in card


def test_restore_is_sharded_and_equals_the_trained_params(trained):
    run_dir, _, params, _ = trained
    mesh = make_mesh((1, 4, 2))
    loaded = loading.load_checkpoint(run_dir, model_cfg={"model_path": "", **_model_cfg()}, workdir=run_dir, mesh=mesh)
    assert (loaded.source, loaded.step, loaded.base_dir) == ("orbax", STEPS, run_dir / "tiny_model")
    kernel = loaded.model.language_model.layers[0].mlp.gate_proj.kernel[...]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert not kernel.sharding.is_fully_replicated
    restored = nnx_params(loaded.model)
    for (path, a), (_, b) in zip(ts.named_leaves(restored), ts.named_leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=path)


def nnx_params(model):
    from flax import nnx

    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _model_cfg():
    return {"tokenizer_path": "", "dtype": "float32", "param_dtype": "float32", "remat": False, "attn_impl": "xla",
            "seed": 0}  # fmt: skip


def test_bad_checkpoints_fail_clearly(trained, tmp_path):
    run_dir, *_ = trained
    with pytest.raises(FileNotFoundError, match="no orbax checkpoints"):
        export.export_checkpoint(tmp_path, tmp_path / "out", model_cfg={"model_path": "", **_model_cfg()},
                                 mesh=make_mesh((1, 1, 1)))  # fmt: skip
    # another architecture: the restore names the parameter and its shapes
    from flax import nnx

    other = tiny_config(vocab_size=1024, intermediate_size=96)
    abstract = nnx.eval_shape(lambda: Qwen25VL(other, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"'language_model/layers/0/mlp/down_proj/kernel' has shape \(128, 64\)"):
        loading.restore_params(run_dir / "checkpoints", abstract, make_mesh((1, 1, 1)))
    with pytest.raises(FileNotFoundError, match=f"no checkpoint at step 7; saved steps: \\[{STEPS}\\]"):
        loading.restore_params(run_dir / "checkpoints", abstract, make_mesh((1, 1, 1)), step=7)
    # which base model: the run's config, else its tiny_model/, else a clear request for model.model_path
    bare = tmp_path / "bare"
    shutil.copytree(run_dir / "checkpoints", bare / "checkpoints")
    with pytest.raises(ValueError, match="model.model_path"):
        loading.base_folders(bare, {"model_path": "", **_model_cfg()})
    shutil.copytree(run_dir / "tiny_model", bare / "tiny_model")
    assert loading.base_folders(bare, {"model_path": "", **_model_cfg()})[0] == bare / "tiny_model"


def _weights(folder):
    return sorted(p.name for p in folder.glob("model*.safetensors*"))


def test_export_into_an_earlier_export_leaves_exactly_the_new_model(trained, tmp_path, monkeypatch):
    """Single file, then shards, then a single file again into one out_dir: each time only the new weights remain,
    load_hf reads them, and every file has the same mode. A foreign folder is refused; a crash changes nothing."""
    from qponder_jax import hf
    from qponder_jax.errors import ConfigError

    run_dir, _, params, _ = trained
    out = tmp_path / "hf"
    kw = dict(model_cfg={"model_path": "", **_model_cfg()}, mesh=make_mesh((1, 1, 1)))
    export.export_checkpoint(run_dir, out, **kw)
    assert _weights(out) == ["model.safetensors"]
    export.export_checkpoint(run_dir, out, max_shard_bytes=60_000, **kw)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert _weights(out) == sorted({*index["weight_map"].values(), "model.safetensors.index.json"})
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert len(set(modes.values())) == 1, modes  # safetensors writes 0600; the json files get the umask's mode
    model, _ = hf.load_hf(out)
    kernel = np.asarray(model.language_model.layers[0].mlp.gate_proj.kernel[...])
    trained_kernel = params["language_model"]["layers"][0]["mlp"]["gate_proj"]["kernel"]
    np.testing.assert_array_equal(kernel, np.asarray(trained_kernel))  # the new weights, not a stale file's
    export.export_checkpoint(run_dir, out, **kw)
    assert _weights(out) == ["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no .partial / .old left behind

    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def crash(model, config, path, **_):  # dies after writing a weight file into the staging folder
        (path / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed mid-export")

    monkeypatch.setattr(hf, "save_hf", crash)
    with pytest.raises(RuntimeError, match="killed mid-export"):
        export.export_checkpoint(run_dir, out, **kw)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    monkeypatch.undo()

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match=r"out_dir=.*mine.* not an earlier qponder_jax export.*overwrite=True"):
        export.export_checkpoint(run_dir, foreign, **kw)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    export.export_checkpoint(run_dir, foreign, overwrite=True, **kw)
    assert loading.is_hf_folder(foreign) and not (foreign / "notes.txt").exists()
