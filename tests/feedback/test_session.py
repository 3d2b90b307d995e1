"""What the pages say the session is doing: waiting for labels or training, round N of M, and how long
the last round took (session.py), from the store's round times."""

from __future__ import annotations

from diffalign.feedback.session import format_duration, session_status

PROMPT = "a red circle left of a blue square"


def _round(iteration, created, closed=None, submitted=(), required=1):
    return {"iteration": iteration, "created_at": f"2026-12-01T10:{created}+00:00",
            "closed_at": f"2026-12-01T10:{closed}+00:00" if closed else None,
            "state": "closed" if closed else "open", "complete": len(submitted) >= required,
            "evaluators_submitted": list(submitted), "evaluators_required": required}


def test_states_and_durations_from_round_times():
    assert session_status([], 3)["state"] == "not_started"
    first = _round(0, "00:00", closed="01:30", submitted=["a"])
    waiting = session_status([_round(1, "02:10", submitted=["a"], required=2), first], 3)
    assert waiting["state"] == "waiting_for_labels" and waiting["round"] == 2 and waiting["of"] == 3
    assert waiting["last_round"] == {"round": 1, "labelling_seconds": 90.0, "training_seconds": 40.0,
                                     "total_seconds": 130.0}
    assert waiting["message"].startswith("Waiting for labels on round 2 of 3 (1 of 2 evaluators submitted).")
    assert "took 2 min 10 s (labelling 1 min 30 s, training 40 s)" in waiting["message"]
    assert waiting["since"] == "2026-12-01T10:02:10+00:00"
    labelled = session_status([first, _round(1, "02:10", submitted=["a"])], 3)
    assert labelled["state"] == "labelled" and "reads it next" in labelled["message"]
    training = session_status([first, _round(1, "02:10", closed="03:00", submitted=["a"])], 3)
    assert training["state"] == "training" and training["since"] == "2026-12-01T10:03:00+00:00"
    assert "round 3 of 3 comes when it is done" in training["message"]
    last = session_status([first, _round(1, "02:10", "03:00", ["a"]), _round(2, "04:00", "05:00", ["a"])], 3)
    assert last["state"] == "training_last" and last["last_round"]["round"] == 2
    assert session_status([first], None)["message"].startswith("Training on the labels of round 1;")  # no plan
    assert [format_duration(x) for x in (None, 0.2, 4.4, 65, 7260)] == ["–", "under 1 s", "4 s", "1 min 5 s",
                                                                      "2 h 1 min"]


def test_the_run_summary_carries_the_session(store, images):
    run = store.create_run("s", {"feedback": {"rounds": 2}})
    assert store.run_summary(run)["session"]["state"] == "not_started"
    r0 = store.create_round(run, 0, PROMPT, images.toy(PROMPT, 2))
    assert store.run_summary(run)["session"]["state"] == "waiting_for_labels"
    store.submit(r0.id, "alice", {i: "bad" for i in r0.image_ids}, None)
    assert store.run_summary(run)["session"]["state"] == "labelled"
    store.close_round(r0.id)
    session = store.run_summary(run)["session"]
    assert session["state"] == "training" and session["round"] == 1 and session["of"] == 2
    store.create_round(run, 1, PROMPT, images.toy(PROMPT, 2, seed=1))
    session = store.list_runs()[0]["session"]
    assert session["state"] == "waiting_for_labels" and session["last_round"]["round"] == 1
    assert session["last_round"]["total_seconds"] >= session["last_round"]["training_seconds"] >= 0
