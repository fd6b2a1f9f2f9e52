"""Hugging Face interop: `load_hf` / `save_hf` between a local transformers Qwen2.5-VL folder and our model.

One table (`_TABLE`) maps our parameter paths to safetensors keys and says how each tensor is transformed.
Two key layouts exist on disk and both load: the released checkpoints' (`model.layers.*`, `model.embed_tokens.*`,
`visual.*`; transformers 5.x also writes it for a freshly built model) and transformers 5.x's module layout
(`model.language_model.*`, `model.visual.*`). `lm_head.weight` is the same in both.

Weights stream one tensor at a time: the model is built abstractly, each tensor is read with `safe_open`,
transformed and placed directly on its sharding; saving gathers one tensor at a time (at most one shard file is
held on the host) and only process 0 writes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from safetensors import safe_open
from safetensors.numpy import save_file

from qponder_jax.model import sharding
from qponder_jax.model.config import Qwen25VLConfig
from qponder_jax.model.qwen2_5_vl import Qwen25VL

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "processor_config.json",
    "added_tokens.json",
)
# key prefixes of the text model and the vision tower in each on-disk layout
LAYOUTS = {
    "released": {"text": "model.", "visual": "visual."},
    "transformers5": {"text": "model.language_model.", "visual": "model.visual."},
}
DEFAULT_LAYOUT = "released"
_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64}
_DTYPE_CODES = {np.dtype(v): k for k, v in _DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class Transform:
    """How a tensor goes from our layout to HF's (`to_hf`) and back (`from_hf`); `hf_shape` from our shape."""

    to_hf: Callable[[np.ndarray, tuple], np.ndarray]  # (ours, hf_shape) -> hf
    from_hf: Callable[[np.ndarray, tuple], np.ndarray]  # (hf, our_shape) -> ours
    hf_shape: Callable[[tuple, Qwen25VLConfig], tuple]


SAME = Transform(lambda x, s: x, lambda x, s: x, lambda s, c: s)
# nn.Linear weight [out, in] <-> our kernel [in, out]
LINEAR = Transform(lambda x, s: x.T, lambda x, s: x.T, lambda s, c: s[::-1])
# Conv3d weight [hidden, C, tp, p, p] <-> our kernel [C*tp*p*p, hidden] (patch rows are flattened as (C, tp, p, p))
CONV3D = Transform(
    lambda x, s: x.T.reshape(s),
    lambda x, s: x.reshape(x.shape[0], -1).T,
    lambda s, c: (
        s[1],
        c.vision.in_channels,
        c.vision.temporal_patch_size,
        c.vision.patch_size,
        c.vision.patch_size,
    ),
)

_LAYER = r"language_model\.layers\.(\d+)\."
_BLOCK = r"visual\.blocks\.(\d+)\."
_PROJ = r"mlp\.(?:gate|up|down)_proj"
# (our parameter path as a regex, HF key template with {text}/{visual} layout prefixes, transform)
_TABLE: tuple[tuple[str, str, Transform], ...] = (
    (r"language_model\.embed_tokens\.embedding", "{text}embed_tokens.weight", SAME),
    (_LAYER + r"(input_layernorm|post_attention_layernorm)\.weight", r"{text}layers.\1.\2.weight", SAME),
    (_LAYER + rf"(self_attn\.[qkvo]_proj|{_PROJ})\.kernel", r"{text}layers.\1.\2.weight", LINEAR),
    (_LAYER + r"(self_attn\.[qkv]_proj)\.bias", r"{text}layers.\1.\2.bias", SAME),
    (r"language_model\.norm\.weight", "{text}norm.weight", SAME),
    (r"lm_head\.kernel", "lm_head.weight", LINEAR),
    (r"visual\.patch_embed\.proj\.kernel", "{visual}patch_embed.proj.weight", CONV3D),
    (_BLOCK + r"(norm1|norm2)\.weight", r"{visual}blocks.\1.\2.weight", SAME),
    (_BLOCK + rf"(attn\.qkv|attn\.proj|{_PROJ})\.kernel", r"{visual}blocks.\1.\2.weight", LINEAR),
    (_BLOCK + rf"(attn\.qkv|attn\.proj|{_PROJ})\.bias", r"{visual}blocks.\1.\2.bias", SAME),
    (r"visual\.merger\.ln_q\.weight", "{visual}merger.ln_q.weight", SAME),
    (r"visual\.merger\.fc1\.kernel", "{visual}merger.mlp.0.weight", LINEAR),
    (r"visual\.merger\.fc1\.bias", "{visual}merger.mlp.0.bias", SAME),
    (r"visual\.merger\.fc2\.kernel", "{visual}merger.mlp.2.weight", LINEAR),
    (r"visual\.merger\.fc2\.bias", "{visual}merger.mlp.2.bias", SAME),
)


@dataclasses.dataclass(frozen=True)
class HFMeta:
    """What `load_hf` saw on disk, so `save_hf` writes the same keys and dtypes by default."""

    layout: str
    dtype: str  # the most common safetensors dtype code, e.g. "BF16"
    dtype_exceptions: tuple[tuple[str, str], ...] = ()  # (key, dtype code) where a tensor differs from `dtype`

    def dtype_of(self, key: str) -> str:
        return dict(self.dtype_exceptions).get(key, self.dtype)


def hf_key(path: tuple, layout: str) -> tuple[str, Transform]:
    """The safetensors key and transform of our parameter at `path` (a tuple of attribute names / indices)."""
    dotted = ".".join(str(p) for p in path)
    for pattern, template, transform in _TABLE:
        match = re.fullmatch(pattern, dotted)
        if match:
            return match.expand(template.format(**LAYOUTS[layout])), transform
    raise KeyError(f"qponder_jax/hf.py: no Hugging Face name for parameter {dotted!r}; add it to _TABLE")


def _weight_files(folder: Path) -> dict[str, Path]:
    """{tensor key: safetensors file} from the index, or from the single model file."""
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: folder / f for k, f in weight_map.items()}
    single = folder / SINGLE_FILE
    if not single.is_file():
        raise FileNotFoundError(f"{folder}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
    with safe_open(single, "numpy") as f:
        return {k: single for k in f.keys()}


def _detect_layout(keys) -> str:
    v5 = LAYOUTS["transformers5"]
    return "transformers5" if any(k.startswith((v5["text"], v5["visual"])) for k in keys) else "released"


def load_hf(
    path: str | Path,
    *,
    mesh: jax.sharding.Mesh | None = None,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    remat: bool = False,
    attn_impl: str = "xla",
) -> tuple[Qwen25VL, Qwen25VLConfig]:
    """Loads a local HF Qwen2.5-VL folder (config.json + model.safetensors or a sharded index) into our model.

    Tensors stream one at a time onto their shardings over `mesh` (a single device when None). Raises ValueError
    naming the tensor and file on a missing tensor, an unexpected extra tensor or a shape mismatch.
    """
    folder = Path(path)
    config = Qwen25VLConfig.from_json_file(folder / "config.json")
    files = _weight_files(folder)
    layout = _detect_layout(files)
    make = lambda: Qwen25VL(
        config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype, remat=remat, attn_impl=attn_impl
    )
    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    if mesh is None:
        mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    shardings = dict(nnx.to_flat_state(sharding.state_shardings(abstract, mesh)))
    flat = list(nnx.to_flat_state(abstract))
    expected = {hf_key(p, layout)[0]: p for p, _ in flat}
    missing = [k for k in expected if k not in files]
    if missing:
        listing = INDEX_FILE if (folder / INDEX_FILE).is_file() else SINGLE_FILE
        raise ValueError(
            f"{folder / listing}: missing tensor {missing[0]!r} ({len(missing)} missing in the {layout} key layout, "
            f"e.g. {missing[:5]})"
        )
    extra = sorted(set(files) - set(expected))
    if config.tie_word_embeddings and extra == ["lm_head.weight"]:
        extra = []  # a tied head some writers still store; the embedding is used
    if extra:
        raise ValueError(f"unexpected tensor {extra[0]!r} in {files[extra[0]]} ({len(extra)} extra: {extra[:5]})")

    loaded, dtype_codes = [], {}
    with ExitStack() as stack:
        handles = {}
        for p, var in flat:
            key, transform = hf_key(p, layout)
            file = files[key]
            if file not in handles:
                handles[file] = stack.enter_context(safe_open(file, "numpy"))
            tensor_slice = handles[file].get_slice(key)
            want = tuple(transform.hf_shape(tuple(var.shape), config))
            got = tuple(tensor_slice.get_shape())
            if got != want:
                raise ValueError(f"tensor {key!r} in {file}: shape {got} on disk, the config expects {want}")
            dtype_codes[key] = tensor_slice.get_dtype()
            host = transform.from_hf(handles[file].get_tensor(key), tuple(var.shape)).astype(var.dtype)
            value = jax.make_array_from_callback(host.shape, shardings[p].get_value(), lambda idx, h=host: h[idx])
            loaded.append((p, var.replace(value)))
    model = nnx.merge(graphdef, nnx.from_flat_state(loaded))
    common = Counter(dtype_codes.values()).most_common(1)[0][0]
    model.hf_meta = HFMeta(layout, common, tuple(sorted((k, c) for k, c in dtype_codes.items() if c != common)))
    return model, config


def _gather(x: jax.Array) -> np.ndarray:
    """The full value of one (possibly multi-host sharded) array on this host."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _file_mode() -> int:
    """The mode a newly created file gets under the current umask (0o644 under the usual 0o022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def save_hf(
    model: Qwen25VL,
    config: Qwen25VLConfig,
    path: str | Path,
    *,
    tokenizer_dir: str | Path | None = None,
    dtype=None,
    max_shard_bytes: int = 4 * 2**30,
) -> None:
    """Writes `model` as a transformers Qwen2.5-VL folder: safetensors (one file, or shards of at most
    `max_shard_bytes` plus model.safetensors.index.json), config.json, generation_config.json, and the
    tokenizer/processor files found in `tokenizer_dir`.

    Tensors are written in `dtype` when given, else in the dtype and key layout `load_hf` read them with (so a
    load/save round trip is bit-identical), else in the parameters' dtype. Weight files of an earlier save in the same
    folder (a single file next to new shards, or shards and their index next to a new single file) are removed, so
    the folder holds exactly this model's weights. Every process must call this (tensors are gathered collectively);
    only process 0 writes.
    """
    folder = Path(path)
    meta: HFMeta | None = getattr(model, "hf_meta", None)
    layout = meta.layout if meta else DEFAULT_LAYOUT
    entries = []  # (key, value, transform, numpy dtype, hf shape)
    for p, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        key, transform = hf_key(p, layout)
        value = var.get_value()
        if dtype is not None:
            np_dtype = np.dtype(dtype)
        elif meta is not None:
            np_dtype = np.dtype(_DTYPES[meta.dtype_of(key)])
        else:
            np_dtype = np.dtype(value.dtype)
        entries.append((key, value, transform, np_dtype, tuple(transform.hf_shape(tuple(value.shape), config))))

    shards: list[list] = [[]]
    size = 0
    for entry in entries:
        nbytes = int(np.prod(entry[4])) * entry[3].itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes

    writer = jax.process_index() == 0
    if writer:
        folder.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = SINGLE_FILE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for key, value, transform, np_dtype, hf_shape in shard:
            host = _gather(value).astype(np_dtype)
            tensors[key] = np.ascontiguousarray(transform.to_hf(host, hf_shape))
            weight_map[key] = name
            total += tensors[key].nbytes
        if writer:
            save_file(tensors, folder / name, metadata={"format": "pt"})
            os.chmod(folder / name, _file_mode())  # safetensors creates its files 0600; the rest get the umask's
        del tensors
    if not writer:
        return
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    written = set(weight_map.values()) | ({INDEX_FILE} if len(shards) > 1 else set())
    for stale in [*folder.glob("model*.safetensors"), folder / INDEX_FILE]:
        if stale.is_file() and stale.name not in written:
            stale.unlink()  # transformers would read a stale model.safetensors first, load_hf a stale index

    codes = Counter(_DTYPE_CODES[e[3]] for e in entries).most_common(1)[0][0]
    hf_config = config.to_hf_dict()
    hf_config["dtype"] = np.dtype(_DTYPES[codes]).name
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    source = Path(tokenizer_dir) if tokenizer_dir is not None else None
    if source is not None and (source / "generation_config.json").is_file():
        shutil.copyfile(source / "generation_config.json", folder / "generation_config.json")
    else:
        t = config.text
        gen = {k: getattr(t, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id") if getattr(t, k) is not None}
        (folder / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    if source is not None:
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, folder / name)
