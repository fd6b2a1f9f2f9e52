"""Model config: both config.json layouts, hashability under jit, and clear errors."""

import json

import pytest
from transformers import Qwen2_5_VLConfig

from qponder_jax.model.config import Qwen25VLConfig, tiny_config

LEGACY_7B = {  # the transformers 4.x layout of the released Qwen2.5-VL-7B-Instruct config.json (abridged)
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 152064,
    "eos_token_id": 151645,
    "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                      "out_hidden_size": 3584, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
                      "tokens_per_second": 2},
}  # fmt: skip


def test_round_trip_through_transformers():
    cfg = tiny_config()
    hf = Qwen2_5_VLConfig(**cfg.to_hf_dict())
    assert Qwen25VLConfig.from_hf_dict(hf.to_dict()) == cfg


def test_legacy_layout():
    cfg = Qwen25VLConfig.from_hf_dict(LEGACY_7B)
    assert cfg.text.hidden_size == 3584 and cfg.text.mrope_section == (16, 24, 24)
    assert cfg.text.rope_theta == 1e6 and cfg.vision.fullatt_block_indexes == (7, 15, 23, 31)
    assert cfg.vision.depth == 32 and cfg.vision.out_hidden_size == 3584


def test_list_valued_eos_is_hashable():
    d = tiny_config().to_hf_dict()
    d["text_config"]["eos_token_id"] = [7, 8]
    cfg = Qwen25VLConfig.from_hf_dict(d)
    assert cfg.text.eos_token_id == (7, 8)
    hash(cfg)  # the model's graphdef hashes its config under jit


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="expected a Qwen2.5-VL config.*llama"):
        Qwen25VLConfig.from_hf_dict({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    bad = dict(LEGACY_7B, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 20]})
    with pytest.raises(ValueError, match="mrope_section"):
        Qwen25VLConfig.from_hf_dict(bad)
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Qwen25VLConfig.from_json_file(path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Qwen25VLConfig.from_json_file(tmp_path / "missing.json")
    path.write_text(json.dumps(LEGACY_7B))
    assert Qwen25VLConfig.from_json_file(path).text.num_hidden_layers == 28
