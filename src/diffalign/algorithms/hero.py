"""HERO: human feedback -> a feedback-aligned embedding -> a continuous reward, plus noise reuse
(Hiranaka et al., "HERO: Human-Feedback Efficient Reinforcement Learning for Online Diffusion Model
Finetuning", ICLR 2025, arXiv 2410.05116; sony/hero).

Notation:

    z          final latent of an image (C, h, w)
    E(z)       embedding encoder, one of (``hero.encoder``):
               "latent-cnn":    small CNN on z (C -> 8 -> 16 -> 32 channels, pooling) + MLP -> R^d (the reference)
               "unet-features": MLP on phi(z), the frozen base UNet's features of z: the output of one block
                                (``hero.feature_block``), averaged over space, for z noised to a small timestep
    P(.)       projection head, used by the triplet loss only
    d(u, v)    cosine distance (1 - cos(u, v)) / 2, in [0, 1]
    triplet    max(0, d(P E(z_best), P E(z_good)) - d(P E(z_best), P E(z_bad)) + margin)
    reward     r(z) = (cos(E(z), E(z_best)) + 1) / 2        (mode "best")
               r(z) = mean_good (cos(E(z), E(z_good)) + 1) / 2 (mode "good-mean")

The policy update is DDPO on these rewards (``ddpo.py``). The next batch's initial noises come from the
preferred images' noises: a fraction ``best_noise_fraction`` from the best's, the rest from the good
images' (in turn), each perturbed as sqrt(1 - s^2) eps_selected + s N(0, I).

Why the second encoder: the CNN is trained from scratch on a few dozen labelled latents per round and, on
the toy task, ranks new images at chance (held-out AUC ~0.5), so the reward's gradation between images is
noise. The diffusion model's own features already separate what evaluators judge: a linear probe on phi(z)
from 32 labels ranks held-out toy images at AUC 0.99 where the raw latent gives 0.60 (bench/RESULTS.md).
Only the small head is trained; the UNet runs once per image, with the LoRA switched off so that the
features, and with them the embedding learned in earlier rounds, do not move as the policy trains.

Edge cases handled here (the reference code gets some wrong): a round with no good image (no triplets;
the reward falls back to the previous best, or to zero advantages), a round where only the best is good
(the anchor is its own positive, so the loss only pushes bad images away), and a best picked from the
candidate list (the previous round's best, not in this batch: its latent and noise are kept).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class EmbeddingEncoder(nn.Module):
    def __init__(self, in_channels: int = 4, embedding_dim: int = 32, projection_dim: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 8, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.SiLU(), nn.AdaptiveAvgPool2d(2),
        )
        self.mlp = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4, 64), nn.SiLU(), nn.Linear(64, embedding_dim))
        self.projection = nn.Sequential(nn.SiLU(), nn.Linear(embedding_dim, projection_dim))

    def embed(self, z: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.features(z.float()))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.projection(self.embed(z))


class FeatureHead(nn.Module):
    """The trainable part of the "unet-features" encoder: an MLP over a feature vector per image."""

    def __init__(self, in_features: int, embedding_dim: int = 32, projection_dim: int = 32):
        super().__init__()
        # LayerNorm: UNet activations have block-dependent scales; it keeps one learning rate right for any.
        self.mlp = nn.Sequential(nn.LayerNorm(in_features), nn.Linear(in_features, 64), nn.SiLU(),
                                 nn.Linear(64, embedding_dim))
        self.projection = nn.Sequential(nn.SiLU(), nn.Linear(embedding_dim, projection_dim))

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(features.float())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.projection(self.embed(features))


class UNetFeatures:
    """phi(z): the frozen base UNet's ``block`` output for final latents noised to ``timestep``, averaged over
    space. One noise pattern is shared by every image, so an image's features do not depend on its batch."""

    def __init__(self, pipe, block: str, timestep: int, seed: int = 0):
        from ..families import family_for

        self.family = family_for(pipe)  # the denoiser, its conditioning and noising differ by model family
        block = block or self.family.feature_block()  # '': the family's (a UNet's up_blocks.1, a DiT's middle block)
        self.pipe, self.block, self.timestep = pipe, block, timestep
        unet = self.family.denoiser
        try:
            self.module = unet.get_submodule(block)
        except AttributeError:
            names = [n for n, _ in unet.named_children()]
            raise ValueError(f"hero.feature_block = {block!r} is not a module of the denoiser; use a dotted path "
                             f"such as 'up_blocks.1' (top-level modules: {', '.join(names)})") from None
        steps = self.family.feature_timestep_range()
        if not 0 <= timestep < steps:
            raise ValueError(f"hero.feature_timestep = {timestep} is outside the scheduler's 0..{steps - 1}")
        self.noise = torch.randn(self.family.latent_shape(1)[1:], generator=torch.Generator().manual_seed(seed))

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor, prompt_embeds, unet=None, chunk: int = 32) -> torch.Tensor:
        """(B, C, h, w) latents and the conditioning of 1 or B prompts (a (1 or B, L, D) prompt-embedding tensor, or
        a families.Conditioning with the family's extra conditioning) -> (B, F) features, ``chunk`` images per
        denoiser call (a round with many unlabelled images would otherwise be one large call)."""
        from ..families import Conditioning
        from ..pipeline import set_lora_enabled

        unet = unet if unet is not None else self.family.denoiser
        cond = prompt_embeds if isinstance(prompt_embeds, Conditioning) else Conditioning(prompt_embeds)
        cond = cond.conditional().to(latents.device, unet.dtype)
        captured = []
        hook = self.module.register_forward_hook(lambda module, args, out: captured.append(
            self.family.pool_features(out).cpu()))
        has_lora = bool(getattr(unet, "peft_config", None))
        try:
            if has_lora:
                set_lora_enabled(unet, False)
            t = torch.tensor([self.timestep], device=latents.device)
            noisy = self.family.noise_for_features(latents, self.noise.to(latents).expand_as(latents), t)
            for start in range(0, len(noisy), chunk):
                part = noisy[start:start + chunk].to(unet.dtype)
                rows = list(range(start, start + len(part))) if len(cond) > 1 else [0] * len(part)
                self.family.conditional(unet, part, t, cond.index(rows))
        finally:
            hook.remove()
            if has_lora:
                set_lora_enabled(unet, True)
        return torch.cat(captured)


def cosine_distance(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (1 - F.cosine_similarity(u, v, dim=-1)) / 2


def triplet_loss(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, margin: float) -> torch.Tensor:
    return F.relu(cosine_distance(anchor, positive) - cosine_distance(anchor, negative) + margin).mean()


@dataclass
class RoundLabels:
    """One round's feedback as HERO uses it. ``best`` indexes the batch, or is None when the best is the
    previous round's best (``best_is_previous``) or when nobody picked one."""

    good: torch.Tensor  # (B,) bool
    best: int | None
    best_is_previous: bool = False


def make_triplets(labels: RoundLabels, num_candidates: int, anchor_index: int | None):
    """(anchor, positive, negative) index triples into the candidate latents (batch + previous best).

    ``anchor_index`` is the best's row among the candidates. With no anchor or no bad image there is
    nothing to learn from and the list is empty; with no other good image the anchor is its own positive.
    """
    if anchor_index is None:
        return []
    good = [i for i in range(len(labels.good)) if labels.good[i] and i != anchor_index]
    bad = [i for i in range(len(labels.good)) if not labels.good[i]]
    if not bad:
        return []
    positives = good or [anchor_index]
    return [(anchor_index, p, n) for p in positives for n in bad]


class HERO:
    """The feedback-to-reward part of HERO; the policy update is DDPO."""

    def __init__(self, cfg, in_channels: int = 4, seed: int = 0, feature_dim: int | None = None,
                 features: UNetFeatures | None = None):
        """``in_channels``: of the latents ("latent-cnn"); ``feature_dim``: of phi(z) ("unet-features"), which
        ``features`` computes. ``update`` and ``rewards`` take what the encoder reads: latents or features."""
        self.cfg = cfg  # HEROConfig
        self.features = features
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        if cfg.encoder == "unet-features":
            if feature_dim is None:
                raise ValueError("hero.encoder = 'unet-features' needs the feature size (feature_dim)")
            self.encoder = FeatureHead(feature_dim, cfg.embedding_dim)
        else:
            self.encoder = EmbeddingEncoder(in_channels, cfg.embedding_dim)
        torch.random.set_rng_state(gen_state)
        self.optimizer = torch.optim.Adam(self.encoder.parameters(), lr=cfg.learning_rate)
        self.best_latent: torch.Tensor | None = None  # the encoder's input for the best so far
        self.best_noise: torch.Tensor | None = None

    def update(self, latents: torch.Tensor, labels: RoundLabels, gen: torch.Generator) -> dict:
        """Train the encoder on this round's triplets; remember the best latent. Returns diagnostics."""
        candidates = latents
        if labels.best is not None:
            anchor = labels.best
        elif labels.best_is_previous and self.best_latent is not None:
            candidates = torch.cat([latents, self.best_latent[None]])
            anchor = len(latents)
        else:
            anchor = None
        padded = RoundLabels(torch.cat([labels.good, torch.ones(len(candidates) - len(latents), dtype=torch.bool)]),
                             labels.best, labels.best_is_previous)
        triplets = make_triplets(padded, len(candidates), anchor)
        stats = {"triplets": len(triplets), "triplet_loss": float("nan"), "encoder_collapsed": False}
        if triplets:
            idx = torch.tensor(triplets)  # (N, 3)
            before = copy.deepcopy((self.encoder.state_dict(), self.optimizer.state_dict()))
            self.encoder.train()
            for _ in range(self.cfg.embed_steps):
                pick = idx[torch.randint(len(idx), (min(len(idx), 64),), generator=gen)]
                proj = self.encoder(candidates)
                loss = triplet_loss(proj[pick[:, 0]], proj[pick[:, 1]], proj[pick[:, 2]], self.cfg.triplet_margin)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
            stats["triplet_loss"] = float(loss.item())
            if self.collapsed(candidates):
                # The triplet loss has a trivial minimum (every embedding equal, loss = margin) that it falls
                # into when a round's good and bad images are hard to tell apart; the reward would then be
                # one constant plus float noise, and batch normalisation would turn that noise into
                # advantages. Keep the encoder of the previous round instead.
                self.encoder.load_state_dict(before[0])
                self.optimizer.load_state_dict(before[1])
                stats["encoder_collapsed"] = True
        if anchor is not None:
            self.best_latent = candidates[anchor].detach().clone()
        return stats

    @torch.no_grad()
    def collapsed(self, latents: torch.Tensor) -> bool:
        """True when the encoder maps ``latents`` to (nearly) one direction: rewards would not rank them."""
        self.encoder.eval()
        emb = F.normalize(self.encoder.embed(latents), dim=-1)
        sims = emb @ emb.T
        return len(latents) > 1 and float(sims.min()) > 1 - self.cfg.collapse_tolerance

    @torch.no_grad()
    def rewards(self, latents: torch.Tensor, good: torch.Tensor) -> torch.Tensor:
        """Similarity to the best (or to the good images) in the learned embedding, in [0, 1]."""
        self.encoder.eval()
        emb = self.encoder.embed(latents)
        if self.cfg.reward_mode == "good-mean" and good.any():
            refs = emb[good]
        elif self.best_latent is not None:
            refs = self.encoder.embed(self.best_latent[None])
        else:
            return torch.zeros(len(latents))  # nothing preferred yet: zero advantages, no update
        sims = (F.cosine_similarity(emb[:, None], refs[None], dim=-1) + 1) / 2  # (B, R)
        return sims.mean(dim=1)

    def next_noises(self, noises: torch.Tensor, labels: RoundLabels, batch: int, gen: torch.Generator) -> torch.Tensor | None:
        """Initial noises of the next round from preferred noises, or None (fresh noise) if nothing is preferred."""
        if labels.best is not None:
            self.best_noise = noises[labels.best].clone()
        good_noises = [noises[i] for i in range(len(noises)) if labels.good[i] and i != labels.best]
        if self.best_noise is None and not good_noises:
            return None
        n_best = round(self.cfg.best_noise_fraction * batch) if self.best_noise is not None else 0
        if not good_noises:
            n_best = batch if self.best_noise is not None else 0
        selected = [self.best_noise] * n_best
        for i in range(batch - n_best):
            selected.append(good_noises[i % len(good_noises)] if good_noises else self.best_noise)
        base = torch.stack(selected)  # (batch, C, h, w)
        s = self.cfg.noise_perturbation
        fresh = torch.randn(base.shape, generator=gen)
        return (1 - s**2) ** 0.5 * base + s * fresh

    def state_dict(self) -> dict:
        return {"encoder": self.encoder.state_dict(), "optimizer": self.optimizer.state_dict(),
                "best_latent": self.best_latent, "best_noise": self.best_noise}

    def load_state_dict(self, state: dict) -> None:
        self.encoder.load_state_dict(state["encoder"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.best_latent, self.best_noise = state["best_latent"], state["best_noise"]
