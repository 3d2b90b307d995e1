"""The model-family interface: everything that differs between text-to-image model families.

The trainer, the algorithms, the rewards and the feedback loop talk to a :class:`Family` and never ask which
one they run on. A family wraps one loaded diffusers pipeline and answers, in its own terms:

    load          which ``model_index.json`` classes it drives (``pipeline_classes``) and how to set a loaded
                  pipeline up for training (``prepare``: the stochastic scheduler, frozen parts)
    encode        prompts -> :class:`Conditioning` (prompt embeddings, the unconditional ones for CFG, and any
                  extra per-sample conditioning: SDXL's pooled embeddings and add_time_ids, FLUX's pooled
                  embeddings and guidance)
    denoise       one guided denoiser call returning (guided, conditional) predictions; without CFG both are
                  the same tensor (FLUX)
    step          x_t -> x_t' with log p(x_t' | x_t) (DDIM with eta for DDPM-type families, an SDE step with a
                  Gaussian log-prob for flow matching), and scoring of a given x_t'
    x0_hat        the clean latent a prediction implies at x_t (DAG's forward-looking reward)
    backward      log p_B(x_t | x_t') of DAG's fixed backward kernel, and the state's "time" t' after a step
    features      the denoiser block HERO reads (``feature_block``) and how x0 is noised to read it
    LoRA          default target modules, the denoiser to attach to, saving with the family's own
                  ``save_lora_weights`` so that the stock pipeline's ``load_lora_weights`` applies it

Notation shared by all families: x_t a latent (B, C, h, w) at the step whose scheduler timestep is t; a
"prediction" is whatever the denoiser outputs (eps, v or x0 for DDPM-type models, a velocity for flow models);
t' the next, less noisy timestep of the grid. Timesteps are always the scheduler's own values, as a 0-d or
per-sample (B,) tensor.

Part 2 (SD3 / FLUX, ``shared/algorithms.md`` "Flow-matching models") plugs in by subclassing this with a
``transformer`` denoiser (``denoiser_name``), a velocity prediction, an SDE ``step`` whose ``eta`` is the noise
level, ``x0_hat`` = x_t - sigma_t v, and a backward kernel derived for the rectified-flow path; nothing outside
``families/`` changes. See docs/families.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class Conditioning:
    """What the denoiser is conditioned on, per sample. ``extra`` holds family-specific tensors whose first
    dimension is the batch (SDXL: ``text_embeds``, ``negative_text_embeds``, ``time_ids``); it travels in
    Trajectories and Transition untouched, so no code outside the family needs to know its keys."""

    prompt_embeds: torch.Tensor  # (B, L, E)
    negative_embeds: torch.Tensor | None = None  # (B, L, E), None without CFG
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # each (B, ...)

    def index(self, idx) -> Conditioning:
        return Conditioning(self.prompt_embeds[idx], None if self.negative_embeds is None else self.negative_embeds[idx],
                            {k: v[idx] for k, v in self.extra.items()})

    def to(self, device, dtype: torch.dtype | None = None) -> Conditioning:
        """On ``device``; floating tensors also cast to ``dtype`` if given (half-precision text encoders)."""
        def move(v):
            return v.to(device=device, dtype=dtype) if dtype is not None and v.is_floating_point() else v.to(device)

        return Conditioning(move(self.prompt_embeds), None if self.negative_embeds is None else move(self.negative_embeds),
                            {k: move(v) for k, v in self.extra.items()})

    def conditional(self) -> Conditioning:
        """The text-conditional half alone (no CFG): one denoiser pass per sample."""
        return Conditioning(self.prompt_embeds, None, self.extra)

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]


def cat_extra(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else {}


class Family:
    """One model family. Subclasses set the class attributes and implement the methods that raise here."""

    name = "base"
    pipeline_classes: tuple[str, ...] = ()  # ``_class_name`` values of model_index.json this family drives
    denoiser_name = "unet"  # the pipeline attribute holding the trained denoiser
    default_lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    default_feature_block = "up_blocks.1"  # HERO's "unet-features" block
    lora_weights_name = "pytorch_lora_weights.safetensors"
    load_kwargs: dict = {}  # extra from_pretrained arguments (SD: no safety checker)

    def __init__(self, pipe, scheduler=None):
        self.pipe = pipe
        self._scheduler = scheduler  # only for an instance built without a pipeline (``for_scheduler``)

    @classmethod
    def for_scheduler(cls, scheduler) -> Family:
        """An instance that only steps and scores (no pipeline): what a Policy built from a bare scheduler uses."""
        return cls(None, scheduler)

    # -- loading ------------------------------------------------------------------------------------
    @classmethod
    def pipeline_class(cls):
        import diffusers

        return getattr(diffusers, cls.pipeline_classes[0])

    def prepare(self, model_id: str) -> None:
        """Set a freshly loaded pipeline up for training: its stochastic scheduler, frozen parts. Raises
        ModelLoadError for a checkpoint the family cannot train."""
        self.pipe.set_progress_bar_config(disable=True)
        for module in self.frozen_modules() + [self.denoiser]:
            module.requires_grad_(False)

    def frozen_modules(self) -> list[torch.nn.Module]:
        """The parts that never train (VAE, text encoders): what mixed precision may cast to half."""
        raise NotImplementedError

    # -- shapes -------------------------------------------------------------------------------------
    @property
    def scheduler(self):
        return self._scheduler if self._scheduler is not None else self.pipe.scheduler

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, self.denoiser_name)

    def latent_shape(self, batch: int) -> tuple[int, ...]:
        raise NotImplementedError

    @property
    def text_embed_dim(self) -> int:
        """Width of ``Conditioning.prompt_embeds`` (what DAG's flow network cross-attends to)."""
        raise NotImplementedError

    # -- sampling -----------------------------------------------------------------------------------
    def encode(self, prompts: list[str], guidance_scale: float) -> Conditioning:
        raise NotImplementedError

    def set_timesteps(self, num_steps: int, device) -> torch.Tensor:
        self.scheduler.set_timesteps(num_steps, device=device)
        return self.scheduler.timesteps

    def scale_model_input(self, latents: torch.Tensor, timestep) -> torch.Tensor:
        """What the denoiser is given for x_t (the scheduler's input scaling; the identity for most)."""
        return self.scheduler.scale_model_input(latents, timestep)

    def initial_latents(self, noise: torch.Tensor) -> torch.Tensor:
        """x_T from standard normal noise (the stock pipeline's scaling)."""
        return noise * self.scheduler.init_noise_sigma

    def guided_and_conditional(self, denoiser, latents, timestep, cond: Conditioning,
                               guidance_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(guided prediction, text-conditional prediction) in one batched denoiser call."""
        raise NotImplementedError

    def conditional(self, denoiser, latents, timestep, cond: Conditioning) -> torch.Tensor:
        """The text-conditional prediction alone (DAG's ``current`` forward-looking reward)."""
        return self.guided_and_conditional(denoiser, latents, timestep, cond.conditional(), 1.0)[1]

    def step(self, prediction, timestep, sample, eta: float, prev_sample=None, generator=None,
             reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t', log p(x_t' | x_t)) of shape ((B, C, h, w), (B,)); scores ``prev_sample`` if given."""
        raise NotImplementedError

    def step_mean_std(self, prediction, timestep, sample, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's Gaussian N(mean, std^2 I) in fp32 (the closed-form KL of GRPO's reference term needs it)."""
        raise NotImplementedError

    def x0_hat(self, prediction, timestep, sample) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images (B, 3, H, W) in [0, 1]."""
        raise NotImplementedError

    # -- DAG ----------------------------------------------------------------------------------------
    def next_timestep(self, timestep: torch.Tensor) -> torch.Tensor:
        """t' of the state after a step from t (the flow network's time input for x_t')."""
        raise NotImplementedError

    def backward_log_prob(self, x_t, x_next, timestep, reduction: str) -> torch.Tensor:
        """log p_B(x_t | x_t') of DAG's fixed backward kernel."""
        raise NotImplementedError

    # -- HERO ---------------------------------------------------------------------------------------
    def feature_block(self) -> str:
        """The denoiser block HERO reads when ``hero.feature_block`` is left empty."""
        return self.default_feature_block

    def pool_features(self, output) -> torch.Tensor:
        """A feature block's output -> (B, F): a UNet block's (B, C, h, w) map averaged over space."""
        out = output[0] if isinstance(output, tuple) else output
        return out.float().mean(dim=(2, 3))

    def feature_timestep_range(self) -> int:
        return self.scheduler.config.num_train_timesteps

    def noise_for_features(self, x0, noise, timestep) -> torch.Tensor:
        return self.scheduler.add_noise(x0, noise, timestep)

    # -- LoRA ---------------------------------------------------------------------------------------
    def lora_state_dict(self, denoiser) -> dict[str, torch.Tensor]:
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        return convert_state_dict_to_diffusers(get_peft_model_state_dict(denoiser))

    def save_lora(self, denoiser, directory: str | Path) -> Path:
        """Write the LoRA with the family pipeline's ``save_lora_weights`` (stock ``load_lora_weights`` applies it)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.pipeline_class().save_lora_weights(directory, **{f"{self.denoiser_name}_lora_layers":
                                                              self.lora_state_dict(denoiser)},
                                                weight_name=self.lora_weights_name, safe_serialization=True)
        return directory

    def load_lora_state(self, denoiser, state: dict[str, torch.Tensor]):
        """Put a saved LoRA state (diffusers format, as ``lora_state_dict`` returns) back into the adapter."""
        from diffusers.utils import convert_unet_state_dict_to_peft
        from peft.utils import set_peft_model_state_dict

        state = convert_unet_state_dict_to_peft(state)
        state = {k.removeprefix(f"{self.denoiser_name}."): v for k, v in state.items()}
        return set_peft_model_state_dict(denoiser, state, adapter_name="default")
