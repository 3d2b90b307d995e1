"""The labeling app's HTTP API: validation, tokens, limits, idempotency, pages and the OpenAPI spec."""

from __future__ import annotations

import httpx
import pytest
from fastapi.testclient import TestClient

from diffalign.feedback.server import create_app, is_loopback, main, serve

PROMPT = "a red circle left of a blue square"
TOKEN = "s3cret-token-for-tests"


@pytest.fixture
def setup(store, images):
    run = store.create_run("api")
    r0 = store.create_round(run, 0, PROMPT, images.toy(PROMPT, 3))
    r1 = store.create_round(run, 1, PROMPT, images.toy(PROMPT, 3, seed=1), previous_best_image_id=r0.image_ids[0],
                            evaluators_required=2)
    return store, r0, r1


def _body(info, evaluator="alice", best="first", labels=None):
    labels = labels or {str(i): ("good" if k == 0 else "bad") for k, i in enumerate(info.image_ids)}
    return {"evaluator": evaluator, "labels": labels,
            "best_image_id": info.image_ids[0] if best == "first" else best}


def _client(store, **kw):
    return TestClient(create_app(store, **kw), raise_server_exceptions=False)


def test_round_listing_and_images(setup):
    store, r0, r1 = setup
    c = _client(store)
    rounds = c.get("/api/rounds").json()
    assert [r["id"] for r in rounds] == [r0.id, r1.id] and rounds[0]["run_name"] == "api"
    data = c.get(f"/api/rounds/{r1.id}").json()
    assert [im["id"] for im in data["images"]] == r1.image_ids
    assert data["previous_best"]["id"] == r0.image_ids[0] and data["prompt"] == PROMPT
    assert data["evaluators_required"] == 2 and data["mine"] is None
    png = c.get(data["images"][0]["url"])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.content == store.image_path(r1.image_ids[0]).read_bytes()
    assert png.headers["etag"] == f'"{data["images"][0]["sha256"]}"'
    assert c.get(data["images"][0]["url"], headers={"If-None-Match": png.headers["etag"]}).status_code == 304
    for page in ("/", f"/rounds/{r1.id}", f"/runs/{r1.run_id}", "/static/round.js", "/static/style.css"):
        resp = c.get(page)
        assert resp.status_code == 200, page
    assert "script-src 'self'" in c.get("/").headers["content-security-policy"]
    assert c.get("/").headers["x-frame-options"] == "DENY"


def test_unknown_ids_are_404_with_json(setup):
    store, r0, _ = setup
    c = _client(store)
    for path in ("/api/rounds/9999", "/api/images/9999.png", "/api/runs/9999", "/rounds/9999", "/runs/9999",
                 "/api/nothing", "/static/nothing.js"):
        resp = c.get(path)
        assert resp.status_code == 404, path
        assert resp.headers["content-type"].startswith("application/json") and resp.json()["detail"], path
    resp = c.post("/api/rounds/9999/submissions", json=_body(r0))
    assert resp.status_code == 404 and "round_id" in resp.json()["detail"]


def test_images_only_by_id(setup):
    store, r0, _ = setup
    c = _client(store)
    for path in ("/api/images/..%2Ffeedback.sqlite", "/api/images/../feedback.sqlite", "/api/images/1",
                 "/static/../feedback.sqlite", "/static/..%2F..%2Fstore.py", "/api/images/abc.png",
                 "/api/images/-1.png"):
        resp = c.get(path)
        assert 400 <= resp.status_code < 500, path
        assert b"SQLite" not in resp.content, path


def test_submit_double_submit_and_audit(setup):
    store, r0, r1 = setup
    c = _client(store)
    first = c.post(f"/api/rounds/{r1.id}/submissions", json=_body(r1))
    assert first.status_code == 200, first.text
    out = first.json()
    assert out["complete"] is False and out["evaluators_submitted"] == 1 and out["evaluators_required"] == 2
    again = c.post(f"/api/rounds/{r1.id}/submissions", json=_body(r1))
    assert again.json()["submission_id"] == out["submission_id"]
    prev_best = c.post(f"/api/rounds/{r1.id}/submissions", json=_body(r1, best=r0.image_ids[0]))
    assert prev_best.status_code == 200 and prev_best.json()["submission_id"] != out["submission_id"]
    assert len(store.submissions(r1.id)) == 2
    mine = c.get(f"/api/rounds/{r1.id}", params={"evaluator": "alice"}).json()["mine"]
    assert mine["best_image_id"] == r0.image_ids[0] and mine["labels"][str(r1.image_ids[0])] == "good"
    done = c.post(f"/api/rounds/{r1.id}/submissions", json=_body(r1, evaluator="bob"))
    assert done.json()["complete"] is True
    assert r1.id not in [r["id"] for r in c.get("/api/rounds").json()]
    assert store.label_count(r1.run_id) == 0 and store.close_round(r1.id).labels_used == 6
    assert store.label_count(r1.run_id) == 6


def test_validation_errors_are_4xx_json(setup):
    store, r0, r1 = setup
    c = _client(store)
    url = f"/api/rounds/{r1.id}/submissions"
    foreign = _body(r1)
    foreign["labels"][str(r0.image_ids[1])] = "good"
    cases = [
        (foreign, 400, "not in round"),
        (_body(r1, labels={str(i): "bad" for i in r0.image_ids}), 400, "not in round"),
        (_body(r1, best=r1.image_ids[1]), 400, "best_image_id"),  # labeled bad
        (_body(r1, best=None), 400, "best_image_id"),
        (_body(r1, best=r0.image_ids[1]), 400, "best_image_id"),  # another round's image, not the previous best
        (_body(r1, evaluator=""), 400, "evaluator"),
        ({**_body(r1), "labels": {str(i): "maybe" for i in r1.image_ids}}, 400, "labels"),
        ({**_body(r1), "labels": {"abc": "good"}}, 422, "labels"),
        ({**_body(r1), "extra": 1}, 422, "extra"),
        ({"evaluator": "x"}, 422, "labels"),
        ({**_body(r1), "best_image_id": "first"}, 422, "best_image_id"),
        ([1, 2, 3], 422, ""),
    ]
    for body, status, message in cases:
        resp = c.post(url, json=body)
        assert resp.status_code == status, (body, resp.text)
        assert message in resp.json()["detail"], (body, resp.text)
    bad_json = c.post(url, content=b"{not json", headers={"Content-Type": "application/json"})
    assert bad_json.status_code == 422
    form = c.post(url, content=b"evaluator=x", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert form.status_code == 415 and "JSON" in form.json()["detail"]
    assert c.post("/api/rounds/abc/submissions", json=_body(r1)).status_code == 422
    assert store.submissions(r1.id) == []


def test_oversized_body_is_413(setup, live_server):
    store, _, r1 = setup
    c = _client(store, max_body_bytes=2000)
    big = _body(r1)
    big["evaluator"] = "x" * 5000
    resp = c.post(f"/api/rounds/{r1.id}/submissions", json=big)
    assert resp.status_code == 413 and "2000 bytes" in resp.json()["detail"]
    # A chunked upload (no Content-Length) is cut off too, by the real server.
    server = live_server(max_body_bytes=2000)

    def chunks():
        for _ in range(10):
            yield b"x" * 1000

    resp = httpx.post(f"{server.url}/api/rounds/{r1.id}/submissions", content=chunks(),
                      headers={"Content-Type": "application/json"}, timeout=10)
    assert resp.status_code == 413 and "2000 bytes" in resp.json()["detail"]
    assert store.submissions(r1.id) == []


def test_token_required_for_posts(setup):
    store, _, r1 = setup
    c = _client(store, token=TOKEN)
    url = f"/api/rounds/{r1.id}/submissions"
    missing = c.post(url, json=_body(r1))
    assert missing.status_code == 401 and "token" in missing.json()["detail"]
    assert missing.headers["www-authenticate"] == "Bearer"
    assert c.post(url, json=_body(r1), headers={"Authorization": "Bearer nope"}).status_code == 403
    assert c.post(url, json=_body(r1), headers={"X-Diffalign-Token": TOKEN + "x"}).status_code == 403
    assert c.post(url, json=_body(r1), headers={"Authorization": "Basic " + TOKEN}).status_code == 401
    assert store.submissions(r1.id) == []
    ok = c.post(url, json=_body(r1), headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200
    ok2 = c.post(url, json=_body(r1, evaluator="bob"), headers={"X-Diffalign-Token": TOKEN})
    assert ok2.status_code == 200 and ok2.json()["complete"]
    assert c.get(f"/api/rounds/{r1.id}").status_code == 200  # reads need no token
    assert c.get("/api/health").json()["token_required"] is True


def test_cross_origin_posts_refused_without_token(setup):
    store, _, r1 = setup
    c = _client(store)
    url = f"/api/rounds/{r1.id}/submissions"
    assert c.post(url, json=_body(r1), headers={"Origin": "https://evil.example"}).status_code == 403
    assert c.post(url, json=_body(r1), headers={"Origin": "null"}).status_code == 403
    assert c.post(url, json=_body(r1), headers={"Origin": "http://localhost:8765"}).status_code == 200


def test_openapi_is_published(setup):
    store, _, _ = setup
    spec = _client(store).get("/openapi.json").json()
    assert "/api/rounds/{round_id}/submissions" in spec["paths"]
    assert "/api/images/{image_id}.png" in spec["paths"]
    assert "SubmissionIn" in spec["components"]["schemas"]


def test_serve_refuses_public_host_without_token(store, capsys):
    with pytest.raises(ValueError, match="without an access token"):
        serve(store, host="0.0.0.0", port=1)
    with pytest.raises(ValueError, match="without an access token"):
        serve(store, host="192.0.2.1", port=1)
    assert main(["--store", str(store.directory), "--host", "0.0.0.0", "--port", "1"]) == 2
    assert "without an access token" in capsys.readouterr().err
    with pytest.raises(ValueError, match="empty token"):
        create_app(store, token="")
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("[::1]")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.org")
