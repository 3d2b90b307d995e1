"""The HTML report of a blind A/B comparison: verdict, win rates with intervals, and the pairs unblinded.

Self-contained (images embedded as base64 PNG), like the run report. It is written for the team after the
evaluation, so it names the models; the labeling app never does. Images the safety filter flagged appear
hidden (``safety.hide``) with the filter's reason, never as they are.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from .feedback.comparisons import flag_reason
from .report import _png
from .safety import hide

PAIRS_SHOWN_PER_PROMPT = 6
SCALE = 2  # 64 px toy images are too small to see at 1x


def _rate_row(label: str, w: dict) -> str:
    cells = [html.escape(label), str(w["wins"]), str(w["losses"]), str(w["ties"])]
    cells += (["–", "–"] if w["rate"] is None else [f"{w['rate']:.3f}", f"[{w['low']:.3f}, {w['high']:.3f}]"])
    return "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


def _table(rows: list[str]) -> str:
    head = "".join(f"<th>{h}</th>" for h in ("", "B preferred", "A preferred", "no preference", "B's win rate",
                                              "95% interval"))
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _image_cell(store, pair: dict, model: str) -> str:
    image = store.load_pair_image(pair["pair_id"], model)
    reason = flag_reason(pair["metadata"], model)
    if reason:
        image = hide(image)
    image = np.asarray(image).repeat(SCALE, 0).repeat(SCALE, 1)
    caption = f"<div class='flag'>hidden: {html.escape(reason)}</div>" if reason else ""
    return f"<td><img alt='{model.upper()}' src='data:image/png;base64,{_png(image)}'>{caption}</td>"


def pairs_html(store, comparison_id: int, choices: list[dict]) -> str:
    """Up to PAIRS_SHOWN_PER_PROMPT pairs of each prompt, those someone preferred a side of first (with many
    ties, the first few pairs would otherwise show identical images): A's image, B's image, and the picks."""
    picks: dict[int, list[str]] = {}
    for c in choices:
        picks.setdefault(c["pair_id"], []).append(f"{c['evaluator']}: {c['choice'].upper() if c['choice'] != 'none' else 'no preference'}")
    shown: dict[str, int] = {}
    rows = []
    decisive = {c["pair_id"] for c in choices if c["choice"] != "none"}
    for pair in sorted(store.pairs(comparison_id), key=lambda p: (p["pair_id"] not in decisive, p["position"])):
        if shown.get(pair["prompt"], 0) >= PAIRS_SHOWN_PER_PROMPT:
            continue
        shown[pair["prompt"]] = shown.get(pair["prompt"], 0) + 1
        rows.append(f"<tr><td>{html.escape(pair['prompt'])}<br><span class='muted'>pair {pair['position']}</span></td>"
                    f"{_image_cell(store, pair, 'a')}{_image_cell(store, pair, 'b')}"
                    f"<td>{html.escape('; '.join(picks.get(pair['pair_id'], [])) or 'not picked yet')}</td></tr>")
    return ("<table class='pairs'><tr><th>prompt</th><th>A</th><th>B</th><th>picks</th></tr>" + "".join(rows)
            + "</table>")


def compare_html(store, comparison_id: int, result: dict) -> str:
    v = result["verdict"]
    colour = {"ship": "#1f9d55", "reject": "#d64541"}.get(v["decision"], "#b7791f")
    tie_rule = ("a tie (no preference) counts as half a win for B" if result["ties"] == "half"
                else "ties (no preference) are left out")
    st = result["settings"]
    parts = [
        f"<h1>Blind A/B comparison: {html.escape(result['comparison'])}</h1>",
        f"<p><b>A</b> = <code>{html.escape(result['model_a'])}</code><br><b>B</b> = "
        f"<code>{html.escape(result['model_b'])}</code></p>",
        f"<p class='verdict' style='border-color:{colour}'><b style='color:{colour}'>{v['decision'].upper()}</b> — "
        f"{html.escape(v['reason'])}.</p>",
        f"<p>{result['picks']} picks on {result['pairs_decided']} of {result['pairs']} pairs. Each pair: one prompt, "
        f"the same initial and step noise for both models (seed {st.get('seed')}, {st.get('num_steps')} DDIM steps, "
        f"eta {st.get('eta')}, guidance {st.get('guidance_scale')}); sides shown at random per pair, model names "
        f"hidden. Rule: {tie_rule}. Interval: Wilson score, 95%. Gate: ship if the lower bound of B's win rate "
        f"is above {result['gate']}. Created by {html.escape(result['created_by'])}.</p>",
        "<h2>Win rate of B</h2>",
        _table([_rate_row(p, w) for p, w in result["per_prompt"].items()] + [_rate_row("overall", result["overall"])]),
        "<h2>By evaluator</h2>",
        _table([_rate_row(e, w) for e, w in result["per_evaluator"].items()]) if result["per_evaluator"]
        else "<p>No picks yet.</p>",
    ]
    if st.get("safety_filter"):
        parts.append(f"<p>Safety filter <code>{html.escape(st['safety_filter'])}</code> (threshold "
                     f"{st.get('safety_threshold')}): {result['flagged_pairs']} pair(s) with a flagged image, shown "
                     f"hidden.</p>")
    parts += ["<h2>Pairs</h2>", pairs_html(store, comparison_id, store.comparison_choices(comparison_id))]
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#1d2327}"
             "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}"
             ".verdict{border:2px solid;padding:.6em 1em;border-radius:8px}.muted{color:#667079}"
             ".flag{color:#d64541;font-size:.8em;max-width:140px}img{image-rendering:pixelated}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>A/B {html.escape(result['comparison'])}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")


def write_compare_report(store, comparison_id: int, result: dict, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(compare_html(store, comparison_id, result))
    return path
