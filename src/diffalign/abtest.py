"""The statistics of a blind A/B comparison: B's win rate over A with a Wilson interval, and a ship verdict.

Notation: each decided pick is one *observation*: a win for B (the evaluator preferred B's image), a loss
(preferred A's) or a tie ("no preference"). With ``ties = "half"`` (the default) a tie counts as half a win
and half a loss, so n = wins + losses + ties and the win rate is (wins + ties / 2) / n: many ties pull the
rate toward 0.5 and keep the interval honest about how often the models were indistinguishable. With
``ties = "exclude"`` ties are dropped: the rate is wins / (wins + losses) among the pairs where someone had a
preference (larger effects, fewer observations). The rule is fixed when the comparison is created and
stored with it, so the results are always computed the same way.

The 95% interval is Wilson's score interval (Wilson 1927; Brown, Cai & DasGupta 2001 recommend it over the
normal approximation for small n), from statsmodels' ``proportion_confint(method="wilson")``, which accepts
the fractional count a half-counted tie gives. Each evaluator's latest pick of a pair is one observation;
several evaluators on the same pair are not independent, so with many evaluators per pair the interval is
somewhat too narrow (one evaluator per pair, or the per-evaluator figures, avoid that).

The verdict compares the interval with a gate fixed at creation: **ship** when the lower bound of B's win rate
is above ``gate`` (default 0.5: B wins more often than not, with 95% confidence); **reject** when the upper
bound is below 0.5 (B loses, with 95% confidence); otherwise **inconclusive** (collect more picks).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

TIE_RULES = ("half", "exclude")


@dataclass
class WinRate:
    """B's win rate over A on a set of picks, with its interval; ``rate``/``low``/``high`` are None if n = 0."""

    wins: int
    losses: int
    ties: int
    n: float
    rate: float | None
    low: float | None
    high: float | None

    def as_dict(self) -> dict:
        return asdict(self)


def check_ties(ties: str) -> str:
    if ties not in TIE_RULES:
        raise ValueError(f"ties: {ties!r} is not a tie rule; use 'half' (a tie counts as half a win) or 'exclude'")
    return ties


def check_gate(gate: float) -> float:
    if not (isinstance(gate, (int, float)) and 0.0 <= float(gate) < 1.0):
        raise ValueError(f"gate: the lower bound of B's win rate must exceed it, so it lies in [0, 1); got {gate!r} "
                         f"(0.5 means 'B wins more often than A')")
    return float(gate)


def win_rate(wins: int, losses: int, ties: int, ties_rule: str = "half", alpha: float = 0.05) -> WinRate:
    """B's win rate and its Wilson (1 - alpha) interval from counts, ties counted by ``ties_rule``."""
    from statsmodels.stats.proportion import proportion_confint

    check_ties(ties_rule)
    if min(wins, losses, ties) < 0:
        raise ValueError(f"counts must be >= 0, got wins={wins}, losses={losses}, ties={ties}")
    successes, n = (wins + ties / 2, wins + losses + ties) if ties_rule == "half" else (wins, wins + losses)
    if n == 0:
        return WinRate(wins, losses, ties, 0, None, None, None)
    low, high = proportion_confint(successes, n, alpha=alpha, method="wilson")
    return WinRate(wins, losses, ties, n, successes / n, float(low), float(high))


def verdict(overall: WinRate, gate: float) -> dict:
    """``{"decision": "ship" | "reject" | "inconclusive", "reason": ...}`` for B against the gate."""
    if overall.rate is None:
        return {"decision": "inconclusive", "reason": "no picks yet"}
    interval = f"B's win rate {overall.rate:.3f}, 95% CI [{overall.low:.3f}, {overall.high:.3f}]"
    if overall.low > gate:
        return {"decision": "ship", "reason": f"{interval}: the lower bound is above the gate {gate}"}
    if overall.high < 0.5:
        return {"decision": "reject", "reason": f"{interval}: B loses to A (the upper bound is below 0.5)"}
    return {"decision": "inconclusive",
            "reason": f"{interval}: the lower bound is not above the gate {gate}; collect more picks or keep A"}


def _count(choices: list[dict]) -> tuple[int, int, int]:
    wins = sum(c["choice"] == "b" for c in choices)
    losses = sum(c["choice"] == "a" for c in choices)
    return wins, losses, len(choices) - wins - losses


def summarise(choices: list[dict], pairs: int, ties_rule: str = "half", gate: float = 0.5,
              alpha: float = 0.05) -> dict:
    """Overall, per-prompt and per-evaluator win rates of B and the verdict, from the latest picks
    (``FeedbackStore.comparison_choices``: dicts with ``prompt``, ``evaluator``, ``pair_id``, ``choice``)."""
    check_ties(ties_rule)
    gate = check_gate(gate)
    overall = win_rate(*_count(choices), ties_rule, alpha)
    prompts = list(dict.fromkeys(c["prompt"] for c in choices))
    evaluators = list(dict.fromkeys(c["evaluator"] for c in choices))
    return {
        "ties": ties_rule, "alpha": alpha, "gate": gate, "pairs": pairs,
        "pairs_decided": len({c["pair_id"] for c in choices}), "picks": len(choices),
        "overall": overall.as_dict(),
        "per_prompt": {p: win_rate(*_count([c for c in choices if c["prompt"] == p]), ties_rule, alpha).as_dict()
                       for p in prompts},
        "per_evaluator": {e: win_rate(*_count([c for c in choices if c["evaluator"] == e]), ties_rule, alpha).as_dict()
                          for e in evaluators},
        "verdict": verdict(overall, gate),
    }


def format_summary(result: dict, model_a: str, model_b: str) -> str:
    """The summary as plain text (what ``diffalign compare`` prints)."""
    def row(label: str, w: dict) -> str:
        if w["rate"] is None:
            return f"{label:<36}{w['wins']:>5}{w['losses']:>7}{w['ties']:>6}{'':>9}   (no picks)"
        return (f"{label:<36}{w['wins']:>5}{w['losses']:>7}{w['ties']:>6}{w['rate']:>9.3f}   "
                f"[{w['low']:.3f}, {w['high']:.3f}]")

    tie_text = "a tie counts as half a win" if result["ties"] == "half" else "ties are left out"
    lines = [f"A = {model_a}", f"B = {model_b}",
             f"{result['picks']} picks on {result['pairs_decided']} of {result['pairs']} pairs; {tie_text}; "
             f"{100 * (1 - result['alpha']):.0f}% Wilson intervals", "",
             f"{'':<36}{'B won':>5}{'A won':>7}{'ties':>6}{'B rate':>9}   interval"]
    lines += [row(_short(p), w) for p, w in result["per_prompt"].items()]
    lines += [row("overall", result["overall"]), "",
              f"verdict: {result['verdict']['decision'].upper()} ({result['verdict']['reason']})"]
    return "\n".join(lines)


def _short(text: str, width: int = 34) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"

