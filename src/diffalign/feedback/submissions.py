"""Submissions to the feedback store: one evaluator's labels and best pick, appended, never overwritten.

Part of :class:`~diffalign.feedback.store.FeedbackStore` (see ``store.py``).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from diffalign.feedback.base import (
    LABELS,
    FeedbackError,
    NotFoundError,
    RoundClosedError,
    RoundFeedback,
    StoreBase,
    _check_int,
    _now,
    _write_atomic,
    check_evaluator,
    find_evaluator,
)


def flagged_images(c: sqlite3.Connection, round_id: int) -> list[int]:
    """The ids of a round's images the safety filter flagged (image metadata ``flagged`` holds the reason)."""
    return [int(r["id"]) for r in c.execute("SELECT id, metadata FROM images WHERE round_id = ?", (round_id,))
            if json.loads(r["metadata"]).get("flagged")]


class Submissions(StoreBase):
    """Submitting labels, waiting for a round, the audit trail of submissions and its export."""

    # ------------------------------------------------------------------ submissions

    def _evaluator_id(self, c: sqlite3.Connection, name: str) -> int:
        row = find_evaluator(c, name)  # "Alice" and "alice" are one evaluator
        if row is not None:
            return int(row["id"])
        return int(c.execute("INSERT INTO evaluators (name, created_at) VALUES (?, ?)", (name, _now())).lastrowid)

    def submit(self, round_id: int, evaluator: str, labels: dict[int, str], best_image_id: int | None) -> int:
        """Record one evaluator's labels and best pick for a round, in one transaction; returns the submission id.

        ``labels`` maps every image id of the round to ``"good"`` or ``"bad"``; images the safety filter
        flagged (metadata ``flagged``: nobody was shown them) are labelled bad whatever is sent, and may be
        left out; sending ``"good"`` for one is refused. ``best_image_id`` is a good
        image of the round or the round's previous best image; it is required when some image is good and
        may be ``None`` only when none is. Submitting the same labels and best again returns the existing
        submission id (idempotent); a change is appended and supersedes the evaluator's earlier submission.
        """
        round_id = _check_int(round_id, "round_id")
        name = check_evaluator(evaluator)
        if not isinstance(labels, dict):
            raise FeedbackError("labels: expected a mapping of image id to 'good' or 'bad'")
        clean: dict[int, str] = {}
        for key, value in labels.items():
            image_id = _check_int(key, "labels")
            if not isinstance(value, str) or value.strip().lower() not in LABELS:
                raise FeedbackError(f"labels: the label of image {image_id} must be 'good' or 'bad', got {value!r}")
            clean[image_id] = value.strip().lower()
        if best_image_id is not None:
            best_image_id = _check_int(best_image_id, "best_image_id")

        with self._write() as c:
            info = self._round_info(c, round_id)
            ids = set(info.image_ids)
            for image_id in flagged_images(c, round_id):
                if clean.get(image_id) == "good":
                    raise FeedbackError(f"labels: image {image_id} was hidden by the safety filter (never shown), so "
                                        f"it is labelled bad; it cannot be good")
                clean[image_id] = "bad"
            foreign = sorted(set(clean) - ids)
            if foreign:
                raise FeedbackError(f"labels: image ids {foreign} are not in round {round_id}")
            missing = [i for i in info.image_ids if i not in clean]
            if missing:
                raise FeedbackError(f"labels: images {missing} of round {round_id} have no label")
            any_good = any(v == "good" for v in clean.values())
            if best_image_id is None:
                if any_good:
                    raise FeedbackError("best_image_id: pick the best of the good images")
            elif best_image_id == info.previous_best_image_id:
                pass
            elif best_image_id not in ids:
                raise FeedbackError(f"best_image_id: image {best_image_id} is not in round {round_id} and is not "
                                    f"its previous best")
            elif clean[best_image_id] != "good":
                raise FeedbackError(f"best_image_id: image {best_image_id} is labeled bad; the best must be good")

            evaluator_id = self._evaluator_id(c, name)
            last = c.execute("SELECT id, best_image_id FROM submissions WHERE round_id = ? AND evaluator_id = ? "
                             "ORDER BY id DESC LIMIT 1", (round_id, evaluator_id)).fetchone()
            if last is not None and last["best_image_id"] == best_image_id:
                old = {int(r["image_id"]): r["label"] for r in c.execute(
                    "SELECT image_id, label FROM labels WHERE submission_id = ?", (last["id"],))}
                if old == clean:
                    return int(last["id"])  # a re-sent submission (e.g. its answer was lost): acknowledged again
            closure = c.execute("SELECT closed_at FROM round_closures WHERE round_id = ?", (round_id,)).fetchone()
            if closure is not None:
                raise RoundClosedError(
                    f"round: round {round_id} is closed: the training loop used its labels at {closure['closed_at']}, "
                    f"so this submission was not recorded. Label the round that is open now (the index page "
                    f"lists it)")
            cur = c.execute("INSERT INTO submissions (round_id, evaluator_id, best_image_id, created_at) "
                            "VALUES (?, ?, ?, ?)", (round_id, evaluator_id, best_image_id, _now()))
            submission_id = int(cur.lastrowid)
            c.executemany("INSERT INTO labels (submission_id, image_id, label) VALUES (?, ?, ?)",
                          [(submission_id, i, clean[i]) for i in info.image_ids])
            return submission_id

    def _latest_submissions(self, c: sqlite3.Connection, round_id: int, active_only: bool = False) -> list[sqlite3.Row]:
        """Each evaluator's latest submission for a round, oldest first; with ``active_only``, leaving out the
        evaluators the team excluded from aggregation (:meth:`exclude_evaluator`)."""
        rows = c.execute(
            "SELECT s.id, s.best_image_id, s.created_at, e.name AS evaluator FROM submissions s "
            "JOIN evaluators e ON e.id = s.evaluator_id WHERE s.id IN ("
            "  SELECT MAX(id) FROM submissions WHERE round_id = ? GROUP BY evaluator_id) ORDER BY s.id",
            (round_id,)).fetchall()
        if not active_only or not rows:
            return rows
        run = c.execute("SELECT run_id FROM rounds WHERE id = ?", (round_id,)).fetchone()
        excluded = self._excluded(c, int(run["run_id"]))
        return [r for r in rows if r["evaluator"] not in excluded]

    def submitted_evaluators(self, round_id: int) -> list[str]:
        round_id = _check_int(round_id, "round_id")
        with self._read() as c:
            self._round_info(c, round_id)
            return [r["evaluator"] for r in self._latest_submissions(c, round_id)]

    def round_complete(self, round_id: int) -> bool:
        """Whether the configured number of distinct evaluators has submitted."""
        submitted, required = self._progress(round_id)
        return submitted >= required

    def _progress(self, round_id: int) -> tuple[int, int]:
        """(evaluators whose labels count, evaluators required): excluded evaluators do not complete a round."""
        round_id = _check_int(round_id, "round_id")
        with self._read() as c:
            row = c.execute("SELECT evaluators_required FROM rounds WHERE id = ?", (round_id,)).fetchone()
            if row is None:
                raise NotFoundError(f"round_id: no round with id {round_id}")
            return len(self._latest_submissions(c, round_id, active_only=True)), int(row["evaluators_required"])

    def wait_for_round(self, round_id: int, timeout: float | None = None, poll: float = 0.5,
                       on_wait: Callable[[float, int, int], Any] | None = None,
                       on_wait_interval: float = 30.0, close: bool = False) -> RoundFeedback:
        """Block until the round is complete and return its feedback (with ``close``, closed: what training uses).

        ``on_wait(elapsed_seconds, submitted, required)`` is called when waiting starts and then every
        ``on_wait_interval`` seconds, so the caller can say what it is waiting for. Raises TimeoutError after
        ``timeout`` seconds.
        """
        start = time.monotonic()
        next_report = start
        while True:
            submitted, required = self._progress(round_id)
            if submitted >= required:
                return self.close_round(round_id) if close else self.round_feedback(round_id)
            now = time.monotonic()
            elapsed = now - start
            if timeout is not None and elapsed >= timeout:
                raise TimeoutError(
                    f"round {round_id} is not complete after {elapsed:.0f} s: {submitted} of {required} "
                    f"evaluator(s) submitted their labels")
            if on_wait is not None and now >= next_report:
                on_wait(elapsed, submitted, required)
                next_report = now + on_wait_interval
            sleep = poll
            if timeout is not None:
                sleep = min(sleep, max(0.0, timeout - elapsed))
            time.sleep(max(sleep, 0.001))

    def submissions(self, round_id: int) -> list[dict]:
        """Every submission of a round, superseded ones included (the audit log), oldest first."""
        round_id = _check_int(round_id, "round_id")
        with self._read() as c:
            self._round_info(c, round_id)
            latest = {int(r["id"]) for r in self._latest_submissions(c, round_id)}
            closure = c.execute("SELECT submission_ids FROM round_closures WHERE round_id = ?", (round_id,)).fetchone()
            used = set(json.loads(closure["submission_ids"])) if closure is not None else set()
            subs = c.execute("SELECT s.id, s.best_image_id, s.created_at, e.name AS evaluator FROM submissions s "
                             "JOIN evaluators e ON e.id = s.evaluator_id WHERE s.round_id = ? ORDER BY s.id",
                             (round_id,)).fetchall()
            out = []
            for s in subs:
                labels = {int(r["image_id"]): r["label"] for r in c.execute(
                    "SELECT image_id, label FROM labels WHERE submission_id = ? ORDER BY image_id", (s["id"],))}
                out.append({"submission_id": int(s["id"]), "evaluator": s["evaluator"], "labels": labels,
                            "best_image_id": s["best_image_id"], "created_at": s["created_at"],
                            "superseded": int(s["id"]) not in latest, "used": int(s["id"]) in used})
        return out

    # ------------------------------------------------------------------ export

    def export_jsonl(self, run_id: int, path: str | Path) -> int:
        """Write every submission of a run (superseded ones flagged) as JSON lines; returns the rows written.

        One row per submission: run, round, iteration, prompt, evaluator, time, the best pick, and each
        image's label with its id, position in the batch and sha256.
        """
        run_id = _check_int(run_id, "run_id")
        with self._read() as c:
            run = self._run_row(c, run_id)
            round_rows = c.execute("SELECT id FROM rounds WHERE run_id = ? ORDER BY iteration",
                                   (run_id,)).fetchall()
        rows = []
        for rr in round_rows:
            info = self.get_round(int(rr["id"]))
            images = {i: self.image_info(i) for i in info.image_ids}
            if info.previous_best_image_id is not None:
                images[info.previous_best_image_id] = self.image_info(info.previous_best_image_id)
            for sub in self.submissions(info.id):
                best = sub["best_image_id"]
                rows.append({
                    "run_id": run_id, "run": run["name"], "round_id": info.id, "iteration": info.iteration,
                    "prompt": info.prompt, "evaluator": sub["evaluator"], "submission_id": sub["submission_id"],
                    "created_at": sub["created_at"], "superseded": sub["superseded"], "used": sub["used"],
                    "evaluators_required": info.evaluators_required,
                    "previous_best_image_id": info.previous_best_image_id,
                    "best_image_id": best, "best_sha256": images[best]["sha256"] if best is not None else None,
                    "best_is_previous": best is not None and best == info.previous_best_image_id,
                    "labels": [{"image_id": i, "position": images[i]["position"], "sha256": images[i]["sha256"],
                                "label": sub["labels"][i]} for i in info.image_ids],
                })
        path = Path(path)
        data = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode()
        _write_atomic(path, data)
        return len(rows)
