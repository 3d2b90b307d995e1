"""What the training loop hands an algorithm, and what an algorithm must provide.

The loop samples trajectories, scores them, then calls ``algorithm.prepare`` once per epoch and
``algorithm.loss`` once per trained transition (a minibatch of trajectories at one denoising step each).
Algorithms differ only in these two functions and in any extra trainable heads (DAG's flow network).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..families import Conditioning, Family, StableDiffusionFamily
from ..pipeline import set_lora_enabled


@dataclass
class Transition:
    """One denoising step x_t -> x_t' of a minibatch of B trajectories (each at its own step)."""

    latents: torch.Tensor  # (B, C, h, w)  x_t
    next_latents: torch.Tensor  # (B, C, h, w)  x_t', as sampled
    timesteps: torch.Tensor  # (B,)  t
    step_index: torch.Tensor  # (B,)  position of t in the trajectory, 0 = first (noisiest)
    old_log_prob: torch.Tensor  # (B,)  log p_old(x_t' | x_t) at sampling time
    old_eps: torch.Tensor  # (B, C, h, w)  guided eps at sampling time
    prompt_embeds: torch.Tensor  # (B, L, E)
    negative_embeds: torch.Tensor | None  # (B, L, E)
    sample_index: torch.Tensor  # (B,)  index into the epoch's (local) trajectories
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # the family's extra conditioning, each (B, ...)

    @property
    def conditioning(self) -> Conditioning:
        return Conditioning(self.prompt_embeds, self.negative_embeds, self.extra)


class Policy:
    """The LoRA-adapted denoiser seen as a policy over its family's stochastic steps (DDIM(eta) for SD/SDXL).

    ``family`` defaults to Stable Diffusion's step on ``scheduler`` (what a bare UNet + scheduler is)."""

    def __init__(self, unet, scheduler, guidance_scale: float, eta: float, reduction: str, autocast,
                 family: Family | None = None):
        self.unet, self.scheduler = unet, scheduler
        self.guidance_scale, self.eta, self.reduction = guidance_scale, eta, reduction
        self.autocast = autocast
        self.family = family if family is not None else StableDiffusionFamily.for_scheduler(scheduler)

    def eps(self, latents, timesteps, prompt_embeds, negative_embeds=None, extra=None) -> torch.Tensor:
        """The guided prediction (eps for SD; whatever the family's denoiser predicts), in fp32."""
        cond = Conditioning(prompt_embeds, negative_embeds, extra or {})
        with self.autocast():
            out, _ = self.family.guided_and_conditional(self.unet, latents, timesteps, cond, self.guidance_scale)
        return out.float()

    def log_prob(self, tr: Transition) -> tuple[torch.Tensor, torch.Tensor]:
        """(log p_theta(x_t' | x_t), eps_theta(x_t)) with gradients through the LoRA."""
        eps = self.eps(tr.latents, tr.timesteps, tr.prompt_embeds, tr.negative_embeds, tr.extra)
        _, log_prob = self.family.step(eps, tr.timesteps, tr.latents, eta=self.eta, prev_sample=tr.next_latents,
                                       reduction=self.reduction)
        return log_prob, eps

    @torch.no_grad()
    def reference_eps(self, tr: Transition) -> torch.Tensor:
        """The frozen base model's guided prediction at x_t (LoRA switched off)."""
        base = getattr(self.unet, "module", self.unet)
        set_lora_enabled(base, False)
        try:
            return self.eps(tr.latents, tr.timesteps, tr.prompt_embeds, tr.negative_embeds, tr.extra)
        finally:
            set_lora_enabled(base, True)

    @torch.no_grad()
    def reference_log_prob(self, tr: Transition) -> tuple[torch.Tensor, torch.Tensor]:
        """The same under the frozen base model (LoRA switched off)."""
        base = getattr(self.unet, "module", self.unet)
        set_lora_enabled(base, False)
        try:
            return self.log_prob(tr)
        finally:
            set_lora_enabled(base, True)


class Algorithm:
    """Base class: override ``prepare`` and ``loss``; add heads in ``modules``."""

    name = "base"

    def modules(self) -> dict[str, nn.Module]:
        """Extra trainable modules (optimised, synchronised and checkpointed with the LoRA)."""
        return {}

    def param_groups(self) -> list[dict]:
        return []

    def bind_prepared(self, modules: dict[str, nn.Module]) -> None:
        """Receive the accelerate-prepared (possibly DDP-wrapped) versions of ``modules()``."""

    # (this process, number of processes): where this process's trajectories sit in an epoch's global order.
    layout: tuple[int, int] = (0, 1)

    def bind_layout(self, process: int, num_processes: int) -> None:
        """Set by the trainer; the default schedule needs it to train this process's share of each minibatch."""
        self.layout = (process, num_processes)

    def schedule(self, n: int, steps: int, trained_steps: int, batch_size: int, gen: torch.Generator):
        """Which (trajectory rows, step indices) each accumulation step trains, in order.

        Default (DDPO, DAG): each pass trains every trajectory once, on its own random subset of
        ``trained_steps`` of its steps, in random order (ddpo-pytorch's timestep shuffling).

        The minibatches do not depend on how many processes there are, so that 2 processes with
        ``batch_size`` B/2 take the same optimizer steps as 1 process with B. The epoch's trajectories, in
        their global order (process 0's first), are cut into ``batch_size x processes`` contiguous strata;
        global minibatch j takes the j-th member of every stratum in that stratum's random order, and a
        process trains its share: the ``batch_size`` strata it holds. The orders and the step subsets come
        from one generator per stratum, keyed by the global stratum index and a seed drawn from ``gen``
        (the trainer gives every process the same ``gen``). Strata have equal sizes when ``batch_size``
        divides ``n`` (the config checks it; after a skipped reward batch the last minibatch is smaller).
        """
        process, _ = self.layout
        seed = int(torch.randint(2**62, (1,), generator=gen))
        orders, step_perm = [], torch.empty((n, trained_steps), dtype=torch.long)
        for s, members in enumerate(torch.arange(n).tensor_split(batch_size)):
            g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, process * batch_size + s])
                                                  .generate_state(1)[0]))
            orders.append(members[torch.randperm(len(members), generator=g)])
            for i in members.tolist():
                step_perm[i] = torch.randperm(steps, generator=g)[:trained_steps]
        for j in range(max((len(o) for o in orders), default=0)):
            rows = torch.stack([o[j] for o in orders if j < len(o)])
            for k in range(trained_steps):
                yield rows, step_perm[rows, k]

    def prepare(self, prompts: list[str], rewards: torch.Tensor, epoch: int, context: dict) -> dict:
        """Once per epoch, on the gathered batch (all processes): per-trajectory training targets."""
        raise NotImplementedError

    def loss(self, tr: Transition, policy: Policy, prepared: dict, epoch: int) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
