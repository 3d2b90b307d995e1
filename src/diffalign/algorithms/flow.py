"""The GFlowNet pieces DAG-DB and DAG-KL share: flow network, backward policy, beta schedule, and the
forward-looking rewards (Zhang et al. 2024, "Improving GFlowNets for Text-to-Image Diffusion Alignment",
arXiv 2406.00633; apple/ml-diffusion-alignment-gflownet).

Notation:

    f_phi(x_t, t, c)   FlowNetwork: the learned part of the log-flow
    r~(x_t)            forward-looking reward r(decode(x0_hat(x_t)), c)
    log F(x_t)         f_phi(x_t, t, c) + beta r~(x_t);  log F(x_0) = beta r(x_0) at the terminal step
    p_B(x_t | x_t')    N(sqrt(a) x_t', (1 - a) I), a = abar_t / abar_t': the forward noising kernel of the
                       strided chain, fixed (not learned)

**Where beta lives (and the reduction).** With log-probs summed over the D latent elements, detailed
balance makes the sampler's marginal proportional to exp(beta r). With the mean reduction (the default,
as in the reference code) every log-prob is divided by D while log F is not, so the target becomes
exp(D beta r): the effective inverse temperature is D beta (D = 1,024 for the toy model's 4x16x16
latents, 16,384 for SD at 512 px). The reference's beta = 100 is therefore a very sharp target; it
still trains because the loss only ever sees beta r through per-step residuals.

**Forward-looking rewards: which prediction.** ``dag.forward_looking`` picks the noise prediction x0_hat(x_k)
comes from. The reference makes an extra pass of the current model, text-conditional and unguided, for x_t and
x_t' of every trained transition (``current`` here). ``conditional`` (the default) uses the text-conditional
half of the CFG call made at sampling time: the same kind of prediction, of the model that sampled the epoch, at
no extra UNet cost. ``guided`` (our first implementation) uses the guided prediction that drove the step; on the
toy model its x0_hat tracks the final reward much worse (correlation 0.05-0.56 at steps 10-15 against 0.85-0.99
conditional, issue 21), so most of the reward change it carries along the chain is noise. Any fixed function
of x_t is a valid residual parametrisation of log F (f_phi learns the rest), so the choice changes the
parametrisation, not the objective.

**Cached.** With ``conditional`` or ``guided`` a state is decoded and scored the first time a trained
transition needs it, in batches, and cached for the epoch (:class:`ForwardLookingRewards`): no state is scored
twice, and states no trained transition touches are never decoded.
"""

from __future__ import annotations

import torch
from torch import nn

from ..sampling import alphas_at, decode_latents, gaussian_log_prob


def flow_block_types(n: int) -> tuple[str, ...]:
    """A plain first block (full resolution: attention there is the costly part), cross-attention after it."""
    return ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1)


class FlowNetwork(nn.Module):
    """f_phi(x_t, t, c): a UNet down path (diffusers blocks, cross-attention to the prompt embedding,
    sinusoidal timestep embedding), global average pool, linear head. The head starts at zero so that
    log F starts as the forward-looking term alone. Kept in fp32."""

    def __init__(self, in_channels: int = 4, cross_attention_dim: int = 768,
                 block_out_channels: tuple[int, ...] = (32, 64, 64),
                 down_block_types: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 attention_head_dim: int = 8, norm_num_groups: int = 16):
        super().__init__()
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps
        from diffusers.models.unets.unet_2d_blocks import get_down_block

        width = block_out_channels[0]
        self.time_proj = Timesteps(width, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(width, 4 * width)
        self.conv_in = nn.Conv2d(in_channels, width, kernel_size=3, padding=1)
        self.down_blocks = nn.ModuleList()
        channels = width
        for i, kind in enumerate(down_block_types):
            out = block_out_channels[i]
            self.down_blocks.append(get_down_block(
                kind, num_layers=1, in_channels=channels, out_channels=out, temb_channels=4 * width,
                add_downsample=i < len(down_block_types) - 1, resnet_eps=1e-5, resnet_act_fn="silu",
                resnet_groups=norm_num_groups, cross_attention_dim=cross_attention_dim,
                num_attention_heads=max(1, out // attention_head_dim), attention_head_dim=attention_head_dim,
                downsample_padding=1,
            ))
            channels = out
        self.norm = nn.GroupNorm(norm_num_groups, channels)
        self.head = nn.Linear(channels, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, sample: torch.Tensor, timesteps: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        sample, encoder_hidden_states = sample.float(), encoder_hidden_states.float()
        timesteps = torch.as_tensor(timesteps, device=sample.device).reshape(-1).expand(sample.shape[0])
        emb = self.time_embedding(self.time_proj(timesteps).to(sample.dtype))
        h = self.conv_in(sample)
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, _ = block(hidden_states=h, temb=emb, encoder_hidden_states=encoder_hidden_states)
            else:
                h, _ = block(hidden_states=h, temb=emb)
        h = torch.nn.functional.silu(self.norm(h)).mean(dim=(2, 3))  # (B, C)
        return self.head(h).squeeze(-1)  # (B,)


def backward_log_prob(scheduler, x_t: torch.Tensor, x_next: torch.Tensor, timesteps, reduction: str) -> torch.Tensor:
    """log p_B(x_t | x_t') with p_B = N(sqrt(a) x_t', (1 - a) I), a = abar_t / abar_t' (fixed)."""
    abar_t, abar_prev = alphas_at(scheduler, timesteps)
    a = (abar_t / abar_prev).to(x_t.dtype)
    a = a.reshape(-1, *([1] * (x_t.ndim - 1))) if a.ndim else a
    return gaussian_log_prob(x_t, a.sqrt() * x_next, (1 - a).sqrt(), reduction)


def annealed_beta(final: float, epoch: int, num_epochs: int, anneal_fraction: float) -> float:
    """beta = final * min(1, epoch / (anneal_fraction * num_epochs)): 0 at the first epoch (epoch counts from 0),
    ``final`` from the end of the ramp on, as the reference's linear anneal."""
    ramp = anneal_fraction * num_epochs
    if ramp <= 0:
        return final
    return final * min(1.0, epoch / ramp)


def load_forward_decoder(name: str, device=None):
    """The decoder ``dag.forward_decoder`` names: None for the pipeline's VAE, else a frozen AutoencoderTiny."""
    if not name:
        return None
    from diffusers import AutoencoderTiny

    if name == "toy":
        from ..pipeline import TOY_MODEL_DIR
        name = str(TOY_MODEL_DIR / "vae_tiny")
    try:
        decoder = AutoencoderTiny.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise ValueError(f"dag.forward_decoder {name!r} could not be loaded as a diffusers AutoencoderTiny ({e}); "
                         f"give a directory or hub id of one, 'toy', or '' for the pipeline's VAE") from None
    return decoder.requires_grad_(False).eval().to(device or "cpu")


class ForwardLookingRewards:
    """r~(x_k) for the states of one epoch's trajectories, computed on first use and cached.

    Indexed like the (B, T) tensor it stands for (``fl[rows, steps]``). A state is decoded and scored the
    first time a trained transition needs it (as x_t, or as x_t' of the step before) and never again, in
    one batch per lookup; states no trained transition touches are never decoded. With half of the steps
    trained, about a quarter of the decodes (the main cost of DAG on small models) are skipped.
    """

    def __init__(self, pipe, trajectories, reward, batch_size: int = 64, tag: str = "", source: str = "conditional",
                 decoder=None):
        if source not in ("conditional", "guided"):
            raise ValueError(f"forward-looking source {source!r}: cached rewards use 'conditional' or 'guided'")
        from ..families import family_for

        self.pipe, self.traj, self.reward, self.source = pipe, trajectories, reward, source
        self.decoder = decoder  # None: the pipeline's VAE
        self.family = family_for(pipe)
        self.batch_size, self.tag = batch_size, tag
        self.values = torch.full((trajectories.latents.shape[0], trajectories.num_steps), float("nan"))
        self.decoded = 0  # states decoded and scored so far (the cost counter)
        self._calls = 0

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    def __getitem__(self, index: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        rows, steps = (torch.as_tensor(x).cpu() for x in index)
        todo = self.values[rows, steps].isnan()
        if todo.any():
            pairs = torch.unique(torch.stack([rows[todo], steps[todo]], dim=1), dim=0)
            self.values[pairs[:, 0], pairs[:, 1]] = self._score(pairs[:, 0], pairs[:, 1])
        return self.values[rows, steps]

    def all(self) -> torch.Tensor:
        """Every state scored: the full (B, T) tensor."""
        b, t = self.values.shape
        rows, steps = torch.arange(b).repeat_interleave(t), torch.arange(t).repeat(b)
        return self[rows, steps].reshape(b, t)

    @torch.no_grad()
    def _score(self, rows: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        traj = self.traj
        x = traj.latents[rows, steps]
        eps = (traj.cond_eps if self.source == "conditional" else traj.guided_eps)[rows, steps].to(x.dtype)
        x0 = self.family.x0_hat(eps, traj.timesteps[steps], x)
        prompts = [traj.prompts[r] for r in rows.tolist()]
        scores = []
        for start in range(0, len(rows), self.batch_size):
            scores.append(self.score_x0(x0[start:start + self.batch_size], prompts[start:start + self.batch_size]))
        self.decoded += len(rows)
        return torch.cat(scores)

    @torch.no_grad()
    def score_x0(self, x0: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """r(decode(x0), c) for a batch of predicted clean latents."""
        x0 = x0.to(self.pipe.vae.device)
        # A small decoder (dag.forward_decoder) takes the denoiser's latents as they are; else the family's decode.
        images = self.family.decode(x0) if self.decoder is None else decode_latents(self.pipe, x0, vae=self.decoder)
        total, _ = self.reward(images, prompts, [{} for _ in prompts], batch=f"{self.tag}forward-looking {self._calls}")
        self._calls += 1
        return torch.as_tensor(total, dtype=torch.float32)


def forward_looking_rewards(pipe, trajectories, reward, batch_size: int = 64, tag: str = "",
                            source: str = "conditional") -> torch.Tensor:
    """r~(x_k) for k = 0..T-1 of every trajectory, all of them at once: (B, T)."""
    return ForwardLookingRewards(pipe, trajectories, reward, batch_size, tag, source).all()
