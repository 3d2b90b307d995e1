"""What a feedback session is doing now, for the app's pages: waiting for labels, or training, and how long
the last round took. Derived from the store's rounds only (creation and closing times), so the labeling
app needs no channel to the training loop.

A round's life (loop.py): the loop samples and creates round N (``created_at``), evaluators label it, the
loop closes it when it reads the labels (``closed_at``), trains on them, then creates round N+1. So, for
two consecutive rounds: labelling took ``closed_at[N] - created_at[N]``, training (and sampling the next
images) ``created_at[N+1] - closed_at[N]``, and the whole round ``created_at[N+1] - created_at[N]``.
"""

from __future__ import annotations

from datetime import datetime


def _seconds(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    return max(0.0, (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds())


def format_duration(seconds: float | None) -> str:
    """``under 1 s``, ``42 s``, ``3 min 5 s``, ``2 h 7 min``."""
    if seconds is None:
        return "–"
    s = int(round(seconds))
    if s < 1:
        return "under 1 s"
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {(s % 3600) // 60} min"


def session_status(rounds: list[dict], planned: int | None) -> dict:
    """The session's state from its rounds (``round_status`` dicts, any order) and planned round count.

    ``state`` is one of ``not_started`` (no round yet), ``waiting_for_labels`` (the newest round is open and
    incomplete), ``labelled`` (complete, not read yet), ``training`` (read; the next round is being made) and
    ``training_last`` (the planned rounds are all read: training on the last labels, then the session ends).
    ``round``/``of`` number the newest round ("round N of M"; ``of`` is None without a plan), ``since`` is
    when the state began, and ``last_round`` the durations of the latest round that has a successor.
    """
    ordered = sorted(rounds, key=lambda r: r["iteration"])
    last_round = None
    for prev, nxt in zip(ordered, ordered[1:]):
        if prev.get("closed_at"):
            last_round = {"round": prev["iteration"] + 1,
                          "labelling_seconds": _seconds(prev["created_at"], prev["closed_at"]),
                          "training_seconds": _seconds(prev["closed_at"], nxt["created_at"]),
                          "total_seconds": _seconds(prev["created_at"], nxt["created_at"])}
    out = {"state": "not_started", "round": None, "of": planned, "since": None, "last_round": last_round}
    if not ordered:
        out["message"] = "No round yet: the session is sampling the first images."
        return out
    newest = ordered[-1]
    n = newest["iteration"] + 1
    of = f" of {planned}" if planned else ""
    out["round"] = n
    took = ""
    if last_round is not None:
        took = (f" The last round took {format_duration(last_round['total_seconds'])} (labelling "
                f"{format_duration(last_round['labelling_seconds'])}, training "
                f"{format_duration(last_round['training_seconds'])}).")
    if newest["state"] == "open" and not newest["complete"]:
        submitted, required = len(newest["evaluators_submitted"]), newest["evaluators_required"]
        out.update(state="waiting_for_labels", since=newest["created_at"],
                   message=f"Waiting for labels on round {n}{of} ({submitted} of {required} evaluator"
                           f"{'s' if required != 1 else ''} submitted).{took}")
    elif newest["state"] == "open":
        out.update(state="labelled", since=newest["created_at"],
                   message=f"Round {n}{of} is labelled; the training loop reads it next.{took}")
    elif planned is not None and n >= planned:
        out.update(state="training_last", since=newest["closed_at"],
                   message=f"All {planned} rounds are labelled: training on the last labels, then the session "
                           f"ends (its feedback report follows).{took}")
    else:
        out.update(state="training", since=newest["closed_at"],
                   message=f"Training on the labels of round {n}{of}; round {n + 1}{of} comes when it is done."
                           f"{took}")
    return out
