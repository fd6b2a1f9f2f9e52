"""The embedded default and the model section of a config: where a job's model comes from.

Every `tiny` config variant runs on a fresh machine with nothing downloaded: `model.model_path = "embedded:tiny"`
builds the demo tokenizer and a tiny random Qwen2.5-VL, saved as a Hugging Face folder in `<workdir>/tiny_model`
(once; later runs and resumes reuse it), with small image and video pixel limits so that tiny clips are a few
tokens. Real variants name a local HF folder and get a clear error when it is missing.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Mapping
from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from qponder_jax import distributed
from qponder_jax.errors import ConfigError
from qponder_jax.model.config import Qwen25VLConfig, tiny_config
from qponder_jax.model.qwen2_5_vl import Qwen25VL

EMBEDDED_TINY = "embedded:tiny"  # model.model_path value selecting the embedded tiny random model
TINY_MODEL_DIR = "tiny_model"
_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
VIDEO_CONFIG_FILE = "video_preprocessor_config.json"
# The tiny model's video processor: frames resized to 28*56 .. 56*56 pixels, so a clip of F frames is at most
# F/2 * 16 patch rows (F/2 * 4 <|video_pad|> tokens) and tiny clips stay a few tokens (`Processor.from_pretrained`).
TINY_VIDEO_MIN_PIXELS, TINY_VIDEO_MAX_PIXELS = 28 * 56, 56 * 56
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name: str, field: str):
    """A jnp dtype from a config string; raises naming the config field."""
    if name not in _DTYPES:
        raise ConfigError(f"config field {field}={name!r}: choose one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def build_tiny_model(out_dir: str | Path, *, seed: int = 0) -> Path:
    """Writes the demo tokenizer + a tiny random model (`tiny_config` with the tokenizer's vocab and special ids) as
    an HF folder at `out_dir`; an existing complete folder is reused. Returns the folder. In a multi-process run,
    process 0 builds it and the others wait for it."""
    out = Path(out_dir)
    distributed.run_once(lambda: _build_tiny_model(out, seed), name=f"build_tiny_model:{out}")
    return out


def demo_model_config(tokenizer_dir: str | Path, *, vision: Mapping | None = None, **text) -> Qwen25VLConfig:
    """`tiny_config` bound to the demo tokenizer in `tokenizer_dir` (its vocab, eos/pad and vision token ids);
    `text` overrides TextConfig fields and `vision` VisionConfig fields."""
    from tokenizers import Tokenizer

    from qponder_jax.data.tokenizer import special_token_ids

    ids = special_token_ids(Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json")))
    config = tiny_config(
        vocab_size=ids["vocab_size"], eos_token_id=ids["im_end_id"], pad_token_id=ids["endoftext_id"], **text
    )
    return config.replace(
        vision=dataclasses.replace(config.vision, out_hidden_size=config.text.hidden_size, **(vision or {})),
        image_token_id=ids["image_token_id"],
        video_token_id=ids["video_token_id"],
        vision_start_token_id=ids["vision_start_token_id"],
        vision_end_token_id=ids["vision_end_token_id"],
    )


def _build_tiny_model(out: Path, seed: int) -> None:
    from qponder_jax.data.tokenizer import build_demo_tokenizer
    from qponder_jax.hf import save_hf
    from qponder_jax.model.qwen2_5_vl import create_model

    if (out / "config.json").is_file() and any((out / w).is_file() for w in _HF_WEIGHTS):
        if not (out / VIDEO_CONFIG_FILE).is_file():  # a folder built before the video config existed
            write_tiny_video_config(out)
        return
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    tok_dir = build_demo_tokenizer(staging / "tokenizer")
    config = demo_model_config(tok_dir)
    model = create_model(config, rngs_seed=seed)
    save_hf(model, config, staging / "hf", tokenizer_dir=tok_dir)
    write_tiny_video_config(staging / "hf")
    shutil.rmtree(out, ignore_errors=True)
    (staging / "hf").rename(out)
    shutil.rmtree(staging, ignore_errors=True)


def write_tiny_video_config(folder: str | Path) -> Path:
    """Writes the tiny model's `video_preprocessor_config.json` (transformers' Qwen2VLVideoProcessor keys) to
    `folder`; returns its path."""
    from qponder_jax.data.image import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    size = {"shortest_edge": TINY_VIDEO_MIN_PIXELS, "longest_edge": TINY_VIDEO_MAX_PIXELS}
    content = {
        "video_processor_type": "Qwen2VLVideoProcessor",
        "min_pixels": TINY_VIDEO_MIN_PIXELS,
        "max_pixels": TINY_VIDEO_MAX_PIXELS,
        "size": size,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "resample": 3,  # bicubic
        "image_mean": list(OPENAI_CLIP_MEAN),
        "image_std": list(OPENAI_CLIP_STD),
        "do_resize": True,
        "do_rescale": True,
        "do_normalize": True,
        "do_convert_rgb": True,
    }
    path = Path(folder) / VIDEO_CONFIG_FILE
    path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def resolve_model_dir(model_cfg: Mapping, workdir: str | Path) -> tuple[Path, Path]:
    """(HF model folder, tokenizer/processor folder) for a config's `model` section.

    `model_path = "embedded:tiny"` means the embedded tiny model in `<workdir>/tiny_model` (built on first use).
    """
    path = model_cfg["model_path"]
    if path == EMBEDDED_TINY:
        model_dir = build_tiny_model(Path(workdir) / TINY_MODEL_DIR, seed=int(model_cfg["seed"]))
    elif not path:
        raise ConfigError(
            "config field model.model_path is empty: this variant fine-tunes a real Qwen2.5-VL checkpoint. Pass "
            "--config.model.model_path=/path/to/Qwen2.5-VL-<size>-Instruct (a local Hugging Face folder), or "
            f"{EMBEDDED_TINY!r} for the tiny random model"
        )
    else:
        model_dir = Path(path).expanduser()
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(
                f"config field model.model_path={path!r}: no Hugging Face Qwen2.5-VL folder there (config.json is "
                "missing). Download the checkpoint (e.g. Qwen/Qwen2.5-VL-3B-Instruct) to a local folder and pass "
                "--config.model.model_path=/path/to/it"
            )
    tok = model_cfg["tokenizer_path"]
    tok_dir = Path(tok).expanduser() if tok else model_dir
    if not (tok_dir / "tokenizer.json").is_file() and not (tok_dir / "tokenizer_config.json").is_file():
        raise FileNotFoundError(
            f"config field model.tokenizer_path={str(tok_dir)!r}: no tokenizer.json / tokenizer_config.json there"
        )
    return model_dir, tok_dir


def abstract_model(model_cfg: Mapping, model_dir: Path) -> tuple[Qwen25VL, Qwen25VLConfig]:
    """The model of `model_dir/config.json` built abstractly (ShapeDtypeStructs, no memory), with the config's
    dtype, remat and attention settings."""
    config = Qwen25VLConfig.from_json_file(model_dir / "config.json")
    kw = model_kwargs(model_cfg)
    return nnx.eval_shape(lambda: Qwen25VL(config, rngs=nnx.Rngs(0), **kw)), config


def model_kwargs(model_cfg: Mapping) -> dict:
    """Keyword arguments of `load_hf` / `create_model` from a config's `model` section."""
    return dict(
        dtype=dtype_of(model_cfg["dtype"], "model.dtype"),
        param_dtype=dtype_of(model_cfg["param_dtype"], "model.param_dtype"),
        remat=bool(model_cfg["remat"]),
        attn_impl=str(model_cfg["attn_impl"]),
    )
