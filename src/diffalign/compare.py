"""``diffalign compare A B``: a blind A/B evaluation of two models on the same prompts and the same noise.

Each side is a finished run directory (its base model with its LoRA), a LoRA directory (with ``--model``
naming its base model unless it sits in a run directory), or ``base`` (the base model itself). Both sides
sample every (prompt, sample) from the same seed-determined initial noise *and* the same DDIM step noise
(``evaluate.generate`` re-seeds one generator per batch identically for each side), so only the model
differs within a pair. The pairs go into the feedback store (``feedback/comparisons.py``) with the side A is
shown on drawn per pair; people pick in the labeling app (``/compare/<id>``), or ``--evaluator simulated``
picks with the toy judge: the image with the higher toy reward (the judge's partial score), "no
preference" when the two are equal. The statistics and the verdict are in ``abtest.py``; the HTML report
in ``abreport.py``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .abtest import check_gate, check_ties, summarise

LORA_FILE = "pytorch_lora_weights.safetensors"


@dataclass
class Side:
    """One model of a comparison: a base model, with a LoRA or not."""

    spec: str  # what the user typed
    model_id: str
    lora_dir: Path | None = None
    run_dir: Path | None = None
    revision: str | None = None

    @property
    def label(self) -> str:
        return self.spec if self.lora_dir is None else f"{self.spec} (LoRA on {self.model_id})"


def resolve_side(spec: str, model: str | None, which: str) -> Side:
    """``base``, a run directory or a LoRA directory -> :class:`Side` (``model`` fills in a base model)."""
    if spec == "base":
        return Side(spec, model or "toy")
    path = Path(spec)
    if (path / "config.toml").is_file() and (path / "lora" / LORA_FILE).is_file():
        from .config import load_config

        cfg = load_config(path / "config.toml")
        return Side(spec, cfg.model.id, path / "lora", path, cfg.model.revision)
    if (path / LORA_FILE).is_file():
        run = path.parent if (path.parent / "config.toml").is_file() else None
        if run is not None:
            from .config import load_config

            cfg = load_config(run / "config.toml")
            return Side(spec, model or cfg.model.id, path, run, cfg.model.revision)
        if model is None:
            raise ValueError(f"{which}: {spec} is a LoRA outside a run directory, so its base model is unknown; pass "
                             f"--model with the base model it was trained on (e.g. --model toy)")
        return Side(spec, model, path)
    raise ValueError(f"{which}: {spec!r} is neither 'base', a finished run directory (config.toml and "
                     f"lora/{LORA_FILE}) nor a LoRA directory ({LORA_FILE}); give one of those")


def resolve_sides(a: str, b: str, model: str | None = None) -> tuple[Side, Side]:
    """Both sides; ``base`` means the other side's base model when ``--model`` is not given."""
    side_a = resolve_side(a, model, "A") if a != "base" else None
    side_b = resolve_side(b, model, "B") if b != "base" else None
    tuned = side_a or side_b
    default = model or (tuned.model_id if tuned is not None else "toy")
    revision = tuned.revision if tuned is not None and model is None else None
    return (side_a or Side("base", default, revision=revision)), (side_b or Side("base", default, revision=revision))


def load_side(side: Side):
    from .pipeline import load_pipeline

    pipe = load_pipeline(side.model_id, side.revision)
    if side.lora_dir is not None:
        pipe.load_lora_weights(str(side.lora_dir))
    return pipe


@dataclass
class CompareSettings:
    """How the pairs are made and judged; stored with the comparison, so its results are always computed alike."""

    prompts: str | list[str] = "hard_counting"
    samples_per_prompt: int = 16
    seed: int = 1234
    num_steps: int = 20
    guidance_scale: float = 4.0
    eta: float = 1.0
    batch_size: int = 16
    ties: str = "half"
    gate: float = 0.5
    safety_filter: str | None = None
    safety_threshold: float = 0.5

    def __post_init__(self) -> None:
        for name in ("samples_per_prompt", "num_steps", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}: must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"eta: must be in [0, 1], got {self.eta}")
        check_ties(self.ties)
        check_gate(self.gate)


def generate_pairs(side_a: Side, side_b: Side, s: CompareSettings, log=print):
    """(prompts, images of A, images of B, initial-noise shape): every image pair from the same noises."""
    from .evaluate import generate
    from .families import family_for
    from .prompts import resolve_prompts

    prompts = resolve_prompts(s.prompts, "prompts")
    out, shapes = [], []
    for side in (side_a, side_b):  # one pipeline in memory at a time
        log(f"sampling {len(prompts) * s.samples_per_prompt} images of {side.label}")
        pipe = load_side(side)
        shapes.append(family_for(pipe).latent_shape(1))
        if shapes[0] != shapes[-1]:
            raise ValueError(f"A and B sample latents of different shapes ({shapes[0]} vs {shapes[-1]}): they cannot "
                             f"share initial noise, so a pair would differ by more than the model; compare models "
                             f"of one base architecture")
        out.append(generate(pipe, prompts, s.samples_per_prompt, s.seed, s.num_steps, s.guidance_scale, s.eta,
                            batch_size=s.batch_size))
        del pipe
    return out[0].prompts, out[0].images, out[1].images, shapes[0]


def flag_pairs(s: CompareSettings, prompts: list[str], images_a, images_b) -> list[dict]:
    """Per-pair metadata: the safety filter's reason for each side it flags (none without a filter)."""
    meta = [{"sample": i % s.samples_per_prompt} for i in range(len(prompts))]
    if s.safety_filter is None:
        return meta
    from .safety import build_filter, flag_reasons

    filter_ = build_filter(s.safety_filter)
    for key, images in (("flagged_a", images_a), ("flagged_b", images_b)):
        for m, reason in zip(meta, flag_reasons(filter_, s.safety_threshold, images, prompts), strict=True):
            if reason:
                m[key] = reason
    return meta


@dataclass
class SimulatedJudge:
    """Picks like a person with the toy judge's eyes: the side whose image has the higher partial score,
    'none' when they are equal. It sees what the page shows (left and right), nothing else."""

    name: str = "sim-judge"

    def judge(self, store, comparison_id: int) -> int:
        """Pick every pair this judge has not decided yet; returns how many picks it made."""
        from .toy.judge import judge_batch

        made = 0
        while (pair := store.next_pair(comparison_id, self.name)["pair"]) is not None:
            left, right = (store.load_pair_image(pair["id"], side) for side in ("left", "right"))
            _, partial, _ = judge_batch(np.stack([left, right]), [pair["prompt"]] * 2)
            shown = "left" if partial[0] > partial[1] else "right" if partial[1] > partial[0] else "none"
            store.choose(pair["id"], self.name, shown)
            made += 1
        return made


def comparison_results(store, comparison_id: int) -> dict:
    """The summary (abtest.summarise) of a comparison under the tie rule and gate stored with it."""
    info = store.get_comparison(comparison_id)
    st = info["settings"]
    result = summarise(store.comparison_choices(comparison_id), info["pairs"], st.get("ties", "half"),
                       st.get("gate", 0.5))
    flagged = [p for p in store.pairs(comparison_id) if any(k.startswith("flagged_") for k in p["metadata"])]
    return result | {"comparison": info["name"], "comparison_id": comparison_id, "model_a": info["model_a"],
                     "model_b": info["model_b"], "settings": st, "created_by": info["created_by"],
                     "flagged_pairs": len(flagged)}


def default_name(side_a: Side, side_b: Side, s: CompareSettings) -> str:
    """A name that does not reveal the models (evaluators see it): ``ab-`` and a hash of what is compared."""
    key = json.dumps([side_a.label, side_b.label, asdict(s)], sort_keys=True, default=str)
    return "ab-" + hashlib.sha256(key.encode()).hexdigest()[:8]


def run_compare(a: str, b: str, settings: CompareSettings, out_dir: str | Path, model: str | None = None,
                evaluator: str = "simulated", name: str | None = None, store_dir: str | Path | None = None,
                by: str = "cli", log=print) -> dict:
    """Generate the pairs, store them, have them judged (``simulated``) or served (``human``), and report.

    Returns ``{"comparison_id", "store", "url", "result" (None until someone picked), "report"}``.
    """
    from .feedback.store import FeedbackStore

    if evaluator not in ("simulated", "human"):
        raise ValueError(f"evaluator: {evaluator!r} is not 'simulated' (the toy judge) or 'human' (the labeling app)")
    side_a, side_b = resolve_sides(a, b, model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = name or default_name(side_a, side_b, settings)
    prompts, images_a, images_b, shape = generate_pairs(side_a, side_b, settings, log)
    meta = flag_pairs(settings, prompts, images_a, images_b)
    stored = asdict(settings) | {"latent_shape": list(shape), "run_dir_a": str(side_a.run_dir or ""),
                                 "run_dir_b": str(side_b.run_dir or "")}
    with FeedbackStore(store_dir or out_dir / "feedback") as store:
        cid = store.create_comparison(name, side_a.label, side_b.label, prompts, list(images_a), list(images_b),
                                      settings=stored, created_by=by, seed=settings.seed, pair_metadata=meta)
        if evaluator == "simulated":
            SimulatedJudge().judge(store, cid)
        result, report = finish_comparison(store, cid, out_dir)
        return {"comparison_id": cid, "store": str(store.directory), "url": f"/compare/{cid}", "result": result,
                "report": report, "name": name}


def finish_comparison(store, comparison_id: int, out_dir: str | Path) -> tuple[dict, Path]:
    """Results, ``compare.json`` and ``compare_report.html`` in ``out_dir``; with picks, the verdict goes into
    the model card of each side that is a run directory."""
    from .abreport import write_compare_report

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = comparison_results(store, comparison_id)
    report = write_compare_report(store, comparison_id, result, out_dir / "compare_report.html")
    (out_dir / "compare.json").write_text(json.dumps(result, indent=1))
    if result["picks"]:
        for role in ("a", "b"):
            run_dir = result["settings"].get(f"run_dir_{role}")
            if run_dir and Path(run_dir).is_dir():
                record_verdict(Path(run_dir), role.upper(), result, report)
    return result, report


def record_verdict(run_dir: Path, role: str, result: dict, report: Path) -> None:
    """Append the verdict to a run's ``ab_tests.jsonl`` and rewrite its model card (which shows the latest
    entry of each comparison: re-computed results after more picks supersede earlier ones)."""
    entry = {"comparison": result["comparison"], "role": role, "model_a": result["model_a"],
             "model_b": result["model_b"], "overall": result["overall"], "ties": result["ties"],
             "gate": result["gate"], "verdict": result["verdict"], "picks": result["picks"],
             "evaluators": sorted(result["per_evaluator"]), "report": str(report)}
    with open(run_dir / "ab_tests.jsonl", "a") as f:
        f.write(json.dumps(entry) + "\n")
    if (run_dir / "lora").is_dir():
        from .modelcard import write_model_card

        write_model_card(run_dir)
