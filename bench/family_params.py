"""Parameters and training memory of each model family's public architecture (nothing downloaded).

    python bench/family_params.py        # 5-11 min on 2 shared cores, 0.75 GB: fake tensors, no weights

Builds the UNet, VAE and text encoders of SD 1.5, SD 2.1 and SDXL base 1.0, and the transformer, VAE and text
encoders of FLUX.1-dev, SD3.5-medium and SD3.5-large, from the values of their hub config.json files (written out here and in
bench/memory_estimate.py), attaches the LoRA the way the trainer does (rank 4 on each family's default targets)
and prints:

1. Exact parameter counts and the static memory per process as docs/scale_out.md counts it: the denoiser in
   fp32 (the trainer keeps it fp32 and autocasts), the frozen VAE and text encoders in half precision
   (bf16/fp16 on GPU) or fp32, the LoRA with its gradient and Adam's two moments in fp32 (16 bytes each).
2. The memory one training step holds for its backward, by bench/memory_estimate.py's method (every storage
   autograd saves, counted once, parameters and inputs excluded; with gradient checkpointing, what is saved
   outside the checkpointed blocks plus the inputs the checkpoints keep, plus the recomputation of the
   largest block), but run at the native resolution directly instead of extrapolated from 128/256 px: the
   UNet's parameters and inputs are torch FakeTensors on "cpu" (torch._subclasses.fake_tensor), which carry
   shapes and dtypes through every op (and through CPU autocast, for bf16) without allocating. Attention is
   torch's fused SDPA (flash / memory-efficient kernels on GPUs in half precision), as in memory_estimate.py.
   SD 1.5 is printed as the cross-check: memory_estimate.py's numbers, measured on real tensors and
   extrapolated, are in docs/scale_out.md ("fused" rows), and these must equal them.

Per UNet row: a trajectory with classifier-free guidance is 2 rows, so ``train.batch_size`` B is 2B rows. FLUX.1-dev
has no CFG batch (the guidance is embedded): B trajectories are B transformer rows of 4096 image tokens (1024 px,
2x2-packed 128x128x16 latents) and 512 T5 tokens. SD3.5 has CFG (2B rows) of 4096 image tokens (2x2 patches of
128x128x16) and 77 CLIP + 256 T5 tokens.

    python bench/family_params.py --only FLUX.1-dev    # one family (the SD 1.5 cross-check: --only "SD 1.5")
Limits as in memory_estimate.py: a GPU adds the CUDA context (~0.3-1 GB), workspaces and the allocator's
fragmentation (typically 5-20 %); CPU autocast's op lists approximate CUDA's.
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
# black-forest-labs/FLUX.1-dev: transformer/, text_encoder_2/ (T5 v1.1 XXL encoder) and vae/ config.json.
FLUX_DEV_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                            guidance_embeds=True, axes_dims_rope=(16, 56, 56))
T5_XXL_ENCODER = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                      relative_attention_num_buckets=32, relative_attention_max_distance=128,
                      feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
FLUX_VAE = {**SD15_VAE, "latent_channels": 16, "sample_size": 1024, "use_quant_conv": False,
            "use_post_quant_conv": False, "scaling_factor": 0.3611, "shift_factor": 0.1159}
FLUX_PX, FLUX_T5_TOKENS = 1024, 512
FLUX_ROWS = (1, 2, 4)  # transformer rows: train.batch_size 1, 2, 4 (no CFG batch)
# stabilityai/stable-diffusion-3.5-medium and -large: transformer/ and vae/ config.json (MM-DiT, QK RMS-norm; the
# medium model's first 13 blocks have a second, image-only attention). Text: CLIP-L and CLIP-G with projections
# (pooled 768 + 1280 = 2048) and T5 v1.1 XXL; the token sequence is 77 CLIP + 256 T5 tokens.
SD35_MEDIUM_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                               attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                               caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                               dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
SD35_LARGE_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38,
                              attention_head_dim=64, num_attention_heads=38, joint_attention_dim=4096,
                              caption_projection_dim=2432, pooled_projection_dim=2048, pos_embed_max_size=192,
                              qk_norm="rms_norm")
SD3_VAE = {**FLUX_VAE, "scaling_factor": 1.5305, "shift_factor": 0.0609}
SD3_TOKENS = 77
SD3_T5_TOKENS = 256
FAMILIES = {
    "SD 1.5": ("sd", SD15_UNET, [("CLIPTextModel", CLIP_VIT_L14_TEXT)]),
    "SD 2.1": ("sd", SD21_UNET, [("CLIPTextModel", OPENCLIP_H_TEXT)]),
    "SDXL": ("sdxl", SDXL_UNET, [("CLIPTextModel", CLIP_VIT_L14_TEXT),
                                 ("CLIPTextModelWithProjection", OPENCLIP_BIGG_TEXT)]),
}
TEXT_TOKENS = 77
ROWS = (2, 4, 8)  # UNet rows: train.batch_size 1, 2, 4 with CFG


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _family(name: str):
    from diffalign.families import StableDiffusionFamily, StableDiffusionXLFamily

    return {"sd": StableDiffusionFamily, "sdxl": StableDiffusionXLFamily}[name]


def _fake(module: torch.nn.Module) -> None:
    """Swap a meta-device module's parameters and buffers for fake CPU tensors (run inside the FakeTensorMode).
    Assigned in place: ``module.to`` would try to swap tensor subclasses and fails on peft's LoRA layers."""
    for m in module.modules():
        for n, p in list(m._parameters.items()):
            if p is not None:
                m._parameters[n] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=p.requires_grad)
        for n, b in list(m._buffers.items()):
            if b is not None:
                m._buffers[n] = torch.empty(b.shape, dtype=b.dtype)


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata  # the StorageImpl, shared by views (fake storages have no data_ptr)


def unet_inputs(unet_cfg: dict, rows: int) -> dict:
    """A UNet's inputs at its native latent size (fake inside the FakeTensorMode)."""
    size = unet_cfg["sample_size"]
    inputs = {"sample": torch.randn(rows, 4, size, size),  # (R, 4, h, w)
              "timestep": torch.tensor([500] * rows),
              "encoder_hidden_states": torch.randn(rows, TEXT_TOKENS, unet_cfg["cross_attention_dim"])}  # (R, 77, E)
    if unet_cfg.get("addition_embed_type") == "text_time":  # SDXL: pooled text (R, 1280) and 6 time ids
        pooled = unet_cfg["projection_class_embeddings_input_dim"] - 6 * unet_cfg["addition_time_embed_dim"]
        inputs["added_cond_kwargs"] = {"text_embeds": torch.randn(rows, pooled), "time_ids": torch.randn(rows, 6)}
    return inputs


def flux_inputs(cfg: dict, rows: int) -> dict:
    """FLUX.1's transformer inputs as FluxFamily passes them: packed latents, T5 tokens, ids, t/1000, guidance."""
    side = FLUX_PX // 16  # VAE factor 8, then 2x2 patches: 64x64 = 4096 tokens
    return {"hidden_states": torch.randn(rows, side * side, cfg["in_channels"]),  # (R, 4096, 64)
            "encoder_hidden_states": torch.randn(rows, FLUX_T5_TOKENS, cfg["joint_attention_dim"]),  # (R, 512, 4096)
            "pooled_projections": torch.randn(rows, cfg["pooled_projection_dim"]),
            "timestep": torch.full((rows,), 0.5), "guidance": torch.full((rows,), 3.5),
            "txt_ids": torch.zeros(FLUX_T5_TOKENS, 3), "img_ids": torch.zeros(side * side, 3)}


def _tensors(inputs: dict) -> list[torch.Tensor]:
    return [t for v in inputs.values() for t in (_tensors(v) if isinstance(v, dict) else [v]) if torch.is_tensor(t)]


def step_memory(unet, inputs: dict, checkpointing: bool, bf16: bool, blocks=None) -> tuple[int, int]:
    """(bytes held for the backward, bytes of the largest checkpointable block) of one forward at the native
    latent size; the model is fake, so nothing is allocated. Mirrors memory_estimate.training_step. ``blocks``:
    the module classes gradient checkpointing wraps (a UNet's resnet and transformer blocks by default)."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    blocks = blocks or (ResnetBlock2D, BasicTransformerBlock)
    exclude = {_key(x) for x in [*unet.parameters(), *unet.buffers(), *_tensors(inputs)]}
    saved: dict[int, int] = {}
    owner: list[str] = []
    per_block: dict[str, int] = {}
    held_inputs: dict[int, int] = {}

    def pack(x):
        k = _key(x)
        if k not in exclude and k not in saved:
            saved[k] = x.untyped_storage().nbytes()
            if owner:
                per_block[owner[0]] = per_block.get(owner[0], 0) + saved[k]
        return x

    hooks = []
    if checkpointing:
        def checkpoint_recording(module, *args):
            for a in args:
                if torch.is_tensor(a) and _key(a) not in exclude:
                    held_inputs.setdefault(_key(a), a.untyped_storage().nbytes())
            return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)
        unet.enable_gradient_checkpointing(checkpoint_recording)
    else:
        unet.disable_gradient_checkpointing()
        for i, m in enumerate(m for m in unet.modules() if isinstance(m, blocks)):
            hooks.append(m.register_forward_pre_hook(lambda mod, a, i=i: owner.append(str(i)) and None))
            hooks.append(m.register_forward_hook(lambda mod, a, o: owner.pop() and None))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            unet(**inputs)
    finally:
        for h in hooks:
            h.remove()
        unet.disable_gradient_checkpointing()
    held = sum(saved.values()) + sum(b for k, b in held_inputs.items() if k not in saved)
    return held, max(per_block.values(), default=0)


def _step_table(name: str, model, inputs, rows: tuple[int, ...], blocks=None) -> None:
    """Print the fp32 / bf16, checkpointing off / on rows of one family (inside the FakeTensorMode)."""
    _fake(model)
    model.train()
    for bf16 in (False, True):
        largest_block = {}
        for checkpointing in (False, True):  # plain first: checkpointing needs its largest block
            cells = []
            for r in rows:
                held, block = step_memory(model, inputs(r), checkpointing, bf16, blocks)
                largest_block.setdefault(r, block)
                # The backward recomputes one checkpointed block at a time: its saved tensors come on top.
                cells.append((held + (largest_block[r] if checkpointing else 0)) / GiB)
            print(f"{name:<11}{'bf16' if bf16 else 'fp32':>10}{'on' if checkpointing else 'off':>15}"
                  + "".join(f"{c:10.2f}" for c in cells))


def sd3_inputs(cfg: dict, rows: int) -> dict:
    """SD3's transformer inputs as StableDiffusion3Family passes them (CFG: 2 rows per trajectory)."""
    side = cfg["sample_size"]
    return {"hidden_states": torch.randn(rows, cfg["in_channels"], side, side),  # (R, 16, 128, 128)
            "encoder_hidden_states": torch.randn(rows, SD3_TOKENS + SD3_T5_TOKENS, cfg["joint_attention_dim"]),
            "pooled_projections": torch.randn(rows, cfg["pooled_projection_dim"]),
            "timestep": torch.full((rows,), 500.0)}


def flow_transformers() -> dict:
    """name -> (model class, config, VAE config, text encoders, inputs, rows, checkpointed blocks, family, caption)."""
    import transformers
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    from diffusers.models.attention import JointTransformerBlock
    from diffusers.models.transformers.transformer_flux import (
        FluxSingleTransformerBlock,
        FluxTransformerBlock,
    )

    from diffalign.families import FluxFamily, StableDiffusion3Family

    clip_l = (transformers.CLIPTextModelWithProjection, transformers.CLIPTextConfig, CLIP_VIT_L14_TEXT)
    clip_g = (transformers.CLIPTextModelWithProjection, transformers.CLIPTextConfig, OPENCLIP_BIGG_TEXT)
    t5 = (transformers.T5EncoderModel, transformers.T5Config, T5_XXL_ENCODER)
    sd3 = dict(vae=SD3_VAE, texts=[clip_l, clip_g, t5], rows=ROWS, cfg_batch=True, blocks=(JointTransformerBlock,),
               family=StableDiffusion3Family,
               caption=f"({(128 // 2) ** 2} image + {SD3_TOKENS} CLIP + {SD3_T5_TOKENS} T5 tokens); "
                       f"B = train.batch_size (2B transformer rows with CFG)")
    return {
        "FLUX.1-dev": dict(cls=FluxTransformer2DModel, cfg=FLUX_DEV_TRANSFORMER, vae=FLUX_VAE,
                           texts=[(transformers.CLIPTextModel, transformers.CLIPTextConfig, CLIP_VIT_L14_TEXT), t5],
                           inputs=flux_inputs, rows=FLUX_ROWS, cfg_batch=False, blocks=(FluxTransformerBlock, FluxSingleTransformerBlock),
                           family=FluxFamily, caption=f"(4096 image + {FLUX_T5_TOKENS} T5 tokens); "
                                                      "B = train.batch_size = transformer rows (no CFG)"),
        "SD3.5-medium": dict(cls=SD3Transformer2DModel, cfg=SD35_MEDIUM_TRANSFORMER, inputs=sd3_inputs, **sd3),
        "SD3.5-large": dict(cls=SD3Transformer2DModel, cfg=SD35_LARGE_TRANSFORMER, inputs=sd3_inputs, **sd3),
    }


FLOW_NAMES = ("FLUX.1-dev", "SD3.5-medium", "SD3.5-large")


def flow_transformer(name: str) -> None:
    """A rectified-flow transformer family: parameters, static memory and one training step at 1024 px."""
    from diffusers import AutoencoderKL
    from torch._subclasses.fake_tensor import FakeTensorMode

    from diffalign.pipeline import attach_lora

    spec = flow_transformers()[name]
    with torch.device("meta"):
        model = spec["cls"](**spec["cfg"])
        vae = AutoencoderKL(**spec["vae"])
        text = sum(count(cls(config_cls(**cfg))) for cls, config_cls, cfg in spec["texts"])
    lora = sum(p.numel() for p in attach_lora(model, 4, 4.0, list(spec["family"].default_lora_targets)))
    n_model, frozen = count(model) - lora, count(vae) + text
    print(f"{name:<13}{FLUX_PX:>6}{n_model:>15,d}{text:>15,d}{count(vae):>13,d}{lora:>11,d}   "
          f"{n_model * 4 / GiB:.2f} + {frozen * 2 / GiB:.2f} ({frozen * 4 / GiB:.2f}) + {lora * 16 / GiB:.3f}")
    print(f"\n{name}, one training step at {FLUX_PX} px {spec['caption']}; memory held for the backward (GiB), "
          f"fused attention")
    cfg_batch = spec["cfg_batch"]  # CFG doubles the rows: label columns by train.batch_size
    print(f"{'family':<13}{'precision':>8}{'checkpointing':>15}"
          + "".join(f"{f'B = {r // 2 if cfg_batch else r}':>10}" for r in spec["rows"]))
    with FakeTensorMode():
        _step_table(name, model, lambda r: spec["inputs"](spec["cfg"], r), spec["rows"], spec["blocks"])


def main(only: str | None = None) -> None:
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch._subclasses.fake_tensor import FakeTensorMode

    from diffalign.pipeline import attach_lora

    names = [n for n in FAMILIES if only in (None, n)]
    if only not in (None, *FLOW_NAMES, *FAMILIES):
        raise SystemExit(f"--only {only!r}: one of {', '.join([*FAMILIES, *FLOW_NAMES])}")

    print(f"{'family':<11}{'px':>6}{'UNet':>15}{'text enc.':>15}{'VAE':>13}{'LoRA r4':>11}   static GiB: "
          f"UNet fp32 + frozen half (fp32) + LoRA/Adam")
    unets = {}
    for name, (fam, unet_cfg, texts) in ((n, FAMILIES[n]) for n in names):
        with torch.device("meta"):
            unet = UNet2DConditionModel(**unet_cfg)
            vae = AutoencoderKL(**SD15_VAE)
            text = sum(count(getattr(transformers, cls)(transformers.CLIPTextConfig(**cfg))) for cls, cfg in texts)
        lora = sum(p.numel() for p in attach_lora(unet, 4, 4.0, list(_family(fam).default_lora_targets)))
        n_unet = count(unet) - lora
        px = unet_cfg["sample_size"] * 8
        frozen = count(vae) + text
        print(f"{name:<11}{px:>6}{n_unet:>15,d}{text:>15,d}{count(vae):>13,d}{lora:>11,d}   "
              f"{n_unet * 4 / GiB:.2f} + {frozen * 2 / GiB:.2f} ({frozen * 4 / GiB:.2f}) + {lora * 16 / GiB:.3f}")
        unets[name] = (unet, unet_cfg)

    if unets:
        print("\nOne training step at the native resolution, memory held for the backward (GiB), fused attention; "
              "B = train.batch_size (2B UNet rows with CFG)")
        print(f"{'family':<11}{'precision':>10}{'checkpointing':>15}" + "".join(f"{f'B = {r // 2}':>10}" for r in ROWS))
    with FakeTensorMode():
        for name, (unet, unet_cfg) in unets.items():
            _step_table(name, unet, lambda r, c=unet_cfg: unet_inputs(c, r), ROWS)
    for name in FLOW_NAMES:
        if only in (None, name):
            print()
            flow_transformer(name)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="one family, e.g. 'FLUX.1-dev', 'SD3.5-large' or 'SD 1.5'")
    main(parser.parse_args().only)
