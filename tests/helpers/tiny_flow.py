"""Tiny random flow-matching pipelines (SD3 architecture), built from small configs as diffusers' own tests
build them (nothing downloaded). No T5: the pipeline then puts zeros in T5's place, as the released model does
when ``text_encoder_3`` is dropped."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.helpers.tiny_families import TEXT_WIDTH, _clip_config


def build_sd3_pipeline(directory: Path, seed: int = 0, shift: float = 3.0):
    """A StableDiffusion3Pipeline at 16 px (16x16x4 latents, two transformer blocks), saved to ``directory``.
    ``shift`` as SD3's scheduler config (3.0), so the grid is a shifted one."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    from diffalign.toy.model import build_tokenizer

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(Path(directory) / "tokenizer")
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                        num_attention_heads=4, caption_projection_dim=32,
                                        joint_attention_dim=2 * TEXT_WIDTH,  # both CLIPs side by side (T5's width)
                                        pooled_projection_dim=2 * TEXT_WIDTH, out_channels=4)
    vae = AutoencoderKL(block_out_channels=(8,), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8,
                        scaling_factor=1.5, shift_factor=0.1)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=shift), vae=vae,
        text_encoder=CLIPTextModelWithProjection(_clip_config(tokenizer)), tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(tokenizer)), tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None,
    )
    pipe.save_pretrained(directory, safe_serialization=True)
    return pipe
