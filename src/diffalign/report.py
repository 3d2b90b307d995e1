"""A self-contained HTML report of a run: curves, before/after grids from the same seeds, metrics table.

Everything (plots and images) is embedded as base64 PNG, so the file can be mailed or attached as is.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np

from .guards import guards_html


def _png(fig_or_array) -> str:
    buf = io.BytesIO()
    if isinstance(fig_or_array, np.ndarray):
        from PIL import Image
        Image.fromarray(fig_or_array).save(buf, format="PNG")
    else:
        fig_or_array.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def image_grid(images: np.ndarray, columns: int = 8, scale: int = 2, pad: int = 2) -> np.ndarray:
    """(N, H, W, 3) uint8 -> one grid image, upscaled by ``scale`` (nearest) so 64 px images are visible."""
    n, h, w, _ = images.shape
    rows = (n + columns - 1) // columns
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, columns)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = im
    return grid.repeat(scale, 0).repeat(scale, 1)


def _curves(history: list[dict]):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [h["trajectories"] for h in history if "reward_mean" in h]
    success = next((k for h in history for k in h if k.endswith("success_rate")), None)
    keys = [("reward_mean", "mean reward")] + ([(success, "toy success (training samples)")] if success else [])
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.2), squeeze=False)
    for ax, (k, label) in zip(axes[0], keys):
        ax.plot(x, [h.get(k, np.nan) for h in history if "reward_mean" in h], marker="o", ms=3)
        ax.set_xlabel("trajectories sampled")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    return fig


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Build ``report.html`` from ``metrics.jsonl``, ``eval.json`` and ``eval_images.npz`` of a run."""
    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir / "report.html"
    history = []
    if (run_dir / "metrics.jsonl").exists():
        history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evaluation = json.loads((run_dir / "eval.json").read_text()) if (run_dir / "eval.json").exists() else None
    parts = [f"<h1>diffalign report: {html.escape(run_dir.name)}</h1>"]
    if (run_dir / "config.toml").exists():
        parts.append(f"<details><summary>configuration</summary><pre>{html.escape((run_dir / 'config.toml').read_text())}</pre></details>")
    if evaluation:
        rows = []
        for key in ("reward_mean", "success", "partial", "diversity"):
            if key in evaluation["base"]:
                b, t = evaluation["base"][key], evaluation["tuned"][key]
                rows.append(f"<tr><td>{key}</td><td>{b:.4f}</td><td>{t:.4f}</td><td>{t - b:+.4f}</td></tr>")
        rows.append(f"<tr><td>drift from base (RMS pixel)</td><td></td><td>{evaluation['drift']:.4f}</td><td></td></tr>")
        parts.append(
            f"<h2>Before vs after</h2><p>{evaluation['num_images']} images from fixed seeds, prompts "
            f"<code>{html.escape(str(evaluation['prompts']))}</code>.</p>"
            "<table><tr><th>metric</th><th>base</th><th>tuned</th><th>change</th></tr>" + "".join(rows) + "</table>"
        )
    if history:
        parts.append(f"<h2>Training</h2><img src='data:image/png;base64,{_png(_curves(history))}'>")
        last = history[-1]
        parts.append(f"<p>{last.get('epoch')} epochs, {last.get('trajectories')} trajectories, "
                     f"{last.get('optimizer_steps')} optimizer steps.</p>")
        parts.append(guards_html(history))  # empty when the run had no guard checks
    if (run_dir / "eval_images.npz").exists():
        data = np.load(run_dir / "eval_images.npz")
        prompts = [str(p) for p in data["prompts"]]
        # One row of up to 8 images per prompt (at most 8 prompts), so every prompt shows.
        shown = list(dict.fromkeys(prompts))[:8]
        idx = [i for p in shown for i in [j for j, q in enumerate(prompts) if q == p][:8]]
        base, tuned, hidden = _safe_images(run_dir, data["base"][idx], data["tuned"][idx], [prompts[i] for i in idx])
        parts.append("<h2>Same seeds, before and after</h2><div class='pair'>"
                     f"<figure><img src='data:image/png;base64,{_png(image_grid(base))}'><figcaption>base</figcaption></figure>"
                     f"<figure><img src='data:image/png;base64,{_png(image_grid(tuned))}'><figcaption>tuned</figcaption></figure></div>")
        parts.append("<p class='small'>Prompts, row by row: " + html.escape("; ".join(shown)) + "</p>" + hidden)
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}"
             "td:first-child{text-align:left}.pair{display:flex;gap:2em;flex-wrap:wrap}img{image-rendering:pixelated}"
             ".small{font-size:0.85em;color:#555}")
    out.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>diffalign report</title>"
                   f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")
    return out


def _safe_images(run_dir: Path, base: np.ndarray, tuned: np.ndarray, prompts: list[str]):
    """The before/after images with what the run's safety filter flags hidden, and a line saying how many."""
    if not (run_dir / "config.toml").exists():
        return base, tuned, ""
    from .config import load_config
    from .safety import hide_flagged

    safety = load_config(run_dir / "config.toml").safety
    base, flagged_base = hide_flagged(base, prompts, safety)
    tuned, flagged_tuned = hide_flagged(tuned, prompts, safety)
    if safety.filter is None:
        return base, tuned, ""
    n_base, n_tuned = sum(map(bool, flagged_base)), sum(map(bool, flagged_tuned))
    return base, tuned, (f"<p class='small'>Safety filter <code>{html.escape(safety.filter)}</code>: {n_base} base and "
                         f"{n_tuned} tuned image(s) above are hidden (blurred).</p>")


def write_feedback_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """``feedback_report.html``: success and labels per round, and every round's grid."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir / "feedback_report.html"
    history = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    parts = [f"<h1>diffalign feedback session: {html.escape(run_dir.name)}</h1>"]
    measured = [h for h in history if "success" in h]
    if measured:
        fig, ax = plt.subplots(figsize=(5.5, 3.2))
        ax.plot([h["labels_used"] for h in measured], [h["success"] for h in measured], marker="o")
        ax.set_xlabel("labels used")
        ax.set_ylabel("toy success (fixed eval seeds)")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        parts.append(f"<img src='data:image/png;base64,{_png(fig)}'>")
        plt.close(fig)
    rows = "".join(
        f"<tr><td>{h['round']}</td><td>{html.escape(h['prompt'])}</td><td>{h['good']}</td><td>{h['labels_used']}</td>"
        f"<td>{h.get('success', float('nan')):.3f}</td><td>{h.get('safety_flagged', '–')}</td></tr>" for h in history)
    parts.append("<table><tr><th>round</th><th>prompt</th><th>good</th><th>labels used</th><th>success</th>"
                 "<th>hidden by the safety filter</th></tr>"
                 f"{rows}</table><h2>Rounds</h2>")
    for grid in sorted((run_dir / "rounds").glob("round-*.png")):
        data = base64.b64encode(grid.read_bytes()).decode("ascii")
        parts.append(f"<figure><img src='data:image/png;base64,{data}'><figcaption>{grid.stem}</figcaption></figure>")
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px}img{image-rendering:pixelated}")
    out.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>diffalign feedback</title>"
                   f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")
    return out
