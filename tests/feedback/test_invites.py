"""Evaluator identities: invitations with hashed personal tokens, and submissions attributed to the token."""

from __future__ import annotations

import re
import sqlite3

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from diffalign.cli import app as cli_app
from diffalign.feedback.invites import token_digest
from diffalign.feedback.server import create_app
from diffalign.feedback.store import ConflictError, FeedbackError

PROMPT = "a red circle left of a blue square"
ACCESS = "access-token-for-tests"


@pytest.fixture
def two_person_round(store, images):
    run = store.create_run("team")
    return store, store.create_round(run, 0, PROMPT, images.toy(PROMPT, 3), evaluators_required=2)


def _body(info, evaluator=None):
    body = {"labels": {str(i): ("good" if k == 0 else "bad") for k, i in enumerate(info.image_ids)},
            "best_image_id": info.image_ids[0]}
    if evaluator is not None:
        body["evaluator"] = evaluator
    return body


def _as(token):
    return {"X-Diffalign-Evaluator-Token": token}


def test_tokens_are_stored_hashed_and_names_unique_without_case(store):
    tokens = dict(store.invite(["alice", "Bob"], invited_by="owner"))
    assert set(tokens) == {"alice", "Bob"} and tokens["alice"] != tokens["Bob"]
    raw = (store.directory / "feedback.sqlite").read_bytes() + (store.directory / "feedback.sqlite-wal").read_bytes()
    for token in tokens.values():
        assert token.encode() not in raw and len(token) >= 32
    conn = sqlite3.connect(store.db_path)
    assert sorted(r[0] for r in conn.execute("SELECT token_sha256 FROM invites")) == sorted(
        token_digest(t) for t in tokens.values())
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):  # a token cannot be swapped in the database
        conn.execute("UPDATE invites SET token_sha256 = 'x'")
    conn.close()
    assert store.evaluator_for_token(tokens["Bob"]) == "Bob"
    assert store.evaluator_for_token(tokens["Bob"] + "x") is None and store.evaluator_for_token("") is None
    with pytest.raises(ConflictError, match="'Alice' is already an evaluator of this store spelled 'alice'"):
        store.invite(["Alice"], invited_by="owner")
    with pytest.raises(ConflictError, match="already invited; pass --reissue"):
        store.invite(["alice"], invited_by="owner")
    with pytest.raises(ConflictError, match="'carol' and 'CAROL' are the same evaluator"):
        store.invite(["carol", "CAROL"], invited_by="owner")
    assert store.evaluator_for_token(tokens["alice"]) == "alice"  # nothing changed by the refusals
    assert [e["evaluator"] for e in store.invited_evaluators()] == ["Bob", "alice"]
    with pytest.raises(FeedbackError, match="invited_by"):
        store.invite(["dave"], invited_by="")
    # A re-issued link replaces the old one.
    (name, new), = store.invite(["alice"], invited_by="owner", reissue=True)
    assert name == "alice" and store.evaluator_for_token(new) == "alice"
    assert store.evaluator_for_token(tokens["alice"]) is None


def test_typed_names_match_without_case(two_person_round):
    store, info = two_person_round
    store.submit(info.id, "alice", {i: "bad" for i in info.image_ids}, None)
    store.submit(info.id, "Alice", {i: "bad" for i in info.image_ids}, None)
    assert store.submitted_evaluators(info.id) == ["alice"] and not store.round_complete(info.id)


def test_open_mode_keeps_the_typed_name(two_person_round):
    store, info = two_person_round
    c = TestClient(create_app(store), raise_server_exceptions=False)
    assert c.get("/api/whoami").json() == {"invites": False, "evaluator": None}
    resp = c.post(f"/api/rounds/{info.id}/submissions", json=_body(info, "alice"))
    assert resp.status_code == 200 and resp.json()["evaluator"] == "alice"
    missing = c.post(f"/api/rounds/{info.id}/submissions", json=_body(info))
    assert missing.status_code == 400 and "evaluator" in missing.json()["detail"]


def test_nobody_can_submit_as_someone_else(two_person_round):
    store, info = two_person_round
    tokens = dict(store.invite(["alice", "bob"], invited_by="owner"))
    c = TestClient(create_app(store), raise_server_exceptions=False)
    url = f"/api/rounds/{info.id}/submissions"

    anonymous = c.post(url, json=_body(info, "alice"))
    assert anonymous.status_code == 401 and "personal link" in anonymous.json()["detail"]
    forged = c.post(url, json=_body(info, "alice"), headers=_as("made-up-token"))
    assert forged.status_code == 403 and "unknown or was replaced" in forged.json()["detail"]
    as_alice = c.post(url, json=_body(info, "alice"), headers=_as(tokens["bob"]))
    assert as_alice.status_code == 403 and "signs you in as 'bob'" in as_alice.json()["detail"]
    assert store.submissions(info.id) == []

    # The token says who submits: with or without a (matching, any case) name.
    bob = c.post(url, json=_body(info, "BOB"), headers=_as(tokens["bob"]))
    assert bob.status_code == 200 and bob.json()["evaluator"] == "bob" and not bob.json()["complete"]
    # One person cannot complete a two-evaluator round alone, whatever name they type.
    again = c.post(url, json=_body(info), headers=_as(tokens["bob"]))
    assert again.status_code == 200 and again.json()["submission_id"] == bob.json()["submission_id"]
    assert not again.json()["complete"] and store.submitted_evaluators(info.id) == ["bob"]
    # Only your own labels come back with a round; a name in the query does not show someone else's.
    assert c.get(f"/api/rounds/{info.id}", params={"evaluator": "bob"}).json()["mine"] is None
    assert c.get(f"/api/rounds/{info.id}", headers=_as(tokens["bob"])).json()["mine"]["best_image_id"] == info.image_ids[0]
    assert c.get("/api/whoami", headers=_as(tokens["alice"])).json() == {"invites": True, "evaluator": "alice"}
    done = c.post(url, json=_body(info), headers=_as(tokens["alice"]))
    assert done.status_code == 200 and done.json()["complete"]
    assert [s["evaluator"] for s in store.submissions(info.id)] == ["bob", "alice"]


def test_a_personal_token_stands_in_for_the_access_token(two_person_round):
    store, info = two_person_round
    tokens = dict(store.invite(["alice"], invited_by="owner"))
    c = TestClient(create_app(store, token=ACCESS), raise_server_exceptions=False)
    url = f"/api/rounds/{info.id}/submissions"
    assert c.post(url, json=_body(info, "alice")).status_code == 401
    # The access token alone no longer lets anyone label: the store has invitations.
    shared = c.post(url, json=_body(info, "alice"), headers={"Authorization": f"Bearer {ACCESS}"})
    assert shared.status_code == 401 and "invitation" in shared.json()["detail"]
    ok = c.post(url, json=_body(info), headers=_as(tokens["alice"]))
    assert ok.status_code == 200 and ok.json()["evaluator"] == "alice"
    assert c.post(url, json=_body(info), headers={**_as(tokens["alice"]), "Origin": "https://evil.example"},
                  ).status_code == 200  # token-authenticated, as with the access token: no ambient credentials


def test_blind_comparison_picks_are_attributed_to_the_token(store, images):
    a, b = images.toy(PROMPT, 2), images.toy(PROMPT, 2, seed=1)
    cid = store.create_comparison("ab", "model-a", "model-b", [PROMPT] * 2, a, b, created_by="owner")
    tokens = dict(store.invite(["alice", "bob"], invited_by="owner"))
    c = TestClient(create_app(store), raise_server_exceptions=False)
    pair = c.get(f"/api/comparisons/{cid}/next", headers=_as(tokens["alice"])).json()["pair"]
    url = f"/api/pairs/{pair['id']}/choices"
    assert c.post(url, json={"evaluator": "bob", "choice": "left"}).status_code == 401
    assert c.post(url, json={"evaluator": "bob", "choice": "left"}, headers=_as(tokens["alice"])).status_code == 403
    ok = c.post(url, json={"choice": "left"}, headers=_as(tokens["alice"]))
    assert ok.status_code == 200 and ok.json()["decided"] == 1
    assert [ch["evaluator"] for ch in store.comparison_choices(cid)] == ["alice"]
    assert c.get(f"/api/comparisons/{cid}/next", headers=_as(tokens["bob"])).json()["decided"] == 0


def test_cli_invite_prints_each_link_once(store):
    runner = CliRunner()
    result = runner.invoke(cli_app, ["feedback", "invite", "--store", str(store.directory), "--by", "owner",
                                     "--url", "https://label.example.org", "alice", "bob"])
    assert result.exit_code == 0, result.output
    links = dict(re.findall(r"^\s+(\w+): (https://label\.example\.org/#invite=\S+)$", result.output, re.M))
    assert set(links) == {"alice", "bob"}
    assert store.evaluator_for_token(links["bob"].split("#invite=")[1]) == "bob"
    dup = runner.invoke(cli_app, ["feedback", "invite", "--store", str(store.directory), "--by", "owner", "ALICE"])
    assert dup.exit_code != 0 and "spelled 'alice'" in dup.output and "#invite=" not in dup.output
    audit = sqlite3.connect(store.db_path).execute("SELECT action, actor FROM audit_log").fetchall()
    assert audit == [("invite", "owner"), ("invite", "owner")]


def test_a_version_3_store_gains_invites_and_keeps_its_labels(tmp_path, images):
    from diffalign.feedback.store import SCHEMA_VERSION, FeedbackStore

    path = tmp_path / "old"
    with FeedbackStore(path) as s:
        info = s.create_round(s.create_run("kept"), 0, PROMPT, images.toy(PROMPT, 2))
        s.submit(info.id, "alice", {i: "bad" for i in info.image_ids}, None)
    conn = sqlite3.connect(path / "feedback.sqlite")
    conn.execute("DROP TABLE invites")
    conn.execute("PRAGMA user_version = 3")
    conn.commit()
    conn.close()
    with FeedbackStore(path) as s:
        assert s.schema_version == SCHEMA_VERSION == 4 and not s.has_invites()
        assert s.submitted_evaluators(info.id) == ["alice"]
        (name, token), = s.invite(["alice"], invited_by="owner")  # the evaluator who labelled before
        assert s.evaluator_for_token(token) == "alice"
