"""Blind A/B comparisons: the statistics on known counts, the store's guarantees, and the blind page over HTTP."""

from __future__ import annotations

import math
import sqlite3

import numpy as np
import pytest
from fastapi.testclient import TestClient

from diffalign.abtest import format_summary, summarise, verdict, win_rate
from diffalign.feedback.server import create_app
from diffalign.feedback.store import (
    SCHEMA_VERSION,
    ConflictError,
    FeedbackError,
    FeedbackStore,
    NotFoundError,
)

Z95 = 1.959963984540054


def wilson_by_hand(successes: float, n: float, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval written out: centre (p + z²/2n) / (1 + z²/n), half-width
    z sqrt(p(1-p)/n + z²/4n²) / (1 + z²/n)."""
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return centre - half, centre + half


# ------------------------------------------------------------------ statistics


def test_win_rate_on_known_counts_matches_wilson_written_out():
    w = win_rate(60, 30, 10, "half")  # (60 + 5) / 100
    assert w.n == 100 and w.rate == pytest.approx(0.65)
    assert (w.low, w.high) == pytest.approx(wilson_by_hand(65, 100), abs=1e-12)
    x = win_rate(60, 30, 10, "exclude")  # 60 / 90, ties dropped
    assert x.n == 90 and x.rate == pytest.approx(60 / 90)
    assert (x.low, x.high) == pytest.approx(wilson_by_hand(60, 90), abs=1e-12)


def test_ties_pull_toward_one_half_under_the_half_rule_and_vanish_under_exclude():
    half, excl = win_rate(12, 2, 90, "half"), win_rate(12, 2, 90, "exclude")
    assert half.rate == pytest.approx(57 / 104) and excl.rate == pytest.approx(12 / 14)
    assert half.low < 0.5 < excl.low  # 12-2 with 90 ties is not evidence under "half"; it is among preferences
    all_ties = win_rate(0, 0, 20, "half")
    assert all_ties.rate == 0.5 and all_ties.low < 0.5 < all_ties.high
    assert win_rate(0, 0, 20, "exclude").rate is None


def test_verdict_against_the_gate():
    assert verdict(win_rate(70, 30, 0), 0.5)["decision"] == "ship"
    assert verdict(win_rate(70, 30, 0), 0.65)["decision"] == "inconclusive"  # lower bound 0.604
    assert verdict(win_rate(30, 70, 0), 0.5)["decision"] == "reject"
    assert verdict(win_rate(6, 4, 0), 0.5)["decision"] == "inconclusive"
    assert verdict(win_rate(0, 0, 0), 0.5)["decision"] == "inconclusive"


def test_bad_rules_and_gates_name_the_field():
    with pytest.raises(ValueError, match="ties: 'drop' is not a tie rule"):
        win_rate(1, 1, 1, "drop")
    with pytest.raises(ValueError, match=r"gate: .* in \[0, 1\)"):
        summarise([], 0, "half", gate=1.5)


def test_summary_per_prompt_and_overall():
    choices = ([{"prompt": "p", "evaluator": "e", "pair_id": i, "choice": "b"} for i in range(6)]
               + [{"prompt": "p", "evaluator": "e", "pair_id": 6, "choice": "none"}]
               + [{"prompt": "q", "evaluator": "e", "pair_id": 7 + i, "choice": "a"} for i in range(3)])
    s = summarise(choices, pairs=12)
    assert s["per_prompt"]["p"]["wins"] == 6 and s["per_prompt"]["p"]["ties"] == 1
    assert s["per_prompt"]["q"]["losses"] == 3 and s["per_prompt"]["q"]["rate"] == 0.0
    assert s["overall"]["rate"] == pytest.approx(6.5 / 10) and s["pairs_decided"] == 10
    text = format_summary(s, "base", "tuned")
    assert "overall" in text and "a tie counts as half a win" in text and "INCONCLUSIVE" in text


# ------------------------------------------------------------------ the store


def _pairs(n=6, seed=0):
    rng = np.random.default_rng(seed)
    a = [rng.integers(0, 255, (8, 8, 3), dtype=np.uint8) for _ in range(n)]
    b = [rng.integers(0, 255, (8, 8, 3), dtype=np.uint8) for _ in range(n)]
    return ["two red circles"] * (n // 2) + ["three blue squares"] * (n - n // 2), a, b


@pytest.fixture
def store(tmp_path):
    s = FeedbackStore(tmp_path / "store")
    yield s
    s.close()


@pytest.fixture
def comparison(store):
    prompts, a, b = _pairs()
    cid = store.create_comparison("ab-test", "SECRET-MODEL-A", "SECRET-MODEL-B", prompts, a, b,
                                  settings={"ties": "half", "gate": 0.5}, created_by="carol", seed=3)
    return store, cid, a, b


def test_sides_are_randomised_and_the_store_maps_a_side_to_its_model(comparison):
    store, cid, a, b = comparison
    pairs = store.pairs(cid)
    assert {p["a_on_left"] for p in pairs} == {True, False}  # seed 3 puts A on both sides across 6 pairs
    for p in pairs:
        left = store.load_pair_image(p["pair_id"], "left")
        expected = a[p["position"]] if p["a_on_left"] else b[p["position"]]
        np.testing.assert_array_equal(left, expected)
        store.choose(p["pair_id"], "dan", "left")
    picks = store.comparison_choices(cid)
    assert [c["choice"] for c in picks] == ["a" if p["a_on_left"] else "b" for p in pairs]


def test_a_pick_acknowledged_is_stored_once_and_attributed(comparison):
    store, cid, _, _ = comparison
    pair = store.next_pair(cid, "erin")["pair"]
    first = store.choose(pair["id"], "erin", "right")
    assert store.choose(pair["id"], " erin ", "right") == first  # a re-sent pick: the same row
    assert len(store.comparison_choices(cid, latest_only=False)) == 1
    changed = store.choose(pair["id"], "erin", "none")
    assert changed != first
    every = store.comparison_choices(cid, latest_only=False)
    assert [c["shown"] for c in every] == ["right", "none"] and {c["evaluator"] for c in every} == {"erin"}
    assert [c["choice"] for c in store.comparison_choices(cid)] == ["none"]  # the latest counts
    store.choose(pair["id"], "frank", "left")
    assert sorted(c["evaluator"] for c in store.comparison_choices(cid)) == ["erin", "frank"]
    assert store.next_pair(cid, "erin")["decided"] == 1 and store.next_pair(cid, "erin")["pair"]["id"] != pair["id"]
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        store._conn().execute("UPDATE comparison_choices SET choice = 'b'")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        store._conn().execute("DELETE FROM comparison_pairs")
    audit = store.comparison_audit(cid)
    assert audit[0]["action"] == "create_comparison" and audit[0]["actor"] == "carol"


def test_bad_picks_name_the_field(comparison):
    store, cid, _, _ = comparison
    pair_id = store.pairs(cid)[0]["pair_id"]
    with pytest.raises(FeedbackError, match="choice: expected 'left', 'right' or 'none'"):
        store.choose(pair_id, "erin", "A")
    with pytest.raises(FeedbackError, match="evaluator: a name is required"):
        store.choose(pair_id, "  ", "left")
    with pytest.raises(NotFoundError, match="pair_id: no comparison pair"):
        store.choose(999, "erin", "left")


def test_same_name_same_pairs_is_idempotent_other_pairs_conflict(comparison):
    store, cid, a, b = comparison
    prompts, _, _ = _pairs()
    assert store.create_comparison("ab-test", "x", "y", prompts, a, b, seed=3) == cid
    with pytest.raises(ConflictError, match="name: comparison 'ab-test' already exists"):
        store.create_comparison("ab-test", "x", "y", prompts, b, a, seed=3)


def test_a_version_2_store_gains_the_comparison_tables(tmp_path):
    path = tmp_path / "old"
    with FeedbackStore(path) as s:
        run = s.create_run("kept")
    conn = sqlite3.connect(path / "feedback.sqlite")
    for table in ("comparison_choices", "comparison_pairs", "comparisons"):
        conn.execute(f"DROP TABLE {table}")
    conn.execute("PRAGMA user_version = 2")
    conn.commit()
    conn.close()
    with FeedbackStore(path) as s:
        assert s.schema_version == SCHEMA_VERSION and s.get_run(run)["name"] == "kept"
        prompts, a, b = _pairs(2)
        assert s.create_comparison("new", "x", "y", prompts, a, b) > 0


# ------------------------------------------------------------------ the blind page


def test_the_page_and_its_api_never_name_the_models(comparison):
    store, cid, a, b = comparison
    c = TestClient(create_app(store), raise_server_exceptions=False)
    page = c.get(f"/compare/{cid}")
    assert page.status_code == 200 and "Left is better" in page.text
    seen = [page.text, c.get("/api/comparisons").text, c.get("/").text]
    for _ in range(len(a)):
        nxt = c.get(f"/api/comparisons/{cid}/next", params={"evaluator": "gina"})
        seen.append(nxt.text)
        pair = nxt.json()["pair"]
        assert set(pair) == {"id", "position", "prompt", "left", "right"}
        assert pair["left"]["url"].endswith("/left.png") and pair["right"]["url"].endswith("/right.png")
        png = c.get(pair["left"]["url"])
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        resp = c.post(f"/api/pairs/{pair['id']}/choices", json={"evaluator": "gina", "choice": "left"})
        assert resp.status_code == 200, resp.text
        seen.append(resp.text)
    done = c.get(f"/api/comparisons/{cid}/next", params={"evaluator": "gina"}).json()
    assert done["pair"] is None and done["decided"] == done["total"] == len(a)
    for text in seen:
        assert "SECRET-MODEL" not in text and '"a_on_left"' not in text and "sha256" not in text
    for p in store.pairs(cid):  # no served URL or body reveals a content hash either
        assert all(p["sha256_a"] not in t and p["sha256_b"] not in t for t in seen)
    bad = c.post(f"/api/pairs/{store.pairs(cid)[0]['pair_id']}/choices", json={"evaluator": "gina", "choice": "B"})
    assert bad.status_code == 400 and "choice:" in bad.json()["detail"]
    assert c.get(f"/compare/{cid + 50}").status_code == 404


def test_a_flagged_image_is_not_served_and_the_page_gets_the_reason(store):
    prompts, a, b = _pairs(2)
    cid = store.create_comparison("flagged", "x", "y", prompts, a, b, seed=1,
                                  pair_metadata=[{"flagged_b": "toy_red_objects: score 1.00 >= 0.5"}, {}])
    c = TestClient(create_app(store), raise_server_exceptions=False)
    pair = c.get(f"/api/comparisons/{cid}/next").json()["pair"]
    flagged_side = "left" if not store.pair_info(pair["id"])["a_on_left"] else "right"
    assert pair[flagged_side]["flagged"] and pair[flagged_side]["url"] is None
    assert "toy_red_objects" in pair[flagged_side]["flag_reason"]
    hidden = c.get(f"/api/pairs/{pair['id']}/{flagged_side}.png")
    assert hidden.status_code == 403 and "safety filter" in hidden.json()["detail"]
