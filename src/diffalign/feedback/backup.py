"""A consistent copy of a feedback store while a session runs (``diffalign feedback backup --store DIR OUT``).

The database is copied with SQLite's online backup API (:meth:`sqlite3.Connection.backup`,
https://www.sqlite.org/backup.html): it reads one consistent snapshot, including transactions that are
still only in the ``-wal`` file, while the labeling app and the trainer keep writing. Copying
``feedback.sqlite`` with ``cp`` instead can miss every label that has not been checkpointed yet, or tear a
page. The images are then copied by the paths the *copied* database references; they are
content-addressed and written before the row that references them is committed, so every referenced file
exists, and each copy is checked against its sha256.
"""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
from pathlib import Path

from diffalign.feedback.store import BUSY_TIMEOUT_MS, DB_NAME, IMAGE_DIR, FeedbackError


def backup_store(store_dir: str | Path, out_dir: str | Path) -> dict:
    """Copy the store in ``store_dir`` to the new directory ``out_dir``; returns what was copied.

    ``out_dir`` is itself a store (open it with :class:`~diffalign.feedback.store.FeedbackStore` or serve
    it). It must not exist yet or be empty, so a backup never mixes with another store.
    """
    src_dir, out = Path(store_dir), Path(out_dir)
    db = src_dir / DB_NAME
    if not db.is_file():
        raise FeedbackError(f"--store: {src_dir} holds no feedback store ({DB_NAME} missing); pass the store "
                            f"directory, e.g. <output_dir>/feedback")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FeedbackError(f"OUT: {out} already exists and is not an empty directory; choose a new directory "
                            f"for the backup")
    out.mkdir(parents=True, exist_ok=True)
    src = sqlite3.connect(db, timeout=BUSY_TIMEOUT_MS / 1000)
    dst = sqlite3.connect(out / DB_NAME)
    try:
        src.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        src.backup(dst)
        # A self-contained single file (no -wal beside it); FeedbackStore switches it back to WAL on open.
        dst.execute("PRAGMA journal_mode = DELETE")
        problem = dst.execute("PRAGMA integrity_check").fetchone()[0]
        if problem != "ok":
            raise FeedbackError(f"OUT: the copied database fails SQLite's integrity check: {problem}")
        files = [(r[0], r[1]) for r in dst.execute("SELECT DISTINCT file, sha256 FROM images")]
        counts = {table: dst.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
                  for table in ("runs", "rounds", "submissions", "labels")}
    finally:
        src.close()
        dst.close()
    for rel, digest in files:
        source, target = src_dir / rel, out / rel
        if not Path(rel).parts or Path(rel).parts[0] != IMAGE_DIR or ".." in Path(rel).parts:
            raise FeedbackError(f"--store: image path {rel!r} in the database is outside {IMAGE_DIR}/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        if hashlib.sha256(target.read_bytes()).hexdigest() != digest:
            raise FeedbackError(f"--store: image file {rel} does not match its sha256 {digest}")
    (out / IMAGE_DIR).mkdir(exist_ok=True)
    return {"path": out, "images": len(files), **counts}
