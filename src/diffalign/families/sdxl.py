"""Stable Diffusion XL (``StableDiffusionXLPipeline``): the SD family's DDIM step and x0_hat, with SDXL's
conditioning: two CLIP encoders whose hidden states are concatenated (``prompt_embeds``, width 2048 for the
released model), the second encoder's pooled projection (``text_embeds``) and the micro-conditioning
``time_ids`` = (original size, crop top-left, target size), both passed to the UNet as ``added_cond_kwargs``
(Podell et al. 2023, "SDXL", Sec. 2.2). Calling the UNet without them is the crash TRL's DDPOTrainer users hit
(huggingface/trl#1630: ``get_aug_embed``, "argument of type 'NoneType' is not iterable").

The conditioning is computed exactly as ``StableDiffusionXLPipeline.__call__`` does for a prompt with no
negative prompt and the default sizes (tested: the sampler equals the stock call for the same noise):
unconditional embeddings from ``encode_prompt`` (zeros when ``force_zeros_for_empty_prompt``), and the same
``time_ids`` for both CFG halves. ``extra`` carries ``text_embeds``, ``negative_text_embeds`` and ``time_ids``,
one row per sample.
"""

from __future__ import annotations

import torch

from .base import Conditioning
from .sd import StableDiffusionFamily


class StableDiffusionXLFamily(StableDiffusionFamily):
    name = "sdxl"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    load_kwargs: dict = {}

    def frozen_modules(self):
        return [m for m in (self.pipe.vae, self.pipe.text_encoder, self.pipe.text_encoder_2) if m is not None]

    def encode(self, prompts, guidance_scale):
        pipe = self.pipe
        cfg = guidance_scale > 1.0
        with torch.no_grad():
            embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
                prompts, device=self.denoiser.device, num_images_per_prompt=1, do_classifier_free_guidance=cfg)
        size = (pipe.default_sample_size * pipe.vae_scale_factor,) * 2
        projection = (int(pooled.shape[-1]) if pipe.text_encoder_2 is None
                      else pipe.text_encoder_2.config.projection_dim)
        time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=embeds.dtype, text_encoder_projection_dim=projection)
        extra = {"text_embeds": pooled, "time_ids": time_ids.to(embeds.device).repeat(len(prompts), 1)}
        if cfg:
            extra["negative_text_embeds"] = negative_pooled
        return Conditioning(embeds, negative if cfg else None, extra)

    def guided_and_conditional(self, denoiser, latents, timestep, cond, guidance_scale):
        """As the stock pipeline: [unconditional ; conditional] in one UNet call, the same time_ids for both."""
        extra = cond.extra
        if cond.negative_embeds is None:
            out = denoiser(latents, timestep, encoder_hidden_states=cond.prompt_embeds,
                           added_cond_kwargs={"text_embeds": extra["text_embeds"], "time_ids": extra["time_ids"]}).sample
            return out, out
        t = timestep.repeat(2) if torch.is_tensor(timestep) and timestep.ndim else timestep
        added = {"text_embeds": torch.cat([extra["negative_text_embeds"], extra["text_embeds"]]),
                 "time_ids": torch.cat([extra["time_ids"], extra["time_ids"]])}
        out = denoiser(torch.cat([latents, latents]), t,
                       encoder_hidden_states=torch.cat([cond.negative_embeds, cond.prompt_embeds]),
                       added_cond_kwargs=added).sample
        uncond, text = out.chunk(2)
        return uncond + guidance_scale * (text - uncond), text

    def decode(self, latents):
        vae = self.pipe.vae
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is None or std is None:
            return super().decode(latents)
        # Newer SDXL-architecture VAEs normalise latents per channel (the stock pipeline undoes it the same way).
        shape = (1, -1, 1, 1)
        mean = torch.tensor(mean).view(shape).to(latents)
        std = torch.tensor(std).view(shape).to(latents)
        with torch.no_grad():
            images = vae.decode((latents * std / vae.config.scaling_factor + mean).to(vae.dtype)).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)
