"""D3PO: direct preference optimisation over the denoising steps, without a reward model
(Yang et al., "Using Human Feedback to Fine-tune Diffusion Models without Any Reward Model", CVPR 2024,
arXiv 2311.13231; yk7333/d3po). Our human-feedback baseline.

Notation: for a preference pair (w preferred over l), sampled from the same initial noise, at the same
denoising step t:

    rho_w = clamp(p_theta(x_t'^w | x_t^w) / p_ref(x_t'^w | x_t^w), 1 - c, 1 + c)     (ref: LoRA off)
    L     = -log sigmoid(beta (log rho_w - log rho_l)),   beta = 0.1, c = 0.1; every step trained

Pairs come from the labels of a round, within each group of images that share an initial noise:
best > good > bad.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Algorithm, Policy, Transition


def preference_pairs(good: list[bool], best: int | None, groups: list[list[int]]) -> list[tuple[int, int]]:
    """(winner, loser) pairs within each group: best > good > bad."""
    def rank(i: int) -> int:
        return 2 if i == best else (1 if good[i] else 0)

    pairs = []
    for group in groups:
        for a in group:
            for b in group:
                if rank(a) > rank(b):
                    pairs.append((a, b))
    return pairs


def dpo_loss(log_ratio_w: torch.Tensor, log_ratio_l: torch.Tensor, beta: float) -> torch.Tensor:
    return -F.logsigmoid(beta * (log_ratio_w - log_ratio_l)).mean()


class D3PO(Algorithm):
    name = "d3po"

    def __init__(self, cfg):
        self.cfg = cfg  # D3POConfig

    def schedule(self, n, steps, trained_steps, batch_size, gen):
        """Minibatches of pairs: rows [w_1..w_m, l_1..l_m], each pair at one shared step; every step trained."""
        pairs = self._pairs
        if not pairs:
            return
        per_batch = max(1, batch_size // 2)
        order = torch.randperm(len(pairs), generator=gen).tolist()
        for start in range(0, len(order), per_batch):
            chunk = [pairs[i] for i in order[start:start + per_batch]]
            rows = torch.tensor([w for w, _ in chunk] + [lo for _, lo in chunk])
            for k in torch.randperm(steps, generator=gen)[:trained_steps].tolist():
                yield rows, torch.full((len(rows),), k, dtype=torch.long)

    _pairs: list[tuple[int, int]] = []

    def set_pairs(self, pairs: list[tuple[int, int]]) -> None:
        self._pairs = list(pairs)

    def prepare(self, prompts, rewards, epoch, context):
        return {}

    def loss(self, tr: Transition, policy: Policy, prepared: dict, epoch: int):
        log_pf, _ = policy.log_prob(tr)
        log_ref, _ = policy.reference_log_prob(tr)
        c = self.cfg.ratio_clip
        log_ratio = torch.clamp(log_pf - log_ref, min=torch.log(torch.tensor(1 - c)), max=torch.log(torch.tensor(1 + c)))
        m = len(log_pf) // 2
        loss = dpo_loss(log_ratio[:m], log_ratio[m:], self.cfg.beta)
        return loss, {"dpo_loss": loss.item(), "log_ratio_w": log_ratio[:m].mean().item(),
                      "log_ratio_l": log_ratio[m:].mean().item(),
                      "accuracy": (log_ratio[:m] > log_ratio[m:]).float().mean().item()}
