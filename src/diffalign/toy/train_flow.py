"""Pretrain the toy flow-matching model (SD3 architecture) on the toy world (``diffalign toy train-flow``).

The SD toy's VAE is reused as it ships (its latents, its scaling factor), so the two toy models see the same
images through the same decoder and differ only in the denoiser and its objective. Phases, each checkpointed so
that a killed run resumes where it stopped:

1. **encode** - render ``num_scenes`` captioned scenes once and store their latent posteriors (shipped VAE).
2. **transformer** - an ``SD3Transformer2DModel`` and two small CLIP text encoders (with projections, for the
   pooled embedding), jointly, by rectified flow: x_s = (1 - s) x0 + s e, target v = e - x0, s drawn
   logit-normal(0, 1) as SD3 trains (Esser et al. 2024, Sec. 3.1), 10% caption dropout (the empty prompt is
   CFG's), EMA of everything trained.
3. **export** - the EMA weights as a standard diffusers ``StableDiffusion3Pipeline`` directory, no T5 (the
   pipeline puts zeros in its place), ``FlowMatchEulerDiscreteScheduler(shift)``.

Determinism: every random draw of step ``k`` comes from a generator seeded with ``(seed, phase, k)``, so a
resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .model import MAX_TOKENS, TEXT_WIDTH, build_tokenizer
from .train import _alternative_caption, _atomic_save, _gen, _lr, _sample_prompts, _to_tensor

T5_TOKENS = 256  # StableDiffusion3Pipeline.encode_prompt's default max_sequence_length


@dataclass
class ToyFlowTrainConfig:
    out_dir: str = "runs/toy-flow-pretrain"
    """Working directory for checkpoints and logs."""
    export_dir: str = ""
    """Where the finished pipeline goes (default: <out_dir>/pipeline)."""
    seed: int = 0
    num_scenes: int = 10000
    steps: int = 6000
    batch: int = 64
    lr: float = 1e-3
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    count_fraction: float = 0.5
    """Share of count-family scenes (the rest are relations), as the SD toy."""
    layers: int = 4
    """Transformer blocks (each a joint text-image attention block of width heads x head_dim)."""
    heads: int = 4
    head_dim: int = 32
    shift: float = 3.0
    """Inference schedule shift of the exported scheduler (SD3's value)."""
    checkpoint_every: int = 250
    threads: int = 0
    """torch threads (0: all cores)."""


def build_flow_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_TOKENS, projection_dim=TEXT_WIDTH,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return CLIPTextModelWithProjection(cfg)


def build_flow_transformer(cfg: ToyFlowTrainConfig, latent_size: int = 16):
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=latent_size, patch_size=2, in_channels=4, out_channels=4, num_layers=cfg.layers,
        attention_head_dim=cfg.head_dim, num_attention_heads=cfg.heads,
        joint_attention_dim=2 * TEXT_WIDTH,  # both CLIP encoders' hidden states side by side (T5's width)
        caption_projection_dim=cfg.heads * cfg.head_dim, pooled_projection_dim=2 * TEXT_WIDTH, pos_embed_max_size=16)


def _shipped_vae():
    from diffusers import AutoencoderKL

    from ..pipeline import resolve_model

    return AutoencoderKL.from_pretrained(Path(resolve_model("toy")) / "vae")


@torch.no_grad()
def encode_dataset(cfg: ToyFlowTrainConfig, out: Path, log) -> None:
    path = out / "latents.pt"
    if path.exists():
        return
    vae = _shipped_vae().eval()
    rng = np.random.default_rng([cfg.seed, 2])
    prompts = _sample_prompts(rng, cfg.num_scenes, cfg)
    means, stds = [], []
    for i in range(0, cfg.num_scenes, 256):
        dist = vae.encode(_to_tensor(np.stack([render(p, rng) for p in prompts[i:i + 256]]))).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    log(f"encoded {cfg.num_scenes} scenes with the shipped toy VAE")
    _atomic_save({"mean": torch.cat(means), "std": torch.cat(stds), "prompts": prompts,
                  "scaling_factor": vae.config.scaling_factor}, path)


def render(prompt: str, rng: np.random.Generator) -> np.ndarray:
    from .scenes import render_scene

    return render_scene(prompt, rng).image


def _encode_text(encoders, tokenizer, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """As StableDiffusion3Pipeline.encode_prompt without T5: penultimate hidden states of both encoders side by
    side, and their text projections concatenated (the pooled embedding)."""
    ids = tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt").input_ids
    hidden, pooled = [], []
    for enc in encoders:
        out = enc(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled.append(out.text_embeds)
    text = torch.cat(hidden, dim=-1)
    # Without T5 the pipeline appends T5_TOKENS zero tokens (encode_prompt's default max_sequence_length); the
    # model must learn with them, as it will always see them.
    zeros = torch.zeros(text.shape[0], T5_TOKENS, text.shape[-1])
    return torch.cat([text, zeros], dim=1), torch.cat(pooled, dim=-1)


def train_transformer(cfg: ToyFlowTrainConfig, out: Path, log) -> None:
    ckpt = out / "transformer.pt"
    data = torch.load(out / "latents.pt", weights_only=False)
    tokenizer = build_tokenizer(out / "tokenizer-files")
    torch.manual_seed(cfg.seed)
    model = build_flow_transformer(cfg, latent_size=data["mean"].shape[-1])
    encoders = [build_flow_text_encoder(tokenizer), build_flow_text_encoder(tokenizer)]
    live = [model, *encoders]
    ema = [copy.deepcopy(m) for m in live]
    params = [p for m in live for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-4)
    step = 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        for m, s in zip(live + ema, state["live"] + state["ema"]):
            m.load_state_dict(s)
        opt.load_state_dict(state["opt"])
        step = state["step"]
        if step >= cfg.steps:
            return
        log(f"transformer: resuming at step {step}")
    n, scaling = data["mean"].shape[0], data["scaling_factor"]
    for m in live:
        m.train()
    t0 = time.time()
    while step < cfg.steps:
        g = _gen(cfg.seed, 3, step)
        rng = np.random.default_rng([cfg.seed, 3, step])
        idx = torch.randint(0, n, (cfg.batch,), generator=g)
        x0 = (data["mean"][idx] + data["std"][idx] * torch.randn(data["mean"][idx].shape, generator=g)) * scaling
        captions = ["" if rng.random() < cfg.caption_dropout else _alternative_caption(data["prompts"][i], rng)
                    for i in idx.tolist()]
        text, pooled = _encode_text(encoders, tokenizer, captions)
        noise = torch.randn(x0.shape, generator=g)
        s = torch.sigmoid(torch.randn(cfg.batch, generator=g))  # logit-normal(0, 1): SD3's sigma sampling
        xs = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * noise
        pred = model(hidden_states=xs, timestep=s * 1000, encoder_hidden_states=text, pooled_projections=pooled,
                     return_dict=False)[0]
        loss = F.mse_loss(pred, noise - x0)
        for pg in opt.param_groups:
            pg["lr"] = _lr(step, cfg.steps, cfg.lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, m in zip(ema, live):
                for pe, pl in zip(e.parameters(), m.parameters()):
                    pe.lerp_(pl, 1 - decay)
        if step % 50 == 0:
            log(f"transformer step {step}/{cfg.steps} loss {loss.item():.4f} ({(time.time() - t0) / 50:.2f}s/step)")
            t0 = time.time()
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            _atomic_save({"live": [m.state_dict() for m in live], "ema": [m.state_dict() for m in ema],
                          "opt": opt.state_dict(), "step": step}, ckpt)


def export_flow_pipeline(cfg: ToyFlowTrainConfig, out: Path, target: Path) -> Path:
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    data = torch.load(out / "latents.pt", weights_only=False)
    state = torch.load(out / "transformer.pt", weights_only=False)
    tokenizer = build_tokenizer(target / "tokenizer")
    model = build_flow_transformer(cfg, latent_size=data["mean"].shape[-1])
    encoders = [build_flow_text_encoder(tokenizer), build_flow_text_encoder(tokenizer)]
    for m, s in zip([model, *encoders], state["ema"]):
        m.load_state_dict(s)
    pipe = StableDiffusion3Pipeline(
        transformer=model, scheduler=FlowMatchEulerDiscreteScheduler(shift=cfg.shift), vae=_shipped_vae(),
        text_encoder=encoders[0], tokenizer=tokenizer, text_encoder_2=encoders[1], tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(target, safe_serialization=True)
    (target / "toy_training.json").write_text(json.dumps({"config": asdict(cfg), "step": state["step"]}, indent=2))
    return target


def train_toy_flow_model(cfg: ToyFlowTrainConfig, log=print) -> Path:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    encode_dataset(cfg, out, log)
    train_transformer(cfg, out, log)
    target = Path(cfg.export_dir) if cfg.export_dir else out / "pipeline"
    export_flow_pipeline(cfg, out, target)
    log(f"toy flow pipeline written to {target}")
    return target
