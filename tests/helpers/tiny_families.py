"""Tiny random pipelines of other model families, built from small configs as diffusers' own tests build
them (nothing downloaded). The toy CLIP tokenizer (vocabulary 112, 16 positions) serves every CLIP encoder."""

from __future__ import annotations

from pathlib import Path

import torch

TEXT_WIDTH = 32


def _clip_config(tokenizer, **kw):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=37, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
                          projection_dim=TEXT_WIDTH, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **kw)


def build_sdxl(directory: Path, seed: int = 0):
    """A StableDiffusionXLPipeline at 64 px (16x16x4 latents), DDIM scheduler, saved to ``directory``."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from diffalign.toy.model import (
        build_inference_scheduler,
        build_tokenizer,
        build_vae,
        portable_text_encoder,
    )

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(Path(directory) / "tokenizer")
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 8 + TEXT_WIDTH,  # 6 time ids x 8 + the pooled projection
        cross_attention_dim=2 * TEXT_WIDTH, norm_num_groups=16,  # both encoders' hidden states, concatenated
    )
    pipe = StableDiffusionXLPipeline(
        vae=build_vae(), text_encoder=CLIPTextModel(_clip_config(tokenizer)),
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(tokenizer)), tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=unet, scheduler=build_inference_scheduler(), add_watermarker=False,
    )
    pipe.save_pretrained(directory, safe_serialization=True)
    portable_text_encoder(Path(directory) / "text_encoder")
    return pipe


def build_sd_v_prediction(directory: Path, seed: int = 0):
    """The toy architecture as an SD 2.x-style v-prediction pipeline."""
    import json

    from diffalign.toy.model import build_random_pipeline

    pipe = build_random_pipeline(directory, seed=seed)
    config = Path(directory) / "scheduler" / "scheduler_config.json"
    values = json.loads(config.read_text())
    values["prediction_type"] = "v_prediction"
    config.write_text(json.dumps(values))
    return pipe
