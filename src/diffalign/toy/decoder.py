"""A small decoder for DAG's forward-looking rewards on the toy model (``diffalign toy train-decoder``).

DAG scores r(decode(x0_hat(x_t))) for the states its trained transitions touch: about 15 of the 20 states of
every trajectory. On the toy model the VAE decoder (64 x 64 output, 32-64 channels) costs as much per image as
several UNet calls, so those decodes were 77% of DAG's extra time (bench/RESULTS.md). The field's answer for SD
is TAESD (``madebyollin/taesd``, diffusers' ``AutoencoderTiny``): a decoder of a few hundred thousand
parameters that approximates the VAE's. This script makes the same thing for the toy model: an
``AutoencoderTiny`` whose decoder is distilled from the toy VAE's decoder on the latents DAG actually decodes,
the x0-predictions of sampled trajectories at every step (blurry early, sharp late) and final latents.

Data: ``num_trajectories`` trajectories of the toy pipeline on the training prompts (20 DDIM steps, CFG 4),
every state's conditional x0_hat and the VAE's decode of it as the target. Training: L1 + MSE to the target
on random 8 x 8 latent crops (32 x 32 pixels: convolutions do not care, and crops cost a quarter), AdamW with a
cosine schedule; checkpointed, so a killed run resumes.

Only the decoder is trained; the encoder stays random (DAG never encodes). ``scaling_factor`` is 1: the decoder
takes the UNet's latents as they are (the VAE's are those divided by its scaling factor).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

TINY_CONFIG = dict(in_channels=3, out_channels=3, encoder_block_out_channels=(16, 16, 16),
                   decoder_block_out_channels=(16, 16, 16), num_encoder_blocks=(1, 1, 1), num_decoder_blocks=(1, 1, 1),
                   latent_channels=4, upsampling_scaling_factor=2, scaling_factor=1.0)


@dataclass
class DecoderTrainConfig:
    out_dir: str = "runs/toy-decoder"
    export_dir: str = ""
    seed: int = 0
    num_trajectories: int = 192
    steps: int = 1500
    batch: int = 32
    lr: float = 2e-3
    crop: int = 8
    checkpoint_every: int = 250


def build_tiny_autoencoder():
    from diffusers import AutoencoderTiny

    return AutoencoderTiny(**TINY_CONFIG)


@torch.no_grad()
def make_dataset(pipe, cfg: DecoderTrainConfig, log=print) -> dict:
    """x0-predictions of sampled trajectories (UNet space) and the VAE's decodes of them in [-1, 1]."""
    from ..sampling import predict_x0_eps, sample_trajectories
    from .prompts import load_prompts

    prompts = load_prompts("train")
    rng = np.random.default_rng(cfg.seed)
    latents, targets = [], []
    batch = 16
    for b in range(0, cfg.num_trajectories, batch):
        chunk = [prompts[i] for i in rng.integers(len(prompts), size=batch)]
        traj = sample_trajectories(pipe, chunk, num_steps=20, guidance_scale=4.0,
                                   generator=torch.Generator().manual_seed(cfg.seed * 7919 + b), decode=False)
        x = traj.latents[:, :-1].flatten(0, 1)  # (B*T, C, h, w): the states x_t
        t = traj.timesteps.repeat(len(chunk))
        x0, _ = predict_x0_eps(pipe.scheduler, traj.cond_eps.flatten(0, 1), t, x)
        x0 = torch.cat([x0, traj.latents[:, -1]])  # and the final latents
        targets.append(pipe.vae.decode(x0 / pipe.vae.config.scaling_factor).sample.clamp(-1, 1))
        latents.append(x0)
        log(f"data: {b + batch}/{cfg.num_trajectories} trajectories")
    return {"latents": torch.cat(latents), "targets": torch.cat(targets)}


def train_decoder(cfg: DecoderTrainConfig, pipe=None, log=print) -> Path:
    """Distil the toy VAE's decoder into ``build_tiny_autoencoder()``; export it in diffusers layout."""
    from ..pipeline import load_pipeline
    from .train import _atomic_save  # tmp file + rename: a killed run never leaves a half-written checkpoint

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data_path, ckpt_path = out / "data.pt", out / "decoder.pt"
    if data_path.exists():
        data = torch.load(data_path)
    else:
        data = make_dataset(pipe or load_pipeline("toy"), cfg, log)
        _atomic_save(data, data_path)
    model = build_tiny_autoencoder()
    opt = torch.optim.AdamW(model.decoder.parameters(), lr=cfg.lr, weight_decay=0.0)
    step = 0
    if ckpt_path.exists():
        state = torch.load(ckpt_path)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        log(f"resumed at step {step}")
    z, y = data["latents"], data["targets"]
    n, c = len(z), cfg.crop
    s = y.shape[-1] // z.shape[-1]  # pixels per latent cell (64 / 16 = 4)
    t0 = time.time()
    while step < cfg.steps:
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)  # the same batch after a resume
        idx = torch.randint(n, (cfg.batch,), generator=g)
        i, j = (int(v) for v in torch.randint(z.shape[-1] - c + 1, (2,), generator=g))
        zc = z[idx, :, i:i + c, j:j + c]
        yc = y[idx, :, i * s:(i + c) * s, j * s:(j + c) * s]
        for group in opt.param_groups:
            group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        pred = model.decoder(zc)
        loss = F.l1_loss(pred, yc) + F.mse_loss(pred, yc)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 50 == 0:
            log(f"step {step}/{cfg.steps}: loss {loss.item():.4f} ({time.time() - t0:.0f} s)")
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            _atomic_save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step}, ckpt_path)
    target = Path(cfg.export_dir) if cfg.export_dir else out / "decoder"
    model.save_pretrained(target)
    with torch.no_grad():
        full = model.decoder(z[:256]).clamp(-1, 1)
        err = (full - y[:256]).abs().mean().item() * 127.5
    log(f"exported {target}: mean |difference| to the VAE's decode {err:.1f} grey levels (of 255)")
    return target
