"""Rewards: the protocol, built-ins looked up by name, weighted sums, a worker pool."""

from __future__ import annotations

import inspect

from ..redact import resolve_env
from . import aesthetic as _aesthetic  # noqa: F401  (registers "aesthetic")
from . import builtin as _builtin  # noqa: F401  (registers jpeg_*, toy)
from . import http as _http  # noqa: F401  (registers "http")
from .base import REWARDS, Reward, RewardError, RewardPool, WeightedReward, to_uint8_images, validate_scores


def build_reward(terms) -> WeightedReward:
    """A :class:`WeightedReward` from config terms (objects with ``name``, ``weight``, ``args``)."""
    built = []
    for i, term in enumerate(terms):
        factory = REWARDS.get(term.name)
        if factory is None:
            raise ValueError(f"reward.terms[{i}].name {term.name!r} is unknown; choose one of {sorted(REWARDS)}")
        params = inspect.signature(factory).parameters
        unknown = sorted(set(term.args) - set(params))
        if unknown:
            raise ValueError(
                f"reward.terms[{i}].args: {unknown} not accepted by reward {term.name!r}; it takes {sorted(params)}"
            )
        # "env:VAR" references become their values here, in memory only: the config keeps the reference.
        args = resolve_env(dict(term.args), f"reward.terms[{i}].args")
        try:
            reward = factory(**args)
        except TypeError as e:
            raise ValueError(f"reward.terms[{i}] ({term.name}): {e}") from None
        built.append((term.name if len(terms) == 1 or term.name not in [t[0] for t in built] else f"{term.name}_{i}",
                      term.weight, reward))
    return WeightedReward(built)


__all__ = ["REWARDS", "Reward", "RewardError", "RewardPool", "WeightedReward", "build_reward", "to_uint8_images",
           "validate_scores"]
