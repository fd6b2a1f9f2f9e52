"""load_hf / save_hf against transformers' save_pretrained / from_pretrained: logits, bit-identical round trips in
both key layouts and in sharded form, and clear errors on bad checkpoints."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from torch_ref import make_batch, make_torch_model, torch_logits
from transformers import Qwen2_5_VLForConditionalGeneration

from qponder_jax.hf import INDEX_FILE, SINGLE_FILE, load_hf, save_hf
from qponder_jax.model.config import tiny_config


def _tensors(folder) -> dict[str, tuple[str, np.ndarray]]:
    """Every tensor of a HF folder (single file or index): key -> (safetensors dtype, array)."""
    index = folder / INDEX_FILE
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [SINGLE_FILE]
    out = {}
    for name in files:
        with safe_open(folder / name, "numpy") as f:
            for key in f.keys():
                assert key not in out, f"{key} stored twice"
                out[key] = (f.get_slice(key).get_dtype(), f.get_tensor(key))
    return out


def _assert_bit_identical(a_folder, b_folder):
    a, b = _tensors(a_folder), _tensors(b_folder)
    assert sorted(a) == sorted(b)
    for key, (dtype, value) in a.items():
        assert b[key][0] == dtype, key
        assert value.shape == b[key][1].shape, key
        assert value.tobytes() == b[key][1].tobytes(), f"{key} differs"


def _text_inputs(config, t=10):
    ids = (np.arange(2 * t).reshape(2, t) * 37 % 400).astype(np.int32)
    mask = np.ones((2, t), bool)
    mask[1, 7:] = False
    positions = np.stack([np.maximum(np.cumsum(mask, 1) - 1, 0)] * 3)
    positions[1, :, 3:] += 2  # distinct M-RoPE rows
    return ids, mask, positions


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny random torch model and the folder its save_pretrained wrote."""
    config = tiny_config()
    torch_model = make_torch_model(config, seed=2)
    folder = tmp_path_factory.mktemp("hf") / "tiny"
    torch_model.save_pretrained(folder)
    return config, torch_model, folder


def _logit_diff(model, config, torch_model):
    ids, mask, positions = _text_inputs(config)
    ours = np.asarray(model(make_batch(config, ids, mask, positions)))
    ref = torch_logits(torch_model, ids, mask, positions)
    return float(np.abs(ours - ref)[mask].max())


def test_load_matches_torch_and_round_trip(saved, tmp_path):
    config, torch_model, folder = saved
    assert any(k.startswith("model.layers.") for k in _tensors(folder))  # transformers writes the released layout
    model, loaded_config = load_hf(folder)
    assert loaded_config == config
    diff = _logit_diff(model, config, torch_model)
    print(f"load_hf vs torch: max abs diff {diff:.2e}")
    assert diff <= 1e-4

    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json"):
        (tok_dir / name).write_text(f'{{"name": "{name}"}}')
    (tok_dir / "unrelated.txt").write_text("x")
    out = tmp_path / "out"
    save_hf(model, config, out, tokenizer_dir=tok_dir)
    assert (out / SINGLE_FILE).exists() and not (out / INDEX_FILE).exists()
    _assert_bit_identical(folder, out)
    for name in ("tokenizer.json", "chat_template.jinja", "preprocessor_config.json", "generation_config.json"):
        assert (out / name).exists(), name
    assert not (out / "unrelated.txt").exists()
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"

    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, attn_implementation="eager").eval()
    ids, mask, positions = _text_inputs(config)
    np.testing.assert_array_equal(
        torch_logits(reloaded, ids, mask, positions), torch_logits(torch_model, ids, mask, positions)
    )


def test_sharded_checkpoints_round_trip(saved, tmp_path):
    config, torch_model, _ = saved
    sharded = tmp_path / "sharded"
    torch_model.save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / INDEX_FILE).exists()
    model, _ = load_hf(sharded)
    assert _logit_diff(model, config, torch_model) <= 1e-4

    out = tmp_path / "out"
    save_hf(model, config, out, max_shard_bytes=150_000)
    weight_map = json.loads((out / INDEX_FILE).read_text())["weight_map"]
    assert len(set(weight_map.values())) > 2
    assert not (out / SINGLE_FILE).exists()
    _assert_bit_identical(sharded, out)
    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, attn_implementation="eager").eval()
    for a, b in zip(reloaded.state_dict().values(), torch_model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    model2, _ = load_hf(out)
    assert _logit_diff(model2, config, torch_model) <= 1e-4


def test_transformers5_layout_and_bf16_round_trip(saved, tmp_path):
    """Keys as transformers 5.x modules name them (model.language_model.*, model.visual.*) in bfloat16: load, and
    save back the same keys and dtype."""
    config, torch_model, folder = saved
    v5 = tmp_path / "v5"
    shutil.copytree(folder, v5)
    renamed = {}
    for key, (_, value) in _tensors(folder).items():
        if key.startswith("model."):
            key = "model.language_model." + key[len("model.") :]
        elif key.startswith("visual."):
            key = "model." + key
        renamed[key] = torch.from_numpy(value).to(torch.bfloat16)
    from safetensors.torch import save_file as save_torch_file

    save_torch_file(renamed, v5 / SINGLE_FILE, metadata={"format": "pt"})
    model, _ = load_hf(v5)
    assert model.language_model.norm.weight[...].dtype == np.float32
    out = tmp_path / "out"
    save_hf(model, config, out)
    _assert_bit_identical(v5, out)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    reference = Qwen2_5_VLForConditionalGeneration.from_pretrained(v5, dtype=torch.float32).eval()
    assert _logit_diff(model, config, reference) <= 1e-4


def test_tied_embeddings_round_trip(tmp_path):
    config = tiny_config().replace(tie_word_embeddings=True)
    torch_model = make_torch_model(config, seed=3)
    folder = tmp_path / "tied"
    torch_model.save_pretrained(folder)
    assert "lm_head.weight" not in _tensors(folder)
    model, _ = load_hf(folder)
    assert _logit_diff(model, config, torch_model) <= 1e-4
    save_hf(model, config, tmp_path / "out")
    _assert_bit_identical(folder, tmp_path / "out")
    # an explicit dtype overrides the remembered one
    save_hf(model, config, tmp_path / "bf16", dtype=jnp.bfloat16)
    tensors = _tensors(tmp_path / "bf16")
    assert {dtype for dtype, _ in tensors.values()} == {"BF16"}
    embedding = np.asarray(model.language_model.embed_tokens.embedding[...])
    np.testing.assert_array_equal(tensors["model.embed_tokens.weight"][1], embedding.astype(jnp.bfloat16))
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def _corrupt(folder, tmp_path, edit):
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    tensors = load_file(bad / SINGLE_FILE)
    edit(tensors)
    save_file(tensors, bad / SINGLE_FILE, metadata={"format": "pt"})
    return bad


def test_missing_tensor_raises(saved, tmp_path):
    bad = _corrupt(saved[2], tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"model\.safetensors: missing tensor .model\.layers\.1\.mlp\.up_proj\.weight"):
        load_hf(bad)


def test_shape_mismatch_raises(saved, tmp_path):
    def edit(t):
        t["model.layers.0.self_attn.k_proj.weight"] = np.zeros((16, 64), np.float32)

    bad = _corrupt(saved[2], tmp_path, edit)
    with pytest.raises(
        ValueError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight.*model\.safetensors.*\(16, 64\).*\(32, 64\)"
    ):
        load_hf(bad)


def test_extra_tensor_raises(saved, tmp_path):
    def edit(t):
        t["model.layers.0.self_attn.o_proj.bias"] = np.zeros((64,), np.float32)

    bad = _corrupt(saved[2], tmp_path, edit)
    with pytest.raises(
        ValueError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.o_proj\.bias' in .*model\.safetensors"
    ):
        load_hf(bad)


def test_other_architecture_raises(saved, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(saved[2], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "qwen2_vl", ["Qwen2VLForConditionalGeneration"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config\.json: expected a Qwen2\.5-VL config.*'qwen2_vl'"):
        load_hf(bad)
