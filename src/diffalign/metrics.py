"""Evaluation metrics: reward, toy success, diversity (Vendi score) and drift from the base model.

**Diversity** is the Vendi score as its authors define it (Friedman & Dieng 2023, "The Vendi Score"):
exp of the Shannon entropy of the eigenvalues of K/n, K the cosine-similarity kernel of the n image
embeddings; it reads as "the effective number of distinct images" (1 = all identical, n = all orthogonal).
The kernel of a pair depends only on those two images, never on which other images are in the set.

The default embedding must work offline and without a downloaded network, so it is a **pixel
embedding**: each image downsampled to 16x16 (area averaging), minus a *fixed* reference image, flattened.
The reference is the toy world's plain background colour (a constant image): without removing it, the
shared light background makes every pair of toy images look alike (cosine ~0.97). It is fixed, not the
set's own mean: centring on the set's mean made two images always exactly opposite (Vendi 2.0 - the old
value 1.0 with ``eval.samples_per_prompt = 2`` came from that) and capped n unrelated images at n - 1.
For natural images use a semantic embedding (``clip_embedding``: a CLIP vision model from a local
directory or the hub) or pass ``embed=`` any function mapping uint8 images to vectors. Fewer than ~8
images per prompt make the figure coarse (it is bounded by n); ``diffalign eval`` warns.

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

# The toy world's background colour in [0, 1] (toy/scenes.py BACKGROUND): the fixed reference the pixel
# embedding subtracts. Kept here as numbers so metrics does not import the toy world.
REFERENCE_COLOUR = (242 / 255, 242 / 255, 236 / 255)


def pixel_embedding(images, size: int = 16, reference: tuple[float, float, float] | None = REFERENCE_COLOUR) -> np.ndarray:
    """(n, 3 * size * size): area-downsampled pixels in [0, 1] minus a fixed reference colour (per channel).

    ``reference=None`` keeps raw pixels. The reference never depends on the set being scored."""
    x = torch.from_numpy(to_uint8_images(images)).permute(0, 3, 1, 2).float() / 255.0
    x = F.adaptive_avg_pool2d(x, size)
    if reference is not None:
        x = x - torch.tensor(reference, dtype=x.dtype).reshape(1, 3, 1, 1)
    return x.reshape(x.shape[0], -1).numpy().astype(np.float64)


def clip_embedding(model_id: str, device: str = "cpu", revision: str | None = None) -> Callable:
    """A semantic embedding for natural images: L2-normalised CLIP image features.

    ``model_id`` is a local directory or a hub id of a ``CLIPVisionModelWithProjection`` (e.g.
    ``openai/clip-vit-large-patch14``) with its image processor. Returns ``embed(images) -> (n, d)``."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    model = CLIPVisionModelWithProjection.from_pretrained(model_id, revision=revision).to(device).eval()
    processor = CLIPImageProcessor.from_pretrained(model_id, revision=revision)

    @torch.no_grad()
    def embed(images) -> np.ndarray:
        pixels = processor(images=list(to_uint8_images(images)), return_tensors="pt")["pixel_values"]
        feats = model(pixel_values=pixels.to(device)).image_embeds.float()
        return F.normalize(feats, dim=-1).cpu().numpy().astype(np.float64)

    return embed


def vendi_score(embeddings: np.ndarray) -> float:
    """exp(H(eigenvalues of K / n)), K_ij = cos(x_i, x_j) of the embeddings as given (no centring).

    n mutually orthogonal embeddings score n, n identical ones 1. A zero embedding (an image equal to the
    reference) is treated as one point: similarity 1 to other zero embeddings, 0 to the rest."""
    x = np.asarray(embeddings, dtype=np.float64)
    n = x.shape[0]
    if n < 2:
        return float(n)
    norms = np.linalg.norm(x, axis=1)
    zero = norms < 1e-12
    x = x / np.where(zero, 1.0, norms)[:, None]
    k = x @ x.T
    k[np.ix_(zero, zero)] = 1.0
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
