"""DDPO: PPO over the denoising steps (Black et al. 2023, "Training Diffusion Models with Reinforcement
Learning", arXiv 2305.13301; kvablack/ddpo-pytorch; TRL's former DDPOTrainer).

Notation: A advantage, r reward, rho = p_theta(x_t'|x_t) / p_old(x_t'|x_t) the per-step likelihood ratio
(log-probs mean-reduced over latent elements by default, see ``sampling.py``), eps the clip range.

    A   = clip((r - mean_prompt(r)) / (std_prompt(r) + 1e-6), -A_max, A_max)
    L   = E_{i,t} max(-A_i rho_{i,t}, -A_i clip(rho_{i,t}, 1 - eps, 1 + eps))

mean/std per prompt come from a rolling buffer of that prompt's recent rewards, falling back to the
whole batch's statistics until a prompt has ``stat_min_count`` rewards.
"""

from __future__ import annotations

from collections import defaultdict, deque

import numpy as np
import torch

from .base import Algorithm, Policy, Transition


class PerPromptStatTracker:
    """Rolling per-prompt reward statistics (ddpo-pytorch's stat tracking)."""

    def __init__(self, buffer_size: int = 32, min_count: int = 8):
        self.buffer_size, self.min_count = buffer_size, min_count
        self.buffers: dict[str, deque] = defaultdict(lambda: deque(maxlen=self.buffer_size))

    def normalize(self, prompts: list[str], rewards: np.ndarray) -> np.ndarray:
        rewards = np.asarray(rewards, dtype=np.float64)
        advantages = np.empty_like(rewards)
        batch_mean, batch_std = rewards.mean(), rewards.std() + 1e-6
        for prompt in dict.fromkeys(prompts):
            idx = np.array([i for i, p in enumerate(prompts) if p == prompt])
            self.buffers[prompt].extend(rewards[idx].tolist())
            buf = np.asarray(self.buffers[prompt])
            if len(buf) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                mean, std = buf.mean(), buf.std() + 1e-6
            advantages[idx] = (rewards[idx] - mean) / std
        return advantages

    def state_dict(self) -> dict:
        return {p: list(b) for p, b in self.buffers.items()}

    def load_state_dict(self, state: dict) -> None:
        self.buffers.clear()
        for p, values in state.items():
            self.buffers[p].extend(values)


def batch_normalize(rewards: np.ndarray) -> np.ndarray:
    rewards = np.asarray(rewards, dtype=np.float64)
    return (rewards - rewards.mean()) / (rewards.std() + 1e-6)


def ppo_clipped_loss(advantages: torch.Tensor, log_prob: torch.Tensor, old_log_prob: torch.Tensor,
                     clip_range: float) -> tuple[torch.Tensor, dict]:
    """The PPO surrogate on per-step ratios; returns the loss and approx_kl / clipfrac diagnostics."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    policy_loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        stats = {
            "approx_kl": (0.5 * (log_prob - old_log_prob) ** 2).mean().item(),
            "clipfrac": ((ratio - 1.0).abs() > clip_range).float().mean().item(),
            "ratio": ratio.mean().item(),
        }
    return policy_loss, stats


class DDPO(Algorithm):
    name = "ddpo"

    def __init__(self, cfg):
        self.cfg = cfg  # DDPOConfig
        self.tracker = PerPromptStatTracker(cfg.stat_buffer_size, cfg.stat_min_count)

    def advantages(self, prompts: list[str], rewards: np.ndarray) -> np.ndarray:
        if self.cfg.per_prompt_stat_tracking:
            adv = self.tracker.normalize(prompts, rewards)
        else:
            adv = batch_normalize(rewards)
        return np.clip(adv, -self.cfg.adv_clip_max, self.cfg.adv_clip_max)

    def prepare(self, prompts, rewards, epoch, context):
        adv = self.advantages(prompts, rewards.cpu().numpy())
        return {"advantages": torch.as_tensor(adv, dtype=torch.float32)}

    def loss(self, tr: Transition, policy: Policy, prepared: dict, epoch: int):
        log_prob, _ = policy.log_prob(tr)
        advantages = prepared["advantages"].to(log_prob.device)[tr.sample_index]
        policy_loss, stats = ppo_clipped_loss(advantages, log_prob, tr.old_log_prob, self.cfg.clip_range)
        return policy_loss, {"policy_loss": policy_loss.item(), **stats}

    def state_dict(self) -> dict:
        return {"stat_tracker": self.tracker.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.tracker.load_state_dict(state.get("stat_tracker", {}))
