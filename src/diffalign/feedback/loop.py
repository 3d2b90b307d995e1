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

On several processes (``accelerate launch``) a round is still one round of ``images_per_round`` images:
each process samples its share from its slice of the round's initial noises, the images are gathered to
the main process, which alone touches the store (creates the round, runs the simulated evaluator or
waits for people), and the round's labels are broadcast back. Everything that must be the same on every
process - the initial noises, HERO's encoder (trained on the gathered final latents), its rewards and
next noises, D3PO's pairs - is computed from gathered data with a generator that is the same on every
process; only the DDIM noise of sampling is per process. HERO and DDPO-binary train each process on its
own images (advantages from the gathered rewards); D3PO deals the round's pairs out evenly and every
process trains its pairs on the gathered trajectories, so all processes take the same number of steps.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..algorithms.d3po import D3PO, preference_pairs
from ..algorithms.ddpo import DDPO
from ..algorithms.hero import HERO, RoundLabels, UNetFeatures
from ..config import RunConfig, dump_config, redacted_dump
from ..prompts import resolve_prompts
from ..rewards import to_uint8_images
from ..safety import hide_flagged
from ..sampling import Trajectories, sample_trajectories
from ..trainer import Trainer, _local_slice, epoch_generator, mean_over_processes
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
        # HERO's inputs of every labelled image so far (main process), to embed them with each round's encoder.
        self.labeled_ids: list[int] = []
        self.labeled_inputs: torch.Tensor | None = None

    def state_dict(self) -> dict:
        return {"next_noises": self.next_noises, "previous_best_image_id": self.previous_best_image_id,
                "hero": self.hero.state_dict() if self.hero else None,
                "labeled_ids": self.labeled_ids, "labeled_inputs": self.labeled_inputs}

    def load_state_dict(self, state: dict) -> None:
        self.next_noises = state["next_noises"]
        self.previous_best_image_id = state["previous_best_image_id"]
        self.labeled_ids = list(state.get("labeled_ids") or [])  # absent in checkpoints from before explanations
        self.labeled_inputs = state.get("labeled_inputs")
        if self.hero is not None and state.get("hero"):
            self.hero.load_state_dict(state["hero"])


@dataclass
class FeedbackResult:
    output_dir: Path
    lora_dir: Path
    history: list[dict]
    labels_used: int


def _check(cfg: RunConfig, processes: int = 1) -> None:
    fb = cfg.feedback
    if fb.images_per_round % processes:
        raise ValueError(f"feedback.images_per_round ({fb.images_per_round}) must be a multiple of the "
                         f"{processes} processes (each samples an equal share of a round)")
    share = fb.images_per_round // processes
    if share % cfg.train.batch_size and fb.algorithm != "d3po":
        what = "feedback.images_per_round" if processes == 1 else "each process's share of a round"
        raise ValueError(f"train.batch_size ({cfg.train.batch_size}) must divide {what} ({share})")
    extra = cfg.hero.unlabeled_per_round if fb.algorithm == "hero" else 0
    if extra and (extra % processes or (share + extra // processes) % cfg.train.batch_size):
        raise ValueError(f"hero.unlabeled_per_round ({extra}) must split evenly over the {processes} process(es), "
                         f"and train.batch_size ({cfg.train.batch_size}) must divide each process's labelled plus "
                         f"unlabelled images ({share} + {extra // processes})")
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
    _check(cfg, acc.num_processes)
    main = acc.is_main_process
    log = trainer.log  # the main process speaks for all
    hero = _build_hero(cfg, trainer, prompts) if fb.algorithm == "hero" else None
    state = LoopState(hero)
    acc.register_for_checkpointing(state)
    out = Path(cfg.output_dir)
    # The store (SQLite, PNGs), the labeling app and the run's files belong to the main process alone.
    store = run_id = None
    if main:
        out.mkdir(parents=True, exist_ok=True)
        store = FeedbackStore(Path(fb.store_dir) if fb.store_dir else out / "feedback")
        public = _public_config(cfg)
        try:
            # A different config in the same store needs --resume: its rounds belong to the old one.
            run_id = store.create_run(out.name, redacted_dump(public, exclude_none=False), resume=resume)
        except BaseException:
            store.close()
            raise
        # The resolved config, as `train` writes it: `diffalign eval` and `diffalign report` read it.
        dump_config(public, out / "config.toml")
    acc.wait_for_everyone()
    if resume and trainer.load_checkpoint() is not None:
        log(f"resumed after round {trainer.state.epoch}")
    elif main:
        for stale in ("metrics.jsonl", "sync_check.jsonl"):
            (out / stale).unlink(missing_ok=True)
    server = None
    if evaluator == "human" and main:
        _, server = _start_server(store, cfg, log)
    from .simulated import SimulatedEvaluator
    sim = SimulatedEvaluator(name="simulated", good_threshold=fb.simulated_good_threshold,
                             noise_rate=fb.simulated_noise_rate, seed=cfg.train.seed)
    if main:
        (out / "rounds").mkdir(exist_ok=True)
    try:
        for r in range(trainer.state.epoch, fb.rounds):
            record = _round(r, cfg, trainer, state, store, run_id, prompts[r % len(prompts)], evaluator, sim, log)
            trainer.state.epoch = r + 1
            trainer.state.history.append(record)
            if main:
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
            log(f"round {r + 1}/{fb.rounds}: {record['good']} good of {fb.images_per_round}, labels used "
                f"{record['labels_used']}" + (f", success {record['success']:.2f}" if "success" in record else ""))
            if cfg.checkpoint.every and (r + 1) % cfg.checkpoint.every == 0:
                trainer.save_checkpoint()
            if fb.stop_at_success is not None and record.get("success", -1.0) >= fb.stop_at_success:
                log(f"success {record['success']:.2f} >= feedback.stop_at_success ({fb.stop_at_success}): stopping")
                break
    except BaseException:
        if store is not None:
            store.close()
        raise
    finally:
        if server is not None:
            server.should_exit = True
    labels_used = _broadcast(acc, store.label_count(run_id) if main else None)  # finish() ends the process group
    result = trainer.finish()
    if main:
        try:
            store.export_jsonl(run_id, out / "feedback.jsonl")
            from ..report import write_feedback_report
            report = write_feedback_report(out)
            _add_legend(report)
            _add_agreement(report, store, run_id)
            _add_explanations(report, store, run_id)
            log(f"feedback report: {report}")
        finally:
            store.close()  # checkpoints the WAL: feedback.sqlite alone then holds every label
    return FeedbackResult(out, result.lora_dir, trainer.state.history, labels_used)


def _add_legend(report: Path) -> None:
    """Explain the marked round grids (marks.py) where the report's round section starts."""
    from .marks import legend_html

    text = report.read_text()
    report.write_text(text.replace("<h2>Rounds</h2>", "<h2>Rounds</h2>" + legend_html(), 1))


def _add_agreement(report: Path, store: FeedbackStore, run_id: int) -> None:
    """Put the agreement table into the feedback report (before its end: the report itself is report.py's)."""
    from .agreement import report_html

    text = report.read_text()
    report.write_text(text.replace("</body>", report_html(store.agreement(run_id)) + "</body>", 1))


def _add_explanations(report: Path, store: FeedbackStore, run_id: int) -> None:
    """Put "why did HERO reward these images?" into the feedback report (HERO runs only)."""
    from .embeddings import explanations_html

    section = explanations_html(store, run_id)
    if section:
        report.write_text(report.read_text().replace("</body>", section + "</body>", 1))


def _public_config(cfg: RunConfig) -> RunConfig:
    """The config as recorded on disk (store, config.toml): the access token is a secret and never written."""
    public = cfg.model_copy(deep=True)
    public.feedback.token = None
    return public


def _build_hero(cfg: RunConfig, trainer: Trainer, prompts: list[str]) -> HERO:
    family = trainer.family
    shape = family.latent_shape(1)
    if cfg.hero.encoder == "latent-cnn":
        return HERO(cfg.hero, shape[1], seed=cfg.train.seed)
    features = UNetFeatures(trainer.pipe, cfg.hero.feature_block, cfg.hero.feature_timestep, seed=cfg.train.seed)
    probe = torch.zeros(shape, device=family.denoiser.device)
    dim = features(probe, family.encode(prompts[:1], 1.0)).shape[1]
    return HERO(cfg.hero, seed=cfg.train.seed, feature_dim=dim, features=features)


def _initial_noises(r: int, cfg: RunConfig, state: LoopState, trainer: Trainer, gen: torch.Generator) -> torch.Tensor:
    fb, shape = cfg.feedback, trainer.family.latent_shape(1)[1:]
    if fb.algorithm == "hero" and state.next_noises is not None:
        return state.next_noises
    if fb.algorithm == "d3po":
        groups = fb.images_per_round // cfg.d3po.group_size
        base = torch.randn((groups, *shape), generator=gen)
        return base.repeat_interleave(cfg.d3po.group_size, dim=0)
    return torch.randn((fb.images_per_round, *shape), generator=gen)


def _round(r: int, cfg: RunConfig, trainer: Trainer, state: LoopState, store: FeedbackStore | None,
           run_id: int | None, prompt: str, evaluator: str, sim, log) -> dict:
    fb, acc = cfg.feedback, trainer.accelerator
    rank, world, main = trainer.rank, trainer.world, acc.is_main_process
    # `gen` is the same on every process: the round's initial noises, HERO's encoder updates and next
    # noises are computed identically everywhere. The DDIM noise of sampling is per process (with one
    # process it is `gen` itself, continuing after the initial noises, as a single process always did).
    gen = epoch_generator(cfg.train.seed, 0, r, 0)
    sample_gen = gen if world == 1 else epoch_generator(cfg.train.seed, rank, r, 2)
    share = fb.images_per_round // world
    mine = slice(rank * share, (rank + 1) * share)  # this process's rows of the round
    # 1-2. Noises (the whole round's) and this process's trajectories.
    noises = _initial_noises(r, cfg, state, trainer, gen)
    base_unet = acc.unwrap_model(trainer.unet)
    base_unet.eval()
    traj = sample_trajectories(trainer.pipe, [prompt] * share, cfg.sample.num_steps,
                               cfg.sample.guidance_scale, cfg.sample.eta, generator=sample_gen,
                               initial_noise=noises[mine], reduction=cfg.sample.log_prob_reduction, unet=base_unet)
    # The round as a whole, on every process (in process order): what the labels and targets refer to.
    if fb.algorithm == "d3po":
        round_traj = _gather_trajectories(acc, traj)
        all_images, final_latents, initial_noise = round_traj.images, None, None
    else:
        round_traj = None
        all_images, final_latents, initial_noise = (_gather_tensor(acc, t) for t in (
            traj.images, traj.latents[:, -1], traj.initial_noise))
    round_id, n_flagged, shown = None, 0, None
    if main:
        images = to_uint8_images(all_images)
        # 3. The round in the store (the same round again after a restart).
        metadata = [{"index": i, "seed": cfg.train.seed, "round": r} for i in range(len(images))]
        for meta, attrs in zip(metadata, _image_attributes(images, prompt) or [], strict=False):
            meta["attributes"] = attrs  # what the agreement statistics break "good" rates down by
        # The safety filter sits between the sampler and people: a flagged image is stored (training needs its
        # trajectory) but never served; the app shows the reason, and it counts as bad (safety.py).
        shown, reasons = hide_flagged(images, [prompt] * len(images), cfg.safety)
        for meta, reason in zip(metadata, reasons, strict=True):
            if reason:
                meta["flagged"] = reason
        n_flagged = sum(map(bool, reasons))
        info = store.create_round(run_id, r, prompt, list(images), evaluators_required=fb.evaluators_required,
                                  previous_best_image_id=state.previous_best_image_id, image_metadata=metadata)
        round_id = info.id
        from PIL import Image

        from ..report import image_grid
        Image.fromarray(image_grid(shown, columns=8)).save(Path(cfg.output_dir) / "rounds" / f"round-{r + 1:03d}.png")
        # 4. Labels.
        if evaluator == "simulated":
            if not store.round_complete(round_id):
                sim.label_round(store, round_id)
        elif world == 1:
            feedback_wait(store, round_id, fb.wait_timeout, log)
    if evaluator != "simulated" and world > 1:
        _wait_on_main(acc, store, round_id, fb.wait_timeout, log)
    # Closing the round is reading it: from now on the store refuses submissions to it, and what it records
    # as used is exactly what trains here.
    feedback = _broadcast(acc, store.close_round(round_id) if main else None)  # the labels, to every process
    if main:  # the round's grid again, marked with what training used: the feedback report shows these
        from PIL import Image

        from .marks import marked_grid
        Image.fromarray(marked_grid(shown, feedback.good, feedback.best_index)).save(
            Path(cfg.output_dir) / "rounds" / f"round-{r + 1:03d}.png")
    good = torch.tensor(feedback.good, dtype=torch.bool)
    best_is_previous = feedback.best_image_id is not None and feedback.best_index is None
    labels = RoundLabels(good, feedback.best_index, best_is_previous)
    if feedback.best_image_id is not None:
        state.previous_best_image_id = feedback.best_image_id
    # 5. Targets.
    record: dict = {"round": r + 1, "prompt": prompt, "good": int(good.sum()), "best_index": feedback.best_index,
                    "best_is_previous": best_is_previous}
    if cfg.safety.filter is not None:
        record["safety_flagged"] = int(_broadcast(acc, n_flagged if main else None))  # hidden from evaluators
    if cfg.feedback.algorithm == "d3po":
        groups = [list(range(g, g + cfg.d3po.group_size)) for g in range(0, len(good), cfg.d3po.group_size)]
        pairs = preference_pairs(good.tolist(), feedback.best_index, groups)
        # Every process trains as many pairs (DDP needs the same number of steps everywhere): deal the
        # round's pairs out in turn, repeating a few when they do not divide evenly.
        trainer.algorithm.set_pairs(pairs if world == 1 else _deal(pairs, rank, world))
        prepared, record["pairs"] = {}, len(pairs)
        trainable = bool(pairs)
        train_traj = traj if world == 1 else round_traj
    else:
        train_traj, local = traj, share
        if state.hero is not None:
            inputs = _hero_inputs(state.hero, final_latents, traj, base_unet)
            record.update(state.hero.update(inputs, labels, gen))
            rewards = state.hero.rewards(inputs, good)
            record["reward_mean"] = float(rewards.mean())  # of the labelled images
            if main:
                _record_embeddings(store, round_id, state, inputs, rewards)
            if cfg.hero.unlabeled_per_round:
                extra_traj, rewards, extra_mean = _unlabeled(cfg, trainer, state.hero, prompt, inputs, good, gen,
                                                             sample_gen, base_unet)
                record["unlabeled_reward_mean"] = extra_mean
                train_traj, local = Trajectories.cat([traj, extra_traj]), share + len(extra_traj)
        else:
            rewards = good.float()
            record["reward_mean"] = float(rewards.mean())
        trainable = float(rewards.std()) > 1e-8
        prepared = trainer.algorithm.prepare([prompt] * len(rewards), rewards, r, {})
        prepared = _local_slice(prepared, rank, local, world)
    # 6. Policy update (a round with nothing to prefer teaches nothing: skip it).
    if trainable:
        stats = mean_over_processes(acc, trainer.train_on(train_traj, prepared, r))
        record.update({f"train/{k}": v for k, v in stats.items()})
    if state.hero is not None:
        state.next_noises = state.hero.next_noises(initial_noise.cpu(), labels, fb.images_per_round, gen)
        if trainer.check_sync:
            trainer.assert_in_sync(list(state.hero.encoder.state_dict().values()), f"HERO encoder, round {r + 1}")
    # 7. Measure (on the main process; every process gets the same record).
    if main:
        record["labels_used"] = store.label_count(run_id)
        if fb.eval_every and ((r + 1) % fb.eval_every == 0 or r + 1 == fb.rounds):
            success = measure_success(trainer, cfg, prompt)
            if success is not None:
                record["success"] = success
                store.set_run_metric(run_id, "success", success, iteration=r)
        record["trajectories"] = (r + 1) * fb.images_per_round
    return _broadcast(acc, record)


def _image_attributes(images: np.ndarray, prompt: str) -> list[dict] | None:
    """The toy judge's colours, shapes and count per image, for toy-world prompts (else None)."""
    from ..toy.scenes import parse_prompt
    from .agreement import toy_image_attributes

    try:
        parse_prompt(prompt)
    except ValueError:
        return None  # not the toy world: the judge would describe shapes that are not there
    return toy_image_attributes(images)


@torch.no_grad()
def _record_embeddings(store: FeedbackStore, round_id: int, state: LoopState, inputs: torch.Tensor,
                       rewards: torch.Tensor) -> None:
    """Every image labelled so far, embedded by this round's encoder, and this round's rewards, into the store:
    what explains a reward later (feedback/embeddings.py)."""
    ids = store.get_round(round_id).image_ids
    if ids and ids[0] in state.labeled_ids:  # a resumed session repeating a recorded round
        return
    state.labeled_ids += ids
    inputs = inputs.detach().cpu()
    state.labeled_inputs = inputs if state.labeled_inputs is None else torch.cat([state.labeled_inputs, inputs])
    encoder = state.hero.encoder
    encoder.eval()
    device = next(encoder.parameters()).device
    emb = encoder.embed(state.labeled_inputs.to(device)).float().cpu().numpy()  # (N_labelled, d)
    store.store_embeddings(round_id, state.labeled_ids, emb, dict(zip(ids, rewards.tolist(), strict=True)))


def _hero_inputs(hero: HERO, final_latents: torch.Tensor, traj: Trajectories, unet) -> torch.Tensor:
    """What HERO's encoder reads, on the CPU: the final latents, or the frozen UNet's features of them."""
    if hero.features is not None:
        return hero.features(final_latents, traj.conditioning([0]), unet=unet).cpu()
    return final_latents.cpu()


def _unlabeled(cfg: RunConfig, trainer: Trainer, hero: HERO, prompt: str, inputs: torch.Tensor, good: torch.Tensor,
               gen: torch.Generator, sample_gen: torch.Generator, unet) -> tuple[Trajectories, torch.Tensor, float]:
    """``hero.unlabeled_per_round`` more images of the round's prompt, rewarded by the embedding alone.

    Returns this process's extra trajectories, the rewards of everything trained on, laid out process by
    process (a process's labelled share, then its unlabelled share: what ``_local_slice`` expects), and the
    mean reward of the unlabelled images."""
    acc, world, rank = trainer.accelerator, trainer.world, trainer.rank
    n = cfg.hero.unlabeled_per_round
    noises = torch.randn(trainer.family.latent_shape(n), generator=gen)  # fresh: the same on every process
    mine = n // world
    # Undecoded: the embedding reads latents (or UNet features of them), never pixels.
    extra = sample_trajectories(trainer.pipe, [prompt] * mine, cfg.sample.num_steps, cfg.sample.guidance_scale,
                                cfg.sample.eta, generator=sample_gen, initial_noise=noises[rank * mine:(rank + 1) * mine],
                                reduction=cfg.sample.log_prob_reduction, decode=False, unet=unet)
    extra_inputs = _hero_inputs(hero, _gather_tensor(acc, extra.latents[:, -1]), extra, unet)
    # One call: "good-mean" compares with the labelled good images only (the unlabelled count as not good).
    both = hero.rewards(torch.cat([inputs, extra_inputs]), torch.cat([good, torch.zeros(n, dtype=torch.bool)]))
    labelled, unlabelled = both[:len(inputs)], both[len(inputs):]
    share = len(inputs) // world
    laid_out = torch.cat([torch.cat([labelled[p * share:(p + 1) * share], unlabelled[p * mine:(p + 1) * mine]])
                          for p in range(world)])
    return extra, laid_out, float(unlabelled.mean())


def _deal(pairs: list[tuple[int, int]], rank: int, world: int) -> list[tuple[int, int]]:
    """This process's pairs: every world-th pair of the round's list, cycled to a multiple of ``world``."""
    if not pairs:
        return []
    total = -(-len(pairs) // world) * world
    return [pairs[i % len(pairs)] for i in range(rank, total, world)]


def _broadcast(acc, obj):
    """The main process's ``obj`` on every process."""
    if acc.num_processes == 1:
        return obj
    from accelerate.utils import broadcast_object_list
    return broadcast_object_list([obj], from_process=0)[0]


def _gather_tensor(acc, t: torch.Tensor) -> torch.Tensor:
    """Concatenate every process's ``t`` along dim 0 (process order), on every process, on ``t``'s device."""
    if acc.num_processes == 1:
        return t
    return acc.gather(t.contiguous().to(acc.device)).to(t.device)


def _gather_trajectories(acc, traj: Trajectories) -> Trajectories:
    if acc.num_processes == 1:
        return traj
    from ..trainer import gather_objects

    prompts = [p for part in gather_objects(acc, traj.prompts) for p in part]
    return Trajectories(
        prompts=prompts, initial_noise=_gather_tensor(acc, traj.initial_noise),
        latents=_gather_tensor(acc, traj.latents), timesteps=traj.timesteps,
        log_probs=_gather_tensor(acc, traj.log_probs), guided_eps=_gather_tensor(acc, traj.guided_eps),
        cond_eps=_gather_tensor(acc, traj.cond_eps),
        prompt_embeds=_gather_tensor(acc, traj.prompt_embeds),
        negative_embeds=None if traj.negative_embeds is None else _gather_tensor(acc, traj.negative_embeds),
        images=_gather_tensor(acc, traj.images), metadata=[{} for _ in prompts],
        extra_cond={k: _gather_tensor(acc, v) for k, v in traj.extra_cond.items()},
    )


def _wait_on_main(acc, store: FeedbackStore | None, round_id: int | None, timeout: float | None, log,
                  interval: float = 60.0) -> None:
    """Several processes waiting for people: the main process polls the store in slices of ``interval``
    seconds and, after each, tells the others whether to go on, so no process sits in one collective for
    longer than that (a process group times out after 10-30 minutes; a person may take longer)."""
    start = time.monotonic()
    while True:
        status = None
        if acc.is_main_process:
            elapsed = time.monotonic() - start
            left = None if timeout is None else max(0.0, timeout - elapsed)

            def on_wait(t, submitted, required, elapsed=elapsed):
                log(f"waiting for labels on round {round_id}: {submitted} of {required} evaluator(s) submitted "
                    f"({elapsed + t:.0f} s); open the labeling app URL above")
            try:
                store.wait_for_round(round_id, timeout=interval if left is None else min(interval, left), on_wait=on_wait)
                status = "done"
            except TimeoutError as e:
                status = str(e) if left is not None and left <= interval else "waiting"
        status = _broadcast(acc, status)
        if status == "done":
            return
        if status != "waiting":
            raise TimeoutError(status)


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
