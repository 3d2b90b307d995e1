"""DAG-DB and DAG-KL: GFlowNet detailed balance over the denoising chain (Zhang et al. 2024,
"Improving GFlowNets for Text-to-Image Diffusion Alignment", arXiv 2406.00633, TMLR 2025).

Notation (see ``flow.py`` for log F, p_B, beta and the log-prob reduction):

    log_pf     log p_theta(x_t' | x_t)       the policy's DDIM step, through the LoRA
    log_pb     log p_B(x_t | x_t')           fixed backward kernel
    log_f      log F(x_t)   = f_phi(x_t, t, c)   + beta r~(x_t)
    log_f_next log F(x_t')  = f_phi(x_t', t', c) + beta r~(x_t'),   or beta r(x_0) at the last step
    eps, eps_old   guided noise prediction now and at sampling time

DAG-DB (eq. 8, with the proximal term of Sec. 4):
    L = (log_f + log_pf - log_pb - log_f_next)^2 + lambda ||eps - eps_old||^2
    with ``dag.db_huber_delta`` = d (our option, off by default) the square becomes 2 Huber_d: the same inside
    |residual| < d, linear beyond, so no transition weighs the policy's gradient by more than 2 d.

DAG-KL (Sec. 4.2): the flow keeps the DB loss with log_pf detached; the policy follows the REINFORCE
gradient of KL(p_theta(. | x_t) || p_B F / F(x_t)) with a leave-one-out baseline and PPO clipping:
    delta = stopgrad(log_f_next + log_pb - log_pf - log_f)          (= - DB residual)
    A     = clip((delta - mean_{-i} delta) / std_{-i} delta, -A_max, A_max)
    L     = (log_f + sg(log_pf) - log_pb - log_f_next)^2 + klpf * PPO(A, rho) + lambda ||eps - eps_old||^2

Forward-looking prediction (``dag.forward_looking``): x0_hat comes from the conditional, unguided prediction by
default, as in the reference (see ``flow.py``). Critic warm-up (``dag.flow_warmup_epochs``): the first epochs
train only the flow network, the policy's log-prob detached and no policy or proximal term.

Per-step baseline (``dag.step_baseline``, our addition): log F gets a per-step constant B_k fitted in closed
form, B_k - B_{k+1} = -b_k with b_k the running mean of the DB residual at step index k (gathered over
processes), i.e. the minimiser of the squared loss over per-step constants. Without it the residual carries a
systematic per-step part (E[log p_F - log p_B] > 0, and the forward-looking reward drifts along the chain,
e.g. blurry early x0-predictions compress better) that a flow network trained for a few dozen optimizer steps
cannot absorb; DAG-DB then lowers log p_F of its own samples, a direction that runs away (bench/RESULTS.md).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..families import family_for
from ..sampling import alphas_at
from .base import Algorithm, Policy, Transition
from .ddpo import ppo_clipped_loss
from .flow import FlowNetwork, ForwardLookingRewards, annealed_beta, flow_block_types, load_forward_decoder


def db_residual(log_f, log_pf, log_pb, log_f_next):
    """log F(x_t) + log p_F(x_t'|x_t) - log p_B(x_t|x_t') - log F(x_t'): zero under detailed balance."""
    return log_f + log_pf - log_pb - log_f_next


def leave_one_out_advantages(delta: torch.Tensor, clip: float) -> torch.Tensor:
    """(delta_i - mean_{j != i} delta_j) / std_{j != i}, clipped; needs at least 2 samples."""
    n = delta.shape[0]
    if n < 2:
        raise ValueError("DAG-KL needs train.batch_size >= 2 for its leave-one-out baseline")
    baseline = (delta.sum() - delta) / (n - 1)
    sq = (delta - baseline) ** 2
    loo_var = (sq.sum() - sq) / (n - 1)
    return torch.clamp((delta - baseline) / (loo_var.sqrt() + 1e-8), -clip, clip)


class DAG(Algorithm):
    """Shared machinery; ``objective`` is ``"db"`` or ``"kl"``."""

    def __init__(self, cfg, pipe, objective: str):
        self.cfg, self.dag = cfg, cfg.dag
        self.objective = objective
        self.name = f"dag-{objective}"
        self.pipe = pipe
        self.family = family_for(pipe)  # x0_hat, the backward kernel, t' and the denoiser call of the model family
        self.flow = FlowNetwork(in_channels=self.family.latent_shape(1)[1],
                                cross_attention_dim=self.family.text_embed_dim,
                                block_out_channels=tuple(self.dag.flow_channels),
                                down_block_types=flow_block_types(len(self.dag.flow_channels)))
        self.decoder = load_forward_decoder(self.dag.forward_decoder, pipe.vae.device)  # None: the VAE
        self.beta = 0.0
        self.step_offset: torch.Tensor | None = None  # b_k, running mean of the DB residual at step k
        self.step_seen: torch.Tensor | None = None

    def center_by_step(self, residual: torch.Tensor, k: torch.Tensor, num_steps: int) -> torch.Tensor:
        """residual - b_k with b_k updated from this minibatch (all processes' rows); b is not differentiated."""
        if self.step_offset is None:
            self.step_offset, self.step_seen = torch.zeros(num_steps), torch.zeros(num_steps, dtype=torch.bool)
        r, kc = residual.detach().float().cpu(), k.cpu()
        sums = torch.zeros(num_steps).index_add_(0, kc, r)
        counts = torch.zeros(num_steps).index_add_(0, kc, torch.ones_like(r))
        if dist.is_available() and dist.is_initialized():  # the same b on every process: layout-independent
            both = torch.stack([sums, counts]).to(residual.device)
            dist.all_reduce(both)
            sums, counts = both.cpu()
        here = counts > 0
        mean = torch.where(here, sums / counts.clamp(min=1), torch.zeros_like(sums))
        decay = self.dag.step_baseline_decay
        first = here & ~self.step_seen
        again = here & self.step_seen
        self.step_offset[first] = mean[first]
        self.step_offset[again] = decay * self.step_offset[again] + (1 - decay) * mean[again]
        self.step_seen |= here
        return residual - self.step_offset.to(residual.device, residual.dtype)[k]

    def modules(self):
        return {"flow": self.flow}

    def param_groups(self):
        lr = self.dag.flow_learning_rate or self.cfg.train.learning_rate  # unset: the policy's, as the reference
        return [{"params": list(self.flow.parameters()), "lr": lr}]

    def prepare(self, prompts, rewards, epoch, context):
        traj, rank, n = context["trajectories"], context["rank"], context["local_size"]
        self.beta = annealed_beta(self.dag.reward_exp, epoch, context["num_epochs"], self.dag.anneal_fraction)
        # Scored lazily, on first use by a trained transition (see ForwardLookingRewards).
        # With forward_looking = "current" only its scorer is used (log_flows makes the model pass per transition).
        source = "guided" if self.dag.forward_looking == "guided" else "conditional"
        if self.decoder is not None:
            self.decoder.to(self.pipe.vae.device)
        fl = ForwardLookingRewards(self.pipe, traj, context["reward"], tag=f"{epoch + 1}.", source=source,
                                   decoder=self.decoder)  # stands for (n, T)
        terminal = rewards[rank * n:(rank + 1) * n].float()  # r(x_0) of this process's trajectories
        # Kept per process: these are (n, ...) tensors, not gathered ones (trainer slices only (n*world, ...)).
        return {"forward_reward": fl, "terminal_reward": terminal, "beta": self.beta}

    def log_flows(self, tr: Transition, prepared: dict, flow: torch.nn.Module,
                  policy: Policy | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(log F(x_t), log F(x_t')) for a minibatch of transitions."""
        beta = prepared["beta"]
        fl = prepared["forward_reward"]  # (n, T): a tensor or the lazy ForwardLookingRewards
        i, k = tr.sample_index, tr.step_index
        dev = tr.latents.device
        num_steps = fl.shape[1]
        cond = tr.prompt_embeds
        inner = (k < num_steps - 1).nonzero().squeeze(1)  # rows whose x_t' is not the final image
        # One flow call over [x_t ; x_t' of inner rows]: half the cost of two calls, and DDP-safe.
        x = torch.cat([tr.latents, tr.next_latents[inner]])
        t = torch.cat([tr.timesteps, self.family.next_timestep(tr.timesteps[inner])])
        f = flow(x, t, torch.cat([cond, cond[inner]]))
        b = tr.latents.shape[0]
        if self.dag.forward_looking == "current":
            both = torch.cat([torch.arange(b, device=dev), inner])
            r_all = self.current_forward_rewards(policy, fl, x, t, tr.conditioning.index(both),
                                                 torch.cat([i, i[inner]])).to(dev)  # (b + len(inner),)
            r_now, r_next = r_all[:b], r_all[b:]
        else:
            r_now, r_next = fl[i, k].to(dev), fl[i[inner], k[inner] + 1].to(dev)
        log_f = f[:b] + beta * r_now
        terminal = beta * prepared["terminal_reward"].to(tr.latents.device)[i]
        log_f_next = terminal.index_put((inner,), f[b:] + beta * r_next)
        return log_f, log_f_next

    @torch.no_grad()
    def current_forward_rewards(self, policy: Policy, fl, x, t, cond, rows) -> torch.Tensor:
        """r(decode(x0_hat(x)), c) with x0_hat from the current model's conditional, unguided prediction (the
        reference's forward-looking reward): one extra UNet pass per state, not cached (the model moves)."""
        unet = getattr(policy.unet, "module", policy.unet)
        with policy.autocast():
            eps = self.family.conditional(unet, x, t, cond).float()
        x0 = self.family.x0_hat(eps, t, x.float())
        prompts = [fl.traj.prompts[r] for r in rows.tolist()]
        return fl.score_x0(x0, prompts)

    def loss(self, tr: Transition, policy: Policy, prepared: dict, epoch: int):
        reduction = policy.reduction
        warmup = epoch < self.dag.flow_warmup_epochs
        # In the critic warm-up the policy's pass runs without a graph: nothing reaches the LoRA (and DDP sees no
        # LoRA parameter that expects a gradient).
        with torch.set_grad_enabled(torch.is_grad_enabled() and not warmup):
            log_pf, eps = policy.log_prob(tr)
        log_pb = self.family.backward_log_prob(tr.latents, tr.next_latents, tr.timesteps, reduction)
        flow = self._flow_module
        log_f, log_f_next = self.log_flows(tr, prepared, flow, policy)
        proximal = ((eps - tr.old_eps) ** 2).mean(dim=(1, 2, 3))  # (B,)
        stats = {"beta": prepared["beta"], "log_pf": log_pf.mean().item(), "log_pb": log_pb.mean().item(),
                 "log_flow": log_f.mean().item(), "proximal": proximal.mean().item()}
        num_steps = prepared["forward_reward"].shape[1]
        if warmup:  # critic warm-up: the flow learns, the policy does not move
            residual = db_residual(log_f, log_pf, log_pb, log_f_next)
            if self.dag.step_baseline:
                residual = self.center_by_step(residual, tr.step_index, num_steps)
            flow_loss = (residual**2).mean()
            stats.update(db_loss=flow_loss.item(), db_residual_abs=residual.abs().mean().item(), warmup=1.0)
            return flow_loss, stats
        if self.objective == "db":
            residual = db_residual(log_f, log_pf, log_pb, log_f_next)
            if self.dag.step_baseline:
                residual = self.center_by_step(residual, tr.step_index, num_steps)
            if self.dag.db_huber_delta is None:
                db_loss = (residual**2).mean()
            else:  # quadratic within +-delta, linear beyond: the gradient's weight on log p_theta is capped at 2 delta
                db_loss = 2 * torch.nn.functional.huber_loss(residual, torch.zeros_like(residual),
                                                             delta=self.dag.db_huber_delta)
            loss = db_loss + self.dag.proximal_weight * proximal.mean()
            stats.update(db_loss=db_loss.item(), db_residual_abs=residual.abs().mean().item())
            return loss, stats
        residual = db_residual(log_f, log_pf.detach(), log_pb, log_f_next)
        if self.dag.step_baseline:
            residual = self.center_by_step(residual, tr.step_index, num_steps)
        flow_loss = (residual**2).mean()
        delta = -residual.detach()
        advantages = leave_one_out_advantages(delta, self.dag.adv_clip_max)
        policy_loss, ppo_stats = ppo_clipped_loss(advantages, log_pf, tr.old_log_prob, self.dag.clip_range)
        loss = flow_loss + self.dag.klpf * policy_loss + self.dag.proximal_weight * proximal.mean()
        stats.update(db_loss=flow_loss.item(), db_residual_abs=residual.abs().mean().item(),
                     policy_loss=policy_loss.item(), **ppo_stats)
        return loss, stats

    # The trainer hands back the accelerate-prepared (possibly DDP-wrapped) flow module.
    _flow_module: torch.nn.Module | None = None

    def bind_prepared(self, modules: dict[str, torch.nn.Module]) -> None:
        self._flow_module = modules["flow"]

    def state_dict(self) -> dict:
        state = {"beta": self.beta}
        if self.step_offset is not None:
            state["step_offset"], state["step_seen"] = self.step_offset.tolist(), self.step_seen.tolist()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.beta = state.get("beta", 0.0)
        if "step_offset" in state:
            self.step_offset = torch.tensor(state["step_offset"], dtype=torch.float32)
            self.step_seen = torch.tensor(state["step_seen"], dtype=torch.bool)


def build_dag(cfg, pipe) -> DAG:
    if pipe is None:
        raise ValueError("DAG needs the pipeline (for the flow network's sizes and the forward-looking decode)")
    objective = {"dag-db": "db", "dag-kl": "kl"}[cfg.train.algorithm]
    return DAG(cfg, pipe, objective)


__all__ = ["DAG", "alphas_at", "build_dag", "db_residual", "leave_one_out_advantages"]
