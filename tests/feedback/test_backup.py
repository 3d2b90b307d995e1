"""Backups: a clean close leaves everything in feedback.sqlite; `diffalign feedback backup` copies a live store."""

from __future__ import annotations

import shutil
import sqlite3
import threading

from typer.testing import CliRunner

from diffalign.cli import app
from diffalign.feedback.store import FeedbackStore

PROMPT = "two blue squares"


def _labels(info, k):
    labels = {i: ("good" if (j + k) % 2 else "bad") for j, i in enumerate(info.image_ids)}
    return labels, next((i for i, v in labels.items() if v == "good"), None)


def test_a_clean_close_checkpoints_the_wal_into_the_main_file(tmp_path, images):
    store = FeedbackStore(tmp_path / "s")
    run = store.create_run("wal")
    info = store.create_round(run, 0, PROMPT, images.toy(PROMPT, 3))
    store.submit(info.id, "alice", *_labels(info, 0))
    store.close_round(info.id)
    assert (store.directory / "feedback.sqlite-wal").stat().st_size > 0  # open: the labels are in the WAL
    store.close()
    # "Backing up the database file" after a session: the main file alone holds every label.
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copyfile(tmp_path / "s" / "feedback.sqlite", alone / "feedback.sqlite")
    conn = sqlite3.connect(alone / "feedback.sqlite")
    assert conn.execute("SELECT COUNT(*) FROM labels").fetchone()[0] == 3
    assert conn.execute("SELECT labels_used FROM round_closures").fetchone()[0] == 3
    conn.close()


def test_a_backup_taken_mid_session_holds_every_acknowledged_label(store, images, tmp_path):
    run = store.create_run("live")
    rounds = [store.create_round(run, i, PROMPT, images.toy(PROMPT, 3, seed=i)) for i in range(8)]
    acknowledged = {info.id: store.submit(info.id, "alice", *_labels(info, k)) for k, info in enumerate(rounds[:4])}
    assert (store.directory / "feedback.sqlite-wal").stat().st_size > 0  # not checkpointed: a cp would miss them

    def keep_labeling():  # the session goes on during the backup
        writer = FeedbackStore(store.directory)
        for k, info in enumerate(rounds[4:], start=4):
            writer.submit(info.id, "bob", *_labels(info, k))
        writer.close()
    thread = threading.Thread(target=keep_labeling)
    thread.start()
    out = tmp_path / "backup"
    result = CliRunner().invoke(app, ["feedback", "backup", "--store", str(store.directory), str(out)])
    thread.join()
    assert result.exit_code == 0, result.output
    assert "label(s)" in result.output

    copy = FeedbackStore(out)
    for k, info in enumerate(rounds[:4]):
        subs = copy.submissions(info.id)
        assert [s["submission_id"] for s in subs] == [acknowledged[info.id]]
        assert subs[0]["labels"] == _labels(info, k)[0]
        for image_id in info.image_ids:  # the images came along and match their hashes
            assert (copy.load_image(image_id) == store.load_image(image_id)).all()
    # Whatever of bob's work the snapshot caught is whole: every submission has all its labels.
    for info in rounds[4:]:
        for sub in copy.submissions(info.id):
            assert set(sub["labels"]) == set(info.image_ids)
    copy.close()

    again = CliRunner().invoke(app, ["feedback", "backup", "--store", str(store.directory), str(out)])
    assert again.exit_code == 2 and "OUT:" in again.output and "not an empty directory" in again.output
    missing = CliRunner().invoke(app, ["feedback", "backup", "--store", str(tmp_path / "nope"), str(tmp_path / "b2")])
    assert missing.exit_code == 2 and "--store:" in missing.output
