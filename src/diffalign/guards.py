"""Guards during training: catch a run that learns its reward by breaking something else (issue 18).

Every ``guards.every`` epochs the trainer samples a small fixed set of images (the same prompts and noises
each time; ``guards.seed``) with the LoRA on, and compares them with the base model's images from the same
noises (sampled once, at the first check, with the adapter switched off):

* **drift**: RMS pixel difference to the base images (``metrics.drift``) above ``guards.drift_max``;
* **diversity**: Vendi score per prompt (``metrics.diversity``) below ``guards.diversity_min_fraction`` of
  the base's;
* **held-out guard rewards**: scores the run does not optimise (``guards.rewards``, built like reward terms),
  below ``min_fraction`` of the base's mean or more than ``max_drop`` below it.

A tripped guard does what ``guards.action`` says: ``warn`` (log it, train on), ``stop`` (end the run; the
LoRA is saved as it is), or ``rollback`` (end the run with the trained weights of the best check so far at
which nothing tripped, by ``guards.best_by``; the weights before training if none passed). Alarms go to the
log, the tracker (``guard/*`` scalars) and ``metrics.jsonl`` (``guard/alarms``), whence the report shows them.

Why the same noises: with paired noise, drift and the guard rewards measure what the LoRA changed, not
sampling luck (as evaluate.py does). Every process runs the same check on the same weights, so they all
reach the same decision without a broadcast (an HTTP guard reward is then called once per process).
A resumed run starts a fresh best-so-far (the in-memory snapshot is not checkpointed) and checks on.
"""

from __future__ import annotations

import html
import time
from dataclasses import dataclass

import numpy as np
import torch

from .evaluate import generate
from .metrics import diversity, drift
from .prompts import resolve_prompts
from .rewards import build_reward


@dataclass
class Alarm:
    guard: str  # "drift", "diversity" or "reward:<name>"
    value: float
    limit: float
    base: float | None

    def message(self, epoch: int) -> str:
        base = "" if self.base is None else f" (base model {self.base:.4f})"
        if self.guard == "drift":
            return f"guard 'drift' tripped at epoch {epoch}: drift from base {self.value:.4f} > drift_max {self.limit:.4f}"
        return (f"guard '{self.guard}' tripped at epoch {epoch}: {self.value:.4f} < limit {self.limit:.4f}{base}")


def guard_prompts(cfg) -> list[str]:
    """Up to ``guards.num_prompts`` of the guard prompts, evenly spaced over the set (fixed for the run)."""
    g = cfg.guards
    prompts = resolve_prompts(g.prompts if g.prompts is not None else cfg.sample.prompts,
                              field="guards.prompts" if g.prompts is not None else "sample.prompts")
    if len(prompts) <= g.num_prompts:
        return prompts
    idx = np.linspace(0, len(prompts) - 1, g.num_prompts).round().astype(int)
    return [prompts[i] for i in dict.fromkeys(idx.tolist())]


def build_guard_rewards(terms) -> list:
    """One scorer per guard reward; errors name ``guards.rewards[i]``, not the training reward's field."""
    from .config import RewardTerm

    built = []
    for i, term in enumerate(terms):
        try:
            built.append(build_reward([RewardTerm(name=term.name, args=term.args)]))
        except ValueError as e:
            raise ValueError(str(e).replace("reward.terms[0]", f"guards.rewards[{i}]")) from None
    return built


class Guards:
    """The checks of one run. ``check`` is called by the trainer after each epoch; ``stopped`` says why it ended."""

    def __init__(self, cfg, pipe, unet, trained_params: list[torch.Tensor], log=print):
        self.cfg, self.g = cfg, cfg.guards
        self.pipe, self.unet, self.params, self.log = pipe, unet, trained_params, log
        self.prompts = guard_prompts(cfg)
        self.rewards = build_guard_rewards(self.g.rewards)
        self.base: dict | None = None  # measured lazily: a run shorter than `every` epochs pays nothing
        self.base_images: np.ndarray | None = None
        # Rollback target: the weights before training until a check passes.
        self.best = {"epoch": 0, "score": -np.inf, "weights": self._snapshot()}
        self.stopped: str | None = None

    def _snapshot(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params]

    def _images(self) -> tuple[list[str], np.ndarray]:
        s = self.cfg.sample
        out = generate(self.pipe, self.prompts, self.g.samples_per_prompt, self.g.seed, s.num_steps, s.guidance_scale,
                       s.eta, unet=self.unet)
        return out.prompts, out.images

    def _measure(self, prompts: list[str], images: np.ndarray) -> dict:
        m = {"diversity": diversity(images, prompts)}
        for term, reward in zip(self.g.rewards, self.rewards):
            total, _ = reward(images, prompts, [{} for _ in prompts], batch="guard")
            m[term.name] = float(np.mean(total))
        return m

    @torch.no_grad()
    def measure_base(self) -> dict:
        was_training = self.unet.training
        self.unet.eval()
        self.unet.disable_adapters()
        try:
            prompts, self.base_images = self._images()
        finally:
            self.unet.enable_adapters()
            self.unet.train(was_training)
        self.base = self._measure(prompts, self.base_images)
        return self.base

    def due(self, epoch: int) -> bool:
        return bool(self.g.every) and epoch % self.g.every == 0

    @torch.no_grad()
    def check(self, epoch: int, metrics: dict) -> dict:
        """Measure after ``epoch`` epochs (1-based); returns ``guard/*`` fields for the epoch's metrics."""
        if not self.due(epoch):
            return {}
        t0 = time.time()
        if self.base is None:
            self.measure_base()
        was_training = self.unet.training
        self.unet.eval()
        try:
            prompts, images = self._images()
        finally:
            self.unet.train(was_training)
        now = self._measure(prompts, images)
        now["drift"] = drift(self.base_images, images)
        alarms = self.alarms(now)
        fields = {f"guard/{k}": v for k, v in now.items()}
        fields |= {f"guard/{k}_base": v for k, v in self.base.items()}
        fields["guard/tripped"] = len(alarms)
        messages = [a.message(epoch) for a in alarms]
        if messages:
            fields["guard/alarms"] = messages
            for msg in messages:
                self.log(f"warning: {msg} (guards.action = {self.g.action})")
            if self.g.action != "warn":
                self.stopped = "; ".join(messages)
            if self.g.action == "rollback":
                self.rollback()
                fields["guard/rolled_back_to_epoch"] = self.best["epoch"]
        else:
            score = metrics.get("reward_mean", np.nan) if self.g.best_by == "reward_mean" else now[self.g.best_by]
            if np.isfinite(score) and score >= self.best["score"]:
                self.best = {"epoch": epoch, "score": float(score), "weights": self._snapshot()}
        fields["time_guards"] = time.time() - t0
        return fields

    def alarms(self, now: dict) -> list[Alarm]:
        g, base = self.g, self.base
        found = []
        if g.drift_max is not None and now["drift"] > g.drift_max:
            found.append(Alarm("drift", now["drift"], g.drift_max, None))
        if g.diversity_min_fraction is not None:
            limit = g.diversity_min_fraction * base["diversity"]
            if now["diversity"] < limit:
                found.append(Alarm("diversity", now["diversity"], limit, base["diversity"]))
        for term in g.rewards:
            limits = []
            if term.min_fraction is not None:
                limits.append(term.min_fraction * base[term.name])
            if term.max_drop is not None:
                limits.append(base[term.name] - term.max_drop)
            limit = max(limits)  # the stricter of the two
            if now[term.name] < limit:
                found.append(Alarm(f"reward:{term.name}", now[term.name], limit, base[term.name]))
        return found

    def rollback(self) -> None:
        for p, saved in zip(self.params, self.best["weights"]):
            p.data.copy_(saved)
        what = "the weights before training" if self.best["epoch"] == 0 else \
            f"epoch {self.best['epoch']} ({self.g.best_by} {self.best['score']:.4f})"
        self.log(f"guards: rolled back to {what}, the best check at which no guard tripped")


def guards_html(history: list[dict]) -> str:
    """The report's section: one row per check, tripped values marked, alarms listed."""
    checks = [h for h in history if "guard/tripped" in h]
    if not checks:
        return ""
    keys = [k for k in dict.fromkeys(k for h in checks for k in h) if k.startswith("guard/")
            and k not in ("guard/tripped", "guard/alarms", "guard/rolled_back_to_epoch") and not k.endswith("_base")]
    head = "".join(f"<th>{html.escape(k.removeprefix('guard/'))}</th>" for k in keys)
    base = checks[0]
    base_row = "".join(f"<td>{base[k + '_base']:.4f}</td>" if k + "_base" in base else "<td></td>" for k in keys)
    rows = [f"<tr><td>base</td>{base_row}<td></td></tr>"]
    for h in checks:
        cells = "".join(f"<td>{h[k]:.4f}</td>" if k in h else "<td></td>" for k in keys)
        status = "tripped" if h["guard/tripped"] else "ok"
        style = " style='background:#fdd'" if h["guard/tripped"] else ""
        rows.append(f"<tr{style}><td>epoch {h['epoch']}</td>{cells}<td>{status}</td></tr>")
    alarms = [m for h in checks for m in h.get("guard/alarms", [])]
    rolled = [h["guard/rolled_back_to_epoch"] for h in checks if "guard/rolled_back_to_epoch" in h]
    notes = "".join(f"<li>{html.escape(m)}</li>" for m in alarms)
    if rolled:
        notes += f"<li>rolled back to the weights of epoch {rolled[-1]} (0 = before training)</li>"
    return ("<h2>Guards</h2><table><tr><th>check</th>" + head + "<th>status</th></tr>" + "".join(rows) + "</table>"
            + (f"<h3>Alarms</h3><ul class='alarms'>{notes}</ul>" if notes else "<p>No guard tripped.</p>"))
