"""Model configuration: frozen dataclasses, read from and written to Hugging Face `config.json`.

Both config.json layouts are read: transformers 5.x (`text_config` / `vision_config`, `rope_parameters`)
and the 4.x layout of the released Qwen2.5-VL checkpoints (text fields at the top level, `rope_scaling`
with `mrope_section`). `to_hf_dict` writes the 5.x layout.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

ARCHITECTURE = "Qwen2_5_VLForConditionalGeneration"
MODEL_TYPE = "qwen2_5_vl"


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112  # in pixels
    out_hidden_size: int = 3584
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    hidden_act: str = "silu"
    tokens_per_second: int = 2
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch row: channels * temporal_patch * patch * patch."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: tuple[int, ...] = (16, 24, 24)  # rotary frequency pairs for (temporal, height, width)
    hidden_act: str = "silu"
    max_position_embeddings: int = 128000
    bos_token_id: int | None = 151643
    eos_token_id: int | tuple[int, ...] | None = 151645  # a tuple when config.json lists several
    pad_token_id: int | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class Qwen25VLConfig:
    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    tie_word_embeddings: bool = False

    def replace(self, **changes) -> Qwen25VLConfig:
        return dataclasses.replace(self, **changes)

    # ---- Hugging Face config.json ----
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], *, source: str = "config.json") -> Qwen25VLConfig:
        """Parses a transformers Qwen2.5-VL config dict (5.x or 4.x layout); raises on another architecture."""
        model_type = d.get("model_type")
        archs = d.get("architectures") or []
        if model_type != MODEL_TYPE or (archs and ARCHITECTURE not in archs):
            raise ValueError(
                f"{source}: expected a Qwen2.5-VL config (model_type={MODEL_TYPE!r}, architectures=[{ARCHITECTURE!r}]),"
                f" got model_type={model_type!r}, architectures={archs}"
            )
        text_d = dict(d.get("text_config") or {})
        for key, value in d.items():  # 4.x layout: text fields at the top level
            if key not in ("text_config", "vision_config") and key not in text_d:
                text_d[key] = value
        rope = dict(text_d.get("rope_parameters") or text_d.get("rope_scaling") or {})
        rope_theta = rope.get("rope_theta", text_d.get("rope_theta", TextConfig.rope_theta))
        if "mrope_section" not in rope:
            raise ValueError(f"{source}: text config has no mrope_section (in rope_parameters or rope_scaling)")
        text = _pick(TextConfig, text_d, rope_theta=float(rope_theta), mrope_section=tuple(rope["mrope_section"]))
        if 2 * sum(text.mrope_section) != text.head_dim:
            raise ValueError(
                f"{source}: mrope_section {text.mrope_section} must sum to head_dim/2 = {text.head_dim // 2}"
            )
        vision_d = dict(d.get("vision_config") or {})
        vrope = vision_d.get("rope_parameters") or {}
        vision = _pick(
            VisionConfig,
            vision_d,
            fullatt_block_indexes=tuple(vision_d.get("fullatt_block_indexes", VisionConfig.fullatt_block_indexes)),
            rope_theta=float(vrope.get("rope_theta", VisionConfig.rope_theta)),
        )
        if "out_hidden_size" not in vision_d:
            vision = dataclasses.replace(vision, out_hidden_size=text.hidden_size)
        if vision.out_hidden_size != text.hidden_size:
            raise ValueError(
                f"{source}: vision out_hidden_size {vision.out_hidden_size} != text hidden_size {text.hidden_size}"
            )
        tie = bool(d.get("tie_word_embeddings", False) or text_d.get("tie_word_embeddings", False))
        top = {
            k: d[k]
            for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
            if k in d
        }
        return cls(text=text, vision=vision, tie_word_embeddings=tie, **top)

    def to_hf_dict(self) -> dict[str, Any]:
        """The transformers 5.x config.json dict for this model."""
        t, v = self.text, self.vision
        text_d = {
            k: getattr(t, k)
            for k in (
                "vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads "
                "num_key_value_heads rms_norm_eps hidden_act max_position_embeddings bos_token_id "
                "eos_token_id pad_token_id"
            ).split()
        }
        text_d["model_type"] = "qwen2_5_vl_text"
        text_d["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": t.rope_theta,
            "mrope_section": list(t.mrope_section),
        }
        vision_d = {
            k: getattr(v, k)
            for k in (
                "depth hidden_size intermediate_size num_heads in_channels patch_size temporal_patch_size "
                "spatial_merge_size window_size out_hidden_size hidden_act tokens_per_second"
            ).split()
        }
        vision_d["fullatt_block_indexes"] = list(v.fullatt_block_indexes)
        vision_d["model_type"] = "qwen2_5_vl_vision"
        vision_d["rope_parameters"] = {"rope_type": "axial", "rope_theta": v.rope_theta}
        return {
            "architectures": [ARCHITECTURE],
            "model_type": MODEL_TYPE,
            "text_config": text_d,
            "vision_config": vision_d,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
        }

    @classmethod
    def from_json_file(cls, path: str | Path) -> Qwen25VLConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        return cls.from_hf_dict(d, source=str(path))


def _pick(cls, d: dict[str, Any], **overrides):
    """Builds dataclass `cls` from the keys of `d` it knows (ignoring the rest), then applies overrides."""
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in d.items() if k in names}
    # transformers' vision config aliases
    if cls is VisionConfig:
        kwargs.setdefault("depth", d.get("num_hidden_layers", VisionConfig.depth))
        kwargs.setdefault("num_heads", d.get("num_attention_heads", VisionConfig.num_heads))
    kwargs.update(overrides)
    # lists would make the config (and so the model's graphdef) unhashable under jit
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    return cls(**kwargs)


def tiny_config(**text_overrides) -> Qwen25VLConfig:
    """A tiny random-model config for tests and the embedded demo (hidden 64, 2 layers, vision depth 2)."""
    text = dataclasses.replace(
        TextConfig(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_theta=10000.0,
            mrope_section=(2, 3, 3),
            max_position_embeddings=4096,
            bos_token_id=None,
            eos_token_id=None,
        ),
        **text_overrides,
    )
    vision = VisionConfig(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=text.hidden_size,
        fullatt_block_indexes=(1,),
    )
    return Qwen25VLConfig(
        text=text,
        vision=vision,
        image_token_id=500,
        video_token_id=501,
        vision_start_token_id=502,
        vision_end_token_id=503,
    )
