"""Rewards by name, so a config picks rewards, their constants and their weights without if/elif chains.

@register_reward("accuracy")
def accuracy(inputs, *, mode="threshold", eps=0.35): ...   # inputs -> [B, G]

results = compute_rewards(inputs, {"format": {}, "accuracy": {"mode": "gaussian"}})
total = combine_rewards(results, {"format": 0.5, "accuracy": 1.0})  # [B, G]
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

RewardFn = Callable[..., jax.Array]  # (inputs, **constants) -> [B, G] float32, never NaN
_REWARDS: dict[str, RewardFn] = {}
_BUILTIN = ("qponder_jax.rewards.iqa",)  # modules whose import registers the built-in rewards


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: registers a reward function under `name` (each name once)."""

    def add(fn: RewardFn) -> RewardFn:
        if name in _REWARDS and _REWARDS[name] is not fn:
            raise ValueError(f"rewards: '{name}' is already registered (by {_REWARDS[name].__module__})")
        _REWARDS[name] = fn
        return fn

    return add


def _load_builtin() -> None:
    for module in _BUILTIN:
        importlib.import_module(module)


def get_reward(name: str) -> RewardFn:
    _load_builtin()
    if name not in _REWARDS:
        raise KeyError(f"rewards: unknown reward '{name}'; registered: {', '.join(available_rewards())}")
    return _REWARDS[name]


def available_rewards() -> tuple[str, ...]:
    _load_builtin()
    return tuple(sorted(_REWARDS))


def compute_rewards(inputs: Any, spec: Mapping[str, Mapping[str, Any] | None]) -> dict[str, jax.Array]:
    """Runs each named reward with its constants: {name: kwargs} -> {name: [B, G]}."""
    return {name: get_reward(name)(inputs, **dict(kwargs or {})) for name, kwargs in spec.items()}


def combine_rewards(results: Mapping[str, jax.Array], weights: Mapping[str, float]) -> jax.Array:
    """Weighted sum of the named [B, G] rewards; every weight must name a computed reward."""
    missing = sorted(set(weights) - set(results))
    if missing:
        raise KeyError(f"rewards: weights for {missing} but only {sorted(results)} were computed")
    if not weights:
        raise ValueError("rewards: no reward weights given")
    return sum(jnp.float32(w) * results[name] for name, w in weights.items())
