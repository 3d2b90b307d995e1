"""Feedback app crashes: the uvicorn server (a real process) is SIGKILLed three times at seeded random moments
while four evaluators submit and change their minds and the trainer waits on the round; after each restart
every acknowledged (HTTP 2xx) submission is in the store exactly once, with exactly its labels.

Extends tests/feedback/test_durability.py (one evaluator, one kill) to several evaluators, repeated kills,
superseding submissions, and a trainer waiting on the store meanwhile. Evaluators behave like the page: a
submission that got no answer is sent again until it is acknowledged (the store makes that idempotent).
"""

from __future__ import annotations

import random
import sqlite3
import threading
import time

import httpx
import pytest

from diffalign.feedback.store import FeedbackStore
from tests.feedback.conftest import ServerProcess, toy_images

pytestmark = pytest.mark.slow

PROMPT = "four yellow triangles"
EVALUATORS = 4
ROUNDS = 24
KILLS = 3
SEED = 9


def _labels(image_ids, evaluator: int, version: int):
    labels = {str(i): ("good" if (j + evaluator + version) % 3 == 0 else "bad") for j, i in enumerate(image_ids)}
    best = next((int(i) for i, v in labels.items() if v == "good"), None)
    return labels, best


def test_sigkilled_server_keeps_every_acknowledged_label_exactly_once(tmp_path):
    directory = tmp_path / "store"
    store = FeedbackStore(directory)
    run = store.create_run("crashes")
    rounds = [store.create_round(run, i, PROMPT, toy_images(PROMPT, 4, seed=i), evaluators_required=EVALUATORS)
              for i in range(ROUNDS)]
    store.close()

    server = ServerProcess(directory).start(timeout=300)  # slow to import on a loaded machine
    port = server.port
    acks: list[dict] = []  # every 2xx: evaluator, round, labels, best, submission id
    lock = threading.Lock()
    errors: list[str] = []
    retries = [0]

    def evaluator(k: int):
        # Every 4th round the evaluator changes its mind: a second, different submission (the audit log keeps both).
        plan = [(info, version) for info in rounds for version in ((0, 1) if info.iteration % 4 == k % 4 else (0,))]
        # A long timeout: only the kills may cut a request short. A request that timed out could still be
        # committed after its resend and a newer answer, which would be a different (client) race.
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            for info, version in plan:
                labels, best = _labels(info.image_ids, k, version)
                body = {"evaluator": f"ev{k}", "labels": labels, "best_image_id": best}
                while True:  # resend until acknowledged, like the page does after a network error
                    try:
                        resp = client.post(f"/api/rounds/{info.id}/submissions", json=body)
                    except httpx.HTTPError:
                        with lock:
                            retries[0] += 1
                        time.sleep(0.05)
                        continue
                    if resp.status_code != 200:
                        errors.append(f"{resp.status_code}: {resp.text}")
                        return
                    with lock:
                        acks.append({"evaluator": f"ev{k}", "round": info.id, "labels": labels, "best": best,
                                     "id": resp.json()["submission_id"]})
                    break

    waited = {}

    def trainer():  # the training loop waits for the last round through its own store connection
        with FeedbackStore(directory) as s:
            waited["feedback"] = s.wait_for_round(rounds[-1].id, timeout=600, poll=0.1)

    threads = [threading.Thread(target=evaluator, args=(k,)) for k in range(EVALUATORS)]
    threads.append(threading.Thread(target=trainer))
    for t in threads:
        t.start()
    total = sum(2 if info.iteration % 4 == k % 4 else 1 for k in range(EVALUATORS) for info in rounds)
    rng = random.Random(SEED)
    kill_at = sorted(rng.sample(range(total // 8, total - total // 8), KILLS))
    kills = []
    for threshold in kill_at:
        while len(acks) < threshold and any(t.is_alive() for t in threads[:-1]):
            time.sleep(0.002)
        before = len(acks)
        server.kill()  # SIGKILL mid-round: requests in flight get no answer
        kills.append(before)
        time.sleep(rng.uniform(0.0, 0.5))
        # Check the store while the server is down: every acknowledged submission is already durable.
        with lock:
            snapshot = list(acks)
        with sqlite3.connect(directory / "feedback.sqlite") as conn:
            stored = {row[0] for row in conn.execute("SELECT id FROM submissions")}
        assert {a["id"] for a in snapshot} <= stored
        server = ServerProcess(directory, port=port).start(timeout=300)
    for t in threads:
        t.join(timeout=600)
    server.stop()
    assert not errors, errors[:3]
    assert len(acks) == total and len(kills) == KILLS

    # Every acknowledged submission exactly once, with its labels; nothing else in the store.
    check = FeedbackStore(directory)
    with sqlite3.connect(directory / "feedback.sqlite") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = conn.execute("SELECT s.id, s.round_id, e.name, s.best_image_id FROM submissions s "
                            "JOIN evaluators e ON e.id = s.evaluator_id").fetchall()
        label_rows = conn.execute("SELECT submission_id, image_id, label FROM labels").fetchall()
    acked_ids = {a["id"] for a in acks}
    assert sorted(r[0] for r in rows) == sorted(acked_ids), "a submission in the store was never acknowledged, or lost"
    labels_by_submission: dict[int, dict[int, str]] = {}
    for sid, image_id, label in label_rows:
        assert image_id not in labels_by_submission.setdefault(sid, {}), "a label stored twice"
        labels_by_submission[sid][image_id] = label
    by_id = {r[0]: r for r in rows}
    for a in acks:
        _, round_id, name, best = by_id[a["id"]]
        assert (round_id, name, best) == (a["round"], a["evaluator"], a["best"])
        assert labels_by_submission[a["id"]] == {int(i): v for i, v in a["labels"].items()}
    # The latest answer of each evaluator is the one the trainer reads; every round completed.
    for info in rounds:
        fb = check.round_feedback(info.id)
        assert set(fb.per_evaluator) == {f"ev{k}" for k in range(EVALUATORS)}
        for k in range(EVALUATORS):
            final = 1 if info.iteration % 4 == k % 4 else 0
            assert fb.per_evaluator[f"ev{k}"]["labels"] == {
                int(i): v for i, v in _labels(info.image_ids, k, final)[0].items()}
    assert waited["feedback"].round_id == rounds[-1].id
    # The trainer closes each round when it reads it; the run's label count is what those closures used.
    for info in rounds:
        check.close_round(info.id)
    assert check.label_count(run) == 4 * EVALUATORS * ROUNDS
    check.close()
    print(f"\n[reliability] feedback server SIGKILLed {KILLS}x (after {kills} acknowledged submissions) with "
          f"{EVALUATORS} evaluators: {len(acks)} acknowledged submissions ({len(label_rows)} label rows) all present "
          f"exactly once; {retries[0]} requests resent after the kills")
