"""The one training loop: prompts -> sampler -> reward -> algorithm loss -> optimizer, on accelerate.

Every algorithm (DDPO, DAG-DB, DAG-KL; HERO and D3PO through the feedback loop) runs through
:func:`train_epoch`; they differ only in ``algorithm.prepare`` and ``algorithm.loss``.

Determinism: trajectory g of epoch e (g global over processes) draws its prompt, initial noise and DDIM
noises from its own generator seeded with (seed, e, g); the shuffles of trajectories and timesteps come
from a generator seeded with (seed, e), the same on every process, from which the algorithm's schedule
derives the global minibatches (each process trains its share of each). A resumed run therefore repeats
exactly what the uninterrupted run would have done, no two processes sample the same noise, and neither
the samples of an epoch nor the minibatches depend on how the global batch is split over processes: a
run on N processes with ``train.batch_size`` B/N follows the 1-process run with B up to float rounding.

Multi-process (``accelerate launch``, DDP): rewards are computed where the images are; rewards and
prompts are gathered before ``algorithm.prepare``, whose per-trajectory targets are sliced back to each
process; logged training statistics are averaged over processes. ``DIFFALIGN_CHECK_SYNC=1`` makes every
optimizer step assert that all processes hold bit-identical trained weights (a debugging aid, off by
default; main process writes the digests to ``sync_check.jsonl``).

Checkpoints hold only what is trained (the LoRA, the algorithm's heads), the optimizer, the algorithm's
state (DDPO's per-prompt statistics) and the history; they are written to a temporary directory and
renamed into place, so a crash mid-write never leaves a checkpoint that loads wrongly; the COMPLETE marker
holds a manifest (size and sha256 of every file) that is verified before a resume, which falls back to the
previous good checkpoint when the newest is damaged (reliability.py, docs/reliability.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, ProjectConfiguration

from .algorithms import DDPO, Policy, Transition, build_algorithm
from .config import RunConfig, dump_config
from .pipeline import attach_lora, load_pipeline, lora_state_dict, save_lora
from .prompts import resolve_prompts
from .reliability import CheckpointError, fault_point, verify_checkpoint, write_manifest
from .rewards import RewardError, RewardPool, build_reward
from .sampling import Trajectories, sample_trajectories

CHECKPOINT_PREFIX = "checkpoint-"
COMPLETE_MARKER = "COMPLETE"


def trajectory_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator of trajectory ``index`` (global, over all processes) of an epoch."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch, index, 7]).generate_state(1)[0]))


def epoch_generator(seed: int, process: int, epoch: int, stream: int) -> torch.Generator:
    """Independent generator per (seed, process, epoch, stream): 0 = sampling, 1 = training shuffles."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, process, epoch, stream]).generate_state(1)[0]))


@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    optimizer_steps: int = 0
    trajectories: int = 0  # sampled so far, all processes
    skipped_batches: int = 0
    history: list[dict] = field(default_factory=list)


@dataclass
class TrainResult:
    output_dir: Path
    lora_dir: Path
    history: list[dict]


class Trainer:
    """Holds the pieces of a run; :meth:`fit` runs it. Built from a validated :class:`RunConfig`."""

    def __init__(self, cfg: RunConfig, reward=None, pipe=None, algorithm=None, log=print):
        self.cfg, self._log_here = cfg, log
        self.out = Path(cfg.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.trained_steps = max(1, int(round(cfg.sample.num_steps * cfg.train.timestep_fraction)))
        tracker = None if cfg.log.tracker == "none" else cfg.log.tracker
        self.accelerator = Accelerator(
            mixed_precision=cfg.model.mixed_precision,
            # One accumulation micro-step per UNet call: trained steps / timesteps_per_call calls per minibatch.
            gradient_accumulation_steps=cfg.train.gradient_accumulation_steps * self.trained_steps
            // cfg.train.timesteps_per_call,
            log_with=tracker, project_config=ProjectConfiguration(project_dir=str(self.out), logging_dir=str(self.out / "logs")),
        )
        acc = self.accelerator
        if acc.distributed_type == DistributedType.FSDP:
            # Sampling runs the unwrapped UNet and the LoRA is saved from it: with sharded parameters both
            # would be wrong. Use DDP; see docs/scale_out.md.
            raise ValueError("FSDP is not supported: the trainer samples with the unwrapped UNet; use DDP "
                             "(configs/accelerate/8gpu_ddp.yaml), see docs/scale_out.md")
        if cfg.model.mixed_precision == "fp16" and acc.device.type == "cpu":
            # accelerate accepts fp16 on CPU but then autocasts nothing: the run would be fp32 while the
            # config says fp16. Refuse rather than mislead.
            raise ValueError("model.mixed_precision = 'fp16' needs a GPU; on CPU set it to 'bf16' (autocast) or 'no'")
        self.rank, self.world = acc.process_index, acc.num_processes
        # Messages come from the main process only (N processes would print everything N times).
        self.log = log if acc.is_main_process else _quiet
        self.check_sync = os.environ.get("DIFFALIGN_CHECK_SYNC", "") not in ("", "0")
        torch.manual_seed(cfg.train.seed + self.rank)  # LoRA init uses the global RNG: same on every rank below
        # 1. Model: the pipeline, frozen, with a LoRA on the UNet (same initial LoRA on every process).
        self.pipe = pipe if pipe is not None else load_pipeline(cfg.model.id, cfg.model.revision)
        self.pipe.to(acc.device)
        torch.manual_seed(cfg.train.seed)
        self.lora_params = attach_lora(self.pipe.unet, cfg.model.lora_rank, cfg.model.lora_alpha,
                                       cfg.model.lora_target_modules)
        if cfg.model.gradient_checkpointing:
            self.pipe.unet.enable_gradient_checkpointing()
        if acc.device.type == "cpu":
            # oneDNN computes convolutions in NHWC; with NCHW weights every conv reorders its operands first.
            # channels_last made the toy UNet's sampling forward 1.17x faster here (bench/RESULTS.md, issue 8).
            self.pipe.unet.to(memory_format=torch.channels_last)
        if cfg.model.compile:
            # Module.compile, not torch.compile(module): the module object, its parameter names and hooks stay
            # what peft, accelerate's wrappers and the LoRA checkpoints expect; sampling and training both use it.
            self.pipe.unet.compile()
        weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.model.mixed_precision)
        if weight_dtype is not None and acc.device.type != "cpu":
            # Frozen parts in half precision; the LoRA stays fp32 (accelerate autocasts the forward).
            self.pipe.vae.to(dtype=weight_dtype)
            self.pipe.text_encoder.to(dtype=weight_dtype)
        # 2. Algorithm (its heads), reward, prompts.
        self.algorithm = algorithm if algorithm is not None else build_algorithm(cfg, self.pipe)
        if cfg.train.timesteps_per_call > 1 and not isinstance(self.algorithm, DDPO):
            # Other losses see a call's rows together (D3PO's pairs, DAG's per-call step baseline).
            raise ValueError(f"train.timesteps_per_call > 1 is implemented for DDPO's loss only, not "
                             f"{self.algorithm.name}: set it to 1")
        self.reward = reward if reward is not None else build_reward(cfg.reward.terms)
        self.prompts = resolve_prompts(cfg.sample.prompts, field="sample.prompts")
        # 3. Optimizer over the LoRA and the algorithm's heads; everything through accelerate.
        groups = [{"params": self.lora_params, "lr": cfg.train.learning_rate}] + self.algorithm.param_groups()
        optimizer = torch.optim.AdamW(groups, lr=cfg.train.learning_rate, betas=(cfg.train.adam_beta1, cfg.train.adam_beta2),
                                      weight_decay=cfg.train.weight_decay)
        head_names, heads = list(self.algorithm.modules()), list(self.algorithm.modules().values())
        if heads and acc.distributed_type == DistributedType.DEEPSPEED:
            raise ValueError(f"{self.algorithm.name} trains a second network ({', '.join(head_names)}) and DeepSpeed "
                             f"takes one model per accelerator: use DDP (configs/accelerate/8gpu_ddp.yaml)")
        prepared = acc.prepare(self.pipe.unet, optimizer, *heads)
        self.unet, self.optimizer, self.heads = prepared[0], prepared[1], list(prepared[2:])
        self.algorithm.bind_prepared(dict(zip(head_names, self.heads)))
        self.algorithm.bind_layout(self.rank, self.world)
        self._register_checkpoint_hooks()
        acc.register_for_checkpointing(_AlgorithmState(self.algorithm))
        self.policy = Policy(self.unet, self.pipe.scheduler, cfg.sample.guidance_scale, cfg.sample.eta,
                             cfg.sample.log_prob_reduction, acc.autocast)
        self.state = TrainState()

    # ------------------------------------------------------------------------------------------------
    # Checkpoints

    def _register_checkpoint_hooks(self) -> None:
        acc, base_unet = self.accelerator, self.accelerator.unwrap_model(self.unet)

        def save_hook(models, weights, output_dir):
            # Save only the LoRA of the UNet, not its frozen base weights (GBs for SD).
            for i, m in enumerate(models):
                if acc.unwrap_model(m) is base_unet:
                    if acc.is_main_process:
                        from safetensors.torch import save_file
                        save_file(lora_state_dict(base_unet), os.path.join(output_dir, "lora.safetensors"))
                    if weights:  # empty under DeepSpeed, which saves its engine itself
                        weights.pop(i)
                    break

        def load_hook(models, input_dir):
            from diffusers.utils import convert_unet_state_dict_to_peft
            from peft.utils import set_peft_model_state_dict
            from safetensors.torch import load_file

            for i, m in enumerate(models):
                if acc.unwrap_model(m) is base_unet:
                    state = convert_unet_state_dict_to_peft(load_file(os.path.join(input_dir, "lora.safetensors")))
                    state = {k.removeprefix("unet."): v for k, v in state.items()}
                    result = set_peft_model_state_dict(base_unet, state, adapter_name="default")
                    if getattr(result, "unexpected_keys", None):
                        raise RuntimeError(f"checkpoint {input_dir}: unexpected LoRA keys {result.unexpected_keys[:5]}")
                    models.pop(i)
                    break

        acc.register_save_state_pre_hook(save_hook)
        acc.register_load_state_pre_hook(load_hook)

    def checkpoints(self) -> list[Path]:
        ckpt_dir = self.out / "checkpoints"
        found = [p for p in ckpt_dir.glob(f"{CHECKPOINT_PREFIX}*") if (p / COMPLETE_MARKER).is_file()]
        return sorted(found, key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)))

    def save_checkpoint(self) -> Path:
        acc = self.accelerator
        ckpt_dir = self.out / "checkpoints"
        final = ckpt_dir / f"{CHECKPOINT_PREFIX}{self.state.epoch}"
        tmp = ckpt_dir / f".tmp-{CHECKPOINT_PREFIX}{self.state.epoch}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        fault_point("checkpoint_write")  # tests: a crash with the files half there and no marker yet
        acc.wait_for_everyone()  # every process has written its part (RNG states) before the rename
        if acc.is_main_process:
            (tmp / "trainer_state.json").write_text(json.dumps(self.state.__dict__, default=_json_default))
            write_manifest(tmp, COMPLETE_MARKER, self.state.epoch)  # last: the marker vouches for the rest
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)  # atomic: a checkpoint is there whole or not at all
            for old in self.checkpoints()[: -self.cfg.checkpoint.keep]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def load_checkpoint(self, path: Path | None = None) -> Path | None:
        """Load ``path``, or the newest checkpoint that verifies against its manifest (older ones are the
        fallback when the newest is damaged; a damaged one is named, never loaded)."""
        if path is not None:
            problem = verify_checkpoint(path, COMPLETE_MARKER)
            if problem is not None:
                raise CheckpointError(f"checkpoint {path} cannot be loaded: {problem}; remove it or pick another")
        else:
            ckpt_dir = self.out / "checkpoints"
            for partial in sorted(ckpt_dir.glob(f"*{CHECKPOINT_PREFIX}*")):
                if partial.is_dir() and not (partial / COMPLETE_MARKER).is_file():
                    self.log(f"--resume: ignoring {partial.name}: no {COMPLETE_MARKER} marker (a write was interrupted)")
            damaged = []
            for candidate in reversed(self.checkpoints()):
                problem = verify_checkpoint(candidate, COMPLETE_MARKER)
                if problem is None:
                    path = candidate
                    break
                damaged.append(candidate.name)
                self.log(f"--resume: {candidate.name} is damaged ({problem}); falling back to the previous checkpoint")
            if path is None:
                if damaged:
                    raise CheckpointError(f"--resume: every checkpoint in {ckpt_dir} is damaged ({', '.join(damaged)}); "
                                          f"delete them to start over, or restore them from a copy")
                return None
        self.accelerator.load_state(str(path))
        self.state = TrainState(**json.loads((path / "trainer_state.json").read_text()))
        return path

    # ------------------------------------------------------------------------------------------------
    # One epoch

    def sample_epoch(self, epoch: int) -> tuple[Trajectories | None, torch.Tensor | None, dict]:
        """Steps 1-3: draw prompts, sample trajectories, score them (scoring overlaps the next batch)."""
        cfg, acc = self.cfg, self.accelerator
        base_unet = acc.unwrap_model(self.unet)
        pool = RewardPool(self.reward, cfg.reward.workers)
        log_here = self._log_here
        per_process = cfg.sample.batch_size * cfg.sample.num_batches_per_epoch
        pending = []
        try:
            for b in range(cfg.sample.num_batches_per_epoch):
                # Trajectory g of the epoch (global index, the order gather uses) draws everything from its
                # own generator: processes never share noise, and the samples do not depend on how the
                # global batch is split over processes.
                first = self.rank * per_process + b * cfg.sample.batch_size
                gens = [trajectory_generator(cfg.train.seed, epoch, first + i) for i in range(cfg.sample.batch_size)]
                if cfg.sample.same_prompt_per_batch:
                    pick = int(torch.randint(len(self.prompts), (1,), generator=gens[0]))
                    prompts = [self.prompts[pick]] * cfg.sample.batch_size
                else:
                    prompts = [self.prompts[int(torch.randint(len(self.prompts), (1,), generator=g))] for g in gens]
                base_unet.eval()
                traj = sample_trajectories(
                    self.pipe, prompts, cfg.sample.num_steps, cfg.sample.guidance_scale, cfg.sample.eta,
                    generator=gens, reduction=cfg.sample.log_prob_reduction, unet=base_unet,
                )
                fault_point("sample")  # tests: a crash with sampled trajectories only in memory
                pending.append((traj, pool.submit(traj.images, prompts, traj.metadata, batch=f"{epoch}.{b}")))
            kept, scores, infos = [], [], []
            for traj, fut in pending:
                try:
                    total, info = fut.result()
                    ok = True
                except RewardError as e:
                    if cfg.reward.on_error == "stop":
                        raise RewardError(f"{e}; nothing was trained on this batch. Fix the reward, or set "
                                          f"reward.on_error = \"skip_batch\" to drop such batches") from e
                    where = f" (process {self.rank})" if self.world > 1 else ""
                    log_here(f"warning{where}: {e}; skipping this batch (reward.on_error='skip_batch')")
                    ok, total, info = False, None, {}
                # A batch is kept only if every process scored its part, so gathered shapes agree.
                all_ok = bool(acc.gather(torch.tensor([ok], device=acc.device)).all())
                if all_ok:
                    kept.append(traj)
                    scores.append(torch.as_tensor(total, dtype=torch.float32))
                    infos.append(info)
                else:
                    self.state.skipped_batches += 1
                    if self.state.skipped_batches > cfg.reward.max_skipped_batches:
                        raise RewardError(
                            f"{self.state.skipped_batches} reward batches skipped (reward.max_skipped_batches = "
                            f"{cfg.reward.max_skipped_batches}); stopping: fix the reward or raise the limit")
        finally:
            pool.close()
        if not kept:
            return None, None, {}
        return Trajectories.cat(kept), torch.cat(scores), _merge_infos(infos)

    def train_on(self, traj: Trajectories, prepared: dict, epoch: int) -> dict:
        """Steps 5-6: inner epochs over shuffled trajectories and shuffled timesteps; loss; optimizer."""
        cfg, acc = self.cfg, self.accelerator
        # The same generator on every process: the schedule draws global minibatches from it and each
        # process takes its share, so the optimisation path does not depend on the number of processes.
        gen = epoch_generator(cfg.train.seed, 0, epoch, 1)
        n, steps = len(traj), traj.num_steps
        self.unet.train()
        for h in self.heads:
            h.train()
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        params = self.lora_params + [p for h in self.heads for p in h.parameters() if p.requires_grad]
        for _ in range(cfg.train.num_inner_epochs):
            calls = self.algorithm.schedule(n, steps, self.trained_steps, cfg.train.batch_size, gen)
            for rows, k in fuse_timesteps(calls, cfg.train.timesteps_per_call):
                tr = _transition(traj, rows, k, acc.device)
                with acc.accumulate(self.unet, *self.heads):
                    loss, stats = self.algorithm.loss(tr, self.policy, prepared, epoch)
                    if not torch.isfinite(loss):  # before backward: a NaN must never reach the weights
                        raise FloatingPointError(
                            f"epoch {epoch}: non-finite loss {loss.item()} from {self.algorithm.name}; lower the "
                            f"learning rate or the reward scale")
                    acc.backward(loss)
                    if acc.sync_gradients:
                        stats.update(self.clip_gradients())
                        self.state.optimizer_steps += 1
                        fault_point("optimizer_step")  # tests: a crash between backward and the update
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                if self.check_sync and acc.sync_gradients:
                    self.assert_in_sync(params, f"optimizer step {self.state.optimizer_steps}")
                for key, v in stats.items():
                    sums[key] = sums.get(key, 0.0) + float(v)
                    counts[key] = counts.get(key, 0) + 1
        # Per key: grad_norm exists only on the calls that step the optimizer, the rest on every call.
        return {k: v / counts[k] for k, v in sums.items()}

    def clip_gradients(self) -> dict:
        """Clip to train.max_grad_norm, per module (the LoRA; each head on its own, as the DAG reference does) or
        jointly; returns each module's norm before clipping (``grad_norm`` is the LoRA's)."""
        cfg, acc = self.cfg, self.accelerator
        groups = {"grad_norm": self.lora_params}
        for name, head in zip(self.algorithm.modules(), self.heads):
            groups[f"grad_norm_{name}"] = [p for p in head.parameters() if p.requires_grad]
        everything = [p for ps in groups.values() for p in ps]
        if acc.distributed_type == DistributedType.DEEPSPEED:  # DeepSpeed clips itself (and has no heads here)
            acc.clip_grad_norm_(everything, cfg.train.max_grad_norm)
            return {"grad_norm": float("nan")}
        acc.unscale_gradients()  # once, before any norm is taken (a no-op without a gradient scaler)
        if cfg.train.grad_clip == "joint" or len(groups) == 1:
            norms = {k: _grad_norm(ps) for k, ps in groups.items()} if len(groups) > 1 else {}
            total = torch.nn.utils.clip_grad_norm_(everything, cfg.train.max_grad_norm)
            return {"grad_norm": float(total), **norms} | ({"grad_norm_joint": float(total)} if norms else {})
        return {k: float(torch.nn.utils.clip_grad_norm_(ps, cfg.train.max_grad_norm)) for k, ps in groups.items()}

    def assert_in_sync(self, tensors: list[torch.Tensor], where: str) -> str:
        """Raise unless every process holds bit-identical ``tensors``; returns their digest (debugging aid)."""
        digest = tensor_digest(tensors)
        digests = gather_objects(self.accelerator, digest)
        if len(set(digests)) > 1:
            raise RuntimeError(f"processes diverged after {where}: trained weights differ ({digests}); a process "
                               f"trained on something the others did not see, or its numerics differ")
        if self.accelerator.is_main_process:
            with open(self.out / "sync_check.jsonl", "a") as f:
                f.write(json.dumps({"where": where, "processes": self.world, "digest": digest}) + "\n")
        return digest

    def run_epoch(self, epoch: int) -> dict:
        cfg, acc = self.cfg, self.accelerator
        t0 = time.time()
        # 1-3. Sample and score.
        traj, rewards, info = self.sample_epoch(epoch)
        t_sample = time.time() - t0
        if traj is None:
            return {"epoch": epoch + 1, "skipped": True}
        # 4. Gather rewards and prompts from all processes; the algorithm turns them into targets.
        all_rewards = acc.gather(rewards.to(acc.device)).cpu()
        all_prompts = [p for part in gather_objects(acc, traj.prompts) for p in part]
        context = {"trajectories": traj, "pipe": self.pipe, "reward": self.reward, "accelerator": acc,
                   "num_epochs": cfg.train.epochs, "rank": self.rank, "local_size": len(traj)}
        prepared_global = self.algorithm.prepare(all_prompts, all_rewards, epoch, context)
        prepared = _local_slice(prepared_global, self.rank, len(traj), self.world)
        # 5-6. Train; the logged statistics describe the global batch, not the main process's share.
        t1 = time.time()
        stats = mean_over_processes(acc, self.train_on(traj, prepared, epoch))
        info = mean_over_processes(acc, info)
        t_train = time.time() - t1
        # 7. Bookkeeping.
        self.state.epoch = epoch + 1
        self.state.trajectories += len(all_prompts)
        metrics = {
            "epoch": epoch + 1, "trajectories": self.state.trajectories, "optimizer_steps": self.state.optimizer_steps,
            "reward_mean": float(all_rewards.mean()), "reward_std": float(all_rewards.std(unbiased=False)),
            "time_sample": t_sample, "time_train": t_train, **{f"train/{k}": v for k, v in stats.items()},
        }
        for k, v in info.items():
            if isinstance(v, float | int):
                metrics[f"reward/{k}"] = float(v)
        self.state.history.append(metrics)
        acc.log({k: v for k, v in metrics.items() if isinstance(v, int | float)}, step=epoch + 1)
        if cfg.log.image_every and (epoch + 1) % cfg.log.image_every == 0 and acc.is_main_process:
            self._log_images(traj, epoch + 1)
        if acc.is_main_process:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
        return metrics

    def _log_images(self, traj: Trajectories, step: int) -> None:
        if self.cfg.log.tracker != "tensorboard":
            return
        tracker = self.accelerator.get_tracker("tensorboard", unwrap=True)
        tracker.add_images("samples", traj.images[:16].cpu(), step)

    # ------------------------------------------------------------------------------------------------

    def fit(self, resume: bool | str = False) -> TrainResult:
        cfg, acc = self.cfg, self.accelerator
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, self.out / "config.toml")
        acc.wait_for_everyone()
        if resume:
            path = self.load_checkpoint(None if resume is True else Path(resume))
            if path is None:
                self.log(f"--resume: no checkpoint in {self.out / 'checkpoints'}; starting from scratch")
            else:
                self.log(f"resumed from {path} (epoch {self.state.epoch})")
                if acc.is_main_process:  # metrics.jsonl may hold epochs after the checkpoint: rewrite it
                    with open(self.out / "metrics.jsonl", "w") as f:
                        f.writelines(json.dumps(m) + "\n" for m in self.state.history)
        elif acc.is_main_process:
            for stale in ("metrics.jsonl", "sync_check.jsonl"):
                (self.out / stale).unlink(missing_ok=True)
        if cfg.log.tracker != "none":
            acc.init_trackers("diffalign", config=_flat_config(cfg))
        derived = cfg.derived(self.world)
        self.log(f"{cfg.train.algorithm}: {derived} on {self.world} process(es), device {acc.device}")
        progress = _progress(cfg.log.progress and acc.is_main_process, cfg.train.epochs, self.state.epoch)
        for epoch in range(self.state.epoch, cfg.train.epochs):
            metrics = self.run_epoch(epoch)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(traj=metrics.get("trajectories"), reward=f"{metrics.get('reward_mean', float('nan')):.3f}")
            if cfg.checkpoint.every and (epoch + 1) % cfg.checkpoint.every == 0 and epoch + 1 < cfg.train.epochs:
                self.save_checkpoint()
        if progress is not None:
            progress.close()
        return self.finish()

    def finish(self) -> TrainResult:
        """Final checkpoint, the LoRA in diffusers format with the resolved config, the algorithm's heads."""
        cfg, acc = self.cfg, self.accelerator
        self.save_checkpoint()
        lora_dir = self.out / "lora"
        if acc.is_main_process:
            save_lora(acc.unwrap_model(self.unet), lora_dir)
            dump_config(cfg, lora_dir / "diffalign_config.toml")
            for name, module in self.algorithm.modules().items():
                from safetensors.torch import save_file
                save_file(acc.unwrap_model(module).state_dict(), str(self.out / f"{name}.safetensors"))
        acc.wait_for_everyone()
        acc.end_training()
        return TrainResult(self.out, lora_dir, self.state.history)


class _AlgorithmState:
    """Adapter so accelerate checkpoints the algorithm's own state (e.g. per-prompt statistics)."""

    def __init__(self, algorithm):
        self.algorithm = algorithm

    def state_dict(self):
        return self.algorithm.state_dict()

    def load_state_dict(self, state):
        self.algorithm.load_state_dict(state)


def fuse_timesteps(calls, per_call: int):
    """Concatenate each ``per_call`` consecutive (rows, steps) of the schedule into one UNet call.

    The schedule yields a minibatch's trained steps one after another and the optimizer steps once per
    minibatch, so as long as ``per_call`` divides the trained steps (the config checks it) no group spans two
    optimizer steps, and the mean loss of a group is the mean of its members' losses: the same gradient.
    """
    if per_call == 1:
        yield from calls
        return
    group: list[tuple[torch.Tensor, torch.Tensor]] = []
    for rows, k in calls:
        group.append((rows, k))
        if len(group) == per_call:
            yield torch.cat([r for r, _ in group]), torch.cat([s for _, s in group])
            group = []
    if group:
        yield torch.cat([r for r, _ in group]), torch.cat([s for _, s in group])


def _transition(traj: Trajectories, rows: torch.Tensor, k: torch.Tensor, device) -> Transition:
    return Transition(
        latents=traj.latents[rows, k].to(device), next_latents=traj.latents[rows, k + 1].to(device),
        timesteps=traj.timesteps[k].to(device), step_index=k.to(device),
        old_log_prob=traj.log_probs[rows, k].to(device), old_eps=traj.guided_eps[rows, k].to(device),
        prompt_embeds=traj.prompt_embeds[rows].to(device),
        negative_embeds=None if traj.negative_embeds is None else traj.negative_embeds[rows].to(device),
        sample_index=rows.to(device),
    )


def _grad_norm(params: list[torch.Tensor]) -> float:
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


def gather_objects(acc, obj) -> list:
    """One picklable object per process, in process order, on every process."""
    if acc.num_processes == 1:
        return [obj]
    from accelerate.utils import gather_object
    return list(gather_object([obj]))


def mean_over_processes(acc, stats: dict) -> dict:
    """Average per-process statistics (equal-sized shares, so this is the global mean)."""
    if acc.num_processes == 1:
        return stats
    per_process = gather_objects(acc, stats)
    keys = dict.fromkeys(k for d in per_process for k in d)
    return {k: float(np.mean([d[k] for d in per_process if k in d])) for k in keys}


def tensor_digest(tensors: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _local_slice(prepared: dict, rank: int, n: int, world: int) -> dict:
    """Per-trajectory tensors of the gathered batch -> this process's rows (gather is in rank order).
    Anything else (scalars, tensors of another length) passes through unchanged."""
    return {
        k: v[rank * n:(rank + 1) * n] if torch.is_tensor(v) and v.ndim >= 1 and v.shape[0] == n * world else v
        for k, v in prepared.items()
    }


def _merge_infos(infos: list[dict]) -> dict:
    merged: dict = {}
    for info in infos:
        for k, v in info.items():
            if isinstance(v, int | float | np.number) and not isinstance(v, bool):
                merged.setdefault(k, []).append(float(v))
    return {k: float(np.mean(v)) for k, v in merged.items()}


def _flat_config(cfg: RunConfig) -> dict:
    flat = {}
    for section, values in cfg.model_dump(mode="json").items():
        if isinstance(values, dict):
            for k, v in values.items():
                flat[f"{section}.{k}"] = v if isinstance(v, int | float | str | bool) else json.dumps(v)
        else:
            flat[section] = values
    return flat


def _progress(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc="epochs", unit="epoch")


def _quiet(message: str) -> None:
    pass


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o)}")


def train(cfg: RunConfig, resume: bool | str = False, reward=None, log=print) -> TrainResult:
    """Run a training job from a validated config (the Python face of ``diffalign train``)."""
    return Trainer(cfg, reward=reward, log=log).fit(resume=resume)
