"""qponder_jax: Q-Ponder reasoning-based image quality assessment with Qwen2.5-VL in JAX/Flax."""

import logging as _logging

__version__ = "0.1.0"


def _drop_no_torch_advice(record: _logging.LogRecord) -> bool:
    """transformers says "PyTorch was not found ..." when imported without torch; this package uses it only for its
    tokenizers and image processor, never torch, so the line is noise a user cannot act on."""
    return not str(record.msg).startswith("PyTorch was not found")


_logging.getLogger("transformers").addFilter(_drop_no_torch_advice)

_LAZY = {"Scorer": "qponder_jax.scorer", "ScoreResult": "qponder_jax.scorer"}  # imported on first use (jax is heavy)


def __getattr__(name: str):
    """`from qponder_jax import Scorer` without importing jax, the model or transformers at `import qponder_jax`."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qponder_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
