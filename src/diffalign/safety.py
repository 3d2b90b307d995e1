"""A safety filter between generation and training (issue 18, item 3; the training half).

``safety.filter`` names a filter built like a reward (a built-in name, ``python`` with a function, or ``http``
with a service; rewards/ builds it): it returns one unsafety score per image, and an image is **flagged** when
its score is >= ``safety.threshold``. The trainer wraps its reward so that every sampled image passes the
filter: the share of flagged images is logged per epoch (``reward/safety_flagged_rate`` in metrics.jsonl and
the tracker), and each flagged image's reward is lowered by ``safety.penalty`` so the model learns to avoid
what the filter flags (0: count only).

:func:`flag_reasons` says why each image is flagged; :func:`hide` is what a flagged image looks like where
people see it (the A/B pages and reports show the reason, never the pixels).

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


def build_filter(name: str, args: dict | None = None, field: str = "safety.filter"):
    """The filter called ``name`` (built like a reward); errors name ``field``."""
    from .config import RewardTerm

    try:
        filter_ = build_reward([RewardTerm(name=name, args=args or {})])
    except ValueError as e:
        raise ValueError(str(e).replace("reward.terms[0].name", field).replace("reward.terms[0]", field)) from None
    filter_.name = name
    return filter_


def flag_reasons(filter_, threshold: float, images, prompts: list[str]) -> list[str | None]:
    """Per image: why the filter flags it ("<filter>: score 1.00 >= 0.5"), or None when it passes."""
    scores, _ = filter_(images, prompts, [{} for _ in prompts], batch="safety filter")
    name = getattr(filter_, "name", "safety filter")
    return [f"{name}: score {s:.2f} >= {threshold}" if s >= threshold else None for s in np.asarray(scores, float)]


def with_safety(reward, safety):
    """``reward`` behind the configured filter, or ``reward`` itself when ``safety.filter`` is unset."""
    if safety.filter is None:
        return reward
    filter_ = build_filter(safety.filter, safety.args)
    return SafetyFilteredReward(reward, filter_, safety.threshold, safety.penalty)


def hide(image: np.ndarray, radius: float = 8.0) -> np.ndarray:
    """A flagged image made unrecognisable (Gaussian blur, then 8x8 blocks) for reports that must show *something*
    in its place; the labeling app does not serve a flagged image at all."""
    from PIL import Image, ImageFilter

    im = Image.fromarray(np.asarray(image, dtype=np.uint8)).filter(ImageFilter.GaussianBlur(radius))
    w, h = im.size
    return np.asarray(im.resize((max(1, w // 8), max(1, h // 8))).resize((w, h), Image.NEAREST))


def hide_flagged(images: np.ndarray, prompts: list[str], safety) -> tuple[np.ndarray, list[str | None]]:
    """``images`` (N, H, W, 3) uint8 with those the configured filter flags hidden, and the reasons (None: shown).
    Without ``safety.filter`` the images come back as they are."""
    if safety.filter is None:
        return images, [None] * len(images)
    reasons = flag_reasons(build_filter(safety.filter, safety.args), safety.threshold, images, prompts)
    out = np.array(images, copy=True)
    for i, reason in enumerate(reasons):
        if reason:
            out[i] = hide(out[i])
    return out, reasons
