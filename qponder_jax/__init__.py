"""qponder_jax: Q-Ponder reasoning-based image quality assessment with Qwen2.5-VL in JAX/Flax."""

__version__ = "0.1.0"
