"""FLUX.1 (``FluxPipeline``): a rectified-flow transformer (``FluxTransformer2DModel``, Black Forest Labs 2024;
double-stream MM-DiT blocks then single-stream blocks) conditioned on T5 token embeddings and a pooled CLIP
embedding. The step, x0_hat and DAG's backward kernel are the flow-matching family's (``flowmatch.py``); this
file adds what FLUX does differently, each as ``FluxPipeline.__call__`` (diffusers 0.42) does it (tested: with
noise level 0 the sampler equals the stock call for the same initial noise):

- **No CFG batch.** FLUX.1-dev is guidance-distilled: the guidance scale is a transformer *input* (the
  ``guidance`` embedding, ``transformer.config.guidance_embeds``), not a second, unconditional pass. So
  ``sample.guidance_scale`` means the embedded guidance for FLUX (FLUX.1-dev's default 3.5; the pipeline's
  ``true_cfg_scale`` with a negative prompt is not used), one transformer row per sample, and the one
  prediction is both the "guided" and the "conditional" one: DAG's conditional x0_hat reads the prediction
  itself, D3PO's and GRPO's reference pass is the same call with the LoRA off. FLUX.1-schnell (no guidance
  embedding) ignores the scale. The value is stored per sample in ``Conditioning.extra["guidance"]`` at
  ``encode``, so every later call on a stored trajectory (training, DAG's x0_hat, HERO) is conditioned on the
  guidance the trajectory was sampled with, whatever scale the caller passes.
- **Packed latents.** The transformer sees 2x2 patches of the latent as tokens, (B, h/2 * w/2, 4C), with
  positional ``img_ids``. Trajectories stay unpacked, (B, C, h, w), so the flow arithmetic and everything
  outside ``families/`` are unchanged; the latents are packed inside the transformer call and its output
  unpacked (both are reshapes: the elementwise step commutes with them).
- **Timestep** t / 1000 (the transformer's input is sigma), **sigma grid** ``linspace(1, 1/N, N)`` shifted by
  ``mu = calculate_shift(image tokens)`` (the scheduler's dynamic shifting), **decode** ``x / scaling_factor +
  shift_factor`` (shared with SD3).
- **Resolution**: the VAE config's ``sample_size`` (1024 for FLUX.1-dev and -schnell, which is also
  ``FluxPipeline``'s default height and width); the transformer config has no resolution of its own.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import Conditioning
from .flowmatch import FlowMatchFamily


class FluxFamily(FlowMatchFamily):
    name = "flux"
    pipeline_classes = ("FluxPipeline",)
    load_kwargs: dict = {}

    def frozen_modules(self):
        pipe = self.pipe
        return [m for m in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2) if m is not None]

    # -- shapes -------------------------------------------------------------------------------------
    def _latent_hw(self) -> int:
        """Latent side h (= w) as ``FluxPipeline.prepare_latents`` computes it: even, for 2x2 packing."""
        pipe = self.pipe
        size = pipe.vae.config.sample_size
        size = size[0] if isinstance(size, (list, tuple)) else size
        factor = pipe.vae_scale_factor
        if size % (2 * factor):
            raise ValueError(f"the VAE's sample_size {size} px is not a multiple of {2 * factor} (VAE factor x 2x2 "
                             f"packing); set vae/config.json's sample_size to the resolution to sample at")
        return 2 * (size // (2 * factor))

    def latent_shape(self, batch: int) -> tuple[int, ...]:
        h = self._latent_hw()
        return (batch, self.denoiser.config.in_channels // 4, h, h)  # in_channels counts packed 2x2 patches

    @property
    def text_embed_dim(self) -> int:
        return self.denoiser.config.joint_attention_dim  # T5's width (4096 for FLUX.1)

    # -- the grid -----------------------------------------------------------------------------------
    def grid_sigmas(self, num_steps: int) -> list[float] | None:
        if self.scheduler.config.get("use_flow_sigmas", False):
            return None  # the pipeline then leaves the grid to the scheduler too
        return np.linspace(1.0, 1 / num_steps, num_steps).tolist()

    def dynamic_shift_mu(self) -> float:
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        c = self.scheduler.config
        tokens = (self._latent_hw() // 2) ** 2  # the packed sequence length the pipeline passes
        return calculate_shift(tokens, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                               c.get("base_shift", 0.5), c.get("max_shift", 1.15))

    # -- conditioning and the transformer call ------------------------------------------------------
    def max_sequence_length(self) -> int:
        """T5 tokens per prompt: the pipeline's default, 512 (FLUX.1's T5 tokenizer says 512 too), or less where
        the T5 tokenizer's ``model_max_length`` is shorter (the tiny test pipelines: padding a 10-word prompt to
        512 text tokens would make the transformer's attention mostly text)."""
        return min(512, self.pipe.tokenizer_2.model_max_length)

    def encode(self, prompts, guidance_scale):
        """T5 token embeddings, the pooled CLIP embedding and, for a guidance-distilled transformer, the guidance
        scale per sample (module docstring). No negative embeddings: FLUX has no CFG batch."""
        with torch.no_grad():
            embeds, pooled, _text_ids = self.pipe.encode_prompt(prompt=prompts, prompt_2=None,
                                                                device=self.denoiser.device, num_images_per_prompt=1,
                                                                max_sequence_length=self.max_sequence_length())
        extra = {"pooled": pooled}
        if self.denoiser.config.guidance_embeds:
            extra["guidance"] = torch.full((len(prompts),), float(guidance_scale), device=embeds.device)
        return Conditioning(embeds, None, extra)

    def guided_and_conditional(self, denoiser, latents, timestep, cond, guidance_scale):
        """One transformer call on the packed latents; the prediction unpacked, returned as both halves.
        ``guidance_scale`` is not read: the guidance is the one ``encode`` stored in the conditioning."""
        b, c, h, w = latents.shape
        packed = self.pipeline_class()._pack_latents(latents, b, c, h, w)  # (B, h/2 * w/2, 4C)
        embeds = cond.prompt_embeds
        img_ids, txt_ids = self._ids(h, w, embeds.shape[1], latents.device, latents.dtype, embeds.dtype)
        t = torch.as_tensor(timestep, device=latents.device)
        t = (t.expand(b) if t.ndim == 0 else t).to(latents.dtype)
        guidance = cond.extra.get("guidance")
        if denoiser.config.guidance_embeds and guidance is None:
            raise ValueError("this FLUX transformer embeds the guidance scale, but the conditioning carries none: "
                             "encode the prompts with FluxFamily.encode")
        out = denoiser(hidden_states=packed, timestep=t / 1000,
                       guidance=None if guidance is None else guidance.float(),
                       pooled_projections=cond.extra["pooled"], encoder_hidden_states=embeds, txt_ids=txt_ids,
                       img_ids=img_ids, return_dict=False)[0]
        out = self.pipeline_class()._unpack_latents(out, h, w, 1)  # (B, C, h, w); sizes in latent pixels, hence factor 1
        return out, out

    def _ids(self, h, w, text_len, device, dtype, text_dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(img_ids (h/2 * w/2, 3), txt_ids (L, 3)) as the pipeline makes them, once per call; kept per shape here
        rather than rebuilt at every step, since the sampler calls the transformer step by step."""
        key = (h, w, text_len, str(device), dtype, text_dtype)
        cache = self.__dict__.setdefault("_ids_cache", {})
        if key not in cache:
            img_ids = self.pipeline_class()._prepare_latent_image_ids(None, h // 2, w // 2, device, dtype)
            cache.clear()  # one shape at a time in practice
            cache[key] = (img_ids, torch.zeros(text_len, 3, device=device, dtype=text_dtype))  # as encode_prompt
        return cache[key]

    # -- HERO ---------------------------------------------------------------------------------------
    def feature_block(self) -> str:
        """The block at half the transformer's depth, double- and single-stream blocks counted together (FLUX.1:
        19 + 38 blocks -> ``single_transformer_blocks.9``): the analogue of a UNet's middle, past the point where
        text and image streams are merged. A single-stream block returns (text tokens, image tokens) like a
        double-stream one, so ``pool_features`` averages the image tokens of either."""
        double, single = len(self.denoiser.transformer_blocks), len(self.denoiser.single_transformer_blocks)
        middle = (double + single) // 2
        return f"transformer_blocks.{middle}" if middle < double else f"single_transformer_blocks.{middle - double}"


__all__ = ["FluxFamily"]
