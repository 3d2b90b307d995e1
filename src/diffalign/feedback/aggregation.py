"""Aggregation of the feedback store: a round's majority labels and best pick, closing rounds, run summaries.

Part of :class:`~diffalign.feedback.store.FeedbackStore` (see ``store.py``).
"""

from __future__ import annotations

import json
import sqlite3

from diffalign.feedback.agreement import LabeledRound, Thresholds, agreement_report
from diffalign.feedback.base import (
    ConflictError,
    FeedbackError,
    NotFoundError,
    RoundFeedback,
    RoundInfo,
    StoreBase,
    _check_int,
    _now,
    check_evaluator,
)
from diffalign.feedback.session import session_status


class Aggregation(StoreBase):
    """What training and the pages read: aggregated feedback, closures, labels used, run summaries."""

    def run_summary(self, run_id: int) -> dict:
        """What the run page shows: name, config, current iteration, labels used, metrics, and every round."""
        run_id = _check_int(run_id, "run_id")
        with self._read() as c:
            run = self._run_row(c, run_id)
            round_ids = [int(r["id"]) for r in c.execute(
                "SELECT id FROM rounds WHERE run_id = ? ORDER BY iteration", (run_id,))]
        rounds = [self.round_status(rid) for rid in round_ids]
        return {
            "id": run_id,
            "name": run["name"],
            "config": json.loads(run["config"]),
            "created_at": run["created_at"],
            "iteration": max((r["iteration"] for r in rounds), default=None),
            "labels_used": sum(r["labels_used"] for r in rounds),
            "metrics": self.run_metrics(run_id),
            "rounds": rounds,
            "open_rounds": sum(1 for r in rounds if r["state"] == "open" and not r["complete"]),
            "planned_rounds": _planned_rounds(json.loads(run["config"])),
            "session": session_status(rounds, _planned_rounds(json.loads(run["config"]))),  # session.py
        }

    def round_feedback(self, round_id: int) -> RoundFeedback:
        """The labels of a round aggregated over the evaluators' latest submissions (see :class:`RoundFeedback`).

        For a closed round: exactly the submissions training used (:meth:`close_round`)."""
        round_id = _check_int(round_id, "round_id")
        with self._read() as c:
            info = self._round_info(c, round_id)
            closure = c.execute("SELECT submission_ids FROM round_closures WHERE round_id = ?", (round_id,)).fetchone()
            subs = (self._submissions_by_id(c, json.loads(closure["submission_ids"])) if closure is not None
                    else self._latest_submissions(c, round_id, active_only=True))
            return self._aggregate(c, info, subs, closed=closure is not None)

    def close_round(self, round_id: int) -> RoundFeedback:
        """Close a complete round and return the feedback training uses (the trainer calls this once it reads).

        In one write transaction: the evaluators' latest submissions are aggregated and recorded in
        ``round_closures`` (which submissions, how many labels), so what training used is exactly what the
        store says it used; later submissions to the round are refused (:class:`RoundClosedError`, HTTP 409).
        Closing a closed round again (a restarted trainer) returns the recorded feedback. Raises
        ConflictError when the round is not complete yet.
        """
        round_id = _check_int(round_id, "round_id")
        with self._write() as c:
            info = self._round_info(c, round_id)
            closure = c.execute("SELECT submission_ids FROM round_closures WHERE round_id = ?", (round_id,)).fetchone()
            if closure is not None:
                return self._aggregate(c, info, self._submissions_by_id(c, json.loads(closure["submission_ids"])),
                                       closed=True)
            latest = self._latest_submissions(c, round_id, active_only=True)  # excluded evaluators' labels: no
            if len(latest) < info.evaluators_required:
                raise ConflictError(f"round: round {round_id} is not complete ({len(latest)} of "
                                    f"{info.evaluators_required} evaluators submitted); wait_for_round first")
            feedback = self._aggregate(c, info, latest, closed=True)
            c.execute("INSERT INTO round_closures (round_id, submission_ids, labels_used, closed_at) VALUES (?, ?, ?, ?)",
                      (round_id, json.dumps([int(s["id"]) for s in latest]), feedback.labels_used, _now()))
            return feedback

    def _submissions_by_id(self, c: sqlite3.Connection, ids: list[int]) -> list[sqlite3.Row]:
        rows = c.execute(
            f"SELECT s.id, s.best_image_id, s.created_at, e.name AS evaluator FROM submissions s "
            f"JOIN evaluators e ON e.id = s.evaluator_id WHERE s.id IN ({','.join('?' * len(ids))}) ORDER BY s.id",
            [int(i) for i in ids]).fetchall()
        return rows

    def _aggregate(self, c: sqlite3.Connection, info: RoundInfo, subs: list[sqlite3.Row],
                   closed: bool) -> RoundFeedback:
        per_evaluator: dict[str, dict] = {}
        votes = {i: 0 for i in info.image_ids}
        for sub in subs:
            labels = {int(r["image_id"]): r["label"] for r in c.execute(
                "SELECT image_id, label FROM labels WHERE submission_id = ?", (sub["id"],))}
            per_evaluator[sub["evaluator"]] = {
                "submission_id": int(sub["id"]), "labels": {i: labels[i] for i in info.image_ids},
                "best_image_id": sub["best_image_id"], "created_at": sub["created_at"]}
            for i in info.image_ids:
                votes[i] += 1 if labels[i] == "good" else -1
        good = [votes[i] > 0 for i in info.image_ids]
        good_ids = {i for i, g in zip(info.image_ids, good, strict=True) if g}
        counts: dict[int, int] = {}
        first_pick: dict[int, int] = {}
        for order, sub in enumerate(subs):
            best = sub["best_image_id"]
            if best is None or not (best in good_ids or best == info.previous_best_image_id):
                continue
            counts[best] = counts.get(best, 0) + 1
            first_pick.setdefault(best, order)
        best_image_id = min(counts, key=lambda b: (-counts[b], first_pick[b])) if counts else None
        best_index = info.image_ids.index(best_image_id) if best_image_id in info.image_ids else None
        return RoundFeedback(round_id=info.id, image_ids=list(info.image_ids), good=good,
                             best_image_id=best_image_id, best_index=best_index, per_evaluator=per_evaluator,
                             labels_used=len(subs) * len(info.image_ids), closed=closed)

    def round_status(self, round_id: int) -> dict:
        """A JSON-ready summary of a round for the app: state, progress, labels used, measured success if known.

        ``state`` is ``"open"`` (accepting submissions) or ``"closed"`` (training read it). ``labels_used`` is
        what training consumed (0 while the round is open); ``labels_given`` what evaluators have given so far.
        """
        info = self.get_round(round_id)
        submitted = self.submitted_evaluators(round_id)
        counted, _ = self._progress(round_id)
        with self._read() as c:
            metas = [json.loads(r["metadata"]) for r in c.execute(
                "SELECT metadata FROM images WHERE round_id = ? ORDER BY position", (round_id,))]
            closure = c.execute("SELECT labels_used, closed_at FROM round_closures WHERE round_id = ?",
                                (round_id,)).fetchone()
        successes = [m["success"] for m in metas if isinstance(m.get("success"), (bool, int, float))]
        return {
            "id": info.id, "run_id": info.run_id, "iteration": info.iteration, "prompt": info.prompt,
            "n_images": len(info.image_ids), "evaluators_required": info.evaluators_required,
            "evaluators_submitted": submitted, "complete": counted >= info.evaluators_required,
            "state": "closed" if closure is not None else "open",
            "closed_at": closure["closed_at"] if closure is not None else None,
            "labels_used": int(closure["labels_used"]) if closure is not None else 0,
            "labels_given": len(submitted) * len(info.image_ids), "created_at": info.created_at,
            "measured_success": (sum(float(s) for s in successes) / len(successes)) if successes else None,
            "flagged": sum(1 for m in metas if m.get("flagged")),  # hidden by the safety filter, labelled bad
        }

    def label_count(self, run_id: int) -> int:
        """The labels training used in a run: one per evaluator per image of each closed round, as recorded
        when the trainer closed it (resubmissions and refused late submissions count nothing)."""
        run_id = _check_int(run_id, "run_id")
        with self._read() as c:
            self._run_row(c, run_id)
            row = c.execute("SELECT COALESCE(SUM(k.labels_used), 0) FROM round_closures k "
                            "JOIN rounds r ON r.id = k.round_id WHERE r.run_id = ?", (run_id,)).fetchone()
        return int(row[0])

    # ------------------------------------------------------------------ excluding an evaluator

    def _excluded(self, c: sqlite3.Connection, run_id: int) -> dict[str, dict]:
        """The evaluators excluded from a run's aggregation now: the audit log replayed in order."""
        out: dict[str, dict] = {}
        for row in c.execute("SELECT action, actor, detail, created_at FROM audit_log WHERE run_id = ? AND action IN "
                             "('exclude_evaluator', 'include_evaluator') ORDER BY id", (run_id,)):
            detail = json.loads(row["detail"])
            if row["action"] == "exclude_evaluator":
                out[detail["evaluator"]] = {"decided_by": row["actor"], "reason": detail.get("reason", ""),
                                            "at": row["created_at"]}
            else:
                out.pop(detail["evaluator"], None)
        return out

    def excluded_evaluators(self, run_id: int) -> dict[str, dict]:
        """``{evaluator: {"decided_by", "reason", "at"}}`` for the evaluators whose labels no longer count."""
        run_id = _check_int(run_id, "run_id")
        with self._read() as c:
            self._run_row(c, run_id)
            return self._excluded(c, run_id)

    def exclude_evaluator(self, run_id: int, evaluator: str, decided_by: str, reason: str = "",
                          include: bool = False) -> dict:
        """Exclude an evaluator's labels from the aggregation of a run's rounds that are still open and of every
        later round (``include=True`` takes the decision back); the audit log records who decided and why.

        Closed rounds keep what training used: their recorded submissions never change. The excluded
        evaluator may still submit (the statistics keep showing the evidence), but no longer completes a
        round, so a round may then wait for another evaluator.
        """
        run_id = _check_int(run_id, "run_id")
        name = check_evaluator(evaluator)
        try:
            actor = check_evaluator(decided_by)
        except FeedbackError as exc:
            raise FeedbackError(str(exc).replace("evaluator:", "decided_by:", 1) +
                                " (who takes this decision: it goes into the audit log)") from None
        if not isinstance(reason, str) or len(reason) > 1000:
            raise FeedbackError("reason: expected text of at most 1000 characters")
        with self._write() as c:
            self._run_row(c, run_id)
            known = [r["name"] for r in c.execute(
                "SELECT DISTINCT e.name FROM evaluators e JOIN submissions s ON s.evaluator_id = e.id "
                "JOIN rounds r ON r.id = s.round_id WHERE r.run_id = ? ORDER BY e.name", (run_id,))]
            if name not in known:
                raise NotFoundError(f"evaluator: {name!r} has labeled nothing in run {run_id}; the run's evaluators "
                                    f"are {', '.join(known) or '(none yet)'}")
            excluded = name in self._excluded(c, run_id)
            if excluded != include:  # already in the state asked for: nothing to record
                return {"evaluator": name, "excluded": excluded, "changed": False}
            action = "include_evaluator" if include else "exclude_evaluator"
            c.execute("INSERT INTO audit_log (run_id, action, actor, detail, created_at) VALUES (?, ?, ?, ?, ?)",
                      (run_id, action, actor, json.dumps({"evaluator": name, "reason": reason.strip()}), _now()))
        return {"evaluator": name, "excluded": not include, "changed": True}

    def audit_log(self, run_id: int) -> list[dict]:
        """Every recorded decision of a run, oldest first: ``{"action", "actor", "detail", "created_at"}``."""
        run_id = _check_int(run_id, "run_id")
        with self._read() as c:
            self._run_row(c, run_id)
            return [{"action": r["action"], "actor": r["actor"], "detail": json.loads(r["detail"]),
                     "created_at": r["created_at"]} for r in c.execute(
                "SELECT action, actor, detail, created_at FROM audit_log WHERE run_id = ? ORDER BY id", (run_id,))]

    # ------------------------------------------------------------------ agreement

    def labeled_rounds(self, run_id: int) -> list[LabeledRound]:
        """Every round of a run with each evaluator's latest labels (excluded evaluators included) and the
        images' ``attributes`` metadata: what :func:`~diffalign.feedback.agreement.agreement_report` reads."""
        run_id = _check_int(run_id, "run_id")
        out = []
        with self._read() as c:
            self._run_row(c, run_id)
            for row in c.execute("SELECT id FROM rounds WHERE run_id = ? ORDER BY iteration", (run_id,)).fetchall():
                info = self._round_info(c, int(row["id"]))
                labels = {}
                for sub in self._latest_submissions(c, info.id):
                    labels[sub["evaluator"]] = {int(r["image_id"]): r["label"] for r in c.execute(
                        "SELECT image_id, label FROM labels WHERE submission_id = ?", (sub["id"],))}
                attributes = {}
                for img in c.execute("SELECT id, metadata FROM images WHERE round_id = ?", (info.id,)):
                    attrs = json.loads(img["metadata"]).get("attributes")
                    if isinstance(attrs, dict):
                        attributes[int(img["id"])] = {str(k): [str(x) for x in (v if isinstance(v, list) else [v])]
                                                      for k, v in attrs.items()}
                out.append(LabeledRound(info.id, info.iteration, info.prompt, list(info.image_ids), labels, attributes))
        return out

    def agreement(self, run_id: int, thresholds: Thresholds | None = None) -> dict:
        """Agreement and bias statistics of a run (:func:`~diffalign.feedback.agreement.agreement_report`)."""
        return agreement_report(self.labeled_rounds(run_id), thresholds, self.excluded_evaluators(run_id))


def _planned_rounds(config: dict) -> int | None:
    """``feedback.rounds`` of a run's config, if it has one (for "round N of M")."""
    rounds = (config.get("feedback") or {}).get("rounds") if isinstance(config, dict) else None
    return int(rounds) if isinstance(rounds, int) and not isinstance(rounds, bool) else None
