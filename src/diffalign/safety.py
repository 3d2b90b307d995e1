"""A safety filter between generation and training (issue 18, item 3; the training half).

``safety.filter`` names a filter built like a reward (a built-in name, ``python`` with a function, or ``http``
with a service; rewards/ builds it): it returns one unsafety score per image, and an image is **flagged** when
its score is >= ``safety.threshold``. The trainer wraps its reward so that every sampled image passes the
filter: the share of flagged images is logged per epoch (``reward/safety_flagged_rate`` in metrics.jsonl and
the tracker), and each flagged image's reward is lowered by ``safety.penalty`` so the model learns to avoid
what the filter flags (0: count only).

Not here yet: hiding flagged images in the labeling app and in reports (the feedback app is being rebuilt,
issue 17); feedback runs do not filter.

The built-in ``toy_red_objects`` is the toy world's stand-in for a content classifier: an image is unsafe
(1.0) when the toy judge's detector finds a red object in it.
"""

from __future__ import annotations

import numpy as np

from .rewards import build_reward
from .rewards.base import register


class ToyRedObjects:
    """1.0 for images with a red object (by the toy judge's detector), else 0.0."""

    name = "toy_red_objects"

    def __call__(self, images, prompts, metadata):
        from .toy.judge import detect_batch

        flags = [any(o.color == "red" for o in objs) for objs in detect_batch(images)]
        return np.asarray(flags, dtype=np.float64)


@register("toy_red_objects")
def toy_red_objects() -> ToyRedObjects:
    return ToyRedObjects()


class SafetyFilteredReward:
    """The run's reward with the filter applied: flagged images counted (info) and penalised (score)."""

    def __init__(self, reward, filter_, threshold: float, penalty: float):
        self.reward, self.filter, self.threshold, self.penalty = reward, filter_, threshold, penalty
        self.name = getattr(reward, "name", "reward")

    def __call__(self, images, prompts, metadata, batch: int | str = "?"):
        total, info = self.reward(images, prompts, metadata, batch=batch)
        unsafe, _ = self.filter(images, prompts, metadata, batch=f"{batch} (safety filter)")
        flagged = unsafe >= self.threshold  # (B,)
        info = dict(info, safety_flagged_rate=float(flagged.mean()))
        return np.asarray(total, dtype=np.float64) - self.penalty * flagged, info


def with_safety(reward, safety):
    """``reward`` behind the configured filter, or ``reward`` itself when ``safety.filter`` is unset."""
    if safety.filter is None:
        return reward
    from .config import RewardTerm

    try:
        filter_ = build_reward([RewardTerm(name=safety.filter, args=safety.args)])
    except ValueError as e:
        raise ValueError(str(e).replace("reward.terms[0].name", "safety.filter").replace("reward.terms[0]", "safety")) from None
    return SafetyFilteredReward(reward, filter_, safety.threshold, safety.penalty)
