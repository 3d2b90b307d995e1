"""Stable Diffusion 1.x / 2.x (``StableDiffusionPipeline``): UNet2DConditionModel, one CLIP text encoder,
DDIM(eta) as the stochastic step; epsilon, v-prediction (SD 2.x 768 px) and sample prediction.

References: Song et al. 2021 (DDIM); Black et al. 2023 (DDPO's DDIM step with a log-probability); Salimans &
Ho 2022 (v-prediction). The arithmetic lives in ``sampling.py`` (tested against ``DDIMScheduler.step`` and
the stock pipeline); this file only routes the family's calls to it.

Notation as in ``sampling.py``: abar the scheduler's cumulative alphas, abar_t' that of the next timestep.
DAG's backward kernel p_B(x_t | x_t') = N(sqrt(abar_t / abar_t') x_t', (1 - abar_t / abar_t') I) is the
forward noising kernel of the strided chain: it depends on the noise schedule only, not on what the network
predicts, so it is the same for epsilon and v-prediction models; x0_hat is where the prediction type enters.
"""

from __future__ import annotations

from ..sampling import (
    ddim_step_mean_std,
    ddim_step_with_logprob,
    decode_latents,
    encode_prompts,
    guided_and_conditional,
    predict_x0_eps,
)
from .base import Conditioning, Family


class StableDiffusionFamily(Family):
    name = "sd"
    pipeline_classes = ("StableDiffusionPipeline",)
    load_kwargs = {"safety_checker": None, "requires_safety_checker": False}

    def prepare(self, model_id: str) -> None:
        from diffusers import DDIMScheduler

        from ..pipeline import ModelLoadError

        pipe = self.pipe
        if getattr(pipe.scheduler.config, "clip_sample", False):
            # Latent diffusion must not clip x0 to [-1, 1] (shared/README.md: it erases colour); SD's own
            # scheduler configs set clip_sample=False, so a True here comes from a DDPM default.
            raise ModelLoadError(
                f"{model_id}: scheduler has clip_sample=True, which destroys latent information; "
                f"set clip_sample=false in scheduler/scheduler_config.json"
            )
        if not isinstance(pipe.scheduler, DDIMScheduler):  # DDIM(eta) is the step with a log-probability
            # clip_sample=False explicitly: a config without the key (EulerDiscreteScheduler's) would otherwise give
            # DDIM's default True, clipping x0 (the pitfall above; True was refused above).
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
        super().prepare(model_id)

    def frozen_modules(self):
        return [self.pipe.vae, self.pipe.text_encoder]

    def latent_shape(self, batch: int) -> tuple[int, ...]:
        cfg = self.denoiser.config
        return (batch, cfg.in_channels, cfg.sample_size, cfg.sample_size)

    @property
    def text_embed_dim(self) -> int:
        return self.denoiser.config.cross_attention_dim

    def encode(self, prompts, guidance_scale):
        cond, uncond = encode_prompts(self.pipe, prompts, guidance_scale)
        return Conditioning(cond, uncond)

    def guided_and_conditional(self, denoiser, latents, timestep, cond, guidance_scale):
        return guided_and_conditional(denoiser, latents, timestep, cond.prompt_embeds, cond.negative_embeds,
                                      guidance_scale)

    def step(self, prediction, timestep, sample, eta, prev_sample=None, generator=None, reduction="mean"):
        return ddim_step_with_logprob(self.scheduler, prediction, timestep, sample, eta=eta, prev_sample=prev_sample,
                                      generator=generator, reduction=reduction)

    def step_mean_std(self, prediction, timestep, sample, eta):
        return ddim_step_mean_std(self.scheduler, prediction, timestep, sample, eta)

    def x0_hat(self, prediction, timestep, sample):
        return predict_x0_eps(self.scheduler, prediction, timestep, sample)[0]

    def decode(self, latents):
        return decode_latents(self.pipe, latents)

    def next_timestep(self, timestep):
        s = self.scheduler
        return (timestep - s.config.num_train_timesteps // s.num_inference_steps).clamp(min=0)

    def backward_log_prob(self, x_t, x_next, timestep, reduction):
        from ..algorithms.flow import backward_log_prob  # the DDPM-type kernel, documented there

        return backward_log_prob(self.scheduler, x_t, x_next, timestep, reduction)


__all__ = ["StableDiffusionFamily"]
