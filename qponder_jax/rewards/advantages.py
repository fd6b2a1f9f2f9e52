"""GRPO group advantages: each rollout's reward against its group's (same prompt) mean and spread."""

from __future__ import annotations

import jax
import jax.numpy as jnp

STD_MODES = ("population", "unbiased", "none")


def group_advantages(rewards: jax.Array, *, std: str = "unbiased", eps: float = 1e-6) -> tuple[jax.Array, jax.Array]:
    """(advantages [B, G], zero_std_groups [B] bool) from rewards [B, G].

    advantage = (r - mean) / (std + eps) with the population (ddof 0) or unbiased (ddof 1) std of the group,
    or r - mean for std="none" (Dr. GRPO). A group whose rewards are all equal gets exactly zero advantage
    (no rounding noise divided by eps) and is flagged, since it carries no learning signal.
    """
    if std not in STD_MODES:
        raise ValueError(f"rewards: group_advantages std must be one of {STD_MODES}, got '{std}'")
    rewards = jnp.asarray(rewards, jnp.float32)
    g = rewards.shape[1]
    centered = rewards - jnp.mean(rewards, axis=1, keepdims=True)
    if std == "none":
        adv = centered
    else:
        ddof = 1 if std == "unbiased" else 0
        spread = jnp.sqrt(jnp.sum(jnp.square(centered), axis=1, keepdims=True) / max(g - ddof, 1))
        adv = centered / (spread + eps)
    zero_std = jnp.all(rewards == rewards[:, :1], axis=1)
    return jnp.where(zero_std[:, None], 0.0, adv), zero_std
