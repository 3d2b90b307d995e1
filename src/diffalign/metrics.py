"""Evaluation metrics: reward, toy success, diversity (Vendi score) and drift from the base model.

**Diversity** is the Vendi score (Friedman & Dieng 2023): exp of the Shannon entropy of the eigenvalues of
K/n, K the cosine-similarity kernel of n image embeddings; it reads as "the effective number of distinct
images" (1 = all identical, n = all orthogonal). The default embedding must work offline and without a
downloaded network, so it is a **pixel embedding**: each image downsampled to 16x16 (area averaging),
centred by the batch mean image and L2-normalised. Centring matters: without it the shared light
background makes every pair of toy images look alike. For natural images, pass ``embed=`` any function
mapping uint8 images to vectors (e.g. a CLIP image encoder you have locally).

**Drift** is how far the tuned model's images move from the base model's for the same prompt and the
same initial noise: the root-mean-square pixel difference in [0, 1] (0 = unchanged), averaged over
pairs. Same noise pairs the samples, so drift measures the model change, not sampling randomness.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .rewards import to_uint8_images


def pixel_embedding(images, size: int = 16) -> np.ndarray:
    x = torch.from_numpy(to_uint8_images(images)).permute(0, 3, 1, 2).float() / 255.0
    x = F.adaptive_avg_pool2d(x, size).reshape(x.shape[0], -1).numpy().astype(np.float64)
    return x


def vendi_score(embeddings: np.ndarray) -> float:
    """exp(H(eigenvalues of K / n)) with K the cosine kernel of the centred embeddings."""
    x = np.asarray(embeddings, dtype=np.float64)
    n = x.shape[0]
    if n < 2:
        return float(n)
    x = x - x.mean(axis=0, keepdims=True)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = x / np.maximum(norms, 1e-12)
    k = x @ x.T
    # Identical images centre to (near) zero vectors; give them self-similarity 1 so K stays a kernel.
    np.fill_diagonal(k, 1.0)
    eig = np.clip(np.linalg.eigvalsh(k / n), 0, None)
    eig = eig[eig > 1e-12]
    return float(np.exp(-(eig * np.log(eig)).sum()))


def diversity(images, prompts: list[str] | None = None, embed: Callable | None = None) -> float:
    """Mean Vendi score over the images of each prompt (diversity *within* a prompt, which is what reward
    collapse destroys); over all images if ``prompts`` is None."""
    embed = embed or pixel_embedding
    emb = embed(images)
    if prompts is None:
        return vendi_score(emb)
    scores = []
    for p in dict.fromkeys(prompts):
        idx = [i for i, q in enumerate(prompts) if q == p]
        if len(idx) >= 2:
            scores.append(vendi_score(emb[idx]))
    return float(np.mean(scores)) if scores else float("nan")


def drift(base_images, tuned_images) -> float:
    """RMS pixel difference in [0, 1] between paired images (same prompt, same initial noise)."""
    a = to_uint8_images(base_images).astype(np.float64) / 255.0
    b = to_uint8_images(tuned_images).astype(np.float64) / 255.0
    if a.shape != b.shape:
        raise ValueError(f"drift needs paired images of equal shape, got {a.shape} and {b.shape}")
    return float(np.sqrt(((a - b) ** 2).mean(axis=(1, 2, 3))).mean())


def toy_success(images, prompts: list[str]) -> tuple[float, float] | None:
    """(success rate, mean partial score) by the toy judge, or None if the prompts are not toy prompts."""
    from .toy.judge import judge_batch
    from .toy.scenes import parse_prompt

    try:
        for p in set(prompts):
            parse_prompt(p)
    except ValueError:
        return None
    success, partial, _ = judge_batch(to_uint8_images(images), prompts)
    return float(np.mean(success)), float(np.mean(partial))
