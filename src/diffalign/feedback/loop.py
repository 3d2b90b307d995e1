"""The human-feedback loop (``diffalign feedback``): sample a round, collect labels, update the LoRA.

One round, numbered steps:

1. initial noises: HERO reuses preferred noises, D3PO shares one noise per group, DDPO-binary draws fresh;
2. sample the round's trajectories (the shared sampler, the trainer's LoRA-adapted UNet);
3. put the images in the feedback store as a round (idempotent: a restarted loop finds the same round);
4. collect labels: the labeling app (a person) or the simulated evaluator, both through the store;
5. turn labels into training targets: HERO's learned-embedding reward, good = 1 / bad = 0, or D3PO pairs;
6. one policy update through the trainer (DDPO for HERO and DDPO-binary, DPO for D3PO);
7. measure toy success on fixed evaluation seeds, record labels used, checkpoint.

The trainer's checkpoint holds the LoRA, the optimizer, HERO's encoder and the loop's own state, so
``--resume`` continues after the last finished round; a round interrupted while waiting is found again
in the store with the labels already given.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..algorithms.d3po import D3PO, preference_pairs
from ..algorithms.ddpo import DDPO
from ..algorithms.hero import HERO, RoundLabels
from ..config import RunConfig
from ..prompts import resolve_prompts
from ..rewards import to_uint8_images
from ..sampling import sample_trajectories
from ..trainer import Trainer, epoch_generator
from .store import FeedbackStore


class _NoReward:
    """Feedback runs have no black-box reward: labels come from people (or the simulated evaluator)."""

    name = "none"

    def __call__(self, images, prompts, metadata, batch=None):
        raise RuntimeError("feedback runs take their rewards from labels, not from a reward function")


class LoopState:
    """What a resumed loop needs beyond the trainer: next noises, the previous best, HERO's encoder."""

    def __init__(self, hero: HERO | None):
        self.hero = hero
        self.next_noises: torch.Tensor | None = None
        self.previous_best_image_id: int | None = None

    def state_dict(self) -> dict:
        return {"next_noises": self.next_noises, "previous_best_image_id": self.previous_best_image_id,
                "hero": self.hero.state_dict() if self.hero else None}

    def load_state_dict(self, state: dict) -> None:
        self.next_noises = state["next_noises"]
        self.previous_best_image_id = state["previous_best_image_id"]
        if self.hero is not None and state.get("hero"):
            self.hero.load_state_dict(state["hero"])


@dataclass
class FeedbackResult:
    output_dir: Path
    lora_dir: Path
    history: list[dict]
    labels_used: int


def _check(cfg: RunConfig) -> None:
    fb = cfg.feedback
    if fb.images_per_round % cfg.train.batch_size and fb.algorithm != "d3po":
        raise ValueError(f"train.batch_size ({cfg.train.batch_size}) must divide feedback.images_per_round "
                         f"({fb.images_per_round})")
    if fb.algorithm == "d3po" and fb.images_per_round % cfg.d3po.group_size:
        raise ValueError(f"d3po.group_size ({cfg.d3po.group_size}) must divide feedback.images_per_round "
                         f"({fb.images_per_round})")


def _start_server(store: FeedbackStore, cfg: RunConfig, log) -> tuple[str, object]:
    import uvicorn

    from .server import create_app, is_loopback

    fb = cfg.feedback
    token = fb.token
    if not is_loopback(fb.host) and not token:
        import secrets
        token = secrets.token_urlsafe(24)
    server = uvicorn.Server(uvicorn.Config(create_app(store, token=token), host=fb.host, port=fb.port,
                                           log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True, name="labeling-app")
    thread.start()
    while not server.started and thread.is_alive():
        threading.Event().wait(0.05)
    port = server.servers[0].sockets[0].getsockname()[1] if server.servers else fb.port
    url = f"http://{'127.0.0.1' if fb.host in ('0.0.0.0', '::') else fb.host}:{port}/"
    if token:
        url += f"?token={token}"
    log(f"labeling app: open {url}")
    return url, server


def run_feedback(cfg: RunConfig, evaluator: str = "human", resume: bool = False, log=print) -> FeedbackResult:
    """Run a feedback session with HERO, D3PO or DDPO-binary (the Python face of ``diffalign feedback``)."""
    if evaluator not in ("human", "simulated"):
        raise ValueError(f"--evaluator must be 'human' or 'simulated' (got {evaluator!r})")
    _check(cfg)
    fb = cfg.feedback
    prompts = resolve_prompts(fb.prompts)
    cfg = cfg.model_copy(deep=True)
    cfg.sample.prompts = prompts
    cfg.train.epochs = fb.rounds
    algo = D3PO(cfg.d3po) if fb.algorithm == "d3po" else DDPO(cfg.ddpo)
    trainer = Trainer(cfg, reward=_NoReward(), algorithm=algo, log=log)
    acc = trainer.accelerator
    if acc.num_processes > 1:
        raise NotImplementedError("feedback runs are single-process for now (one round gathers one batch)")
    hero = HERO(cfg.hero, trainer.pipe.unet.config.in_channels, seed=cfg.train.seed) if fb.algorithm == "hero" else None
    state = LoopState(hero)
    acc.register_for_checkpointing(state)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    store = FeedbackStore(Path(fb.store_dir) if fb.store_dir else out / "feedback")
    run_id = store.create_run(out.name, cfg.model_dump(mode="json"))
    if resume and trainer.load_checkpoint() is not None:
        log(f"resumed after round {trainer.state.epoch}")
    elif (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()
    server = None
    if evaluator == "human":
        _, server = _start_server(store, cfg, log)
    from .simulated import SimulatedEvaluator
    sim = SimulatedEvaluator(name="simulated", good_threshold=fb.simulated_good_threshold,
                             noise_rate=fb.simulated_noise_rate, seed=cfg.train.seed)
    (out / "rounds").mkdir(exist_ok=True)
    try:
        for r in range(trainer.state.epoch, fb.rounds):
            record = _round(r, cfg, trainer, state, store, run_id, prompts[r % len(prompts)], evaluator, sim, log)
            trainer.state.epoch = r + 1
            trainer.state.history.append(record)
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            log(f"round {r + 1}/{fb.rounds}: {record['good']} good of {fb.images_per_round}, labels used "
                f"{record['labels_used']}" + (f", success {record['success']:.2f}" if "success" in record else ""))
            if cfg.checkpoint.every and (r + 1) % cfg.checkpoint.every == 0:
                trainer.save_checkpoint()
    finally:
        if server is not None:
            server.should_exit = True
    result = trainer.finish()
    store.export_jsonl(run_id, out / "feedback.jsonl")
    from ..report import write_feedback_report
    write_feedback_report(out)
    return FeedbackResult(out, result.lora_dir, trainer.state.history, store.label_count(run_id))


def _initial_noises(r: int, cfg: RunConfig, state: LoopState, trainer: Trainer, gen: torch.Generator) -> torch.Tensor:
    fb, unet = cfg.feedback, trainer.pipe.unet
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    if fb.algorithm == "hero" and state.next_noises is not None:
        return state.next_noises
    if fb.algorithm == "d3po":
        groups = fb.images_per_round // cfg.d3po.group_size
        base = torch.randn((groups, *shape), generator=gen)
        return base.repeat_interleave(cfg.d3po.group_size, dim=0)
    return torch.randn((fb.images_per_round, *shape), generator=gen)


def _round(r: int, cfg: RunConfig, trainer: Trainer, state: LoopState, store: FeedbackStore, run_id: int,
           prompt: str, evaluator: str, sim, log) -> dict:
    fb, acc = cfg.feedback, trainer.accelerator
    gen = epoch_generator(cfg.train.seed, trainer.rank, r, 0)
    # 1-2. Noises and trajectories.
    noises = _initial_noises(r, cfg, state, trainer, gen)
    base_unet = acc.unwrap_model(trainer.unet)
    base_unet.eval()
    traj = sample_trajectories(trainer.pipe, [prompt] * fb.images_per_round, cfg.sample.num_steps,
                               cfg.sample.guidance_scale, cfg.sample.eta, generator=gen, initial_noise=noises,
                               reduction=cfg.sample.log_prob_reduction, unet=base_unet)
    images = to_uint8_images(traj.images)
    # 3. The round in the store (the same round again after a restart).
    info = store.create_round(run_id, r, prompt, list(images), evaluators_required=fb.evaluators_required,
                              previous_best_image_id=state.previous_best_image_id,
                              image_metadata=[{"index": i} for i in range(len(images))])
    from PIL import Image

    from ..report import image_grid
    Image.fromarray(image_grid(images, columns=8)).save(Path(cfg.output_dir) / "rounds" / f"round-{r + 1:03d}.png")
    # 4. Labels.
    if evaluator == "simulated":
        if not store.round_complete(info.id):
            sim.label_round(store, info.id)
    else:
        feedback_wait(store, info.id, fb.wait_timeout, log)
    feedback = store.round_feedback(info.id)
    good = torch.tensor(feedback.good, dtype=torch.bool)
    best_is_previous = feedback.best_image_id is not None and feedback.best_index is None
    labels = RoundLabels(good, feedback.best_index, best_is_previous)
    if feedback.best_image_id is not None:
        state.previous_best_image_id = feedback.best_image_id
    # 5. Targets.
    final_latents = traj.latents[:, -1]
    record: dict = {"round": r + 1, "prompt": prompt, "good": int(good.sum()), "best_index": feedback.best_index,
                    "best_is_previous": best_is_previous}
    if cfg.feedback.algorithm == "d3po":
        groups = [list(range(g, g + cfg.d3po.group_size)) for g in range(0, len(good), cfg.d3po.group_size)]
        pairs = preference_pairs(good.tolist(), feedback.best_index, groups)
        trainer.algorithm.set_pairs(pairs)
        prepared, record["pairs"] = {}, len(pairs)
        trainable = bool(pairs)
    else:
        if state.hero is not None:
            record.update(state.hero.update(final_latents, labels, gen))
            rewards = state.hero.rewards(final_latents, good)
        else:
            rewards = good.float()
        record["reward_mean"] = float(rewards.mean())
        trainable = float(rewards.std()) > 1e-8
        prepared = trainer.algorithm.prepare([prompt] * len(rewards), rewards, r, {})
    # 6. Policy update (a round with nothing to prefer teaches nothing: skip it).
    if trainable:
        record.update({f"train/{k}": v for k, v in trainer.train_on(traj, prepared, r).items()})
    if state.hero is not None:
        state.next_noises = state.hero.next_noises(traj.initial_noise, labels, fb.images_per_round, gen)
    # 7. Measure.
    record["labels_used"] = store.label_count(run_id)
    if fb.eval_every and ((r + 1) % fb.eval_every == 0 or r + 1 == fb.rounds):
        success = measure_success(trainer, cfg, prompt)
        if success is not None:
            record["success"] = success
            store.set_run_metric(run_id, "success", success, iteration=r)
    record["trajectories"] = (r + 1) * fb.images_per_round
    return record


def feedback_wait(store: FeedbackStore, round_id: int, timeout: float | None, log):
    def on_wait(elapsed, submitted, required):
        log(f"waiting for labels on round {round_id}: {submitted} of {required} evaluator(s) submitted "
            f"({elapsed:.0f} s); open the labeling app URL above")
    return store.wait_for_round(round_id, timeout=timeout, on_wait=on_wait)


@torch.no_grad()
def measure_success(trainer: Trainer, cfg: RunConfig, prompt: str) -> float | None:
    """Toy success of the current model on fixed evaluation seeds (the same noises every round)."""
    from ..evaluate import generate
    from ..metrics import toy_success

    pipe = trainer.pipe
    images = generate(pipe, [prompt], cfg.feedback.eval_samples, cfg.eval.seed, cfg.sample.num_steps,
                      cfg.sample.guidance_scale, cfg.sample.eta)
    result = toy_success(images.images, images.prompts)
    return None if result is None else float(np.round(result[0], 6))
