"""Either side can crash: a SIGKILLed server keeps every acknowledged label exactly once; many evaluators at once."""

from __future__ import annotations

import threading
import time

import httpx

from diffalign.feedback.store import FeedbackStore

PROMPT = "three green triangles"


def _labels(info, k):
    labels = {str(i): ("good" if (j + k) % 3 == 0 else "bad") for j, i in enumerate(info.image_ids)}
    best = next((int(i) for i, v in labels.items() if v == "good"), None)
    return labels, best


def test_sigkill_keeps_every_acknowledged_label_once(tmp_path, images, server_process):
    directory = tmp_path / "store"
    store = FeedbackStore(directory)
    run = store.create_run("durable")
    rounds = [store.create_round(run, i, PROMPT, images.toy(PROMPT, 3, seed=i % 4)) for i in range(40)]
    store.close()

    server = server_process(directory)
    acknowledged: dict[int, int] = {}  # round id -> submission id
    stop = threading.Event()

    def submit_all(url):
        with httpx.Client(base_url=url, timeout=5) as client:
            for k, info in enumerate(rounds):
                if stop.is_set() or info.id in acknowledged:
                    continue
                labels, best = _labels(info, k)
                try:
                    resp = client.post(f"/api/rounds/{info.id}/submissions",
                                       json={"evaluator": "alice", "labels": labels, "best_image_id": best})
                except httpx.HTTPError:
                    return  # the server died mid-request: this one was not acknowledged
                assert resp.status_code == 200, resp.text
                acknowledged[info.id] = resp.json()["submission_id"]

    worker = threading.Thread(target=submit_all, args=(server.url,))
    worker.start()
    deadline = time.monotonic() + 30
    while len(acknowledged) < 8 and worker.is_alive() and time.monotonic() < deadline:
        time.sleep(0.005)
    server.kill()  # SIGKILL while the worker is still submitting
    stop.set()
    worker.join(timeout=30)
    killed_after = dict(acknowledged)
    assert 8 <= len(killed_after) < len(rounds), "the kill should land mid-way"

    # Restart on the same port: every acknowledged submission is there, exactly once.
    server = server_process(directory, port=server.port)
    check = FeedbackStore(directory)
    for k, info in enumerate(rounds):
        subs = check.submissions(info.id)
        if info.id in killed_after:
            assert [s["submission_id"] for s in subs] == [killed_after[info.id]]
            labels, best = _labels(info, k)
            assert subs[0]["labels"] == {int(i): v for i, v in labels.items()} and subs[0]["best_image_id"] == best
        else:
            assert len(subs) <= 1  # at most the one in flight when the server died

    # The labeler (or a page reload) re-submits everything: nothing is duplicated, nothing is lost.
    stop.clear()
    acknowledged.clear()
    submit_all(server.url)
    assert len(acknowledged) == len(rounds)
    for info in rounds:
        subs = check.submissions(info.id)
        assert len(subs) == 1 and subs[0]["submission_id"] == acknowledged[info.id]
        if info.id in killed_after:
            assert acknowledged[info.id] == killed_after[info.id]
    assert check.open_rounds(run) == [] and check.label_count(run) == 0  # nothing trained on yet
    assert sum(check.close_round(info.id).labels_used for info in rounds) == check.label_count(run) == 3 * len(rounds)

    # The trainer side restarts too: re-creating its rounds returns the same rounds and image ids.
    again = [check.create_round(run, i, PROMPT, images.toy(PROMPT, 3, seed=i % 4)) for i in range(len(rounds))]
    assert again == rounds
    check.close()


def test_four_concurrent_evaluators_over_http(store, images, live_server):
    run = store.create_run("crowd")
    rounds = [store.create_round(run, i, PROMPT, images.toy(PROMPT, 4, seed=i), evaluators_required=4)
              for i in range(5)]
    server = live_server()
    errors: list[str] = []
    barrier = threading.Barrier(4)

    def evaluator(k):
        barrier.wait()
        with httpx.Client(base_url=server.url, timeout=10) as client:
            for info in rounds:
                labels, best = _labels(info, k)
                for _ in range(2):  # double submit (e.g. a double click): idempotent
                    resp = client.post(f"/api/rounds/{info.id}/submissions",
                                       json={"evaluator": f"ev{k}", "labels": labels, "best_image_id": best})
                    if resp.status_code != 200:
                        errors.append(resp.text)

    # Meanwhile the trainer waits on the last round in its own thread.
    result = {}
    waiter = threading.Thread(target=lambda: result.update(
        fb=FeedbackStore(store.directory).wait_for_round(rounds[-1].id, timeout=30, poll=0.05, close=True)))
    waiter.start()
    threads = [threading.Thread(target=evaluator, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    waiter.join()
    assert not errors
    for info in rounds:
        assert store.round_complete(info.id)
        fb = store.round_feedback(info.id)
        assert set(fb.per_evaluator) == {"ev0", "ev1", "ev2", "ev3"}
        for k in range(4):
            labels, best = _labels(info, k)
            assert fb.per_evaluator[f"ev{k}"]["labels"] == {int(i): v for i, v in labels.items()}
            assert fb.per_evaluator[f"ev{k}"]["best_image_id"] == best
        assert len(store.submissions(info.id)) == 4
    assert store.label_count(run) == 4 * 4  # only the round the trainer read (closed) counts as used
    for info in rounds[:-1]:
        store.close_round(info.id)
    assert store.label_count(run) == 4 * 5 * 4
    assert result["fb"].round_id == rounds[-1].id and len(result["fb"].per_evaluator) == 4
