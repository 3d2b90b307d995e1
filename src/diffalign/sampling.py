"""DDIM sampling with per-step log-probabilities: the trajectories every algorithm trains on.

References: Song et al. 2021 (DDIM, eq. 12 and 16); Black et al. 2023 (DDPO, the DDIM step with a
log-probability, kvablack/ddpo-pytorch); diffusers' ``DDIMScheduler.step``, whose arithmetic
:func:`ddim_step_with_logprob` reproduces exactly (tested), so our trajectories equal the stock pipeline's
for the same noise and eta.

Notation (``shared/algorithms.md``):

    x_t      ``sample``          latent at the current step t
    x_t'     ``prev_sample``     latent at the next, less noisy step t' = t - T_train / T_inference
    abar     ``alphas_cumprod``  the scheduler's cumulative alphas; abar_t' = final_alpha_cumprod if t' < 0
    eps      guided noise prediction  eps_u + w (eps_c - eps_u)
    sigma_t  eta * sqrt((1 - abar_t') / (1 - abar_t)) * sqrt(1 - abar_t / abar_t')
    mu       sqrt(abar_t') x0_hat + sqrt(1 - abar_t' - sigma_t^2) eps
    log p(x_t' | x_t) = log N(x_t'; mu, sigma_t^2 I), reduced over the D latent elements

**The reduction.** ``reduction="mean"`` averages the per-element log-density over the D = C*h*w latent
elements, as ddpo-pytorch and the DAG reference code do; that is what makes a PPO clip range of 1e-4
meaningful and sets the scale of GFlowNet log-flows (a mean log-prob is a sum log-prob divided by D).
``reduction="sum"`` gives the true log-density of the latent. Every algorithm states which it uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from diffusers.utils.torch_utils import randn_tensor

REDUCTIONS = ("mean", "sum")


def _bcast(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A scalar or per-sample (B,) tensor shaped to broadcast against ``like`` (B, C, h, w)."""
    values = values.to(device=like.device, dtype=like.dtype)
    return values.reshape(-1, *([1] * (like.ndim - 1))) if values.ndim else values


def alphas_at(scheduler, timestep: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
    """(abar_t, abar_t') for the DDIM grid the scheduler is set to; t may be a per-sample tensor."""
    ac = scheduler.alphas_cumprod
    step = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    t = torch.as_tensor(timestep, device=ac.device).long()
    prev = t - step
    abar_t = ac[t]
    abar_prev = torch.where(prev >= 0, ac[prev.clamp(min=0)], torch.as_tensor(scheduler.final_alpha_cumprod))
    return abar_t, abar_prev


def predict_x0_eps(scheduler, model_output: torch.Tensor, timestep, sample: torch.Tensor,
                   abar_t: torch.Tensor | None = None):
    """x0_hat and eps from the model output, for epsilon, v-prediction and sample-prediction models.
    ``abar_t`` may be passed by a caller that already looked it up (the DDIM step does)."""
    if abar_t is None:
        abar_t, _ = alphas_at(scheduler, timestep)
    a = _bcast(abar_t, sample)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        x0 = (sample - (1 - a).sqrt() * model_output) / a.sqrt()
        eps = model_output
    elif kind == "sample":
        x0 = model_output
        eps = (sample - a.sqrt() * x0) / (1 - a).sqrt()
    elif kind == "v_prediction":
        x0 = a.sqrt() * sample - (1 - a).sqrt() * model_output
        eps = a.sqrt() * model_output + (1 - a).sqrt() * sample
    else:
        raise ValueError(f"scheduler prediction_type {kind!r} is not supported: use epsilon, v_prediction or sample")
    if getattr(scheduler.config, "thresholding", False):
        x0 = scheduler._threshold_sample(x0)
    elif scheduler.config.clip_sample:
        x0 = x0.clamp(-scheduler.config.clip_sample_range, scheduler.config.clip_sample_range)
    return x0, eps


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """log N(x; mean, std^2 I) per sample, reduced over all but the batch dimension."""
    elem = -((x.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    dims = tuple(range(1, x.ndim))
    if reduction == "mean":
        return elem.mean(dim=dims)
    if reduction == "sum":
        return elem.sum(dim=dims)
    raise ValueError(f"log-prob reduction {reduction!r} is not one of {REDUCTIONS}")


def ddim_step_mean_std(scheduler, model_output: torch.Tensor, timestep, sample: torch.Tensor,
                       eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gaussian of one DDIM step x_t -> x_t' (eta > 0): its mean (B, C, h, w) and std (broadcastable), fp32."""
    if eta <= 0:
        raise ValueError(
            "eta must be > 0 for a DDIM step with a log-probability: with eta = 0 the step is deterministic "
            "and has no density. Set sample.eta to e.g. 1.0."
        )
    if scheduler.num_inference_steps is None:
        raise ValueError("call scheduler.set_timesteps(num_steps) before stepping")
    # The arithmetic runs in fp32 whatever the weights' precision: in bf16, abar near 1 at the last step rounds
    # to 1 and the variance becomes 0/0 (NaN images), while the stock scheduler works on fp32 schedule values.
    model_output, sample = model_output.float(), sample.float()
    abar_t, abar_prev = alphas_at(scheduler, timestep)
    x0, eps = predict_x0_eps(scheduler, model_output, timestep, sample, abar_t)
    abar_t, abar_prev = _bcast(abar_t, sample), _bcast(abar_prev, sample)
    variance = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)  # sigma_t^2 / eta^2, DDIM eq. 16
    std = eta * variance.sqrt()
    mean = abar_prev.sqrt() * x0 + (1 - abar_prev - std**2).sqrt() * eps
    return mean, std


def ddim_step_with_logprob(
    scheduler,
    model_output: torch.Tensor,
    timestep: torch.Tensor | int,
    sample: torch.Tensor,
    eta: float = 1.0,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step x_t -> x_t' with eta > 0 and the log-probability of x_t' under the step's Gaussian.

    ``timestep`` is an int or a per-sample tensor (training re-evaluates shuffled timesteps). If
    ``prev_sample`` is given it is scored rather than drawn (the re-evaluation of a stored trajectory).
    Returns (prev_sample, log_prob) with log_prob of shape (B,).
    """
    out_dtype = sample.dtype
    mean, std = ddim_step_mean_std(scheduler, model_output, timestep, sample, eta)
    if prev_sample is None:
        noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device, dtype=torch.float32)
        prev_sample = mean + std * noise
    prev_sample = prev_sample.float()
    log_prob = gaussian_log_prob(prev_sample, mean, std, reduction)
    return prev_sample.to(out_dtype), log_prob


@dataclass
class Trajectories:
    """A batch of sampled denoising trajectories. B samples, T steps, latents (C, h, w)."""

    prompts: list[str]
    initial_noise: torch.Tensor  # (B, C, h, w)   x_T
    latents: torch.Tensor  # (B, T+1, C, h, w)  x_T ... x_0
    timesteps: torch.Tensor  # (T,) the DDIM grid, shared by the batch
    log_probs: torch.Tensor  # (B, T)  log p(x_t' | x_t) at sampling time
    guided_eps: torch.Tensor  # (B, T, C, h, w)  the guided prediction used at sampling time
    cond_eps: torch.Tensor  # (B, T, C, h, w)  its text-conditional, unguided half (= guided_eps without CFG)
    prompt_embeds: torch.Tensor  # (B, L, E)
    negative_embeds: torch.Tensor | None  # (B, L, E) unconditional embeddings, None without CFG
    images: torch.Tensor | None = None  # (B, 3, H, W) in [0, 1]
    metadata: list[dict] = field(default_factory=list)
    # The family's extra conditioning (SDXL's pooled embeddings and time_ids), each (B, ...): see families/base.py.
    extra_cond: dict[str, torch.Tensor] = field(default_factory=dict)

    def conditioning(self, rows=None):
        """The denoiser's conditioning (families.Conditioning) of all trajectories, or of ``rows``."""
        from .families import Conditioning

        cond = Conditioning(self.prompt_embeds, self.negative_embeds, self.extra_cond)
        return cond if rows is None else cond.index(rows)

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]

    def index(self, idx: torch.Tensor | list[int]) -> Trajectories:
        idx = torch.as_tensor(idx, dtype=torch.long)
        pick = idx.tolist()
        return Trajectories(
            prompts=[self.prompts[i] for i in pick], initial_noise=self.initial_noise[idx],
            latents=self.latents[idx], timesteps=self.timesteps, log_probs=self.log_probs[idx],
            guided_eps=self.guided_eps[idx], cond_eps=self.cond_eps[idx], prompt_embeds=self.prompt_embeds[idx],
            negative_embeds=None if self.negative_embeds is None else self.negative_embeds[idx],
            images=None if self.images is None else self.images[idx],
            metadata=[self.metadata[i] for i in pick] if self.metadata else [],
            extra_cond={k: v[idx] for k, v in self.extra_cond.items()},
        )

    @staticmethod
    def cat(parts: list[Trajectories]) -> Trajectories:
        first = parts[0]
        return Trajectories(
            prompts=[p for t in parts for p in t.prompts],
            initial_noise=torch.cat([t.initial_noise for t in parts]),
            latents=torch.cat([t.latents for t in parts]), timesteps=first.timesteps,
            log_probs=torch.cat([t.log_probs for t in parts]), guided_eps=torch.cat([t.guided_eps for t in parts]),
            cond_eps=torch.cat([t.cond_eps for t in parts]),
            prompt_embeds=torch.cat([t.prompt_embeds for t in parts]),
            negative_embeds=None if first.negative_embeds is None else torch.cat([t.negative_embeds for t in parts]),
            # Undecoded parts (decode=False) make the whole batch undecoded rather than half of it.
            images=None if any(t.images is None for t in parts) else torch.cat([t.images for t in parts]),
            metadata=[m for t in parts for m in t.metadata],
            extra_cond={k: torch.cat([t.extra_cond[k] for t in parts]) for k in first.extra_cond},
        )


def guided_and_conditional(unet, latents, timestep, prompt_embeds, negative_embeds, guidance_scale: float):
    """(eps_u + w (eps_c - eps_u), eps_c): the guided prediction and its text-conditional half, both halves in one
    batched UNet call as the stock pipeline does. DAG's forward-looking reward reads x0_hat from eps_c (the
    reference's choice: its x0_hat tracks the final image far better than the guided one's, bench/RESULTS.md)."""
    if negative_embeds is None:
        out = unet(latents, timestep, encoder_hidden_states=prompt_embeds).sample
        return out, out
    t = timestep.repeat(2) if torch.is_tensor(timestep) and timestep.ndim else timestep
    out = unet(torch.cat([latents, latents]), t, encoder_hidden_states=torch.cat([negative_embeds, prompt_embeds])).sample
    eps_uncond, eps_text = out.chunk(2)
    return eps_uncond + guidance_scale * (eps_text - eps_uncond), eps_text


def guided_noise_prediction(unet, latents, timestep, prompt_embeds, negative_embeds, guidance_scale: float):
    """eps_u + w (eps_c - eps_u) with both halves in one batched UNet call, as the stock pipeline does."""
    return guided_and_conditional(unet, latents, timestep, prompt_embeds, negative_embeds, guidance_scale)[0]


def encode_prompts(pipe, prompts: list[str], guidance_scale: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompt embeddings and, with CFG, the empty-prompt embeddings (what the stock pipeline uses)."""
    device = pipe.unet.device
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(prompts, device, 1, guidance_scale > 1.0, negative_prompt=None)
    return cond, (uncond if guidance_scale > 1.0 else None)


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor, vae=None) -> torch.Tensor:
    """Latents -> images (B, 3, H, W) in [0, 1], with the pipeline's VAE or another decoder (``vae``)."""
    vae = vae if vae is not None else pipe.vae
    images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    return (images.float() / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def sample_trajectories(
    pipe,
    prompts: list[str],
    num_steps: int = 20,
    guidance_scale: float = 5.0,
    eta: float = 1.0,
    generator: torch.Generator | list[torch.Generator] | None = None,
    initial_noise: torch.Tensor | None = None,
    reduction: str = "mean",
    decode: bool = True,
    unet=None,
    family=None,
) -> Trajectories:
    """Sample one trajectory per prompt with the pipeline's denoiser (or ``unet``) and its family's stochastic
    step (DDIM(eta) for SD and SDXL).

    ``initial_noise`` (B, C, h, w) starts the chains from given noises (HERO re-uses preferred noises);
    otherwise it is drawn from ``generator`` exactly as the stock pipeline draws it, so that the same
    generator gives the same images as ``pipe(prompts, eta=eta, generator=generator)``. A list of B
    generators gives every trajectory its own random stream (what the trainer uses). ``family`` defaults to
    the pipeline's (families.family_for).
    """
    if family is None:
        from .families import family_for

        family = family_for(pipe)
    denoiser = unet or family.denoiser
    device, dtype = denoiser.device, denoiser.dtype
    cond = family.encode(prompts, guidance_scale)
    timesteps = family.set_timesteps(num_steps, device)
    shape = family.latent_shape(len(prompts))
    if initial_noise is None:
        initial_noise = randn_tensor(shape, generator=generator, device=device, dtype=cond.prompt_embeds.dtype)
    elif tuple(initial_noise.shape) != shape:
        raise ValueError(f"initial_noise has shape {tuple(initial_noise.shape)}, expected {shape}")
    x = family.initial_latents(initial_noise.to(device=device, dtype=dtype))
    latents, log_probs, eps_all, cond_all = [x], [], [], []
    for t in timesteps:
        model_in = family.scale_model_input(x, t)
        eps, eps_cond = family.guided_and_conditional(denoiser, model_in, t, cond, guidance_scale)
        x, log_prob = family.step(eps, t, x, eta=eta, generator=generator, reduction=reduction)
        latents.append(x)
        log_probs.append(log_prob)
        eps_all.append(eps)
        cond_all.append(eps_cond)
    return Trajectories(
        prompts=list(prompts), initial_noise=initial_noise,
        latents=torch.stack(latents, dim=1), timesteps=timesteps.clone(),
        log_probs=torch.stack(log_probs, dim=1), guided_eps=torch.stack(eps_all, dim=1),
        cond_eps=torch.stack(cond_all, dim=1),
        prompt_embeds=cond.prompt_embeds, negative_embeds=cond.negative_embeds,
        images=family.decode(x) if decode else None,
        metadata=[{} for _ in prompts], extra_cond=cond.extra,
    )
