"""Rectified-flow families (SD3 / SD3.5, FLUX): what every flow-matching model shares behind the Family interface.

Convention of diffusers' ``FlowMatchEulerDiscreteScheduler``: sigma s runs from 1 (noise) to 0 (data),
x_s = (1 - s) x0 + s e, the transformer predicts the velocity v ~ e - x0, and the scheduler's timestep is
t = 1000 s. The grid of s comes from the scheduler after ``set_timesteps`` (shifted schedules included) and is
never recomputed here: a timestep is looked up in it, which also gives the next, less noisy s'.

The stochastic step (Flow-GRPO, Liu et al. 2025, arXiv 2505.05470, eq. 9-12) turns the Euler ODE step
x_s' = x_s + (s' - s) v into an SDE with the same marginals. With dt = s' - s < 0 and the noise scale
g_s = a sqrt(s / (1 - s)) (``eta`` is a, the noise level; at s = 1 the denominator uses the grid's second sigma,
as the reference does, so that g stays finite), the Euler-Maruyama step is Gaussian:

    mean = x_s + [v + g_s^2 / (2 s) (x_s + (1 - s) v)] dt,     std = g_s sqrt(-dt),     x_s' = mean + std z.

x_s + (1 - s) v is the implied noise e_hat, so the drift adds the score term the SDE needs (the score of
x_s is -e_hat / s). With a = 0 the step is the stock ODE step (tested: the sampler equals the pipeline).

x0_hat = x_s - s v. DAG's backward (noising) kernel, from the marginals: x_s = (1 - s) x0 + s e and
x_s' = (1 - s') x0 + s' e' give, for s > s' and r = (1 - s) / (1 - s'), x_s = r x_s' + n with
n ~ N(0, (s^2 - r^2 s'^2) I) (docs/algorithms.md derives it). At s = 1 it is N(0, I): x_T is pure noise.
"""

from __future__ import annotations

import torch
from diffusers.utils.torch_utils import randn_tensor

from ..sampling import gaussian_log_prob
from .base import Family


def _view(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) or () -> broadcastable against (B, ...)."""
    values = values.to(like.device, torch.float32)
    return values.reshape(-1, *([1] * (like.ndim - 1))) if values.ndim else values


class FlowMatchFamily(Family):
    """The rectified-flow arithmetic; subclasses add the conditioning and the denoiser call."""

    denoiser_name = "transformer"

    def prepare(self, model_id: str) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        from ..pipeline import ModelLoadError

        if not isinstance(self.pipe.scheduler, FlowMatchEulerDiscreteScheduler):
            raise ModelLoadError(
                f"{model_id}: scheduler is {type(self.pipe.scheduler).__name__}; the flow-matching step with a "
                f"log-probability needs FlowMatchEulerDiscreteScheduler (the one the model was released with)")
        super().prepare(model_id)

    # -- the sigma grid -----------------------------------------------------------------------------
    def _grid(self, timestep, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(s, s', index in the grid) of a 0-d or (B,) timestep of the current grid."""
        s = self.scheduler
        if s.timesteps is None or getattr(s, "num_inference_steps", None) is None:
            raise ValueError("call set_timesteps(num_steps) before stepping")
        grid = s.timesteps.to(device=device, dtype=torch.float32)
        t = torch.as_tensor(timestep, device=device, dtype=torch.float32)
        index = (t.reshape(-1, 1) - grid.reshape(1, -1)).abs().argmin(dim=1).reshape(t.shape)
        sigmas = s.sigmas.to(device=device, dtype=torch.float32)
        return sigmas[index], sigmas[index + 1], index

    def set_timesteps(self, num_steps: int, device) -> torch.Tensor:
        """The stock pipeline's grid: SD3 shifts by ``shift``; schedulers with dynamic shifting (FLUX) by ``mu``
        from the image's token count, as the pipelines compute it; a family whose pipeline passes its own unshifted
        sigmas (FLUX) gives them in ``grid_sigmas``."""
        s = self.scheduler
        kwargs = {}
        if s.config.get("use_dynamic_shifting", False):
            kwargs["mu"] = self.dynamic_shift_mu()
        sigmas = self.grid_sigmas(num_steps)
        if sigmas is not None:
            kwargs["sigmas"] = sigmas
        s.set_timesteps(None if sigmas is not None else num_steps, device=device, **kwargs)
        return s.timesteps

    def grid_sigmas(self, num_steps: int) -> list[float] | None:
        """The unshifted sigmas the stock pipeline passes to ``set_timesteps``; None: the scheduler's own."""
        return None

    def dynamic_shift_mu(self) -> float:
        raise NotImplementedError

    def scale_model_input(self, latents, timestep):
        return latents  # flow-matching transformers take x_s as it is

    def initial_latents(self, noise: torch.Tensor) -> torch.Tensor:
        return noise  # s = 1: x_1 is the noise

    # -- the step -----------------------------------------------------------------------------------
    def step_mean_std(self, prediction, timestep, sample, eta):
        """The SDE step's Gaussian of the module docstring (fp32); ``eta`` is Flow-GRPO's noise level a > 0."""
        if eta <= 0:
            raise ValueError("eta must be > 0 to score a step: with noise level 0 the step has no density")
        v, x = prediction.float(), sample.float()
        s, s_next, _ = self._grid(timestep, x.device)
        s, s_next = _view(s, x), _view(s_next, x)
        dt = s_next - s
        second = self.scheduler.sigmas[1].item()  # the largest sigma below 1, for g at s = 1
        s_safe = torch.where(s >= 1.0, torch.full_like(s, second), s)
        g = eta * torch.sqrt(s_safe / (1 - s_safe))
        mean = x + (v + g**2 / (2 * s) * (x + (1 - s) * v)) * dt
        return mean, g * torch.sqrt(-dt)

    def step(self, prediction, timestep, sample, eta, prev_sample=None, generator=None, reduction="mean"):
        """(x_s', log p(x_s' | x_s)). With a = 0 the step is the stock Euler step and has no density: sampling
        returns NaN log-probs, scoring a given x_s' is refused (training needs a > 0, which the config enforces)."""
        out_dtype = sample.dtype
        if eta <= 0 and prev_sample is None:
            v, x = prediction.float(), sample.float()
            s, s_next, _ = self._grid(timestep, x.device)
            nxt = x + (_view(s_next, x) - _view(s, x)) * v
            return nxt.to(out_dtype), torch.full((x.shape[0],), float("nan"), device=x.device)
        mean, std = self.step_mean_std(prediction, timestep, sample, eta)
        if prev_sample is None:
            noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            prev_sample = mean + std * noise
        prev_sample = prev_sample.float()
        return prev_sample.to(out_dtype), gaussian_log_prob(prev_sample, mean, std.expand_as(mean), reduction)

    def x0_hat(self, prediction, timestep, sample):
        s, _, _ = self._grid(timestep, sample.device)
        return sample.float() - _view(s, sample) * prediction.float()

    # -- DAG ----------------------------------------------------------------------------------------
    def next_timestep(self, timestep):
        s = self.scheduler
        _, s_next, _ = self._grid(timestep, torch.as_tensor(timestep).device)
        return (s_next * s.config.num_train_timesteps).to(torch.as_tensor(timestep).dtype)

    def backward_log_prob(self, x_t, x_next, timestep, reduction):
        s, s_next, _ = self._grid(timestep, x_t.device)
        s, s_next = _view(s, x_t), _view(s_next, x_t)
        r = (1 - s) / (1 - s_next)
        var = (s**2 - r**2 * s_next**2).clamp(min=1e-12)
        return gaussian_log_prob(x_t.float(), r * x_next.float(), var.sqrt().expand_as(x_t), reduction)

    def decode(self, latents):
        """(B, C, h, w) latents -> images in [0, 1], as the stock pipelines: undo the VAE's scaling and shift."""
        vae = self.pipe.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        with torch.no_grad():
            images = vae.decode((latents / vae.config.scaling_factor + shift).to(vae.dtype)).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)

    # -- HERO ---------------------------------------------------------------------------------------
    def pool_features(self, output) -> torch.Tensor:
        # SD3's and FLUX's transformer blocks return (text tokens, image tokens); the image tokens are (B, N, D).
        out = output[1] if isinstance(output, tuple) else output
        return out.float().mean(dim=1)

    def noise_for_features(self, x0, noise, timestep):
        s = _view(torch.as_tensor(timestep, dtype=torch.float32) / self.scheduler.config.num_train_timesteps, x0)
        return ((1 - s) * x0.float() + s * noise.float()).to(x0.dtype)


__all__ = ["FlowMatchFamily"]
