"""Validated run configuration: TOML in, pydantic models out.

Every field has a description (it is also the CLI's ``diffalign config --help`` text). Unknown keys and
bad values are rejected with the field's dotted name and what is allowed. ``--set section.key=value``
overrides apply before validation, so they are checked the same way.

Groups follow ddpo-pytorch's split: ``sample.*`` (how trajectories are drawn) vs ``train.*`` (how they
are learned from), so ``sample.batch_size`` and ``train.batch_size`` can differ.
"""

from __future__ import annotations

import ast
import datetime
import typing
from pathlib import Path
from typing import Any, Literal

import tomllib
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .redact import redact

ALGORITHMS = ("ddpo", "grpo", "dag-db", "dag-kl")


class ConfigError(ValueError):
    """A configuration problem, with a message that names the field and the fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    id: str = Field("toy", description="'toy' (the embedded toy pipeline), a hub id, or a local diffusers directory.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) when `id` is a hub id.")
    lora_rank: int = Field(4, ge=1, le=256, description="LoRA rank.")
    lora_alpha: float = Field(4.0, gt=0, description="LoRA alpha (scale = alpha / rank).")
    lora_target_modules: list[str] = Field(
        ["to_q", "to_k", "to_v", "to_out.0"], min_length=1, description="UNet module names that get LoRA adapters."
    )
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("no", description="accelerate mixed precision.")
    gradient_checkpointing: bool = Field(False, description="Recompute UNet activations in backward to save memory.")
    compile: bool = Field(
        False, description="torch.compile the UNet in place (parameter names, LoRA and checkpoints unchanged). Each new "
        "input shape compiles first (minutes on CPU), so it pays off in long runs only; see bench/RESULTS.md, issue 8.")


class SampleConfig(_Section):
    prompts: str | list[str] = Field(
        "eval_count", description="A toy prompt-set name, a path to a file with one prompt per line, or a list."
    )
    batch_size: int = Field(8, ge=1, description="Trajectories per sampling batch per process.")
    num_batches_per_epoch: int = Field(2, ge=1, description="Sampling batches per epoch per process.")
    num_steps: int = Field(20, ge=2, le=1000, description="DDIM steps per trajectory.")
    guidance_scale: float = Field(4.0, ge=1.0, description="Classifier-free guidance scale (1 disables CFG). For "
                                  "FLUX.1 the embedded guidance instead (FLUX.1-dev: 3.5; no CFG batch; ignored by "
                                  "FLUX.1-schnell).")
    eta: float = Field(1.0, gt=0, le=1.0, description="Noise of the stochastic step; must be > 0 so that steps have a "
                       "log-probability. DDIM's eta for SD / SDXL; for flow-matching models (SD3, FLUX) the SDE's noise "
                       "level a (Flow-GRPO uses 0.7).")
    log_prob_reduction: Literal["mean", "sum"] = Field(
        "mean", description="Reduce per-element log-densities over latent elements by mean (as ddpo-pytorch) or sum."
    )
    same_prompt_per_batch: bool = Field(False, description="Draw one prompt per batch (else one per trajectory).")


class TrainConfig(_Section):
    algorithm: Literal["ddpo", "grpo", "dag-db", "dag-kl"] = Field("ddpo", description=f"One of {ALGORITHMS}.")
    epochs: int = Field(10, ge=1, description="Sample-then-train epochs.")
    seed: int = Field(0, description="Seed of everything; each process derives its own from it.")
    learning_rate: float = Field(3e-4, gt=0, lt=1, description="AdamW learning rate (LoRA).")
    adam_beta1: float = Field(0.9, gt=0, lt=1)
    adam_beta2: float = Field(0.999, gt=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    batch_size: int = Field(4, ge=1, description="Trajectories per training minibatch per process.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Minibatches accumulated per optimizer step.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm (per module, see grad_clip).")
    grad_clip: Literal["per_module", "joint"] = Field(
        "per_module", description="per_module: the LoRA and each algorithm head (DAG's flow network) are clipped to "
        "max_grad_norm on their own, as the DAG reference does; joint: one norm over all trained parameters (a large "
        "flow gradient then scales the policy's update down).")
    num_inner_epochs: int = Field(1, ge=1, description="Passes over each epoch's samples.")
    timestep_fraction: float = Field(1.0, gt=0, le=1, description="Fraction of each trajectory's steps trained.")
    timesteps_per_call: int = Field(
        1, ge=1, description="DDPO: trained timesteps of a minibatch evaluated in one UNet call (batch_size x this "
        "many rows, each with its own timestep). The optimizer still steps once per minibatch, so the gradient is the "
        "same up to rounding; larger calls can be faster and need that many times the activation memory (toy, CPU: a "
        "DDPO epoch 1.09x faster at 10, with twice the peak memory). Must divide the trained steps per trajectory.")


class DDPOConfig(_Section):
    clip_range: float = Field(1e-4, gt=0, description="PPO ratio clip range (mean-reduced log-probs: ~1e-4).")
    adv_clip_max: float = Field(5.0, gt=0, description="Advantages are clipped to +-adv_clip_max.")
    per_prompt_stat_tracking: bool = Field(True, description="Normalise rewards per prompt with a rolling buffer.")
    stat_buffer_size: int = Field(32, ge=1, description="Per-prompt buffer length.")
    stat_min_count: int = Field(8, ge=1, description="Below this many rewards for a prompt use batch statistics.")


class GRPOConfig(_Section):
    clip_range: float = Field(1e-4, gt=0, description="PPO ratio clip range (mean-reduced log-probs, as Flow-GRPO).")
    adv_clip_max: float = Field(5.0, gt=0, description="Advantages are clipped to +-adv_clip_max.")
    kl_weight: float = Field(0.0, ge=0, description="Weight of the per-step KL to the frozen model (closed form "
                             "between the two Gaussians of a step; Flow-GRPO uses 0.04 for some tasks). 0: off, no "
                             "reference pass.")
    global_std: bool = Field(False, description="Divide advantages by the whole batch's reward std instead of the group's.")
    window_start: int | None = Field(
        None, ge=0, description="Train the contiguous window of round(num_steps x train.timestep_fraction) steps that "
        "starts at this step index (0: the noisiest); unset: a random subset of steps per trajectory, as DDPO.")


class DAGConfig(_Section):
    reward_exp: float = Field(100.0, gt=0, description="Final beta: the target density is exp(beta * reward).")
    anneal_fraction: float = Field(
        0.5, ge=0, le=1, description="beta rises linearly from 0 (at the first epoch, as in the reference) to reward_exp "
        "over this share of training.")
    flow_learning_rate: float | None = Field(
        None, gt=0, description="Learning rate of the flow network; unset: the policy's (train.learning_rate), as in "
        "the reference.")
    forward_looking: Literal["conditional", "guided", "current"] = Field(
        "conditional", description="Which noise prediction x0_hat(x_t) of the forward-looking reward comes from: "
        "conditional (the text-conditional, unguided prediction of the sampling model, computed inside the CFG call "
        "at no extra cost), guided (the CFG prediction used for the step), or current (an extra conditional pass of "
        "the model being trained, for x_t and x_t' of every trained transition, as the reference does).")
    forward_decoder: str = Field(
        "", description="Decoder of the forward-looking x0_hat: '' the pipeline's VAE; 'toy' the toy model's distilled "
        "small decoder (diffalign toy train-decoder); or a directory / hub id of a diffusers AutoencoderTiny taking the "
        "same latents (madebyollin/taesd for SD 1.x/2.x, madebyollin/taesdxl for SDXL). Cheaper decodes, approximate "
        "images: bench/RESULTS.md measures the effect on the forward-looking reward.")
    db_huber_delta: float | None = Field(
        None, gt=0, description="DAG-DB: bound the weight a transition's DB residual puts on the policy's gradient by a "
        "Huber loss with this delta (in nats of the residual) instead of the square; unset: the paper's squared loss. "
        "A trust region for long runs at large beta, where the residual grows with beta (bench/RESULTS.md).")
    flow_channels: list[int] = Field(
        [32, 64, 64], min_length=1, description="Widths of the flow network's down blocks (one block per entry, each a "
        "multiple of 16 for its group norm). The reference's is [64, 128, 256, 256] at 512 px; smaller is cheaper per "
        "update (bench/RESULTS.md measures the epoch time and the reward of [16, 32, 32] on the toy model).")
    flow_warmup_epochs: int = Field(
        0, ge=0, description="Epochs at the start that train only the flow network (the policy frozen): a critic "
        "warm-up. They sample and count toward the trajectory budget like any epoch.")
    proximal_weight: float = Field(1.0, ge=0, description="Weight of the proximal term on the noise prediction.")
    klpf: float = Field(1.0, gt=0, description="DAG-KL: weight of the KL (policy) surrogate.")
    clip_range: float = Field(1e-4, gt=0, description="DAG-KL: PPO-style ratio clip range.")
    adv_clip_max: float = Field(5.0, gt=0, description="DAG-KL: advantage clip.")
    step_baseline: bool = Field(
        True, description="Fit a per-step constant of log F(x_t) - log F(x_t') in closed form (running mean of the "
        "DB residual per step index), so the flow network only has to learn the state-dependent part.")
    step_baseline_decay: float = Field(0.9, ge=0, lt=1, description="Running-mean decay of that per-step constant.")

    @field_validator("flow_channels")
    @classmethod
    def _flow_channels_fit_group_norm(cls, value: list[int]) -> list[int]:
        bad = [w for w in value if w <= 0 or w % 16]
        if bad:
            raise ValueError(f"every width must be a positive multiple of 16 (the group norm has 16 groups); got {bad}: "
                             f"use e.g. [16, 32, 32] or [32, 64, 64]")
        return value


class FeedbackConfig(_Section):
    algorithm: Literal["hero", "d3po", "ddpo-binary"] = Field(
        "hero", description="hero (learned embedding reward + noise reuse), d3po (DPO on preference pairs), or "
        "ddpo-binary (DDPO with good = 1, bad = 0).")
    prompts: str | list[str] = Field(["three red circles"], description="Prompt(s) of the feedback session; one per round, cycled.")
    rounds: int = Field(10, ge=1, description="Feedback rounds (each: sample, label, update).")
    images_per_round: int = Field(16, ge=2, description="Images shown per round (the labels a round costs per evaluator).")
    evaluators_required: int = Field(1, ge=1, description="Submissions that complete a round.")
    store_dir: str = Field("", description="Feedback store directory (default: <output_dir>/feedback).")
    host: str = Field("127.0.0.1", description="Labeling app address; another host requires a token.")
    port: int = Field(8765, ge=0, le=65535, description="Labeling app port (0: pick a free one).")
    token: str | None = Field(None, description="Access token of the labeling app (generated when serving beyond loopback).")
    wait_timeout: float | None = Field(None, gt=0, description="Seconds to wait for a round's labels (None: forever).")
    simulated_noise_rate: float = Field(0.0, ge=0, le=1, description="Simulated evaluator: probability of flipping a label.")
    simulated_good_threshold: float | None = Field(
        None, ge=0, le=1, description="Simulated evaluator: good = judge partial >= this (None: good = success).")
    eval_every: int = Field(1, ge=0, description="Measure toy success on fixed eval seeds every N rounds (0: never).")
    eval_samples: int = Field(32, ge=1, description="Images per prompt in that measurement.")
    stop_at_success: float | None = Field(
        None, ge=0, le=1, description="End the session (saving the LoRA) once the measured success reaches this.")


class HEROConfig(_Section):
    encoder: Literal["unet-features", "latent-cnn"] = Field(
        "unet-features", description="What the embedding reads: the frozen base UNet's features of each final latent "
        "(a trained MLP on top), or the final latent itself through a small CNN trained from scratch (the reference).")
    feature_block: str = Field("", description="Denoiser module whose output is the feature ('unet-features'), as "
                               "a dotted path (e.g. 'mid_block', 'up_blocks.1', 'transformer_blocks.12'); empty: the "
                               "family's default (up_blocks.1 for SD / SDXL, the middle transformer block for SD3).")
    feature_timestep: int = Field(50, ge=0, description="Noise level (scheduler timestep) at which features are read.")
    unlabeled_per_round: int = Field(
        0, ge=0, description="Extra images per round that nobody labels: sampled from fresh noise, rewarded by the "
        "learned embedding alone and trained on with the labelled ones (more trajectories per label; worth it when "
        "the embedding ranks new images well, as with encoder = 'unet-features'). 0 = the paper's HERO.")
    embedding_dim: int = Field(32, ge=2, description="Size of the feedback-aligned embedding.")
    learning_rate: float = Field(1e-3, gt=0, description="Learning rate of the embedding encoder.")
    triplet_margin: float = Field(0.5, gt=0, description="Triplet margin under the cosine distance (1 - cos) / 2.")
    embed_steps: int = Field(100, ge=1, description="Encoder training steps per round.")
    reward_mode: Literal["best", "good-mean"] = Field(
        "best", description="Reward = similarity to the best image, or mean similarity to all good images.")
    best_noise_fraction: float = Field(0.5, ge=0, le=1, description="Share of the next batch started from the best's noise.")
    noise_perturbation: float = Field(0.1, ge=0, le=1, description="s in sqrt(1 - s^2) eps_selected + s N(0, I).")
    collapse_tolerance: float = Field(
        1e-3, ge=0, lt=1, description="A round's encoder update is undone when every pair of embeddings has cosine "
        "similarity above 1 - this (the triplet loss's trivial minimum).")


class D3POConfig(_Section):
    beta: float = Field(0.1, gt=0, description="DPO temperature.")
    ratio_clip: float = Field(0.1, gt=0, lt=1, description="Ratios to the reference are clamped to [1 - c, 1 + c].")
    group_size: int = Field(2, ge=2, description="Images sampled from one shared initial noise (pairs come from a group).")


class RewardTerm(_Section):
    name: str = Field(description="Built-in reward name (see `diffalign rewards`), 'python', or 'http'.")
    weight: float = Field(1.0, description="Weight in the weighted sum.")
    args: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of the reward.")


class RewardConfig(_Section):
    terms: list[RewardTerm] = Field(
        default_factory=lambda: [RewardTerm(name="toy")], min_length=1, description="Rewards and their weights."
    )
    on_error: Literal["stop", "skip_batch"] = Field(
        "stop", description="A reward that fails or returns NaN/inf: stop the run, or drop that batch and go on."
    )
    max_skipped_batches: int = Field(3, ge=0, description="With on_error='skip_batch', stop after this many.")
    workers: int = Field(1, ge=0, description="Reward worker threads (0: score in the sampling thread).")


class LogConfig(_Section):
    tracker: Literal["tensorboard", "wandb", "none"] = Field("tensorboard", description="Where to log.")
    image_every: int = Field(1, ge=0, description="Log an image grid every N epochs (0: never).")
    progress: bool = Field(True, description="Show a progress bar.")


class CheckpointConfig(_Section):
    every: int = Field(1, ge=0, description="Save a resumable checkpoint every N epochs (0: only at the end).")
    keep: int = Field(2, ge=1, description="How many checkpoints to keep.")


class EvalConfig(_Section):
    prompts: str | list[str] = Field("eval_count", description="Evaluation prompt set (name, path or list).")
    samples_per_prompt: int = Field(2, ge=1, description="Images per prompt, from fixed seeds.")
    seed: int = Field(1234, description="Seed of the evaluation noises (same before and after).")


class GuardReward(_Section):
    name: str = Field(description="A reward the run does not optimise, built like reward.terms (a built-in name, "
                      "'python' or 'http'), e.g. 'toy' with args {mode = \"success\"} while training on JPEG.")
    args: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of that reward.")
    min_fraction: float | None = Field(
        None, gt=0, le=1, description="Trip when the tuned model's mean score falls below this fraction of the base "
        "model's (for scores that are positive, like a success rate).")
    max_drop: float | None = Field(
        None, gt=0, description="Trip when the mean score falls more than this below the base model's (any sign).")

    @model_validator(mode="after")
    def _has_limit(self) -> GuardReward:
        if self.min_fraction is None and self.max_drop is None:
            raise ValueError(f"guard reward {self.name!r} has no limit: set min_fraction (e.g. 0.5) or max_drop")
        return self


class GuardsConfig(_Section):
    every: int = Field(5, ge=0, description="Check the guards every N epochs (0: never), on fixed seeds.")
    prompts: str | list[str] | None = Field(
        None, description="Prompts of the checks (name, path or list); unset: sample.prompts.")
    num_prompts: int = Field(2, ge=1, description="At most this many of those prompts (evenly spaced), to keep "
                             "checks cheap.")
    samples_per_prompt: int = Field(8, ge=2, description="Images per prompt per check (Vendi is per prompt, so >= 2; "
                                    "8 or more to mean something).")
    seed: int = Field(4321, description="Seed of the checks' noises: the same for the base and every check.")
    drift_max: float | None = Field(
        None, gt=0, le=1, description="Trip when the RMS pixel drift from the base model (same noise) exceeds this "
        "(unset: no drift limit; the demo ends at ~0.08, bench/RESULTS.md).")
    diversity_min_fraction: float | None = Field(
        0.5, gt=0, le=1, description="Trip when the Vendi diversity per prompt falls below this fraction of the base "
        "model's (unset: no diversity limit).")
    rewards: list[GuardReward] = Field(default_factory=list, description="Held-out guard rewards and their limits.")
    action: Literal["warn", "stop", "rollback"] = Field(
        "warn", description="On a tripped guard: warn (log and go on), stop (end the run, saving the LoRA as it is), "
        "or rollback (end the run with the LoRA of the best check so far at which no guard tripped, by best_by).")
    best_by: str = Field(
        "reward_mean", description="What 'best' means for rollback: 'reward_mean' (the optimised reward, mean over "
        "that epoch's samples) or the name of a guard reward (its mean on the check's images).")

    @model_validator(mode="after")
    def _best_by_known(self) -> GuardsConfig:
        names = [r.name for r in self.rewards]
        if len(set(names)) < len(names):
            raise ValueError(f"guards.rewards: each guard reward needs its own name (got {names}); to guard two "
                             f"modes of one reward, wrap one in a 'python' reward")
        if self.best_by != "reward_mean" and self.best_by not in names:
            raise ValueError(f"guards.best_by {self.best_by!r} is neither 'reward_mean' nor a guard reward "
                             f"({names or 'none configured'}): set one of those")
        return self


class SafetyConfig(_Section):
    filter: str | None = Field(
        None, description="A filter built like a reward: a built-in name (e.g. 'toy_red_objects'), 'python' or "
        "'http'; it scores how unsafe each sampled image is. Unset: no filter.")
    args: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of the filter.")
    threshold: float = Field(0.5, description="An image is flagged when the filter's score is >= this.")
    penalty: float = Field(0.0, ge=0, description="Subtracted from the reward of each flagged image, so that the "
                           "model learns to avoid them (0: only count them, per epoch).")


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    output_dir: str = Field("runs/default", description="Run directory: checkpoints, LoRA, logs, report.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    ddpo: DDPOConfig = Field(default_factory=DDPOConfig)
    dag: DAGConfig = Field(default_factory=DAGConfig)
    grpo: GRPOConfig = Field(default_factory=GRPOConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    feedback: FeedbackConfig = Field(default_factory=FeedbackConfig)
    hero: HEROConfig = Field(default_factory=HEROConfig)
    d3po: D3POConfig = Field(default_factory=D3POConfig)
    guards: GuardsConfig = Field(default_factory=GuardsConfig)
    safety: SafetyConfig = Field(default_factory=SafetyConfig)

    @field_validator("output_dir")
    @classmethod
    def _nonempty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("output_dir must not be empty")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        samples = self.sample.batch_size * self.sample.num_batches_per_epoch
        per_step = self.train.batch_size * self.train.gradient_accumulation_steps
        if samples % self.train.batch_size:
            raise ValueError(
                f"train.batch_size ({self.train.batch_size}) must divide the samples per epoch per process "
                f"(sample.batch_size x sample.num_batches_per_epoch = {samples})"
            )
        if (samples // self.train.batch_size) % self.train.gradient_accumulation_steps:
            raise ValueError(
                f"train.gradient_accumulation_steps ({self.train.gradient_accumulation_steps}) must divide the "
                f"{samples // self.train.batch_size} minibatches of an epoch (samples per epoch / train.batch_size)"
            )
        trained_steps = max(1, int(round(self.sample.num_steps * self.train.timestep_fraction)))
        if trained_steps % self.train.timesteps_per_call:
            divisors = [d for d in range(1, trained_steps + 1) if trained_steps % d == 0]
            raise ValueError(
                f"train.timesteps_per_call ({self.train.timesteps_per_call}) must divide the {trained_steps} trained steps "
                f"per trajectory (sample.num_steps x train.timestep_fraction); use one of {divisors}"
            )
        if self.train.algorithm == "grpo":
            if not self.sample.same_prompt_per_batch or self.sample.batch_size < 2:
                raise ValueError(
                    "train.algorithm 'grpo' compares the images of one prompt: set sample.same_prompt_per_batch = true "
                    f"and sample.batch_size >= 2 (the group size; it is {self.sample.batch_size})")
            start = self.grpo.window_start
            if start is not None and start + trained_steps > self.sample.num_steps:
                raise ValueError(
                    f"grpo.window_start ({start}) + the {trained_steps} trained steps exceeds sample.num_steps "
                    f"({self.sample.num_steps}): start at most at {self.sample.num_steps - trained_steps}")
        if self.train.timesteps_per_call > 1 and self.train.algorithm != "ddpo":
            raise ValueError(
                f"train.timesteps_per_call > 1 is implemented for ddpo only (train.algorithm is "
                f"'{self.train.algorithm}'): set it to 1"
            )
        if per_step > samples:
            raise ValueError(
                f"train.batch_size x train.gradient_accumulation_steps = {per_step} exceeds the {samples} samples "
                f"of an epoch: lower gradient_accumulation_steps or sample more per epoch"
            )
        return self

    def derived(self, num_processes: int = 1) -> dict[str, int]:
        """Effective sizes, printed at start-up."""
        per_proc = self.sample.batch_size * self.sample.num_batches_per_epoch
        trained_steps = max(1, int(round(self.sample.num_steps * self.train.timestep_fraction)))
        return {
            "trajectories_per_epoch": per_proc * num_processes,
            "trained_steps_per_trajectory": trained_steps,
            "optimizer_steps_per_epoch": self.train.num_inner_epochs * per_proc
            // (self.train.batch_size * self.train.gradient_accumulation_steps),
            "global_train_batch": self.train.batch_size * self.train.gradient_accumulation_steps * num_processes,
        }


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            parent = RunConfig
            for part in e["loc"][:-1]:
                field = parent.model_fields.get(str(part))
                parent = field.annotation if field is not None and isinstance(field.annotation, type) else None
                if parent is None:
                    break
            allowed = sorted(parent.model_fields) if parent is not None else []
            lines.append(f"  {loc}: unknown key; allowed keys here: {', '.join(allowed)}")
        elif not e["loc"]:  # a check across fields: its message names them; the whole input would be noise
            lines.append(f"  {e['msg'].removeprefix('Value error, ')}")
        else:
            # The input of a secret-looking field (or a structure holding one) is shown redacted: stderr is logged.
            got = redact({str(e["loc"][-1]): e.get("input")})[str(e["loc"][-1])]
            lines.append(f"  {loc}: {e['msg'].removeprefix('Value error, ')} (got {got!r})")
    return "\n".join(lines)


def _parse_value(text: str, takes_text: bool = False) -> Any:
    """A ``--set`` value: TOML (``3``, ``true``, ``["a", "b"]``, ``"quoted"``), else the text itself, so that
    ``--set train.algorithm=dag-kl`` and ``--set model.id=/path/to/model`` need no shell-proof quoting.

    ``takes_text``: the field holds text (``model.id``, ``model.revision``); a value that TOML reads as a
    number, boolean or date (``--set model.revision=1234``) is then kept as the text that was typed.
    """
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            return text  # a bare string: --set model.id=runwayml/stable-diffusion-v1-5
    if isinstance(value, datetime.date | datetime.time) or (takes_text and isinstance(value, bool | int | float)):
        return text
    return value


def _takes_text(parts: list[str]) -> bool:
    """Whether the field at ``parts`` (section.key) is a text field (its type admits str, not numbers)."""
    model: Any = RunConfig
    for i, part in enumerate(parts):
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return False
        if i < len(parts) - 1:
            model = field.annotation
    args = set(typing.get_args(field.annotation)) or {field.annotation}
    return str in args and not args & {int, float, bool}


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. --set train.epochs=3")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {p!r} is not a section")
        node[parts[-1]] = _parse_value(value.strip(), _takes_text(parts))
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, **sections: Any) -> RunConfig:
    """Read a TOML file (or start from defaults), apply ``--set`` overrides, validate."""
    data: dict = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} not found (see configs/ for examples)")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file {path} is not a text file (not UTF-8): give a TOML file "
                              f"(see configs/ for examples)") from None
        source = str(path)
    for k, v in sections.items():
        data.setdefault(k, {}).update(v) if isinstance(v, dict) else data.__setitem__(k, v)
    apply_overrides(data, overrides or [])
    if overrides:
        source += " with --set overrides"
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def redacted_dump(cfg: RunConfig, exclude_none: bool = True) -> dict:
    """The config as plain data with secrets replaced (see redact.py): what any file, log or tracker may get."""
    return redact(cfg.model_dump(mode="json", exclude_none=exclude_none))


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the config as TOML, secrets redacted (``env:VAR`` references are kept, so it can be rerun)."""
    import tomli_w

    Path(path).write_text(tomli_w.dumps(redacted_dump(cfg)))
