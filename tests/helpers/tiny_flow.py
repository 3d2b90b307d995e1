"""Tiny random flow-matching pipelines (SD3 architecture), built from small configs as diffusers' own tests
build them (nothing downloaded). SD3 without T5: the pipeline then puts zeros in T5's place, as the released model does
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


T5_TOKENS = 16  # T5 positions of the tiny FLUX pipeline (FLUX.1: 512); the family reads it from the tokenizer


def _t5_tokenizer(directory: Path):
    """A T5 tokenizer over the toy world's words, built locally (nothing downloaded): a ``tokenizers`` Unigram model
    laid out as T5's (pad 0, eos 1, unk 2, then SentencePiece words "\u2581word", whitespace split and Metaspace)
    wrapped in ``T5TokenizerFast``, which appends ``</s>``. Saved and loaded back, as the pipeline will load it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import T5TokenizerFast

    from diffalign.toy.model import toy_words

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + word, -1.0) for word in toy_words()]
    backend = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")])
    tok = T5TokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                          extra_ids=0, model_max_length=T5_TOKENS)
    tok.save_pretrained(directory)
    return T5TokenizerFast.from_pretrained(directory)


def build_flux_pipeline(directory: Path, seed: int = 0, guidance_embeds: bool = True, blocks: tuple[int, int] = (1, 2),
                        heads: int = 2, head_dim: int = 8):
    """A FluxPipeline at 16 px (16x16x4 latents, packed to 64 tokens of 16 channels; by default one double-stream
    and two single-stream blocks of width 2 x 8), saved to ``directory``. ``guidance_embeds`` as FLUX.1-dev (True)
    or -schnell (False). The VAE's ``sample_size`` (16) is the resolution the family samples at, as FLUX.1's VAE
    config says 1024. ``blocks``/``heads``/``head_dim`` make a larger transformer (bench/sampler_overhead.py)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    from diffalign.toy.model import build_tokenizer

    torch.manual_seed(seed)
    directory = Path(directory)
    tokenizer = build_tokenizer(directory / "tokenizer")
    t5_tokenizer = _t5_tokenizer(directory / "tokenizer_2")
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=TEXT_WIDTH, d_kv=8, d_ff=37, num_layers=2,
                                 num_heads=4, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                 decoder_start_token_id=0))
    rope = (head_dim // 2, head_dim // 4, head_dim // 4)  # RoPE axes: (text, image row, image column), sum head_dim
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, out_channels=16, num_layers=blocks[0],
                                         num_single_layers=blocks[1], attention_head_dim=head_dim,
                                         num_attention_heads=heads, joint_attention_dim=TEXT_WIDTH,
                                         pooled_projection_dim=TEXT_WIDTH, guidance_embeds=guidance_embeds,
                                         axes_dims_rope=rope)
    vae = AutoencoderKL(block_out_channels=(8,), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8, sample_size=16,
                        scaling_factor=1.5, shift_factor=0.1)
    # FLUX.1's scheduler config: dynamic shifting by the image's token count.
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(transformer=transformer, scheduler=scheduler, vae=vae,
                        text_encoder=CLIPTextModel(_clip_config(tokenizer)), tokenizer=tokenizer,
                        text_encoder_2=t5, tokenizer_2=t5_tokenizer)
    pipe.save_pretrained(directory, safe_serialization=True)
    return pipe
