"""A durable store of human feedback on generated images, on SQLite (standard library ``sqlite3``).

Layout of a store directory::

    feedback.sqlite      runs, rounds, images, evaluators, submissions, labels, run metrics (WAL mode)
    images/ab/abcd....png  the PNG files, content-addressed by their sha256

The training loop creates a *round* (a batch of images for one prompt) with :meth:`FeedbackStore.create_round`,
waits for it with :meth:`FeedbackStore.wait_for_round` and reads the aggregated labels. Evaluators (people
through the labeling app, or :class:`~diffalign.feedback.simulated.SimulatedEvaluator`) go through
:meth:`FeedbackStore.submit`. Every submission is one transaction; nothing is ever overwritten: a changed
submission by the same evaluator is appended and supersedes the older one, which stays as an audit trail.

The store is safe to use from several threads (one SQLite connection per thread) and several processes
(WAL mode, ``busy_timeout``, write transactions taken with ``BEGIN IMMEDIATE``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import operator
import os
import re
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from diffalign.feedback import schema as _schema
from diffalign.feedback.schema import SCHEMA_VERSION

DB_NAME = "feedback.sqlite"
IMAGE_DIR = "images"
LABELS = ("good", "bad")
MAX_EVALUATOR_LENGTH = 64
MAX_PROMPT_LENGTH = 2000
BUSY_TIMEOUT_MS = 30_000


class FeedbackError(ValueError):
    """A request the store refuses (bad field, unknown id, conflict). The message names the field."""

    status_code = 400


class NotFoundError(FeedbackError):
    """An unknown run, round or image id."""

    status_code = 404


class ConflictError(FeedbackError):
    """A request that contradicts what the store already holds (e.g. a round re-created with another prompt)."""

    status_code = 409


class RoundClosedError(ConflictError):
    """A submission to a round that training has already read (closed): it would not change what was learned."""


class SchemaVersionError(FeedbackError):
    """The store was written by a newer diffalign than this one."""


@dataclass
class RoundInfo:
    id: int
    run_id: int
    iteration: int
    prompt: str
    image_ids: list[int]
    evaluators_required: int
    previous_best_image_id: int | None
    created_at: str


@dataclass
class RoundFeedback:
    """The aggregated feedback on a round.

    ``good[i]`` is the majority label on ``image_ids[i]`` over the evaluators' latest submissions (ties and
    no votes count as bad). ``best_image_id`` is the most-picked best among the candidates that are still
    good after aggregation (or the round's previous best image); ties go to the pick made in the earliest
    submission. ``best_index`` indexes ``image_ids``; it is ``None`` when nobody picked a best or the best is
    the previous round's best image (not in this batch). ``labels_used`` counts the aggregated labels (one per
    evaluator per image); ``closed`` says whether this is what training used (:meth:`FeedbackStore.close_round`).
    """

    round_id: int
    image_ids: list[int]
    good: list[bool]
    best_image_id: int | None
    best_index: int | None
    per_evaluator: dict[str, dict] = field(default_factory=dict)
    labels_used: int = 0
    closed: bool = False


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")




def _encode_png(image: Any) -> tuple[bytes, int, int]:
    """PNG bytes, width and height of a PIL image or a uint8 HxWx3 (or HxW, HxWx4) array."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        import numpy as np

        arr = np.asarray(image)
        if arr.dtype != np.uint8:
            raise FeedbackError(f"images: expected uint8 arrays, got dtype {arr.dtype}")
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
            raise FeedbackError(f"images: expected HxWx3 arrays, got shape {tuple(arr.shape)}")
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        image = Image.fromarray(np.ascontiguousarray(arr))
    if image.mode not in ("RGB", "RGBA", "L"):
        image = image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue(), image.width, image.height


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _check_int(value: Any, name: str) -> int:
    """An integer id (int, numpy integer or a string of digits), or FeedbackError naming the field."""
    if isinstance(value, bool):
        raise FeedbackError(f"{name}: expected an integer id, got {value!r}")
    if isinstance(value, int):
        return _in_sqlite_range(value, name)
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d{1,18}\s*", value):
        return int(value)
    if not isinstance(value, (str, float)) and hasattr(value, "__index__"):
        return _in_sqlite_range(operator.index(value), name)
    raise FeedbackError(f"{name}: expected an integer id, got {value!r}")


def _in_sqlite_range(value: int, name: str) -> int:
    # SQLite integers are 64-bit; a larger id (found by the API fuzzer) would raise OverflowError, a 500.
    if not -(2**63) <= value < 2**63:
        raise FeedbackError(f"{name}: id {value} is out of range (ids are 64-bit integers)")
    return value


def check_evaluator(evaluator: Any) -> str:
    """The cleaned evaluator name, or FeedbackError naming the field."""
    if not isinstance(evaluator, str):
        raise FeedbackError("evaluator: expected a name (string)")
    name = evaluator.strip()
    if not name:
        raise FeedbackError("evaluator: a name is required")
    if len(name) > MAX_EVALUATOR_LENGTH:
        raise FeedbackError(f"evaluator: at most {MAX_EVALUATOR_LENGTH} characters")
    if any(not ch.isprintable() for ch in name):
        raise FeedbackError("evaluator: control characters are not allowed")
    return name


class FeedbackStore:
    """Runs, rounds, images, labels and best picks in ``directory/feedback.sqlite`` and ``directory/images/``."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.image_dir = self.directory / IMAGE_DIR
        self.image_dir.mkdir(exist_ok=True)
        self.db_path = self.directory / DB_NAME
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        self._init_schema()

    # ------------------------------------------------------------------ connections

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is not None and getattr(self._local, "pid", None) == os.getpid():
            return conn
        conn = sqlite3.connect(self.db_path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                               check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA synchronous = FULL")
        self._local.conn = conn
        self._local.pid = os.getpid()
        with self._lock:
            self._connections.append(conn)
        return conn

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE``: writers are serialised, the check-then-insert is atomic)."""
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        else:
            conn.execute("COMMIT")

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A consistent snapshot for several SELECTs."""
        conn = self._conn()
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            if conn.in_transaction:
                conn.execute("COMMIT")

    def close(self) -> None:
        """Close every connection this object opened (from any thread), checkpointing the WAL first.

        In WAL mode committed transactions live in ``feedback.sqlite-wal`` until a checkpoint copies them
        into ``feedback.sqlite``; a clean close does that (``TRUNCATE`` also empties the WAL file), so a
        closed store's main file holds everything. While another process still reads the store the
        checkpoint may be partial; nothing is lost either way (SQLite finishes it later).
        """
        with self._lock:
            conns, self._connections = self._connections, []
        if conns:
            with contextlib.suppress(sqlite3.Error):
                conns[0].execute("PRAGMA wal_checkpoint(TRUNCATE)")
        for conn in conns:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        self._local = threading.local()

    def checkpoint(self) -> tuple[int, int, int]:
        """Copy the WAL into the main database file now: ``(busy, wal_pages, checkpointed_pages)``."""
        row = self._conn().execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        return int(row[0]), int(row[1]), int(row[2])

    def __enter__(self) -> FeedbackStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _init_schema(self) -> None:
        conn = self._conn()
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        self._check_version(version)
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":  # e.g. a file system without shared memory
            raise FeedbackError(f"store: could not switch {self.db_path} to WAL mode (got {mode!r})")
        if version == SCHEMA_VERSION:
            return
        with self._write() as c:
            version = c.execute("PRAGMA user_version").fetchone()[0]  # another process may have won the race
            self._check_version(version)
            if version < SCHEMA_VERSION:
                _schema.apply(c, _now())

    def _check_version(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"feedback store {self.db_path} has schema version {version}, newer than the version this "
                f"diffalign supports ({SCHEMA_VERSION}); upgrade diffalign to open it")

    @property
    def schema_version(self) -> int:
        return int(self._conn().execute("PRAGMA user_version").fetchone()[0])

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
        }

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
        sql = ("SELECT r.id FROM rounds r WHERE (SELECT COUNT(DISTINCT s.evaluator_id) FROM submissions s "
               "WHERE s.round_id = r.id) < r.evaluators_required "
               "AND NOT EXISTS (SELECT 1 FROM round_closures k WHERE k.round_id = r.id)")
        args: tuple = ()
        if run_id is not None:
            sql += " AND r.run_id = ?"
            args = (_check_int(run_id, "run_id"),)
        with self._read() as c:
            return [self._round_info(c, int(r["id"])) for r in c.execute(sql + " ORDER BY r.id", args).fetchall()]

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

    # ------------------------------------------------------------------ submissions

    def _evaluator_id(self, c: sqlite3.Connection, name: str) -> int:
        row = c.execute("SELECT id FROM evaluators WHERE name = ?", (name,)).fetchone()
        if row is not None:
            return int(row["id"])
        return int(c.execute("INSERT INTO evaluators (name, created_at) VALUES (?, ?)", (name, _now())).lastrowid)

    def submit(self, round_id: int, evaluator: str, labels: dict[int, str], best_image_id: int | None) -> int:
        """Record one evaluator's labels and best pick for a round, in one transaction; returns the submission id.

        ``labels`` maps every image id of the round to ``"good"`` or ``"bad"``. ``best_image_id`` is a good
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

    def _latest_submissions(self, c: sqlite3.Connection, round_id: int) -> list[sqlite3.Row]:
        """Each evaluator's latest submission for a round, oldest first."""
        return c.execute(
            "SELECT s.id, s.best_image_id, s.created_at, e.name AS evaluator FROM submissions s "
            "JOIN evaluators e ON e.id = s.evaluator_id WHERE s.id IN ("
            "  SELECT MAX(id) FROM submissions WHERE round_id = ? GROUP BY evaluator_id) ORDER BY s.id",
            (round_id,)).fetchall()

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
        round_id = _check_int(round_id, "round_id")
        c = self._conn()
        row = c.execute("SELECT evaluators_required, (SELECT COUNT(DISTINCT evaluator_id) FROM submissions "
                        "WHERE round_id = rounds.id) AS n FROM rounds WHERE id = ?", (round_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"round_id: no round with id {round_id}")
        return int(row["n"]), int(row["evaluators_required"])

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

    def round_feedback(self, round_id: int) -> RoundFeedback:
        """The labels of a round aggregated over the evaluators' latest submissions (see :class:`RoundFeedback`).

        For a closed round: exactly the submissions training used (:meth:`close_round`)."""
        round_id = _check_int(round_id, "round_id")
        with self._read() as c:
            info = self._round_info(c, round_id)
            closure = c.execute("SELECT submission_ids FROM round_closures WHERE round_id = ?", (round_id,)).fetchone()
            subs = (self._submissions_by_id(c, json.loads(closure["submission_ids"])) if closure is not None
                    else self._latest_submissions(c, round_id))
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
            latest = self._latest_submissions(c, round_id)
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
        with self._read() as c:
            metas = [json.loads(r["metadata"]) for r in c.execute(
                "SELECT metadata FROM images WHERE round_id = ? ORDER BY position", (round_id,))]
            closure = c.execute("SELECT labels_used, closed_at FROM round_closures WHERE round_id = ?",
                                (round_id,)).fetchone()
        successes = [m["success"] for m in metas if isinstance(m.get("success"), (bool, int, float))]
        return {
            "id": info.id, "run_id": info.run_id, "iteration": info.iteration, "prompt": info.prompt,
            "n_images": len(info.image_ids), "evaluators_required": info.evaluators_required,
            "evaluators_submitted": submitted, "complete": len(submitted) >= info.evaluators_required,
            "state": "closed" if closure is not None else "open",
            "closed_at": closure["closed_at"] if closure is not None else None,
            "labels_used": int(closure["labels_used"]) if closure is not None else 0,
            "labels_given": len(submitted) * len(info.image_ids), "created_at": info.created_at,
            "measured_success": (sum(float(s) for s in successes) / len(successes)) if successes else None,
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


def _planned_rounds(config: dict) -> int | None:
    """``feedback.rounds`` of a run's config, if it has one (for "round N of M")."""
    rounds = (config.get("feedback") or {}).get("rounds") if isinstance(config, dict) else None
    return int(rounds) if isinstance(rounds, int) and not isinstance(rounds, bool) else None


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


def _json_default(value: Any) -> Any:
    """JSON for numpy scalars and arrays in image metadata."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    return str(value)
