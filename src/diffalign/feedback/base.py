"""The feedback store's foundations: errors, records, field checks, and the SQLite connections and schema.

:class:`StoreBase` owns the database (one connection per thread, WAL mode, ``BEGIN IMMEDIATE`` writers,
the schema and its upgrade); the parts of :class:`~diffalign.feedback.store.FeedbackStore` that work on
runs and rounds, submissions, and aggregation build on it (``rounds.py``, ``submissions.py``,
``aggregation.py``).
"""

from __future__ import annotations

import contextlib
import io
import operator
import os
import re
import sqlite3
import tempfile
import threading
from collections.abc import Iterator
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


def find_evaluator(c: sqlite3.Connection, name: str) -> sqlite3.Row | None:
    """The evaluator called ``name``, matched case-insensitively ("Alice" is "alice"), or None.

    The exact spelling wins; a store written before names were matched this way may hold both spellings
    as two evaluators, and each keeps its own labels. ``casefold`` rather than SQLite's ``NOCASE``, which
    folds ASCII only.
    """
    exact = c.execute("SELECT id, name FROM evaluators WHERE name = ?", (name,)).fetchone()
    if exact is not None:
        return exact
    key = name.casefold()
    matches = [r for r in c.execute("SELECT id, name FROM evaluators ORDER BY id") if r["name"].casefold() == key]
    return matches[0] if matches else None


def _json_default(value: Any) -> Any:
    """JSON for numpy scalars and arrays in image metadata."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    return str(value)


class StoreBase:
    """The database of a store: connections, transactions, schema. See :class:`FeedbackStore`."""

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

    def __enter__(self):
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

