"""The feedback store's SQLite schema: tables, append-only triggers, and the upgrade from older versions.

Version history (``PRAGMA user_version``, also appended to the ``schema_version`` table):

1. runs, run metrics, rounds, images, evaluators, submissions, labels.
2. ``round_closures`` (a round is closed when the trainer reads it: which submissions training used),
   ``run_configs`` (every config a run was started or resumed with), ``audit_log`` (decisions such as
   excluding an evaluator), and triggers that refuse UPDATE and DELETE on submissions, labels, closures,
   run configs and the audit log: the labels are append-only in the database, not by convention.
3. Blind A/B comparisons (``diffalign compare``): ``comparisons`` (what was compared, with which settings),
   ``comparison_pairs`` (one prompt, one shared noise, model A's and model B's image, and which side the
   page shows A on) and ``comparison_choices`` (an evaluator's pick of a pair), all append-only like labels;
   ``image_embeddings``: HERO's feedback-aligned embedding of every labelled image as each round's encoder
   saw it, and the reward it gave the round's own images (what "why did HERO reward this image?" reads).
4. ``invites``: evaluator identities. The session owner invites an evaluator by name and the store keeps the
   sha256 of the personal token it printed once (never the token); an evaluator's latest invite is the valid
   one, so a re-issued link replaces the old. Append-only like labels.

Every statement is idempotent (``IF NOT EXISTS``), so one list creates a new store and upgrades an old one
inside the same ``BEGIN IMMEDIATE`` transaction (``executescript`` would commit halfway).
"""

from __future__ import annotations

import sqlite3

SCHEMA_VERSION = 4

_TABLES = [
    """CREATE TABLE IF NOT EXISTS schema_version (
        version     INTEGER NOT NULL,
        applied_at  TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS runs (
        id          INTEGER PRIMARY KEY,
        name        TEXT NOT NULL UNIQUE,
        config      TEXT NOT NULL DEFAULT '{}',
        created_at  TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS run_metrics (
        id          INTEGER PRIMARY KEY,
        run_id      INTEGER NOT NULL REFERENCES runs(id),
        name        TEXT NOT NULL,
        value       REAL NOT NULL,
        iteration   INTEGER,
        recorded_at TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS run_metrics_run ON run_metrics(run_id, name, id)",
    """CREATE TABLE IF NOT EXISTS rounds (
        id                      INTEGER PRIMARY KEY,
        run_id                  INTEGER NOT NULL REFERENCES runs(id),
        iteration               INTEGER NOT NULL,
        prompt                  TEXT NOT NULL,
        evaluators_required     INTEGER NOT NULL CHECK (evaluators_required >= 1),
        previous_best_image_id  INTEGER REFERENCES images(id),
        created_at              TEXT NOT NULL,
        UNIQUE (run_id, iteration))""",
    """CREATE TABLE IF NOT EXISTS images (
        id          INTEGER PRIMARY KEY,
        round_id    INTEGER NOT NULL REFERENCES rounds(id),
        position    INTEGER NOT NULL,
        sha256      TEXT NOT NULL,
        file        TEXT NOT NULL,
        width       INTEGER NOT NULL,
        height      INTEGER NOT NULL,
        metadata    TEXT NOT NULL DEFAULT '{}',
        created_at  TEXT NOT NULL,
        UNIQUE (round_id, position))""",
    """CREATE TABLE IF NOT EXISTS evaluators (
        id          INTEGER PRIMARY KEY,
        name        TEXT NOT NULL UNIQUE,
        created_at  TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS submissions (
        id              INTEGER PRIMARY KEY,
        round_id        INTEGER NOT NULL REFERENCES rounds(id),
        evaluator_id    INTEGER NOT NULL REFERENCES evaluators(id),
        best_image_id   INTEGER REFERENCES images(id),
        created_at      TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS submissions_round ON submissions(round_id, evaluator_id, id)",
    """CREATE TABLE IF NOT EXISTS labels (
        id              INTEGER PRIMARY KEY,
        submission_id   INTEGER NOT NULL REFERENCES submissions(id),
        image_id        INTEGER NOT NULL REFERENCES images(id),
        label           TEXT NOT NULL CHECK (label IN ('good', 'bad')),
        UNIQUE (submission_id, image_id))""",
    # --- version 2
    """CREATE TABLE IF NOT EXISTS round_closures (
        round_id        INTEGER PRIMARY KEY REFERENCES rounds(id),
        submission_ids  TEXT NOT NULL,
        labels_used     INTEGER NOT NULL CHECK (labels_used >= 0),
        closed_at       TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS run_configs (
        id          INTEGER PRIMARY KEY,
        run_id      INTEGER NOT NULL REFERENCES runs(id),
        config      TEXT NOT NULL,
        reason      TEXT NOT NULL,
        recorded_at TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS audit_log (
        id          INTEGER PRIMARY KEY,
        run_id      INTEGER REFERENCES runs(id),
        action      TEXT NOT NULL,
        actor       TEXT NOT NULL,
        detail      TEXT NOT NULL DEFAULT '{}',
        created_at  TEXT NOT NULL)""",
    # --- version 3
    """CREATE TABLE IF NOT EXISTS comparisons (
        id          INTEGER PRIMARY KEY,
        name        TEXT NOT NULL UNIQUE,
        model_a     TEXT NOT NULL,
        model_b     TEXT NOT NULL,
        settings    TEXT NOT NULL DEFAULT '{}',
        created_by  TEXT NOT NULL,
        created_at  TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS comparison_pairs (
        id              INTEGER PRIMARY KEY,
        comparison_id   INTEGER NOT NULL REFERENCES comparisons(id),
        position        INTEGER NOT NULL,
        prompt          TEXT NOT NULL,
        seed_index      INTEGER NOT NULL,
        sha256_a        TEXT NOT NULL,
        file_a          TEXT NOT NULL,
        sha256_b        TEXT NOT NULL,
        file_b          TEXT NOT NULL,
        a_on_left       INTEGER NOT NULL CHECK (a_on_left IN (0, 1)),
        metadata        TEXT NOT NULL DEFAULT '{}',
        UNIQUE (comparison_id, position))""",
    """CREATE TABLE IF NOT EXISTS comparison_choices (
        id              INTEGER PRIMARY KEY,
        pair_id         INTEGER NOT NULL REFERENCES comparison_pairs(id),
        evaluator_id    INTEGER NOT NULL REFERENCES evaluators(id),
        shown           TEXT NOT NULL CHECK (shown IN ('left', 'right', 'none')),
        choice          TEXT NOT NULL CHECK (choice IN ('a', 'b', 'none')),
        created_at      TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS comparison_choices_pair ON comparison_choices(pair_id, evaluator_id, id)",
    """CREATE TABLE IF NOT EXISTS image_embeddings (
        id          INTEGER PRIMARY KEY,
        round_id    INTEGER NOT NULL REFERENCES rounds(id),
        image_id    INTEGER NOT NULL REFERENCES images(id),
        vector      TEXT NOT NULL,
        reward      REAL,
        UNIQUE (round_id, image_id))""",
    # --- version 4
    """CREATE TABLE IF NOT EXISTS invites (
        id              INTEGER PRIMARY KEY,
        evaluator_id    INTEGER NOT NULL REFERENCES evaluators(id),
        token_sha256    TEXT NOT NULL UNIQUE,
        invited_by      TEXT NOT NULL,
        created_at      TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS invites_evaluator ON invites(evaluator_id, id)",
]

# Tables whose rows are never changed once written. A trigger raises ABORT, so a stray UPDATE or DELETE
# (a script, a sqlite3 shell, a bug) fails loudly instead of silently rewriting what training used.
APPEND_ONLY = ("submissions", "labels", "round_closures", "run_configs", "audit_log", "comparisons",
               "comparison_pairs", "comparison_choices", "image_embeddings", "invites")


def _triggers() -> list[str]:
    out = []
    for table in APPEND_ONLY:
        for op in ("UPDATE", "DELETE"):
            out.append(
                f"CREATE TRIGGER IF NOT EXISTS {table}_no_{op.lower()} BEFORE {op} ON {table} BEGIN "
                f"SELECT RAISE(ABORT, '{table} are append-only: {op} is refused (record a new row instead)'); END")
    return out


STATEMENTS = _TABLES + _triggers()


def apply(conn: sqlite3.Connection, now: str) -> None:
    """Create or upgrade the schema to :data:`SCHEMA_VERSION` (inside the caller's write transaction)."""
    for statement in STATEMENTS:
        conn.execute(statement)
    conn.execute("INSERT INTO schema_version (version, applied_at) VALUES (?, ?)", (SCHEMA_VERSION, now))
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
