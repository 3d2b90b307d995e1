"""The feedback store: rounds, submissions, the audit log, aggregation, export, schema versions, waiting."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time

import numpy as np
import pytest
from PIL import Image

from diffalign.feedback.store import (
    SCHEMA_VERSION,
    ConflictError,
    FeedbackError,
    FeedbackStore,
    NotFoundError,
    SchemaVersionError,
)

PROMPT = "two red circles"


def _round(store, images, n=4, iteration=0, **kw):
    run = store.create_run("run-a")
    return store.create_round(run, iteration, PROMPT, images.toy(PROMPT, n, seed=iteration), **kw)


def test_layout_wal_and_schema_version(store):
    assert (store.directory / "feedback.sqlite").is_file()
    assert (store.directory / "images").is_dir()
    conn = sqlite3.connect(store.db_path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()
    assert store.schema_version == SCHEMA_VERSION


def test_newer_schema_is_refused_with_a_clear_message(tmp_path):
    FeedbackStore(tmp_path / "s").close()
    conn = sqlite3.connect(tmp_path / "s" / "feedback.sqlite")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(SchemaVersionError, match=rf"schema version {SCHEMA_VERSION + 1}, newer .* upgrade diffalign"):
        FeedbackStore(tmp_path / "s")


def test_create_run_is_idempotent_by_name(store):
    a = store.create_run("exp", {"lr": 1e-4})
    assert store.create_run("exp", {"lr": 1e-4}) == a
    assert store.create_run("exp") == a  # no config given: just the id
    assert store.create_run("other") != a
    assert store.get_run(a)["config"] == {"lr": 1e-4}


def test_another_config_is_refused_without_resume_and_recorded_with_it(store):
    a = store.create_run("exp", {"train": {"seed": 0, "lr": 1e-4}, "feedback": {"rounds": 3}})
    with pytest.raises(ConflictError, match=r"config: run 'exp' .* another config \(train.seed: 0 -> 1\)\. "
                                            r".*--resume.*new output_dir"):
        store.create_run("exp", {"train": {"seed": 1, "lr": 1e-4}, "feedback": {"rounds": 3}})
    resumed = {"train": {"seed": 0, "lr": 1e-4}, "feedback": {"rounds": 5}}
    assert store.create_run("exp", resumed, resume=True) == a
    history = store.run_configs(a)
    assert [h["reason"] for h in history] == ["created", "resume"] and history[-1]["config"] == resumed
    # The resumed config is now the current one: the same again needs no --resume.
    assert store.create_run("exp", resumed) == a


def test_create_round_stores_pngs_by_hash_and_is_idempotent(store, images):
    run = store.create_run("run-a")
    imgs = images.toy(PROMPT, 4)
    pil = [Image.fromarray(im) for im in imgs]
    info = store.create_round(run, 0, PROMPT, pil[:2] + imgs[2:], evaluators_required=2,
                              image_metadata=[{"seed": i, "success": np.bool_(i % 2 == 0)} for i in range(4)])
    assert len(info.image_ids) == 4 and info.evaluators_required == 2 and info.iteration == 0
    for image_id, arr in zip(info.image_ids, imgs, strict=True):
        path = store.image_path(image_id)
        assert path.is_file() and path.is_relative_to(store.directory / "images")
        meta = store.image_info(image_id)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == meta["sha256"] == path.stem
        np.testing.assert_array_equal(store.load_image(image_id), arr)
    assert store.image_info(info.image_ids[1])["metadata"] == {"seed": 1, "success": False}
    assert store.round_status(info.id)["measured_success"] == 0.5

    # A restarted trainer (new store object, the same images) gets the same round and the same image ids.
    again = FeedbackStore(store.directory).create_round(run, 0, PROMPT, imgs)
    assert again == info
    assert len(list((store.directory / "images").rglob("*.png"))) == 4
    assert store.open_rounds() == [info]
    with pytest.raises(ConflictError, match="prompt"):
        store.create_round(run, 0, "one blue square", imgs)
    with pytest.raises(ConflictError, match="images"):
        store.create_round(run, 0, PROMPT, imgs[:3])


def test_create_round_concurrently_creates_one_round(store, images):
    run = store.create_run("run-a")
    imgs = images.toy(PROMPT, 3)
    results, errors = [], []

    def create():
        try:
            results.append(store.create_round(run, 5, PROMPT, imgs))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=create) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len({r.id for r in results}) == 1 and len({tuple(r.image_ids) for r in results}) == 1
    assert len(store.open_rounds()) == 1


def test_create_round_validation(store, images):
    run = store.create_run("run-a")
    imgs = images.toy(PROMPT, 2)
    with pytest.raises(NotFoundError, match="run_id"):
        store.create_round(999, 0, PROMPT, imgs)
    with pytest.raises(FeedbackError, match="prompt"):
        store.create_round(run, 0, " ", imgs)
    with pytest.raises(FeedbackError, match="images"):
        store.create_round(run, 0, PROMPT, [])
    with pytest.raises(FeedbackError, match="images"):
        store.create_round(run, 0, PROMPT, [np.zeros((8, 8, 3), np.float32)])
    with pytest.raises(FeedbackError, match="evaluators_required"):
        store.create_round(run, 0, PROMPT, imgs, evaluators_required=0)
    with pytest.raises(FeedbackError, match="image_metadata"):
        store.create_round(run, 0, PROMPT, imgs, image_metadata=[{}])
    with pytest.raises(NotFoundError, match="previous_best_image_id"):
        store.create_round(run, 0, PROMPT, imgs, previous_best_image_id=12345)
    other = store.create_run("run-b")
    foreign = store.create_round(other, 0, PROMPT, imgs)
    with pytest.raises(FeedbackError, match="another run"):
        store.create_round(run, 0, PROMPT, imgs, previous_best_image_id=foreign.image_ids[0])
    assert store.open_rounds(run) == []


def test_submit_validation_names_the_field(store, images):
    info = _round(store, images, n=3)
    other = _round(store, images, n=2, iteration=1)
    a, b, c = info.image_ids
    ok = {a: "good", b: "bad", c: "bad"}
    cases = [
        ((info.id, "", ok, a), "evaluator"),
        ((info.id, "x" * 65, ok, a), "evaluator"),
        ((info.id, "bob\n", ok, a), None),  # stripped: fine
        ((info.id, "ev", {a: "good", b: "bad"}, a), "labels: images .* have no label"),
        ((info.id, "ev", {**ok, other.image_ids[0]: "good"}, a), "labels: image ids .* not in round"),
        ((info.id, "ev", {a: "good", b: "meh", c: "bad"}, a), "labels: the label of image"),
        ((info.id, "ev", {"x": "good"}, a), "labels: expected an integer"),
        ((info.id, "ev", ok, b), "best_image_id: image .* is labeled bad"),
        ((info.id, "ev", ok, None), "best_image_id: pick the best"),
        ((info.id, "ev", ok, other.image_ids[0]), "best_image_id: image .* is not in round"),
        ((info.id, "ev", {a: "bad", b: "bad", c: "bad"}, a), "best_image_id"),
    ]
    for args, message in cases:
        if message is None:
            store.submit(*args)
            continue
        with pytest.raises(FeedbackError, match=message):
            store.submit(*args)
    with pytest.raises(NotFoundError, match="round_id"):
        store.submit(9999, "ev", ok, a)
    assert store.submit(info.id, "ev", {a: "bad", b: "bad", c: "bad"}, None) > 0  # nothing good: no best
    assert set(store.submitted_evaluators(info.id)) == {"bob", "ev"}


def test_double_submit_is_idempotent_and_changes_are_appended(store, images):
    info = _round(store, images, n=3, evaluators_required=2)
    a, b, c = info.image_ids
    first = store.submit(info.id, "alice", {a: "good", b: "bad", c: "bad"}, a)
    assert store.submit(info.id, "alice", {a: "good", b: "bad", c: "bad"}, a) == first
    assert store.submit(info.id, "alice", {str(a): "GOOD", b: "bad", c: "bad"}, str(a)) == first
    assert not store.round_complete(info.id)
    changed = store.submit(info.id, "alice", {a: "good", b: "good", c: "bad"}, b)
    assert changed != first
    subs = store.submissions(info.id)
    assert [s["submission_id"] for s in subs] == [first, changed]
    assert [s["superseded"] for s in subs] == [True, False]
    assert subs[0]["labels"] == {a: "good", b: "bad", c: "bad"}  # the old row is kept, untouched
    fb = store.round_feedback(info.id)
    assert fb.per_evaluator["alice"]["labels"] == {a: "good", b: "good", c: "bad"}
    assert fb.best_image_id == b and fb.best_index == 1
    assert fb.labels_used == 3 and store.label_count(info.run_id) == 0  # nothing trained on yet
    # Going back to the first answer is a change too: appended, and it is the latest again.
    back = store.submit(info.id, "alice", {a: "good", b: "bad", c: "bad"}, a)
    assert back not in (first, changed) and store.round_feedback(info.id).best_image_id == a
    assert not store.round_complete(info.id)
    store.submit(info.id, "bob", {a: "bad", b: "bad", c: "bad"}, None)
    assert store.round_complete(info.id) and info.id not in [r.id for r in store.open_rounds()]
    assert store.close_round(info.id).labels_used == 6
    assert store.label_count(info.run_id) == 6  # the audit rows are not counted again


def test_aggregation_majority_ties_and_best(store, images):
    run = store.create_run("agg")
    prev = store.create_round(run, 0, PROMPT, images.toy(PROMPT, 2))
    info = store.create_round(run, 1, PROMPT, images.toy(PROMPT, 4, seed=1), evaluators_required=3,
                              previous_best_image_id=prev.image_ids[1])
    w, x, y, z = info.image_ids
    P = prev.image_ids[1]
    store.submit(info.id, "e1", {w: "good", x: "good", y: "bad", z: "good"}, x)
    store.submit(info.id, "e2", {w: "good", x: "bad", y: "bad", z: "good"}, z)
    store.submit(info.id, "e3", {w: "bad", x: "good", y: "good", z: "good"}, P)
    fb = store.round_feedback(info.id)
    assert fb.good == [True, True, False, True]
    # One pick each for x, z and P: the tie goes to the earliest submission (e1's x).
    assert fb.best_image_id == x and fb.best_index == 1
    assert fb.labels_used == 12 and set(fb.per_evaluator) == {"e1", "e2", "e3"}
    # e2 changes to the previous best: P has two picks now.
    store.submit(info.id, "e2", {w: "good", x: "bad", y: "bad", z: "good"}, P)
    fb = store.round_feedback(info.id)
    assert fb.best_image_id == P and fb.best_index is None
    assert store.label_count(run) == 0  # no round closed: training used nothing yet


def test_ties_count_as_bad_and_best_must_stay_good(store, images):
    info = _round(store, images, n=2, evaluators_required=2)
    a, b = info.image_ids
    store.submit(info.id, "e1", {a: "good", b: "good"}, a)
    store.submit(info.id, "e2", {a: "bad", b: "good"}, b)
    fb = store.round_feedback(info.id)
    assert fb.good == [False, True]  # 1 vs 1 on a: bad
    assert fb.best_image_id == b  # a was picked first but is not good after aggregation


def test_round_feedback_without_submissions(store, images):
    info = _round(store, images, n=2)
    fb = store.round_feedback(info.id)
    assert fb.good == [False, False] and fb.best_image_id is None and fb.best_index is None
    assert fb.labels_used == 0 and fb.per_evaluator == {}


def test_wait_for_round_reports_and_times_out(store, images):
    info = _round(store, images, n=2)
    calls = []
    with pytest.raises(TimeoutError, match=rf"round {info.id} is not complete .* 0 of 1 evaluator"):
        store.wait_for_round(info.id, timeout=0.3, poll=0.05, on_wait=lambda *a: calls.append(a),
                             on_wait_interval=0.1)
    assert calls and calls[0][1:] == (0, 1) and calls[0][0] < 0.1
    assert len(calls) >= 2

    a, b = info.image_ids

    def label_later():
        time.sleep(0.3)
        FeedbackStore(store.directory).submit(info.id, "late", {a: "good", b: "bad"}, a)

    t = threading.Thread(target=label_later)
    t.start()
    fb = store.wait_for_round(info.id, timeout=10, poll=0.05)
    t.join()
    assert fb.good == [True, False] and fb.best_index == 0


def test_run_metrics_and_summary(store, images):
    info = _round(store, images, n=2)
    store.set_run_metric(info.run_id, "success_rate", 0.25, iteration=0)
    store.set_run_metric(info.run_id, "success_rate", 0.5, iteration=1)
    with pytest.raises(FeedbackError, match="value"):
        store.set_run_metric(info.run_id, "success_rate", float("nan"))
    with pytest.raises(NotFoundError):
        store.set_run_metric(999, "x", 1.0)
    summary = store.run_summary(info.run_id)
    assert summary["metrics"]["success_rate"]["value"] == 0.5
    assert summary["iteration"] == 0 and summary["labels_used"] == 0 and summary["open_rounds"] == 1


def test_export_jsonl(store, images, tmp_path):
    run = store.create_run("export")
    r0 = store.create_round(run, 0, PROMPT, images.toy(PROMPT, 2))
    r1 = store.create_round(run, 1, PROMPT, images.toy(PROMPT, 2, seed=1), previous_best_image_id=r0.image_ids[0])
    store.submit(r0.id, "alice", {r0.image_ids[0]: "good", r0.image_ids[1]: "bad"}, r0.image_ids[0])
    store.submit(r0.id, "alice", {r0.image_ids[0]: "good", r0.image_ids[1]: "good"}, r0.image_ids[1])
    store.submit(r1.id, "bob", {r1.image_ids[0]: "bad", r1.image_ids[1]: "bad"}, r0.image_ids[0])
    out = tmp_path / "export" / "feedback.jsonl"
    assert store.export_jsonl(run, out) == 3
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["iteration"], r["evaluator"], r["superseded"]) for r in rows] == [
        (0, "alice", True), (0, "alice", False), (1, "bob", False)]
    assert rows[1]["best_image_id"] == r0.image_ids[1]
    assert rows[1]["labels"][1] == {"image_id": r0.image_ids[1], "position": 1, "label": "good",
                                    "sha256": store.image_info(r0.image_ids[1])["sha256"]}
    assert rows[2]["best_is_previous"] and rows[2]["best_sha256"] == store.image_info(r0.image_ids[0])["sha256"]
    assert all(r["run"] == "export" and r["prompt"] == PROMPT for r in rows)


def test_threads_share_a_store_without_lost_updates(store, images):
    run = store.create_run("threads")
    rounds = [store.create_round(run, i, PROMPT, images.toy(PROMPT, 3, seed=i), evaluators_required=4)
              for i in range(3)]
    errors = []

    def evaluator(k):
        try:
            for info in rounds:
                labels = {i: ("good" if (i + k) % 2 else "bad") for i in info.image_ids}
                best = next((i for i, v in labels.items() if v == "good"), None)
                store.submit(info.id, f"ev{k}", labels, best)
        except Exception as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=evaluator, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(store.round_complete(r.id) for r in rounds)
    assert sum(store.close_round(r.id).labels_used for r in rounds) == store.label_count(run) == 4 * 3 * 3
