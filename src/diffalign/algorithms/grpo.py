"""GRPO as Flow-GRPO uses it (Liu et al. 2025, "Flow-GRPO: Training Flow Matching Models via Online RL",
arXiv 2505.05470; DanceGRPO, arXiv 2505.07818): the recipe users of SD3 / FLUX compare against. It runs on any
family, because the stochastic step is the family's (the SDE step for flow models, DDIM(eta) for SD).

Notation: a group is the G images of one prompt sampled in an epoch (``sample.same_prompt_per_batch``: a
sampling batch is one group), r their rewards, rho = p_theta(x_t'|x_t) / p_old(x_t'|x_t) per step,
N(mu_theta, s^2 I) and N(mu_ref, s^2 I) the step's Gaussians under the trained and the frozen model (same std:
it depends on the schedule and the noise level only).

    A          = clip((r - mean_group(r)) / (std_group(r) + 1e-4), -A_max, A_max)     (std over the whole
                 batch with ``grpo.global_std``)
    policy     = E_{i,t} max(-A_i rho_{i,t}, -A_i clip(rho_{i,t}, 1 - eps, 1 + eps))
    kl         = E_{i,t} mean_elements((mu_theta - mu_ref)^2) / (2 s^2)   (closed form, Gaussians of equal std)
    L          = policy + kl_weight * kl

Trained steps: a random subset of each trajectory's steps (``train.timestep_fraction``), or with
``grpo.window_start`` the contiguous window of that many steps starting there (Flow-GRPO-Fast trains a few
early, high-noise steps).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from .base import Algorithm, Policy, Transition
from .ddpo import ppo_clipped_loss


def group_advantages(prompts: list[str], rewards: np.ndarray, global_std: bool = False) -> np.ndarray:
    """(r - mean of its prompt's group) / (std of the group, or of the whole batch, + 1e-4)."""
    rewards = np.asarray(rewards, dtype=np.float64)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        groups[p].append(i)
    adv = np.zeros_like(rewards)
    batch_std = rewards.std()
    for idx in groups.values():
        r = rewards[idx]
        adv[idx] = (r - r.mean()) / ((batch_std if global_std else r.std()) + 1e-4)
    return adv


class GRPO(Algorithm):
    name = "grpo"

    def __init__(self, cfg):
        self.cfg = cfg.grpo

    def prepare(self, prompts, rewards, epoch, context):
        adv = group_advantages(prompts, rewards.cpu().numpy(), self.cfg.global_std)
        adv = np.clip(adv, -self.cfg.adv_clip_max, self.cfg.adv_clip_max)
        return {"advantages": torch.as_tensor(adv, dtype=torch.float32)}

    def schedule(self, n, steps, trained_steps, batch_size, gen):
        if self.cfg.window_start is None:
            return super().schedule(n, steps, trained_steps, batch_size, gen)
        # The same minibatches as the default over a window of `trained_steps` steps, shifted to its start.
        start = self.cfg.window_start
        return [(rows, k + start) for rows, k in super().schedule(n, trained_steps, trained_steps, batch_size, gen)]

    def loss(self, tr: Transition, policy: Policy, prepared: dict, epoch: int):
        log_prob, eps = policy.log_prob(tr)
        advantages = prepared["advantages"].to(log_prob.device)[tr.sample_index]
        policy_loss, stats = ppo_clipped_loss(advantages, log_prob, tr.old_log_prob, self.cfg.clip_range)
        stats["policy_loss"] = policy_loss.item()
        if self.cfg.kl_weight == 0:
            return policy_loss, stats
        family = policy.family
        mean, std = family.step_mean_std(eps, tr.timesteps, tr.latents, policy.eta)
        with torch.no_grad():
            ref_mean, _ = family.step_mean_std(policy.reference_eps(tr), tr.timesteps, tr.latents, policy.eta)
        per_element = (mean - ref_mean) ** 2 / (2 * (std**2).expand_as(mean))
        kl = per_element.mean(dim=tuple(range(1, mean.ndim))).mean()
        stats["kl"] = kl.item()
        return policy_loss + self.cfg.kl_weight * kl, stats


__all__ = ["GRPO", "group_advantages"]
