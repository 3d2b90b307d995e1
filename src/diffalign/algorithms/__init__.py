"""Algorithms: one file each; they share the sampler and the training loop."""

from .base import Algorithm, Policy, Transition
from .ddpo import DDPO, PerPromptStatTracker, ppo_clipped_loss


def build_algorithm(cfg, pipe=None) -> Algorithm:
    """The algorithm named by ``cfg.train.algorithm``."""
    name = cfg.train.algorithm
    if name == "ddpo":
        return DDPO(cfg.ddpo)
    if name in ("dag-db", "dag-kl"):
        from .dag import build_dag
        return build_dag(cfg, pipe)
    if name == "grpo":
        from .grpo import GRPO
        return GRPO(cfg)
    raise ValueError(f"train.algorithm {name!r} is unknown; choose ddpo, grpo, dag-db or dag-kl")


__all__ = ["Algorithm", "DDPO", "PerPromptStatTracker", "Policy", "Transition", "build_algorithm", "ppo_clipped_loss"]
