"""The reward protocol, validation of what rewards return, weighted sums, and a worker pool.

A reward is any callable ``reward(images, prompts, metadata) -> scores`` or ``-> (scores, info)``:

* ``images``: uint8 array (B, H, W, 3), RGB;
* ``prompts``: list of B strings; ``metadata``: list of B dicts (may be empty dicts);
* ``scores``: B finite floats (list, numpy or torch); ``info``: a dict of extra per-batch diagnostics.

(The interface of ddpo-pytorch and TRL.) Rewards are looked up by name in :data:`REWARDS`. Whatever a
reward returns goes through :func:`validate_scores`: a wrong count, NaN or inf never reaches the loss.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from ..reliability import fault_point


class RewardError(RuntimeError):
    """A reward failed or returned unusable scores; the message names the reward and the batch."""


class Reward(Protocol):
    name: str

    def __call__(self, images: np.ndarray, prompts: list[str], metadata: list[dict]) -> Any: ...


REWARDS: dict[str, Callable[..., Reward]] = {}


def register(name: str):
    def deco(factory):
        REWARDS[name] = factory
        return factory
    return deco


def to_uint8_images(images) -> np.ndarray:
    """(B, 3, H, W) float tensor in [0, 1], (B, H, W, 3) uint8/float array, or PIL list -> (B, H, W, 3) uint8."""
    if torch.is_tensor(images):
        images = images.detach().float().cpu()
        if images.ndim == 4 and images.shape[1] in (1, 3):
            images = images.permute(0, 2, 3, 1)
        images = images.numpy()
    if isinstance(images, list):
        images = np.stack([np.asarray(im.convert("RGB")) for im in images])
    images = np.asarray(images)
    if images.dtype != np.uint8:
        images = np.clip(np.rint(images * 255.0), 0, 255).astype(np.uint8)
    return images


def _describe(value) -> str:
    if value is None:
        return "null (None)"
    if isinstance(value, bool | np.bool_):
        return f"the boolean {str(bool(value)).lower()}"
    return f"the string {str(value)[:40]!r}"


def _refuse_non_numbers(raw, where: str) -> None:
    """null, booleans and strings are not scores: numpy would turn them into NaN, 0/1 or a number silently."""
    if torch.is_tensor(raw):
        items = raw.reshape(-1)[:1].tolist() if raw.dtype == torch.bool else []
    elif isinstance(raw, np.ndarray):
        items = raw.reshape(-1).tolist() if raw.dtype.kind in "bOUS" else []
    elif isinstance(raw, list | tuple):
        items = list(raw)
    else:
        return
    for i, v in enumerate(items):
        if v is None or isinstance(v, bool | np.bool_ | str | bytes):
            raise RewardError(f"{where} returned {_describe(v)} at position {i}: every score must be a number "
                              f"(null, booleans and strings are refused)")


def validate_scores(raw, n: int, reward_name: str, batch: int | str, source: str | None = None) -> np.ndarray:
    """``raw`` as n finite float64 scores, or a RewardError naming the reward (and ``source``, e.g. its URL),
    the batch, and what is wrong (count, position and value)."""
    where = f"reward {reward_name!r}{f' ({source})' if source else ''} on batch {batch}"
    if isinstance(raw, tuple):
        raw = raw[0]
    if raw is None or isinstance(raw, str | bytes | dict):  # numpy would make NaN or an error of these
        raise RewardError(f"{where} returned {type(raw).__name__}, not a sequence of numbers (one score per image)")
    _refuse_non_numbers(raw, where)
    try:
        scores = np.asarray(raw.detach().cpu() if torch.is_tensor(raw) else raw, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as e:
        raise RewardError(f"{where} returned {type(raw).__name__}, not a sequence of numbers: {e}") from None
    if scores.shape[0] != n:
        raise RewardError(f"{where} returned {scores.shape[0]} scores for {n} images")
    bad = ~np.isfinite(scores)
    if bad.any():
        raise RewardError(f"{where} returned non-finite scores (NaN/inf) at positions {np.flatnonzero(bad)[:10].tolist()}")
    return scores


def _split_info(raw) -> dict:
    return dict(raw[1]) if isinstance(raw, tuple) and len(raw) > 1 and isinstance(raw[1], dict) else {}


@dataclass
class WeightedReward:
    """sum_i w_i r_i(images); per-term scores are kept in info under their names."""

    terms: list[tuple[str, float, Reward]]
    name: str = field(default="weighted")

    def __call__(self, images, prompts, metadata, batch: int | str = "?"):
        fault_point("reward")  # tests/reliability: a crash while a batch is being scored
        images = to_uint8_images(images)
        total = np.zeros(len(prompts))
        info: dict[str, Any] = {}
        for term_name, weight, reward in self.terms:
            source = getattr(reward, "source", None)  # e.g. the scoring service's URL
            try:
                raw = reward(images, prompts, metadata)
            except RewardError:
                raise
            except Exception as e:  # a user's reward may raise anything: name it and the batch
                raise RewardError(f"reward {term_name!r}{f' ({source})' if source else ''} raised on batch {batch}: "
                                  f"{type(e).__name__}: {e}") from e
            scores = validate_scores(raw, len(prompts), term_name, batch, source)
            info[term_name] = scores
            for k, v in _split_info(raw).items():
                info[f"{term_name}/{k}"] = v
            total += weight * scores
        return total, info


def load_python_function(spec: str) -> Callable:
    """``package.module:function`` or ``path/to/file.py:function``."""
    if ":" not in spec:
        raise ValueError(f"python reward {spec!r}: expected 'module:function' or 'file.py:function'")
    target, func_name = spec.rsplit(":", 1)
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise ValueError(f"python reward: file {target!r} not found")
        mod_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[path.stem] = module
        mod_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise ValueError(f"python reward: cannot import module {target!r}: {e}") from None
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise ValueError(f"python reward: {target!r} has no callable {func_name!r}")
    return fn


@register("python")
def python_reward(function: str) -> Reward:
    fn = load_python_function(function)
    fn.name = getattr(fn, "name", function)
    return fn


class RewardPool:
    """Scores batches in worker threads so that scoring batch k overlaps sampling batch k+1.

    Threads, not processes: built-in rewards spend their time in numpy, PIL, torch or network I/O, which
    release the GIL, and a user's reward stays in the process that imported it.
    """

    def __init__(self, reward: WeightedReward, workers: int = 1):
        self.reward = reward
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="reward") if workers > 0 else None

    def submit(self, images, prompts: list[str], metadata: list[dict], batch: int | str) -> Future:
        images = to_uint8_images(images)  # copy off the sampler's tensors before the next batch overwrites nothing
        if self._executor is None:
            fut: Future = Future()
            try:
                fut.set_result(self.reward(images, prompts, metadata, batch))
            except Exception as e:
                fut.set_exception(e)
            return fut
        return self._executor.submit(self.reward, images, prompts, metadata, batch)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
