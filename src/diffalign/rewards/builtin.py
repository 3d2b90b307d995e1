"""Built-in rewards: JPEG (in)compressibility (Black et al. 2023) and the toy-world judge."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from .base import register


def jpeg_size_kb(images: np.ndarray, quality: int = 95) -> np.ndarray:
    sizes = []
    for im in images:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000.0)
    return np.asarray(sizes)


class JpegReward:
    """Size of the image as JPEG (quality 95) in kB; negated for compressibility, as in DDPO."""

    def __init__(self, sign: float, quality: int = 95, name: str = "jpeg"):
        if not 1 <= quality <= 100:
            raise ValueError(f"jpeg reward: quality must be in 1..100 (got {quality})")
        self.sign, self.quality, self.name = sign, quality, name

    def __call__(self, images, prompts, metadata):
        size = jpeg_size_kb(images, self.quality)
        return self.sign * size, {"jpeg_kb_mean": float(size.mean())}


@register("jpeg_compressibility")
def jpeg_compressibility(quality: int = 95) -> JpegReward:
    return JpegReward(-1.0, quality, "jpeg_compressibility")


@register("jpeg_incompressibility")
def jpeg_incompressibility(quality: int = 95) -> JpegReward:
    return JpegReward(1.0, quality, "jpeg_incompressibility")


class ToyJudgeReward:
    """The toy world's exact judge: ``partial`` score in [0, 1] (default) or 0/1 ``success``."""

    def __init__(self, mode: str = "partial"):
        if mode not in ("partial", "success"):
            raise ValueError(f"toy reward: mode must be 'partial' or 'success' (got {mode!r})")
        self.mode, self.name = mode, f"toy_{mode}"

    def __call__(self, images, prompts, metadata):
        from ..toy.judge import judge_batch

        success, partial, _ = judge_batch(images, prompts)
        scores = partial if self.mode == "partial" else success.astype(np.float64)
        return np.asarray(scores, dtype=np.float64), {"success_rate": float(np.mean(success))}


@register("toy")
def toy(mode: str = "partial") -> ToyJudgeReward:
    return ToyJudgeReward(mode)
