"""Rounds open -> closed, rounds identified by their images' content, append-only tables (issue 17, 1/2/4)."""

from __future__ import annotations

import sqlite3

import httpx
import pytest

from diffalign.feedback.store import ConflictError, FeedbackStore, RoundClosedError

PROMPT = "two red circles"


def _labels(info, good=()):
    return {i: ("good" if k in good else "bad") for k, i in enumerate(info.image_ids)}


def test_late_submission_to_a_closed_round_is_refused_and_used_labels_stay_exact(store, images):
    """The issue's scenario: two evaluators complete a round, training reads it, a third evaluator submits."""
    run = store.create_run("late")
    info = store.create_round(run, 0, PROMPT, images.toy(PROMPT, 4), evaluators_required=2)
    a, b = info.image_ids[:2]
    first = store.submit(info.id, "alice", _labels(info, good=(0,)), a)
    store.submit(info.id, "bob", _labels(info, good=(0, 1)), b)
    used = store.close_round(info.id)  # what the trainer trains on
    assert used.good == [True, False, False, False] and used.best_image_id == a and used.labels_used == 8
    assert store.round_status(info.id)["state"] == "closed" and store.label_count(run) == 8

    with pytest.raises(RoundClosedError, match=r"round: round \d+ is closed: the training loop used its labels"):
        store.submit(info.id, "carol", _labels(info, good=(1, 2)), b)
    with pytest.raises(RoundClosedError):
        store.submit(info.id, "alice", _labels(info, good=(1,)), b)  # a change after the close, too
    # A re-sent identical submission (its answer was lost on the way) is still acknowledged, not stored again.
    assert store.submit(info.id, "alice", _labels(info, good=(0,)), a) == first

    after = store.round_feedback(info.id)
    assert (after.good, after.best_image_id, after.labels_used) == (used.good, used.best_image_id, 8)
    assert store.close_round(info.id) == used  # a restarted trainer reads the same thing again
    subs = store.submissions(info.id)
    assert [(s["evaluator"], s["used"], s["superseded"]) for s in subs] == [("alice", True, False),
                                                                          ("bob", True, False)]
    assert store.label_count(run) == 8 and store.run_summary(run)["labels_used"] == 8


def test_a_round_cannot_be_closed_before_it_is_complete(store, images):
    run = store.create_run("early")
    info = store.create_round(run, 0, PROMPT, images.toy(PROMPT, 2), evaluators_required=2)
    store.submit(info.id, "alice", _labels(info), None)
    with pytest.raises(ConflictError, match=r"round: round \d+ is not complete \(1 of 2"):
        store.close_round(info.id)
    store.submit(info.id, "bob", _labels(info), None)
    assert store.wait_for_round(info.id, timeout=1, close=True).closed
    assert store.open_rounds() == [] and store.round_status(info.id)["state"] == "closed"


def test_late_submission_over_http_is_a_409_with_the_reason(store, images, live_server):
    run = store.create_run("late-http")
    info = store.create_round(run, 0, PROMPT, images.toy(PROMPT, 2))
    store.submit(info.id, "alice", _labels(info), None)
    store.close_round(info.id)
    server = live_server()
    body = {"evaluator": "carol", "labels": {str(i): "bad" for i in info.image_ids}, "best_image_id": None}
    r = httpx.post(f"{server.url}/api/rounds/{info.id}/submissions", json=body)
    assert r.status_code == 409 and "is closed" in r.json()["detail"]
    shown = httpx.get(f"{server.url}/api/rounds/{info.id}").json()
    assert shown["state"] == "closed" and shown["closed_at"] and shown["labels_used"] == 2


def test_rerun_with_other_images_is_refused_with_what_differs_and_what_to_do(store, images):
    """The issue's re-run scenario: the same output directory, another train.seed, no --resume."""
    run = store.create_run("rerun")
    old = images.toy(PROMPT, 4, seed=0)
    info = store.create_round(run, 0, PROMPT, old, image_metadata=[{"seed": 0}] * 4)
    store.submit(info.id, "alice", _labels(info, good=(0, 1)), info.image_ids[0])
    store.close_round(info.id)
    new = images.toy(PROMPT, 4, seed=1)
    with pytest.raises(ConflictError, match=r"images: round \d+ \(run \d+, iteration 0\) already holds other images: "
                                            r"4 of 4 differ by content hash \(positions 0-3\); sampling seed 0 stored, "
                                            r"1 now\. .*--resume.*new output_dir"):
        store.create_round(run, 0, PROMPT, new, image_metadata=[{"seed": 1}] * 4)
    with pytest.raises(ConflictError, match=r"positions 2\)"):
        store.create_round(run, 0, PROMPT, old[:2] + [new[2], old[3]])
    # The very same images (a resumed trainer) find the round and its labels.
    assert store.create_round(run, 0, PROMPT, old, image_metadata=[{"seed": 0}] * 4) == info


def test_submissions_and_labels_are_append_only_in_the_database(store, images):
    run = store.create_run("append-only")
    info = store.create_round(run, 0, PROMPT, images.toy(PROMPT, 2))
    sid = store.submit(info.id, "alice", _labels(info, good=(0,)), info.image_ids[0])
    store.close_round(info.id)
    conn = sqlite3.connect(store.db_path)
    statements = [
        ("UPDATE labels SET label = 'bad' WHERE submission_id = ?", (sid,)),
        ("DELETE FROM labels WHERE submission_id = ?", (sid,)),
        ("UPDATE submissions SET best_image_id = NULL WHERE id = ?", (sid,)),
        ("DELETE FROM submissions WHERE id = ?", (sid,)),
        ("UPDATE round_closures SET labels_used = 0", ()),
        ("DELETE FROM round_closures", ()),
    ]
    for sql, args in statements:
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute(sql, args)
    conn.close()
    fb = store.round_feedback(info.id)
    assert fb.good == [True, False] and fb.best_image_id == info.image_ids[0] and store.label_count(run) == 2


def test_a_version_1_store_is_upgraded_in_place(tmp_path, images):
    from diffalign.feedback import schema

    path = tmp_path / "old"
    path.mkdir()
    conn = sqlite3.connect(path / "feedback.sqlite")
    for statement in schema._TABLES[:schema._TABLES.index(next(t for t in schema._TABLES if "round_closures" in t))]:
        conn.execute(statement)
    conn.execute("INSERT INTO runs (name, config, created_at) VALUES ('v1', '{}', 'then')")
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    with FeedbackStore(path) as s:
        assert s.schema_version == schema.SCHEMA_VERSION
        info = s.create_round(1, 0, PROMPT, images.toy(PROMPT, 1))
        sid = s.submit(info.id, "alice", {info.image_ids[0]: "bad"}, None)
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            s._conn().execute("DELETE FROM submissions WHERE id = ?", (sid,))
