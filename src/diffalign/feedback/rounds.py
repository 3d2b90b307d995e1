"""Runs and rounds of the feedback store: a run's recorded config, its metrics, rounds identified by their images.

Part of :class:`~diffalign.feedback.store.FeedbackStore` (see ``store.py``).
"""

from __future__ import annotations

import hashlib
import json
import math
import operator
import sqlite3
from pathlib import Path
from typing import Any

from diffalign.feedback.base import (
    IMAGE_DIR,
    MAX_PROMPT_LENGTH,
    ConflictError,
    FeedbackError,
    NotFoundError,
    RoundInfo,
    StoreBase,
    _check_int,
    _encode_png,
    _json_default,
    _now,
    _write_atomic,
)


class RunsAndRounds(StoreBase):
    """Runs (name, config history, metrics), rounds and their images."""

    # ------------------------------------------------------------------ runs

    def create_run(self, name: str, config: dict | None = None, resume: bool = False) -> int:
        """The id of the run called ``name``, created if new.

        The store records the config a run was created with. Opening an existing run with a *different*
        config raises :class:`ConflictError` naming the differing fields, unless ``resume`` is true (a
        resumed session may change, e.g., the number of rounds): then the new config is appended to the
        run's config history (``run_configs``). The same config again is fine either way.
        """
        if not isinstance(name, str) or not name.strip():
            raise FeedbackError("name: a run name is required")
        name = name.strip()
        config_json = json.dumps(config or {}, sort_keys=True, default=str)
        with self._write() as c:
            row = c.execute("SELECT id, config FROM runs WHERE name = ?", (name,)).fetchone()
            if row is None:
                cur = c.execute("INSERT INTO runs (name, config, created_at) VALUES (?, ?, ?)",
                                (name, config_json, _now()))
                run_id = int(cur.lastrowid)
                c.execute("INSERT INTO run_configs (run_id, config, reason, recorded_at) VALUES (?, ?, ?, ?)",
                          (run_id, config_json, "created", _now()))
                return run_id
            run_id = int(row["id"])
            if config is None:
                return run_id
            last = c.execute("SELECT config FROM run_configs WHERE run_id = ? ORDER BY id DESC LIMIT 1",
                             (run_id,)).fetchone()
            current = json.loads(last["config"] if last is not None else row["config"])
            new = json.loads(config_json)
            if current == new:
                return run_id
            diff = config_diff(current, new)
            if not resume:
                shown = "; ".join(diff[:8]) + (f"; and {len(diff) - 8} more" if len(diff) > 8 else "")
                raise ConflictError(
                    f"config: run {name!r} in the feedback store {self.directory} was started with another config "
                    f"({shown}). Its rounds and labels belong to that config: pass --resume to continue it with "
                    f"this config, or use a new output_dir (or feedback.store_dir) for a new session")
            c.execute("INSERT INTO run_configs (run_id, config, reason, recorded_at) VALUES (?, ?, ?, ?)",
                      (run_id, config_json, "resume", _now()))
            return run_id

    def run_configs(self, run_id: int) -> list[dict]:
        """Every config a run was created or resumed with, oldest first: ``{"config", "reason", "recorded_at"}``."""
        run_id = _check_int(run_id, "run_id")
        with self._read() as c:
            self._run_row(c, run_id)
            rows = c.execute("SELECT config, reason, recorded_at FROM run_configs WHERE run_id = ? ORDER BY id",
                             (run_id,)).fetchall()
        return [{"config": json.loads(r["config"]), "reason": r["reason"], "recorded_at": r["recorded_at"]}
                for r in rows]

    def _run_row(self, c: sqlite3.Connection, run_id: int) -> sqlite3.Row:
        row = c.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"run_id: no run with id {run_id}")
        return row

    def get_run(self, run_id: int) -> dict:
        """A run's id, name, config and creation time."""
        run_id = _check_int(run_id, "run_id")
        row = self._run_row(self._conn(), run_id)
        return {"id": run_id, "name": row["name"], "config": json.loads(row["config"]),
                "created_at": row["created_at"]}

    def list_runs(self) -> list[dict]:
        with self._read() as c:
            ids = [int(r["id"]) for r in c.execute("SELECT id FROM runs ORDER BY id")]
        return [self.run_summary(i) for i in ids]

    def set_run_metric(self, run_id: int, name: str, value: float, iteration: int | None = None) -> None:
        """Record a measured metric of a run (e.g. ``success_rate``); appended, the latest value is shown."""
        run_id = _check_int(run_id, "run_id")
        if not isinstance(name, str) or not name.strip():
            raise FeedbackError("name: a metric name is required")
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise FeedbackError(f"value: expected a number, got {value!r}") from None
        if not math.isfinite(value):
            raise FeedbackError(f"value: expected a finite number, got {value!r}")
        with self._write() as c:
            self._run_row(c, run_id)
            c.execute("INSERT INTO run_metrics (run_id, name, value, iteration, recorded_at) VALUES (?, ?, ?, ?, ?)",
                      (run_id, name.strip(), value, iteration, _now()))

    def run_metrics(self, run_id: int) -> dict[str, dict]:
        """The latest value of each metric of a run: ``{name: {"value", "iteration", "recorded_at"}}``."""
        with self._read() as c:
            self._run_row(c, run_id)
            rows = c.execute("SELECT name, value, iteration, recorded_at FROM run_metrics WHERE run_id = ? "
                             "ORDER BY id", (run_id,)).fetchall()
        return {r["name"]: {"value": r["value"], "iteration": r["iteration"], "recorded_at": r["recorded_at"]}
                for r in rows}

    # ------------------------------------------------------------------ rounds and images

    def create_round(self, run_id: int, iteration: int, prompt: str, images: list,
                     evaluators_required: int = 1, previous_best_image_id: int | None = None,
                     image_metadata: list[dict] | None = None) -> RoundInfo:
        """Store a batch of images for evaluation and return the round.

        Idempotent by ``(run_id, iteration)``: if that round exists (a restarted trainer) it is returned as
        it is, with its original image ids; a different prompt or number of images raises ConflictError.
        """
        run_id = _check_int(run_id, "run_id")
        iteration = _check_int(iteration, "iteration")
        if not isinstance(prompt, str) or not prompt.strip():
            raise FeedbackError("prompt: a prompt is required")
        if len(prompt) > MAX_PROMPT_LENGTH:
            raise FeedbackError(f"prompt: at most {MAX_PROMPT_LENGTH} characters")
        evaluators_required = _check_int(evaluators_required, "evaluators_required")
        if evaluators_required < 1:
            raise FeedbackError("evaluators_required: must be at least 1")
        if previous_best_image_id is not None:
            previous_best_image_id = _check_int(previous_best_image_id, "previous_best_image_id")
        images = list(images)
        if not images:
            raise FeedbackError("images: a round needs at least one image")
        if image_metadata is not None:
            image_metadata = list(image_metadata)
            if len(image_metadata) != len(images):
                raise FeedbackError(f"image_metadata: {len(image_metadata)} entries for {len(images)} images")
        pngs = [_encode_png(image) for image in images]
        digests = [hashlib.sha256(data).hexdigest() for data, _, _ in pngs]
        metadata = [json.dumps(m or {}, sort_keys=True, default=_json_default) for m in
                    (image_metadata or [None] * len(images))]
        existing = self._existing_round(run_id, iteration, prompt, digests, metadata)
        if existing is not None:
            return existing

        # Write the files first (content-addressed, so a crash leaves at most an unreferenced file).
        encoded = []
        for (data, width, height), digest in zip(pngs, digests, strict=True):
            rel = f"{IMAGE_DIR}/{digest[:2]}/{digest}.png"
            path = self.directory / rel
            if not path.exists():
                _write_atomic(path, data)
            encoded.append((digest, rel, width, height))

        with self._write() as c:
            self._run_row(c, run_id)
            row = c.execute("SELECT id FROM rounds WHERE run_id = ? AND iteration = ?", (run_id, iteration)).fetchone()
            if row is None:
                if previous_best_image_id is not None:
                    prev = c.execute("SELECT r.run_id FROM images i JOIN rounds r ON r.id = i.round_id "
                                     "WHERE i.id = ?", (previous_best_image_id,)).fetchone()
                    if prev is None:
                        raise NotFoundError(f"previous_best_image_id: no image with id {previous_best_image_id}")
                    if int(prev["run_id"]) != run_id:
                        raise FeedbackError(f"previous_best_image_id: image {previous_best_image_id} belongs to "
                                            f"another run")
                now = _now()
                cur = c.execute(
                    "INSERT INTO rounds (run_id, iteration, prompt, evaluators_required, previous_best_image_id, "
                    "created_at) VALUES (?, ?, ?, ?, ?, ?)",
                    (run_id, iteration, prompt, evaluators_required, previous_best_image_id, now))
                round_id = int(cur.lastrowid)
                for position, ((digest, rel, width, height), meta) in enumerate(zip(encoded, metadata, strict=True)):
                    c.execute("INSERT INTO images (round_id, position, sha256, file, width, height, metadata, "
                              "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                              (round_id, position, digest, rel, width, height, meta, now))
        existing = self._existing_round(run_id, iteration, prompt, digests, metadata)
        assert existing is not None
        return existing

    def _existing_round(self, run_id: int, iteration: int, prompt: str, digests: list[str],
                        metadata: list[str]) -> RoundInfo | None:
        """The round ``(run_id, iteration)`` if it exists and holds exactly these images, else ConflictError.

        A round is identified by its images' content (sha256 of the PNG), not by its prompt and size: labels
        belong to the pixels people saw, and a re-run that sampled other images must never inherit them.
        """
        with self._read() as c:
            row = c.execute("SELECT id FROM rounds WHERE run_id = ? AND iteration = ?",
                            (run_id, iteration)).fetchone()
            if row is None:
                return None
            info = self._round_info(c, int(row["id"]))
            stored = c.execute("SELECT sha256, metadata FROM images WHERE round_id = ? ORDER BY position",
                               (info.id,)).fetchall()
        where = f"round {info.id} (run {run_id}, iteration {iteration})"
        fix = (f"The feedback store {self.directory} holds an earlier session whose labels belong to its own "
               f"images: to continue that session run with --resume (which samples the same images again); to "
               f"start a new session use a new output_dir (or feedback.store_dir)")
        if info.prompt != prompt:
            raise ConflictError(f"prompt: {where} already exists with prompt {info.prompt!r}, not {prompt!r}. {fix}")
        if len(stored) != len(digests):
            raise ConflictError(f"images: {where} already exists with {len(stored)} images, not {len(digests)}. "
                                f"{fix}")
        differ = [k for k, (r, d) in enumerate(zip(stored, digests, strict=True)) if r["sha256"] != d]
        if differ:
            seeds = _seed_difference([json.loads(r["metadata"]) for r in stored], [json.loads(m) for m in metadata])
            raise ConflictError(
                f"images: {where} already holds other images: {len(differ)} of {len(digests)} differ by content "
                f"hash (positions {_ranges(differ)}){seeds}. {fix}")
        return info

    def _round_info(self, c: sqlite3.Connection, round_id: int) -> RoundInfo:
        row = c.execute("SELECT * FROM rounds WHERE id = ?", (round_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"round_id: no round with id {round_id}")
        image_ids = [int(r["id"]) for r in c.execute(
            "SELECT id FROM images WHERE round_id = ? ORDER BY position", (round_id,))]
        return RoundInfo(id=int(row["id"]), run_id=int(row["run_id"]), iteration=int(row["iteration"]),
                         prompt=row["prompt"], image_ids=image_ids,
                         evaluators_required=int(row["evaluators_required"]),
                         previous_best_image_id=row["previous_best_image_id"], created_at=row["created_at"])

    def get_round(self, round_id: int) -> RoundInfo:
        round_id = _check_int(round_id, "round_id")
        with self._read() as c:
            return self._round_info(c, round_id)

    def find_round(self, run_id: int, iteration: int) -> RoundInfo | None:
        row = self._conn().execute("SELECT id FROM rounds WHERE run_id = ? AND iteration = ?",
                                   (run_id, iteration)).fetchone()
        return None if row is None else self.get_round(int(row["id"]))

    def open_rounds(self, run_id: int | None = None) -> list[RoundInfo]:
        """Rounds that still wait for evaluators (open, not complete), oldest first."""
        sql = "SELECT r.id FROM rounds r WHERE NOT EXISTS (SELECT 1 FROM round_closures k WHERE k.round_id = r.id)"
        args: tuple = ()
        if run_id is not None:
            sql += " AND r.run_id = ?"
            args = (_check_int(run_id, "run_id"),)
        with self._read() as c:
            ids = [int(r["id"]) for r in c.execute(sql + " ORDER BY r.id", args).fetchall()]
        waiting = [i for i in ids if operator.lt(*self._progress(i))]  # excluded evaluators do not count
        with self._read() as c:
            return [self._round_info(c, i) for i in waiting]

    def image_path(self, image_id: int) -> Path:
        """The PNG file of an image (by id only: paths never come from outside).

        The path is the database's, and the database is a file on disk too: a row edited to point outside
        ``images/`` (``../feedback.sqlite``, an absolute path, a symlink) is refused, never served.
        """
        path = (self.directory / self.image_info(image_id)["file"]).resolve()
        if not path.is_relative_to(self.image_dir.resolve()):
            raise NotFoundError(f"image_id: the file of image {image_id} is not inside the store's images/ folder")
        return path

    def image_info(self, image_id: int) -> dict:
        image_id = _check_int(image_id, "image_id")
        row = self._conn().execute("SELECT * FROM images WHERE id = ?", (image_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"image_id: no image with id {image_id}")
        return {"id": int(row["id"]), "round_id": int(row["round_id"]), "position": int(row["position"]),
                "sha256": row["sha256"], "file": row["file"], "width": int(row["width"]),
                "height": int(row["height"]), "metadata": json.loads(row["metadata"])}

    def load_image(self, image_id: int):
        """The image as a uint8 HxWx3 numpy array."""
        import numpy as np
        from PIL import Image

        with Image.open(self.image_path(image_id)) as im:
            return np.asarray(im.convert("RGB"))


def _ranges(positions: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    parts, start = [], None
    for k, p in enumerate(positions):
        if start is None:
            start = p
        if k + 1 == len(positions) or positions[k + 1] != p + 1:
            parts.append(str(start) if start == p else f"{start}-{p}")
            start = None
    return ", ".join(parts)


def _seed_difference(stored: list[dict], new: list[dict]) -> str:
    """", sampling seed 0 stored, 1 now" when the images' metadata record different ``seed`` values."""
    old_seeds = sorted({str(m["seed"]) for m in stored if "seed" in m})
    new_seeds = sorted({str(m["seed"]) for m in new if "seed" in m})
    if old_seeds and new_seeds and old_seeds != new_seeds:
        return f"; sampling seed {', '.join(old_seeds)} stored, {', '.join(new_seeds)} now"
    return ""


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def config_diff(old: dict, new: dict) -> list[str]:
    """The fields that differ between two nested configs, as ``"field: old -> new"`` lines (sorted)."""
    a, b = _flatten(old), _flatten(new)

    def shown(flat: dict, key: str) -> str:
        return repr(flat[key]) if key in flat else "(unset)"
    return [f"{key}: {shown(a, key)} -> {shown(b, key)}" for key in sorted(set(a) | set(b))
            if key not in a or key not in b or a[key] != b[key]]
