"""How far evaluators agree, and whose labels lean one way: agreement and bias statistics of a feedback run.

What a team wants to know before it trusts its labels (the model learns the evaluators' biases along with
their judgement):

* **agreement with the others' majority** - for evaluator *e* and each image *e* labeled, the majority
  label of the *other* evaluators (images where the others tie are left out); the share of images where
  *e* says the same. Leave-one-out, so *e*'s own vote never props up its own score.
* **Cohen's kappa** for each pair of evaluators on the images both labeled
  (:func:`sklearn.metrics.cohen_kappa_score`): agreement corrected for what two raters with those "good"
  rates would reach by chance (Cohen 1960). Undefined (``None``) when both raters gave one label only.
* **Fleiss' kappa** per round and overall (:func:`statsmodels.stats.inter_rater.fleiss_kappa`), over the
  images labeled by every evaluator of that set (Fleiss 1971; it needs the same number of raters per image).
* **the "good" rate** of each evaluator overall, by prompt, and by image attribute (for the toy world: the
  colours, shapes and object count the judge detects in each image, see :func:`toy_image_attributes`),
  each next to the others' majority on *the same images*.

**Flags** (thresholds in :class:`Thresholds`, stated with every flag): an evaluator is flagged when its
agreement with the others' majority is below ``min_agreement`` (over at least ``min_items`` images), or when
in some group (overall, a prompt, an attribute value) of at least ``min_items`` images its good rate differs
from the others' majority by at least ``max_rate_gap`` *and* McNemar's exact test on the paired labels
(:func:`statsmodels.stats.contingency_tables.mcnemar`) gives p < ``alpha`` - a gap on a few images is
chance, a gap the test backs is a lean. Each flag carries its evidence (rates, counts, p-value).

Attribution needs the honest evaluators to be a majority of the *others* on every image: with two
evaluators who disagree, both are flagged (nothing says which one is right), so bias checks want at least
three evaluators per round.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

GOOD, BAD = "good", "bad"


@dataclass
class Thresholds:
    """When an evaluator is flagged (see the module docstring)."""

    min_agreement: float = 0.75
    """Flag when agreement with the others' majority is below this (over at least ``min_items`` images)."""
    max_rate_gap: float = 0.25
    """Flag when a group's good rate differs from the others' majority by at least this (and McNemar agrees)."""
    alpha: float = 0.05
    """McNemar's exact test must give p below this for a rate gap to count."""
    min_items: int = 10
    """Groups and agreement scores over fewer images are shown, never flagged."""

    def __post_init__(self) -> None:
        for name in ("min_agreement", "max_rate_gap", "alpha"):
            value = getattr(self, name)
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"{name}: must be in [0, 1], got {value!r}")
        if int(self.min_items) < 1:
            raise ValueError(f"min_items: must be at least 1, got {self.min_items!r}")


@dataclass
class LabeledRound:
    """One round's labels as the statistics read them.

    ``labels[evaluator][image_id]`` is ``"good"`` or ``"bad"``; ``attributes[image_id]`` maps an attribute name
    (``"colour"``) to the values the image has (``["blue", "red"]``; an image can be in several groups).
    """

    round_id: int
    iteration: int
    prompt: str
    image_ids: list[int]
    labels: dict[str, dict[int, str]]
    attributes: dict[int, dict[str, list[str]]] = field(default_factory=dict)


def toy_image_attributes(images) -> list[dict[str, list[str]]] | None:
    """What the toy judge sees in each image: ``{"colour": [...], "shape": [...], "count": ["2"]}``.

    ``None`` when ``images`` are not toy-world images the judge can read (another size or model family):
    attributes of such images come from whoever creates the round, through the image metadata.
    """
    from diffalign.toy.judge import OTHER, detect_batch

    try:
        found = detect_batch(images)
    except (ValueError, TypeError):
        return None
    out = []
    for objects in found:
        out.append({
            "colour": sorted({o.color for o in objects if o.color != OTHER}),
            "shape": sorted({o.shape for o in objects if o.shape != OTHER}),
            "count": [str(len(objects))],
        })
    return out


def _majority(votes: list[str]) -> str | None:
    good = sum(v == GOOD for v in votes)
    bad = len(votes) - good
    return GOOD if good > bad else BAD if bad > good else None


def _mcnemar_p(gains: int, losses: int) -> float:
    """Exact McNemar p-value of ``gains`` (evaluator good, others bad) vs ``losses`` (the reverse)."""
    from statsmodels.stats.contingency_tables import mcnemar

    if gains + losses == 0:
        return 1.0
    return float(mcnemar([[0, gains], [losses, 0]], exact=True).pvalue)


def _kappa(a: list[str], b: list[str]) -> float | None:
    from sklearn.metrics import cohen_kappa_score

    if len(set(a) | set(b)) < 2:
        return None  # both raters used one label only: chance agreement is 1 and kappa is 0/0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        value = float(cohen_kappa_score(a, b, labels=[BAD, GOOD]))
    return None if math.isnan(value) else value


def _fleiss(items: list[list[str]]) -> dict:
    """Fleiss' kappa over ``items`` (each the labels of the same raters), with its sample sizes."""
    from statsmodels.stats.inter_rater import fleiss_kappa

    if not items:
        return {"kappa": None, "items": 0, "raters": 0}
    raters = len(items[0])
    table = np.array([[sum(v == BAD for v in votes), sum(v == GOOD for v in votes)] for votes in items])
    kappa = None
    if raters >= 2 and len(items) >= 2:
        with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)
            value = float(fleiss_kappa(table, method="fleiss"))
        kappa = None if math.isnan(value) or math.isinf(value) else value
    return {"kappa": kappa, "items": len(items), "raters": raters}


@dataclass
class _Pair:
    """One image seen by an evaluator: its label, the others' majority, and the groups the image is in."""

    mine: str
    others: str | None
    groups: list[str]


def _group_rows(pairs: list[_Pair], th: Thresholds) -> list[dict]:
    """Per group: the evaluator's good rate vs the others' majority on the same images, and McNemar's p."""
    by_group: dict[str, list[_Pair]] = {}
    for p in pairs:
        for g in p.groups:
            by_group.setdefault(g, []).append(p)
    rows = []
    for group, members in by_group.items():
        compared = [p for p in members if p.others is not None]
        gains = sum(p.mine == GOOD and p.others == BAD for p in compared)
        losses = sum(p.mine == BAD and p.others == GOOD for p in compared)
        rate = sum(p.mine == GOOD for p in members) / len(members)
        others_rate = (sum(p.others == GOOD for p in compared) / len(compared)) if compared else None
        mine_on_compared = (sum(p.mine == GOOD for p in compared) / len(compared)) if compared else None
        gap = None if others_rate is None else mine_on_compared - others_rate
        p_value = _mcnemar_p(gains, losses) if compared else None
        flagged = (gap is not None and len(compared) >= th.min_items and abs(gap) >= th.max_rate_gap
                   and p_value < th.alpha)
        rows.append({"group": group, "n": len(members), "good_rate": rate, "compared": len(compared),
                     "others_good_rate": others_rate, "gap": gap, "p_value": p_value, "flagged": flagged})
    return sorted(rows, key=lambda r: (r["group"] != "overall", r["group"]))


def agreement_report(rounds: list[LabeledRound], thresholds: Thresholds | None = None,
                     excluded: dict[str, Any] | None = None) -> dict:
    """Agreement and bias statistics of a run's rounds (JSON-ready; see the module docstring).

    ``excluded`` names evaluators whose labels the team excluded from aggregation: they are still analysed
    (the evidence stays visible) and marked, but their votes do not count in the others' majority.
    """
    th = thresholds or Thresholds()
    excluded = dict(excluded or {})
    evaluators = sorted({e for r in rounds for e in r.labels})
    voting = [e for e in evaluators if e not in excluded]
    pairs: dict[str, list[_Pair]] = {e: [] for e in evaluators}
    round_rows = []
    fleiss_items_by_raters: dict[tuple[str, ...], list[list[str]]] = {}
    for rnd in rounds:
        raters = tuple(e for e in voting if e in rnd.labels)
        round_items = []
        for image_id in rnd.image_ids:
            votes = {e: rnd.labels[e][image_id] for e in rnd.labels if image_id in rnd.labels[e]}
            attrs = rnd.attributes.get(image_id, {})
            groups = ["overall", f"prompt={rnd.prompt}"] + [
                f"{name}={value}" for name, values in sorted(attrs.items()) for value in values]
            for e, label in votes.items():
                others = [v for o, v in votes.items() if o != e and o not in excluded]
                pairs[e].append(_Pair(label, _majority(others) if others else None, groups))
            if raters and all(e in votes for e in raters):
                round_items.append([votes[e] for e in raters])
        fleiss_items_by_raters.setdefault(raters, []).extend(round_items)
        round_rows.append({"round_id": rnd.round_id, "iteration": rnd.iteration, "prompt": rnd.prompt,
                           "evaluators": list(raters), **_fleiss(round_items)})
    # Overall Fleiss' kappa needs one set of raters: the largest set that labeled the most images.
    overall = {"kappa": None, "items": 0, "raters": 0, "evaluators": []}
    if fleiss_items_by_raters:
        raters, items = max(fleiss_items_by_raters.items(), key=lambda kv: (len(kv[0]) >= 2, len(kv[1]), len(kv[0])))
        overall = {**_fleiss(items), "evaluators": list(raters)}

    pairwise = []
    for i, a in enumerate(evaluators):
        for b in evaluators[i + 1:]:
            la, lb = [], []
            for rnd in rounds:
                if a in rnd.labels and b in rnd.labels:
                    for image_id in rnd.image_ids:
                        if image_id in rnd.labels[a] and image_id in rnd.labels[b]:
                            la.append(rnd.labels[a][image_id])
                            lb.append(rnd.labels[b][image_id])
            same = sum(x == y for x, y in zip(la, lb, strict=True))
            pairwise.append({"a": a, "b": b, "n": len(la), "kappa": _kappa(la, lb) if la else None,
                             "agreement": same / len(la) if la else None})

    rows = []
    for e in evaluators:
        mine = pairs[e]
        compared = [p for p in mine if p.others is not None]
        agreement = sum(p.mine == p.others for p in compared) / len(compared) if compared else None
        kappas = [p["kappa"] for p in pairwise if e in (p["a"], p["b"]) and p["kappa"] is not None]
        groups = _group_rows(mine, th)
        flags = []
        if agreement is not None and len(compared) >= th.min_items and agreement < th.min_agreement:
            flags.append(f"agrees with the others' majority on {agreement:.0%} of {len(compared)} images "
                         f"(threshold {th.min_agreement:.0%})")
        for g in groups:
            if g["flagged"]:
                flags.append(f"{g['group']}: good {g['good_rate']:.0%} of {g['n']} images vs the others' majority "
                             f"{g['others_good_rate']:.0%} on the same {g['compared']} (gap {g['gap']:+.0%}, "
                             f"threshold {th.max_rate_gap:.0%}; McNemar p = {g['p_value']:.2g} < {th.alpha})")
        rows.append({
            "evaluator": e, "items": len(mine), "compared": len(compared), "agreement": agreement,
            "mean_kappa": float(np.mean(kappas)) if kappas else None,
            "good_rate": (sum(p.mine == GOOD for p in mine) / len(mine)) if mine else None,
            "groups": groups, "flags": flags, "flagged": bool(flags),
            "excluded": excluded.get(e),
        })
    return {"thresholds": asdict(th), "evaluators": rows, "pairwise": pairwise,
            "fleiss": {"overall": overall, "rounds": round_rows},
            "flagged": [r["evaluator"] for r in rows if r["flagged"]],
            "rounds": len(rounds), "labels": sum(len(v) for r in rounds for v in r.labels.values())}


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def format_report(report: dict) -> str:
    """The report as plain text tables (what ``diffalign feedback agreement`` prints)."""
    th = report["thresholds"]
    lines = [f"{report['rounds']} round(s), {report['labels']} label(s), {len(report['evaluators'])} evaluator(s)"]
    fo = report["fleiss"]["overall"]
    lines.append(f"Fleiss' kappa overall: {_fmt(fo['kappa'], '.3f')} ({fo['items']} images x {fo['raters']} "
                 f"evaluators: {', '.join(fo['evaluators']) or '-'})")
    lines.append("")
    lines.append(f"{'evaluator':<20}{'images':>8}{'good':>8}{'agree':>8}{'kappa':>8}  flags")
    for r in report["evaluators"]:
        status = "FLAGGED" if r["flagged"] else "ok"
        if r["excluded"]:
            status += " (excluded)"
        lines.append(f"{r['evaluator'][:19]:<20}{r['items']:>8}{_fmt(r['good_rate'], '.0%'):>8}"
                     f"{_fmt(r['agreement'], '.0%'):>8}{_fmt(r['mean_kappa']):>8}  {status}")
        lines.extend(f"    - {f}" for f in r["flags"])
    if report["pairwise"]:
        lines += ["", "Cohen's kappa, pairwise:", f"{'a':<20}{'b':<20}{'images':>8}{'agree':>8}{'kappa':>8}"]
        for p in report["pairwise"]:
            lines.append(f"{p['a'][:19]:<20}{p['b'][:19]:<20}{p['n']:>8}{_fmt(p['agreement'], '.0%'):>8}"
                         f"{_fmt(p['kappa']):>8}")
    lines += ["", "Fleiss' kappa per round:"]
    lines.extend(f"  round {r['iteration'] + 1} (#{r['round_id']}): {_fmt(r['kappa'], '.3f')} over {r['items']} "
                 f"images x {r['raters']} evaluators" for r in report["fleiss"]["rounds"])
    lines += ["", f"Thresholds: agreement < {th['min_agreement']:.0%}, or a good-rate gap >= {th['max_rate_gap']:.0%} "
              f"with McNemar p < {th['alpha']}, over >= {th['min_items']} images."]
    return "\n".join(lines)


def report_html(report: dict) -> str:
    """The report as an HTML section (tables, every text escaped) for the feedback report."""
    import html

    e = html.escape
    th = report["thresholds"]
    fo = report["fleiss"]["overall"]
    rows = "".join(
        f"<tr><td>{e(r['evaluator'])}</td><td>{r['items']}</td><td>{_fmt(r['good_rate'], '.0%')}</td>"
        f"<td>{_fmt(r['agreement'], '.0%')}</td><td>{_fmt(r['mean_kappa'])}</td>"
        f"<td>{'<b>flagged</b>' if r['flagged'] else 'ok'}{' (excluded)' if r['excluded'] else ''}"
        f"{''.join(f'<br><small>{e(f)}</small>' for f in r['flags'])}</td></tr>" for r in report["evaluators"])
    pairs = "".join(f"<tr><td>{e(p['a'])}</td><td>{e(p['b'])}</td><td>{p['n']}</td>"
                    f"<td>{_fmt(p['agreement'], '.0%')}</td><td>{_fmt(p['kappa'])}</td></tr>" for p in report["pairwise"])
    rounds = "".join(f"<tr><td>{r['iteration'] + 1}</td><td>{e(r['prompt'])}</td><td>{r['items']} x {r['raters']}</td>"
                     f"<td>{_fmt(r['kappa'], '.3f')}</td></tr>" for r in report["fleiss"]["rounds"])
    return (
        "<section id='agreement'><h2>Evaluator agreement</h2>"
        f"<p>Fleiss' kappa overall: {_fmt(fo['kappa'], '.3f')} ({fo['items']} images x {fo['raters']} evaluators). "
        f"Flagged when agreement with the others' majority is below {th['min_agreement']:.0%}, or a good-rate gap "
        f"of at least {th['max_rate_gap']:.0%} is backed by McNemar p &lt; {th['alpha']} (over at least "
        f"{th['min_items']} images).</p>"
        "<table><tr><th>evaluator</th><th>images</th><th>good</th><th>agrees with others</th>"
        f"<th>mean Cohen's kappa</th><th>status</th></tr>{rows}</table>"
        + (f"<h3>Cohen's kappa, pairwise</h3><table><tr><th>a</th><th>b</th><th>images</th><th>agree</th>"
           f"<th>kappa</th></tr>{pairs}</table>" if pairs else "")
        + f"<h3>Fleiss' kappa per round</h3><table><tr><th>round</th><th>prompt</th><th>images x evaluators</th>"
        f"<th>kappa</th></tr>{rounds}</table></section>")


__all__ = ["LabeledRound", "Thresholds", "agreement_report", "format_report", "report_html", "toy_image_attributes"]
