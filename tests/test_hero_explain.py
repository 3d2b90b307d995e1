"""Why did HERO reward this image? Nearest labelled images in each round's embedding, in the app and the report."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

from diffalign.config import load_config
from diffalign.feedback.loop import run_feedback
from diffalign.feedback.server import create_app
from diffalign.feedback.store import ConflictError, FeedbackStore
from tests.conftest import tiny_run_overrides


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (8, 8, 3), dtype=np.uint8) for _ in range(n)]


def test_nearest_are_ordered_by_cosine_in_the_rounds_embedding_and_carry_labels(tmp_path):
    with FeedbackStore(tmp_path / "s") as store:
        run = store.create_run("r")
        r0 = store.create_round(run, 0, "p", _images(3))
        store.submit(r0.id, "ann", dict(zip(r0.image_ids, ["good", "bad", "bad"], strict=True)), r0.image_ids[0])
        store.submit(r0.id, "bob", dict(zip(r0.image_ids, ["good", "good", "bad"], strict=True)), r0.image_ids[1])
        store.close_round(r0.id)
        q = r0.image_ids[2]
        # In this round's embedding image 2 points along x; image 1 is 45 degrees off, image 0 opposite.
        store.store_embeddings(r0.id, r0.image_ids, np.array([[-1.0, 0], [1, 1], [1, 0]]),
                               rewards={r0.image_ids[0]: 0.9, r0.image_ids[1]: 0.5, q: 0.1})
        ex = store.explain(q, k=2)
        assert [n["image_id"] for n in ex["neighbours"]] == [r0.image_ids[1], r0.image_ids[0]]
        assert ex["neighbours"][0]["similarity"] == pytest.approx(np.sqrt(0.5))
        assert ex["neighbours"][1]["similarity"] == pytest.approx(-1.0)
        assert ex["neighbours"][0]["labels"] == {"ann": "bad", "bob": "good"}  # a 1-1 tie aggregates to bad
        assert ex["neighbours"][0]["label"] == "bad" and ex["neighbours"][1]["label"] == "good"
        assert ex["reward"] == pytest.approx(0.1)
        assert store.best_and_worst(r0.id) == (r0.image_ids[0], q)
        r1 = store.create_round(run, 1, "p", _images(2, seed=1))
        store.store_embeddings(r1.id, r1.image_ids, np.eye(2))
        with pytest.raises(ConflictError, match="still open"):
            store.explain(r1.image_ids[0])
        c = TestClient(create_app(store), raise_server_exceptions=False)
        assert c.get(f"/api/images/{r1.image_ids[0]}/explanation").status_code == 409
        got = c.get(f"/api/images/{q}/explanation", params={"k": 1})
        assert got.status_code == 200 and got.json()["neighbours"][0]["url"] == f"/api/images/{r0.image_ids[1]}.png"


def test_a_hero_session_records_embeddings_and_the_report_explains_best_and_worst(tiny_pipe_dir, tmp_path):
    out = tmp_path / "hero"
    cfg = load_config(overrides=tiny_run_overrides(
        tiny_pipe_dir, out, 'feedback.algorithm="hero"', "feedback.rounds=2", "feedback.images_per_round=4",
        "feedback.prompts=['two red circles']", "feedback.simulated_noise_rate=0.5", "feedback.eval_every=0",
        "hero.embed_steps=3"))
    run_feedback(cfg, evaluator="simulated", log=lambda m: None)
    with FeedbackStore(out / "feedback") as store:
        run_id = store.list_runs()[0]["id"]
        rounds = store.run_summary(run_id)["rounds"]
        second = store.get_round(rounds[1]["id"])
        ex = store.explain(second.image_ids[0], k=10)
        # Round 2's embedding holds every image labelled so far: 4 of round 1 and 4 of round 2, minus itself.
        assert len(ex["neighbours"]) == 7 and ex["reward"] is not None
        assert {n["iteration"] for n in ex["neighbours"]} == {0, 1}
        assert all(set(n["labels"]) == {"simulated"} and n["label"] in ("good", "bad") for n in ex["neighbours"])
        sims = [n["similarity"] for n in ex["neighbours"]]
        assert sims == sorted(sims, reverse=True)
        first = store.explain(store.get_round(rounds[0]["id"]).image_ids[0], k=10)
        assert len(first["neighbours"]) == 3  # round 1's embedding knew only round 1
    report = (out / "feedback_report.html").read_text()
    assert "Why did HERO reward these images?" in report and report.count("highest reward") == 2
