"""Blind A/B comparisons in the feedback store: pairs of images from the same noise, and evaluators' picks.

Part of :class:`~diffalign.feedback.store.FeedbackStore` (see ``store.py``); the tables are schema version 3
(``schema.py``). A comparison holds one pair per (prompt, noise): model A's image and model B's, and the side
the page shows A on, drawn at random per pair when the comparison is created and stored, so every evaluator
and every reload sees the same layout. The labeling app only ever says "left" and "right"; the store turns the
side into "a" or "b". Picks are append-only like labels: the same pick again is acknowledged with its
existing id (a re-sent request is stored once), a changed pick is appended and supersedes the evaluator's
earlier one, which stays as the audit trail. Creating a comparison is recorded in the audit log with who ran it.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import numpy as np

from diffalign.feedback.base import (
    IMAGE_DIR,
    MAX_PROMPT_LENGTH,
    ConflictError,
    FeedbackError,
    NotFoundError,
    _check_int,
    _encode_png,
    _json_default,
    _now,
    _write_atomic,
    check_evaluator,
)
from diffalign.feedback.submissions import Submissions

SIDES = ("left", "right", "none")
CHOICES = ("a", "b", "none")


class Comparisons(Submissions):
    """Creating comparisons, serving their pairs blind, recording and reading evaluators' picks."""

    def create_comparison(self, name: str, model_a: str, model_b: str, prompts: list[str], images_a: list,
                          images_b: list, settings: dict | None = None, created_by: str = "cli",
                          seed: int = 0, pair_metadata: list[dict] | None = None) -> int:
        """Store the pairs ``(prompts[i], images_a[i], images_b[i])`` as comparison ``name``; returns its id.

        The side A is shown on is drawn per pair from ``seed`` (so a re-run places them identically).
        Idempotent by name: the same pairs again return the existing id; other pairs under the same name raise
        :class:`ConflictError` (picks belong to the pixels people saw).
        """
        if not isinstance(name, str) or not name.strip():
            raise FeedbackError("name: a comparison name is required")
        name, created_by = name.strip(), check_evaluator(created_by)
        n = len(prompts)
        if n == 0:
            raise FeedbackError("prompts: a comparison needs at least one pair")
        if len(images_a) != n or len(images_b) != n:
            raise FeedbackError(f"images: {len(images_a)} images of A and {len(images_b)} of B for {n} prompts; "
                                f"every prompt needs one image of each")
        if any(not isinstance(p, str) or not p.strip() or len(p) > MAX_PROMPT_LENGTH for p in prompts):
            raise FeedbackError(f"prompts: every prompt must be non-empty text of at most {MAX_PROMPT_LENGTH} characters")
        metadata = [json.dumps(m or {}, sort_keys=True, default=_json_default)
                    for m in (pair_metadata or [None] * n)]
        files = [[self._put_png(im) for im in images_a], [self._put_png(im) for im in images_b]]
        a_on_left = np.random.default_rng([int(seed), 11]).random(n) < 0.5  # (n,) per pair, fixed at creation
        settings_json = json.dumps(settings or {}, sort_keys=True, default=str)
        with self._write() as c:
            row = c.execute("SELECT id FROM comparisons WHERE name = ?", (name,)).fetchone()
            if row is not None:
                stored = [(r["sha256_a"], r["sha256_b"]) for r in c.execute(
                    "SELECT sha256_a, sha256_b FROM comparison_pairs WHERE comparison_id = ? ORDER BY position",
                    (row["id"],))]
                if stored != [(a[0], b[0]) for a, b in zip(*files, strict=True)]:
                    raise ConflictError(f"name: comparison {name!r} already exists in {self.directory} with other "
                                        f"images; choose another --name (its picks belong to its own images)")
                return int(row["id"])
            cid = int(c.execute("INSERT INTO comparisons (name, model_a, model_b, settings, created_by, created_at) "
                                "VALUES (?, ?, ?, ?, ?, ?)",
                                (name, model_a, model_b, settings_json, created_by, _now())).lastrowid)
            for k in range(n):
                (sa, fa), (sb, fb) = files[0][k], files[1][k]
                c.execute("INSERT INTO comparison_pairs (comparison_id, position, prompt, seed_index, sha256_a, "
                          "file_a, sha256_b, file_b, a_on_left, metadata) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                          (cid, k, prompts[k].strip(), k, sa, fa, sb, fb, int(a_on_left[k]), metadata[k]))
            c.execute("INSERT INTO audit_log (run_id, action, actor, detail, created_at) VALUES (NULL, ?, ?, ?, ?)",
                      ("create_comparison", created_by, json.dumps({"comparison_id": cid, "name": name, "pairs": n,
                                                                    "model_a": model_a, "model_b": model_b}), _now()))
        return cid

    def _put_png(self, image) -> tuple[str, str]:
        data, _, _ = _encode_png(image)
        digest = hashlib.sha256(data).hexdigest()
        rel = f"{IMAGE_DIR}/{digest[:2]}/{digest}.png"
        if not (self.directory / rel).exists():
            _write_atomic(self.directory / rel, data)
        return digest, rel

    # ------------------------------------------------------------------ reading

    def _comparison_row(self, c: sqlite3.Connection, comparison_id: int) -> sqlite3.Row:
        row = c.execute("SELECT * FROM comparisons WHERE id = ?", (comparison_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"comparison_id: no comparison with id {comparison_id}")
        return row

    def get_comparison(self, comparison_id: int) -> dict:
        """A comparison with its model names and settings (not for evaluators: the app never sends this)."""
        comparison_id = _check_int(comparison_id, "comparison_id")
        with self._read() as c:
            row = self._comparison_row(c, comparison_id)
            n = c.execute("SELECT COUNT(*) FROM comparison_pairs WHERE comparison_id = ?", (comparison_id,)).fetchone()[0]
        return {"id": comparison_id, "name": row["name"], "model_a": row["model_a"], "model_b": row["model_b"],
                "settings": json.loads(row["settings"]), "created_by": row["created_by"],
                "created_at": row["created_at"], "pairs": int(n)}

    def find_comparison(self, name: str) -> int | None:
        row = self._conn().execute("SELECT id FROM comparisons WHERE name = ?", (str(name).strip(),)).fetchone()
        return None if row is None else int(row["id"])

    def list_comparisons(self) -> list[dict]:
        """Every comparison, blind: id, name, pairs, creation time (no model names)."""
        with self._read() as c:
            rows = c.execute("SELECT c.id, c.name, c.created_at, COUNT(p.id) AS pairs FROM comparisons c "
                             "LEFT JOIN comparison_pairs p ON p.comparison_id = c.id GROUP BY c.id ORDER BY c.id").fetchall()
        return [{"id": int(r["id"]), "name": r["name"], "created_at": r["created_at"], "pairs": int(r["pairs"])}
                for r in rows]

    def _pair_row(self, c: sqlite3.Connection, pair_id: int) -> sqlite3.Row:
        row = c.execute("SELECT * FROM comparison_pairs WHERE id = ?", (pair_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"pair_id: no comparison pair with id {pair_id}")
        return row

    def pairs(self, comparison_id: int) -> list[dict]:
        """Every pair, unblinded (for reports): position, prompt, image files of A and B, side of A, metadata."""
        comparison_id = _check_int(comparison_id, "comparison_id")
        with self._read() as c:
            self._comparison_row(c, comparison_id)
            rows = c.execute("SELECT * FROM comparison_pairs WHERE comparison_id = ? ORDER BY position",
                             (comparison_id,)).fetchall()
        return [{"pair_id": int(r["id"]), "position": int(r["position"]), "prompt": r["prompt"],
                 "sha256_a": r["sha256_a"], "sha256_b": r["sha256_b"], "a_on_left": bool(r["a_on_left"]),
                 "metadata": json.loads(r["metadata"])} for r in rows]

    def pair_info(self, pair_id: int) -> dict:
        """A pair's comparison, prompt, side of A and metadata (server-side only: it says which side is A)."""
        pair_id = _check_int(pair_id, "pair_id")
        with self._read() as c:
            r = self._pair_row(c, pair_id)
        return {"pair_id": pair_id, "comparison_id": int(r["comparison_id"]), "position": int(r["position"]),
                "prompt": r["prompt"], "a_on_left": bool(r["a_on_left"]), "metadata": json.loads(r["metadata"])}

    def pair_image_path(self, pair_id: int, side: str) -> Path:
        """The PNG shown on ``side`` ('left' or 'right') of a pair; ``side`` may also be 'a' or 'b' (reports)."""
        pair_id = _check_int(pair_id, "pair_id")
        if side not in ("left", "right", "a", "b"):
            raise FeedbackError(f"side: expected 'left' or 'right', got {side!r}")
        with self._read() as c:
            row = self._pair_row(c, pair_id)
        if side in ("left", "right"):
            side = side_model(side, bool(row["a_on_left"]))
        path = (self.directory / row[f"file_{side}"]).resolve()
        if not path.is_relative_to(self.image_dir.resolve()):
            raise NotFoundError(f"pair_id: the image file of pair {pair_id} is not inside the store's images/ folder")
        return path

    def load_pair_image(self, pair_id: int, side: str) -> np.ndarray:
        from PIL import Image

        with Image.open(self.pair_image_path(pair_id, side)) as im:
            return np.asarray(im.convert("RGB"))

    def next_pair(self, comparison_id: int, evaluator: str | None = None) -> dict:
        """What the page shows next: the first pair ``evaluator`` has not decided (blind), and the progress."""
        comparison_id = _check_int(comparison_id, "comparison_id")
        name = check_evaluator(evaluator) if evaluator else None
        with self._read() as c:
            self._comparison_row(c, comparison_id)
            rows = c.execute("SELECT id, position, prompt, a_on_left, metadata FROM comparison_pairs WHERE comparison_id = ? "
                             "ORDER BY position", (comparison_id,)).fetchall()
            decided: set[int] = set()
            if name is not None:
                decided = {int(r["pair_id"]) for r in c.execute(
                    "SELECT DISTINCT x.pair_id FROM comparison_choices x JOIN evaluators e ON e.id = x.evaluator_id "
                    "JOIN comparison_pairs p ON p.id = x.pair_id WHERE p.comparison_id = ? AND e.name = ?",
                    (comparison_id, name))}
        todo = [r for r in rows if int(r["id"]) not in decided]
        out: dict = {"comparison_id": comparison_id, "total": len(rows), "decided": len(rows) - len(todo), "pair": None}
        if todo:
            r = todo[0]
            out["pair"] = blind_pair(int(r["id"]), r["prompt"], int(r["position"]), bool(r["a_on_left"]),
                                     json.loads(r["metadata"]))
        return out

    # ------------------------------------------------------------------ picks

    def choose(self, pair_id: int, evaluator: str, shown: str) -> int:
        """Record ``evaluator``'s pick of a pair: 'left', 'right' or 'none' (no preference); returns its id.

        The same pick again returns the existing id (a re-sent request is stored once); a different pick is
        appended and supersedes the earlier one, which stays in the audit trail.
        """
        pair_id = _check_int(pair_id, "pair_id")
        name = check_evaluator(evaluator)
        shown = shown.strip().lower() if isinstance(shown, str) else shown
        if shown not in SIDES:
            raise FeedbackError(f"choice: expected 'left', 'right' or 'none' (no preference), got {shown!r}")
        with self._write() as c:
            row = self._pair_row(c, pair_id)
            choice = "none" if shown == "none" else side_model(shown, bool(row["a_on_left"]))
            evaluator_id = self._evaluator_id(c, name)
            last = c.execute("SELECT id, choice FROM comparison_choices WHERE pair_id = ? AND evaluator_id = ? "
                             "ORDER BY id DESC LIMIT 1", (pair_id, evaluator_id)).fetchone()
            if last is not None and last["choice"] == choice:
                return int(last["id"])
            return int(c.execute("INSERT INTO comparison_choices (pair_id, evaluator_id, shown, choice, created_at) "
                                 "VALUES (?, ?, ?, ?, ?)", (pair_id, evaluator_id, shown, choice, _now())).lastrowid)

    def comparison_choices(self, comparison_id: int, latest_only: bool = True) -> list[dict]:
        """The picks of a comparison, oldest first: each evaluator's latest per pair, or every pick (audit)."""
        comparison_id = _check_int(comparison_id, "comparison_id")
        latest = ("AND x.id IN (SELECT MAX(id) FROM comparison_choices GROUP BY pair_id, evaluator_id)"
                  if latest_only else "")
        with self._read() as c:
            self._comparison_row(c, comparison_id)
            rows = c.execute(
                "SELECT x.id, x.pair_id, p.position, p.prompt, e.name AS evaluator, x.shown, x.choice, x.created_at "
                "FROM comparison_choices x JOIN comparison_pairs p ON p.id = x.pair_id "
                f"JOIN evaluators e ON e.id = x.evaluator_id WHERE p.comparison_id = ? {latest} ORDER BY x.id",
                (comparison_id,)).fetchall()
        return [{"choice_id": int(r["id"]), "pair_id": int(r["pair_id"]), "position": int(r["position"]),
                 "prompt": r["prompt"], "evaluator": r["evaluator"], "shown": r["shown"], "choice": r["choice"],
                 "created_at": r["created_at"]} for r in rows]

    def comparison_audit(self, comparison_id: int) -> list[dict]:
        """The audit-log entries of a comparison (its creation, with who ran it)."""
        comparison_id = _check_int(comparison_id, "comparison_id")
        with self._read() as c:
            rows = c.execute("SELECT action, actor, detail, created_at FROM audit_log WHERE run_id IS NULL "
                             "ORDER BY id").fetchall()
        out = [{"action": r["action"], "actor": r["actor"], "detail": json.loads(r["detail"]),
                "created_at": r["created_at"]} for r in rows]
        return [e for e in out if e["detail"].get("comparison_id") == comparison_id]


def blind_pair(pair_id: int, prompt: str, position: int, a_on_left: bool, metadata: dict) -> dict:
    """What an evaluator may see of a pair: the prompt and two image URLs by side, nothing naming a model.
    An image the safety filter flagged has no URL, only the reason (the app refuses to serve it too)."""
    out: dict = {"id": pair_id, "position": position, "prompt": prompt}
    for side in ("left", "right"):
        reason = flag_reason(metadata, side_model(side, a_on_left))
        out[side] = {"url": None if reason else f"/api/pairs/{pair_id}/{side}.png", "flagged": bool(reason),
                     "flag_reason": reason}
    return out


def side_model(side: str, a_on_left: bool) -> str:
    """'a' or 'b': the model whose image is shown on ``side``."""
    return "a" if (side == "left") == a_on_left else "b"


def flag_reason(metadata: dict, model: str) -> str | None:
    """Why the safety filter flagged model ``model``'s image of a pair (metadata ``flagged_a``/``flagged_b``), or None."""
    return metadata.get(f"flagged_{model}") or None
