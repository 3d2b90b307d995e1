"""Measure the toy pipeline with the judge and write its model card (``diffalign toy card``).

Rates, per prompt family, on training and held-out prompts, from fixed seeds with the sampler the
alignment uses (DDIM, eta 1, CFG 4, 20 steps):

* colour accuracy: the image has at least one object and every detected object has the asked colour;
* shape accuracy: at least one object and every object has the asked shape;
* count success: the judge's success on a count prompt (exact count, colour and shape, nothing extra);
* relation success: the judge's success on a relation prompt.

Also writes ``toy/prompts/hard_counting.txt``: the training count prompts whose success is <= 30%, the
starting point of the alignment benchmarks.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .judge import judge_batch
from .prompts import PROMPT_DIR, load_prompts
from .scenes import COLORS, parse_prompt

HARD_THRESHOLD = 0.30


@dataclass
class CardSettings:
    samples_count: int = 16
    samples_relation: int = 4
    num_steps: int = 20
    guidance_scale: float = 4.0
    eta: float = 1.0
    seed: int = 2024


def _rates(prompts: list[str], images: np.ndarray) -> dict:
    success, partial, judgements = judge_batch(images, prompts)
    rows = []
    for p, s, part, j in zip(prompts, success, partial, judgements):
        spec = parse_prompt(p)
        objs = j.objects
        row = {"prompt": p, "family": spec.family, "success": bool(s), "partial": float(part), "n_objects": len(objs)}
        if spec.family == "count":
            row["color_ok"] = bool(objs) and all(o.color == spec.color for o in objs)
            row["shape_ok"] = bool(objs) and all(o.shape == spec.shape for o in objs)
            row["count_ok"] = len(objs) == spec.count
            row["color"] = spec.color
        rows.append(row)
    return rows


def _summary(rows: list[dict]) -> dict:
    out = {}
    for family in ("count", "relation"):
        fam = [r for r in rows if r["family"] == family]
        if not fam:
            continue
        d = {"n": len(fam), "success": float(np.mean([r["success"] for r in fam])),
             "partial": float(np.mean([r["partial"] for r in fam]))}
        if family == "count":
            d["color"] = float(np.mean([r["color_ok"] for r in fam]))
            d["shape"] = float(np.mean([r["shape_ok"] for r in fam]))
            d["count"] = float(np.mean([r["count_ok"] for r in fam]))
            d["color_by_colour"] = {c: float(np.mean([r["color_ok"] for r in fam if r["color"] == c]))
                                    for c in COLORS if any(r["color"] == c for r in fam)}
        out[family] = d
    return out


def measure(pipe, settings: CardSettings | None = None, log=print) -> dict:
    from ..evaluate import generate

    s = settings or CardSettings()
    sets = {
        "train_count": (load_prompts("eval_count"), s.samples_count),
        "heldout_count": ([p for p in load_prompts("heldout") if parse_prompt(p).family == "count"], s.samples_count),
        "train_relation": (load_prompts("eval_relation"), s.samples_relation),
        "heldout_relation": ([p for p in load_prompts("heldout") if parse_prompt(p).family == "relation"],
                             s.samples_relation),
    }
    results, images_by_set = {}, {}
    for name, (prompts, n) in sets.items():
        t0 = time.time()
        imgs = generate(pipe, prompts, n, s.seed, s.num_steps, s.guidance_scale, s.eta)
        rows = _rates(imgs.prompts, imgs.images)
        results[name] = {"summary": _summary(rows), "rows": rows}
        images_by_set[name] = imgs
        log(f"{name}: {len(rows)} images in {time.time() - t0:.0f}s: {json.dumps(_summary(rows))}")
    per_prompt = {}
    for r in results["train_count"]["rows"]:
        per_prompt.setdefault(r["prompt"], []).append(r["success"])
    results["per_prompt_count_success"] = {p: float(np.mean(v)) for p, v in per_prompt.items()}
    results["settings"] = s.__dict__
    return results | {"_images": images_by_set}


def write_card(results: dict, out_dir: Path, model_dir: Path, command: str, training: dict | None) -> Path:
    from PIL import Image

    from ..report import image_grid

    out_dir.mkdir(parents=True, exist_ok=True)
    imgs = results["_images"]["train_count"]
    # Grid: 8 prompts (one per row) x 8 samples.
    chosen = ["one red circle", "two blue squares", "three green triangles", "four yellow circles",
              "one yellow triangle", "two red triangles", "three red squares", "four green squares"]
    rows = []
    for p in chosen:
        idx = [i for i, q in enumerate(imgs.prompts) if q == p][:8]
        rows.extend(imgs.images[i] for i in idx)
    Image.fromarray(image_grid(np.stack(rows), columns=8, scale=2)).save(out_dir / "toy_count_samples.png")
    rel = results["_images"]["train_relation"]
    Image.fromarray(image_grid(rel.images[:32], columns=8, scale=2)).save(out_dir / "toy_relation_samples.png")

    hard = sorted(p for p, v in results["per_prompt_count_success"].items() if v <= HARD_THRESHOLD)
    (PROMPT_DIR / "hard_counting.txt").write_text(
        f"# count prompts with base success <= {HARD_THRESHOLD:.0%} ({results['settings']['samples_count']} samples "
        f"each, written by `diffalign toy card`)\n" + "\n".join(hard) + "\n")

    def fmt(x):
        return f"{100 * x:.1f}%"

    lines = ["# Toy pipeline model card", "",
             "A tiny Stable Diffusion pipeline (AutoencoderKL, UNet2DConditionModel, CLIP text encoder with a "
             "word-level CLIP BPE tokenizer, DDIM scheduler with `clip_sample=False`) trained from scratch on the "
             "toy world of `diffalign.toy.scenes`: 64x64 scenes of coloured circles, squares and triangles.",
             "It exists so that every feature, test and benchmark of diffalign runs on a real diffusers pipeline "
             "without a model hub. Load it with stock diffusers:", "",
             "```python", "from diffusers import StableDiffusionPipeline",
             "from diffalign.pipeline import TOY_MODEL_DIR",
             "pipe = StableDiffusionPipeline.from_pretrained(TOY_MODEL_DIR)",
             'image = pipe("two red circles", num_inference_steps=20, guidance_scale=4.0).images[0]', "```", "",
             "## Training", "", f"Command: `{command}`", ""]
    if training:
        lines += [f"- {k}: {v}" for k, v in training.items()] + [""]
    size = sum(f.stat().st_size for f in model_dir.rglob("*") if f.is_file())
    lines += [f"Size on disk: {size / 1e6:.1f} MB (safetensors, fp32).", "",
              "## Measured rates of the base model", "",
              f"Sampler: DDIM eta {results['settings']['eta']}, {results['settings']['num_steps']} steps, "
              f"CFG {results['settings']['guidance_scale']}, fixed seeds (seed {results['settings']['seed']}). "
              "Judged by `diffalign.toy.judge` (see docs/judge.md).", "",
              "| prompt set | images | colour | shape | exact count | success (judge) | mean partial |",
              "|---|---|---|---|---|---|---|"]
    for name in ("train_count", "heldout_count"):
        s = results[name]["summary"]["count"]
        lines.append(f"| {name} | {s['n']} | {fmt(s['color'])} | {fmt(s['shape'])} | {fmt(s['count'])} | "
                     f"{fmt(s['success'])} | {s['partial']:.3f} |")
    for name in ("train_relation", "heldout_relation"):
        s = results[name]["summary"]["relation"]
        lines.append(f"| {name} | {s['n']} | | | | {fmt(s['success'])} (relation) | {s['partial']:.3f} |")
    lines += ["", "Colour accuracy per colour (training count prompts): " + ", ".join(
        f"{c} {fmt(v)}" for c, v in results["train_count"]["summary"]["count"]["color_by_colour"].items()), "",
              "Success per training count prompt:", "", "| prompt | success |", "|---|---|"]
    for p, v in sorted(results["per_prompt_count_success"].items(), key=lambda kv: kv[1]):
        lines.append(f"| {p} | {fmt(v)} |")
    lines += ["", f"## Hard prompts (base success <= {HARD_THRESHOLD:.0%})", "",
              "Written to `src/diffalign/toy/prompts/hard_counting.txt`; the alignment benchmarks start from these:",
              ""] + [f"- {p}" for p in hard] + [
              "", "## Samples", "", "Count prompts (rows: " + "; ".join(chosen) + "):", "",
              "![count samples](toy_count_samples.png)", "", "Relation prompts (first 32 evaluation images):", "",
              "![relation samples](toy_relation_samples.png)", "",
              "## Judge hard cases", "", "See [judge.md](judge.md) and its figure `judge_hard_cases.png`.", ""]
    card = out_dir / "toy_model_card.md"
    card.write_text("\n".join(lines))
    (out_dir / "toy_model_card.json").write_text(json.dumps(
        {k: v for k, v in results.items() if not k.startswith("_")}, indent=1, default=float))
    return card
