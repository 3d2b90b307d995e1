"""Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``): an MM-DiT transformer (``SD3Transformer2DModel``)
predicting the rectified-flow velocity, conditioned on two CLIP encoders and an optional T5 (Esser et al. 2024,
"Scaling Rectified Flow Transformers"), with classifier-free guidance. The step, x0_hat and DAG's backward
kernel are the flow-matching family's (``flowmatch.py``); this file only adds SD3's conditioning.

The conditioning is what ``StableDiffusion3Pipeline.__call__`` computes for prompts with no negative prompt
(tested: with noise level 0 the sampler equals the stock call for the same noise): ``encode_prompt`` gives the
token embeddings (CLIP-L and CLIP-G hidden states side by side, zero-padded to T5's width, then T5's tokens, or
zeros without T5) and the pooled CLIP projections; ``extra`` carries ``pooled`` and ``negative_pooled``.
"""

from __future__ import annotations

import torch

from .base import Conditioning
from .flowmatch import FlowMatchFamily


class StableDiffusion3Family(FlowMatchFamily):
    name = "sd3"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    load_kwargs: dict = {}

    def frozen_modules(self):
        pipe = self.pipe
        return [m for m in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3) if m is not None]

    def latent_shape(self, batch: int) -> tuple[int, ...]:
        cfg = self.denoiser.config
        return (batch, cfg.in_channels, cfg.sample_size, cfg.sample_size)

    @property
    def text_embed_dim(self) -> int:
        return self.denoiser.config.joint_attention_dim

    def dynamic_shift_mu(self) -> float:
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        c, cfg = self.scheduler.config, self.denoiser.config
        tokens = (cfg.sample_size // cfg.patch_size) ** 2
        return calculate_shift(tokens, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                               c.get("base_shift", 0.5), c.get("max_shift", 1.16))

    def encode(self, prompts, guidance_scale):
        cfg = guidance_scale > 1.0
        with torch.no_grad():
            embeds, negative, pooled, negative_pooled = self.pipe.encode_prompt(
                prompt=prompts, prompt_2=None, prompt_3=None, device=self.denoiser.device, num_images_per_prompt=1,
                do_classifier_free_guidance=cfg)
        extra = {"pooled": pooled}
        if cfg:
            extra["negative_pooled"] = negative_pooled
        return Conditioning(embeds, negative if cfg else None, extra)

    def guided_and_conditional(self, denoiser, latents, timestep, cond, guidance_scale):
        """As the stock pipeline: [unconditional ; conditional] in one transformer call, timestep per row."""
        extra = cond.extra
        t = torch.as_tensor(timestep, device=latents.device)
        if cond.negative_embeds is None:
            out = denoiser(hidden_states=latents, timestep=t.expand(latents.shape[0]) if t.ndim == 0 else t,
                           encoder_hidden_states=cond.prompt_embeds, pooled_projections=extra["pooled"],
                           return_dict=False)[0]
            return out, out
        t = t.expand(2 * latents.shape[0]) if t.ndim == 0 else t.repeat(2)
        out = denoiser(hidden_states=torch.cat([latents, latents]), timestep=t,
                       encoder_hidden_states=torch.cat([cond.negative_embeds, cond.prompt_embeds]),
                       pooled_projections=torch.cat([extra["negative_pooled"], extra["pooled"]]),
                       return_dict=False)[0]
        uncond, text = out.chunk(2)
        return uncond + guidance_scale * (text - uncond), text

    # -- HERO: a middle transformer block's image tokens, averaged ------------------------------------
    def feature_block(self) -> str:
        return f"transformer_blocks.{len(self.denoiser.transformer_blocks) // 2}"


__all__ = ["StableDiffusion3Family"]
