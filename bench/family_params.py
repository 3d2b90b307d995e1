"""Parameters and static training memory of each model family's public architecture (nothing downloaded).

    python bench/family_params.py        # seconds: the models are built on the meta device (no weights)

Builds the UNet, VAE and text encoders of SD 1.5, SD 2.1 and SDXL base 1.0 from the values of their hub
config.json files (written out here and in bench/memory_estimate.py), attaches the LoRA the way the trainer
does (rank 4 on each family's default targets) and prints exact parameter counts and the static memory per
process the way docs/scale_out.md counts it: the denoiser in fp32 (the trainer keeps it fp32 and autocasts),
the frozen VAE and text encoders in half precision (bf16/fp16 on GPU) or fp32, the LoRA with its gradient and
Adam's two moments in fp32 (16 bytes per parameter). Activation memory of a training step is what
bench/memory_estimate.py measures (SD 1.5 so far).
"""

from __future__ import annotations

import torch
from memory_estimate import CLIP_VIT_L14_TEXT, SD15_UNET, SD15_VAE

GiB = 2**30
SD21_UNET = {**SD15_UNET, "sample_size": 96, "cross_attention_dim": 1024, "attention_head_dim": (5, 10, 20, 20),
             "use_linear_projection": True, "upcast_attention": True}
OPENCLIP_H_TEXT = {**CLIP_VIT_L14_TEXT, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
                   "num_attention_heads": 16, "hidden_act": "gelu", "projection_dim": 512}
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    norm_num_groups=32, norm_eps=1e-5,
)
OPENCLIP_BIGG_TEXT = {**CLIP_VIT_L14_TEXT, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                      "num_attention_heads": 20, "hidden_act": "gelu", "projection_dim": 1280}
FAMILIES = {
    "SD 1.5": ("sd", SD15_UNET, [("CLIPTextModel", CLIP_VIT_L14_TEXT)]),
    "SD 2.1": ("sd", SD21_UNET, [("CLIPTextModel", OPENCLIP_H_TEXT)]),
    "SDXL": ("sdxl", SDXL_UNET, [("CLIPTextModel", CLIP_VIT_L14_TEXT),
                                 ("CLIPTextModelWithProjection", OPENCLIP_BIGG_TEXT)]),
}


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def main() -> None:
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from diffalign.families import StableDiffusionFamily, StableDiffusionXLFamily
    from diffalign.pipeline import attach_lora

    families = {"sd": StableDiffusionFamily, "sdxl": StableDiffusionXLFamily}
    print(f"{'family':<8}{'px':>6}{'UNet':>15}{'text enc.':>15}{'VAE':>13}{'LoRA r4':>11}   static GiB: "
          f"UNet fp32 + frozen half (fp32) + LoRA/Adam")
    for name, (fam, unet_cfg, texts) in FAMILIES.items():
        with torch.device("meta"):
            unet = UNet2DConditionModel(**unet_cfg)
            vae = AutoencoderKL(**SD15_VAE)
            text = sum(count(getattr(transformers, cls)(transformers.CLIPTextConfig(**cfg))) for cls, cfg in texts)
        lora = sum(p.numel() for p in attach_lora(unet, 4, 4.0, list(families[fam].default_lora_targets)))
        n_unet = count(unet) - lora
        px = unet_cfg["sample_size"] * 8
        frozen = count(vae) + text
        print(f"{name:<8}{px:>6}{n_unet:>15,d}{text:>15,d}{count(vae):>13,d}{lora:>11,d}   "
              f"{n_unet * 4 / GiB:.2f} + {frozen * 2 / GiB:.2f} ({frozen * 4 / GiB:.2f}) + {lora * 16 / GiB:.3f}")


if __name__ == "__main__":
    main()
