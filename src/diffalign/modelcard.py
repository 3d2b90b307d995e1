"""A model card per run: ``<run>/lora/README.md`` in the Hugging Face model-card format (issue 18, item 5).

The file is YAML metadata between ``---`` lines, then Markdown, as huggingface_hub's ``ModelCard`` reads and
writes it (https://huggingface.co/docs/hub/model-cards), so ``huggingface_hub.upload_folder`` can publish
``lora/`` as it is. It records what shaped the LoRA: the base model and revision, the algorithm and its
settings, the rewards, the guards and what they measured, the before/after evaluation (once ``eval.json``
exists), for feedback runs the labels used and who gave them, and the command that repeats the run.

Written by the trainer when a run finishes and again by ``diffalign eval`` (which adds the evaluation).
Secrets stay out: values under keys that name credentials (headers, tokens, passwords, API keys) and the
user/query parts of URLs are replaced by ``<redacted>`` before anything is written.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

SECRET_KEY = re.compile(r"token|secret|passw|api[_-]?key|auth|header|cookie|credential", re.IGNORECASE)
REDACTED = "<redacted>"


def redact(value, key: str = ""):
    """A copy of ``value`` (nested dicts/lists of config) with credentials replaced by ``<redacted>``."""
    if key and SECRET_KEY.search(key) and value not in (None, "", {}, []):
        return REDACTED
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, key) for v in value]
    if isinstance(value, str) and value.startswith(("http://", "https://")):
        parts = urlsplit(value)
        netloc = parts.netloc.rsplit("@", 1)[-1] if "@" in parts.netloc else parts.netloc
        netloc = f"{REDACTED}@{netloc}" if "@" in parts.netloc else netloc
        return urlunsplit((parts.scheme, netloc, parts.path, REDACTED if parts.query else "", ""))
    return value


def _is_hub_id(model_id: str) -> bool:
    """'org/name' that is not a local path: what the Hub accepts as ``base_model``."""
    return (re.fullmatch(r"[\w.-]+/[\w.-]+", model_id) is not None and not Path(model_id).exists())


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def _metadata(cfg, history: list[dict]) -> dict:
    feedback = any("labels_used" in h for h in history)
    algorithm = cfg.feedback.algorithm if feedback else cfg.train.algorithm
    tags = ["diffusers", "lora", "text-to-image", "stable-diffusion", "diffalign", algorithm]
    tags += [] if feedback else [t.name for t in cfg.reward.terms if t.name not in ("python", "http")]
    tags += ["human-feedback"] if feedback else []
    meta = {"library_name": "diffusers", "license": "other", "pipeline_tag": "text-to-image",
            "tags": list(dict.fromkeys(tags))}
    if _is_hub_id(cfg.model.id):
        meta = {"base_model": cfg.model.id, "base_model_relation": "adapter"} | meta
    return meta


def _table(rows: list[tuple], header: tuple) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _guards_section(cfg, history: list[dict]) -> str:
    g = cfg.guards
    checks = [h for h in history if "guard/tripped" in h]
    limits = [f"drift_max = {g.drift_max}" if g.drift_max is not None else None,
              f"diversity_min_fraction = {g.diversity_min_fraction}" if g.diversity_min_fraction is not None else None]
    limits += [f"guard reward `{r.name}` ({json.dumps(redact(r.args))}): min_fraction = {r.min_fraction}, "
               f"max_drop = {r.max_drop}" for r in g.rewards]
    text = [f"Every {g.every} epochs (0 = off) on {g.samples_per_prompt} images per prompt from seed {g.seed}; action "
            f"on a trip: **{g.action}** (best by `{g.best_by}`). Limits: " + ("; ".join(x for x in limits if x) or "none")
            + "."]
    if not checks:
        text.append("\nNo check ran (the run was shorter than `guards.every` epochs, or guards were off).")
        return "\n".join(text)
    keys = [k for k in dict.fromkeys(k for h in checks for k in h) if k.startswith("guard/")
            and not k.endswith("_base") and k not in ("guard/alarms", "guard/rolled_back_to_epoch")]
    base = checks[0]
    rows = [("base", *[_fmt(base.get(k + "_base", "")) for k in keys])]
    rows += [(f"epoch {h['epoch']}", *[_fmt(h.get(k, "")) for k in keys]) for h in checks]
    text += ["", _table(rows, ("check", *[k.removeprefix("guard/") for k in keys]))]
    alarms = [m for h in checks for m in h.get("guard/alarms", [])]
    text += ["", "Alarms:" if alarms else "No guard tripped."] + [f"- {m}" for m in alarms]
    rolled = [h["guard/rolled_back_to_epoch"] for h in checks if "guard/rolled_back_to_epoch" in h]
    if rolled:
        text.append(f"- The LoRA was rolled back to the weights of epoch {rolled[-1]} (0 = before training).")
    return "\n".join(text)


def _feedback_section(cfg, history: list[dict], run_dir: Path) -> str:
    fb = cfg.feedback
    rounds = [h for h in history if "labels_used" in h]
    text = [f"Algorithm {fb.algorithm}, {len(rounds)} of {fb.rounds} rounds of {fb.images_per_round} images, "
            f"{fb.evaluators_required} evaluator(s) per round; labels used: {rounds[-1]['labels_used']}."]
    prompts = list(dict.fromkeys(h["prompt"] for h in rounds if "prompt" in h))
    if prompts:
        text.append("Prompts: " + "; ".join(f"`{p}`" for p in prompts) + ".")
    store_dir = Path(fb.store_dir) if fb.store_dir else run_dir / "feedback"
    evaluators = _evaluators(store_dir, run_dir.name)
    if evaluators is not None:
        text.append("Evaluators (labels given): " + (", ".join(f"{e} ({n})" for e, n in evaluators.items()) or "none")
                    + ".")
    return "\n".join(text)


def _evaluators(store_dir: Path, run_name: str) -> dict[str, int] | None:
    """Images labelled per evaluator in the feedback store, over the store's runs of this name; None if no store."""
    from .feedback.store import DB_NAME, FeedbackStore

    if not (store_dir / DB_NAME).is_file():  # FeedbackStore() would create an empty one
        return None

    counts: dict[str, int] = {}
    with FeedbackStore(store_dir) as store:
        for run in store.list_runs():
            if run["name"] != run_name:
                continue
            for r in store.run_summary(run["id"])["rounds"]:
                for e in r["evaluators_submitted"]:
                    counts[e] = counts.get(e, 0) + r["n_images"]
    return counts


def _ab_section(run_dir: Path) -> str:
    """The verdicts of ``diffalign compare`` runs that involved this run (``ab_tests.jsonl``, latest per comparison)."""
    latest = {e["comparison"]: e for e in _read_jsonl(run_dir / "ab_tests.jsonl")}
    if not latest:
        return ("None run yet: `diffalign compare base <run>` has evaluators (or the toy judge) pick between this "
                "LoRA and the base model, blind, and records the verdict here.")
    rows = []
    for e in latest.values():
        o = e["overall"]
        rate = "–" if o["rate"] is None else f"{o['rate']:.3f} [{o['low']:.3f}, {o['high']:.3f}]"
        rows.append((e["comparison"], f"{e['role']} (A = `{e['model_a']}`, B = `{e['model_b']}`)",
                     f"{o['wins']} / {o['losses']} / {o['ties']}", rate, f"**{e['verdict']['decision']}**",
                     ", ".join(e["evaluators"])))
    ties = {e["ties"] for e in latest.values()}
    note = ("a tie counts as half a win" if ties == {"half"} else "ties left out" if ties == {"exclude"}
            else "tie rule per comparison (see its report)")
    return (f"B's win rate over A with a 95% Wilson interval ({note}); verdict against each comparison's gate "
            f"(ship if the lower bound is above it).\n\n"
            + _table(rows, ("comparison", "this run is", "B / A / no preference", "B's win rate", "verdict",
                            "evaluators")))


def render_model_card(run_dir: str | Path, cfg=None) -> str:
    """The card's text, from ``config.toml``, ``metrics.jsonl`` and ``eval.json`` of the run."""
    import yaml

    from . import __version__
    from .config import load_config

    run_dir = Path(run_dir)
    cfg = cfg if cfg is not None else load_config(run_dir / "config.toml")
    history = _read_jsonl(run_dir / "metrics.jsonl")
    feedback = any("labels_used" in h for h in history)
    meta = _metadata(cfg, history)
    algorithm = cfg.feedback.algorithm if feedback else cfg.train.algorithm
    last = history[-1] if history else {}
    revision = cfg.model.revision or "(default branch)"
    body = [f"# {run_dir.name}: a LoRA tuned with diffalign", "",
            f"A LoRA (rank {cfg.model.lora_rank}, alpha {cfg.model.lora_alpha}, on "
            f"{', '.join(cfg.model.lora_target_modules)}) for `{cfg.model.id}` at revision {revision}, trained by "
            f"diffalign {__version__} with **{algorithm}**.", "",
            "```python", "from diffusers import DiffusionPipeline", "",
            f"pipe = DiffusionPipeline.from_pretrained({cfg.model.id!r}"
            + (f", revision={cfg.model.revision!r})" if cfg.model.revision else ")"),
            'pipe.load_lora_weights("path/to/this/directory")', "```", "",
            "License: `license: other` above is a placeholder; set it before publishing (the base model's license "
            "governs its weights).", "", "## Training", ""]
    if history:
        body.append(f"{last.get('epoch', last.get('round', '?'))} epochs/rounds done of "
                    f"{cfg.feedback.rounds if feedback else cfg.train.epochs} configured; "
                    f"{last.get('trajectories', '?')} trajectories, {last.get('optimizer_steps', '?')} optimizer steps, "
                    f"seed {cfg.train.seed}.")
    stopped = [m for h in history for m in h.get("guard/alarms", [])] if cfg.guards.action != "warn" else []
    if stopped:
        body.append(f"The run was ended early by its guards ({cfg.guards.action}).")
    if not feedback:
        body += ["", "## Rewards", "", _table([(t.name, t.weight, json.dumps(redact(t.args)) if t.args else "")
                                              for t in cfg.reward.terms], ("reward", "weight", "arguments"))]
        if history:
            first = history[0].get("reward_mean")
            body.append(f"\nMean training reward: {_fmt(first)} in the first epoch, {_fmt(last.get('reward_mean'))} "
                        f"in the last.")
    else:
        body += ["", "## Human feedback", "", _feedback_section(cfg, history, run_dir)]
    body += ["", "## Guards", "", _guards_section(cfg, history)]
    evaluation = json.loads((run_dir / "eval.json").read_text()) if (run_dir / "eval.json").is_file() else None
    if evaluation:
        rows = [(k, _fmt(evaluation["base"][k]), _fmt(evaluation["tuned"][k]))
                for k in ("reward_mean", "success", "partial", "diversity") if k in evaluation["base"]]
        rows.append(("drift from base (RMS pixel)", "", _fmt(evaluation["drift"])))
        body += ["", "## Evaluation: before and after", "",
                 f"{evaluation['num_images']} images from fixed seeds (seed {cfg.eval.seed}), the same noises for the "
                 f"base model and the tuned one; prompts `{evaluation['prompts']}`.", "",
                 _table(rows, ("metric", "base", "tuned"))]
    else:
        body += ["", "## Evaluation", "", "Not run yet: `diffalign eval <run>` measures base vs tuned and rewrites "
                 "this card."]
    body += ["", "## Blind A/B evaluation", "", _ab_section(run_dir)]
    command = "feedback" if feedback else "train"
    body += ["", "## Reproduce", "",
             "The resolved configuration (credentials redacted; put them back if a reward needs them):", "",
             "```toml", _toml(cfg), "```", "",
             "Save it as `config.toml` and run, with the same diffalign version (seeded: the same samples and "
             "updates on the same hardware and library versions):", "",
             "```bash", f"pip install diffalign=={__version__}",
             f"diffalign {command} --config config.toml --set output_dir='\"runs/{run_dir.name}-reproduced\"'"
             + (" --evaluator simulated  # or human, as the original run" if feedback else ""), "```"]
    front = yaml.safe_dump(meta, sort_keys=False).strip()
    return f"---\n{front}\n---\n\n" + "\n".join(body) + "\n"


def _toml(cfg) -> str:
    import tomli_w

    return tomli_w.dumps(redact(cfg.model_dump(mode="json", exclude_none=True))).strip()


def write_model_card(run_dir: str | Path, cfg=None) -> Path:
    """Write ``<run>/lora/README.md`` (the LoRA directory must exist)."""
    run_dir = Path(run_dir)
    lora = run_dir / "lora"
    if not lora.is_dir():
        raise FileNotFoundError(f"{run_dir} has no lora/ directory: the model card goes next to a finished run's LoRA")
    path = lora / "README.md"
    path.write_text(render_model_card(run_dir, cfg))
    return path
