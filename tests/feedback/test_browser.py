"""A person's clicks in a real headless Chromium end up in the store, exactly."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROMPT = "a red circle left of a blue square"
TOKEN = "browser-test-token"
DOCS_SCREENSHOT = REPO / "docs" / "labeling_app.png"

pytestmark = pytest.mark.browser


@pytest.fixture
def labeling(store, images, live_server):
    """A run with a finished round 0 (its best is the previous-best candidate) and an open round 1 of 8."""
    run = store.create_run("hero-demo", {"algorithm": "hero", "images_per_round": 8})
    r0 = store.create_round(run, 0, PROMPT, images.toy(PROMPT, 4, seed=7))
    store.submit(r0.id, "alice", {i: "good" for i in r0.image_ids}, r0.image_ids[1])
    store.close_round(r0.id)  # the trainer read round 0
    # Images 1, 3 and 5 match the prompt, the others do not: the clicks below label them truthfully, so the
    # screenshot kept for the docs shows a sensible labeling.
    from diffalign.toy.scenes import render_scene

    prompts = [PROMPT, "a blue square left of a red circle", PROMPT, "two yellow triangles", PROMPT,
               "a red circle above a blue square", "one green circle", "a blue circle right of a red square"]
    imgs = [render_scene(p, 30 + k).image for k, p in enumerate(prompts)]
    r1 = store.create_round(run, 1, PROMPT, imgs, previous_best_image_id=r0.image_ids[1])
    store.set_run_metric(run, "success_rate", 0.375, iteration=0)
    server = live_server(token=TOKEN)
    return store, r0, r1, server


def _page(chromium):
    context = chromium.new_context(viewport={"width": 1280, "height": 860}, device_scale_factor=1)
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    return context, page, errors


def test_label_a_round_in_the_browser(chromium, labeling, artifacts):
    store, r0, r1, server = labeling
    context, page, errors = _page(chromium)
    try:
        # The index page, opened with the token URL the server prints; the token leaves the address bar.
        page.goto(f"{server.url}/?token={TOKEN}")
        page.get_by_role("link", name="Label →").first.click()
        page.wait_for_url(f"**/rounds/{r1.id}")
        assert "token" not in page.url
        page.wait_for_selector("#grid figure.card >> nth=7")
        assert page.locator("#prompt").inner_text() == PROMPT
        assert page.locator("#left").inner_text() == "8 of 8 left to label"

        page.fill("#evaluator", "carol")
        page.press("#evaluator", "Enter")
        cards = page.locator("#grid figure.card")
        cards.nth(0).click()  # good
        cards.nth(1).click()
        cards.nth(1).click()  # good -> bad
        page.keyboard.press("3")
        page.keyboard.press("g")
        page.keyboard.press("ArrowRight")  # image 4
        page.keyboard.press("b")
        page.keyboard.press("ArrowRight")  # image 5
        page.keyboard.press(" ")  # unlabeled -> good
        page.keyboard.press("s")  # star image 5
        assert page.locator("#left").inner_text() == "3 of 8 left to label"
        cards.nth(0).locator("button.star").click()  # the star moves to image 1
        page.screenshot(path=str(artifacts / "labeling_round_in_progress.png"), full_page=True)
        if not DOCS_SCREENSHOT.exists() or os.environ.get("DIFFALIGN_UPDATE_SCREENSHOTS"):
            DOCS_SCREENSHOT.parent.mkdir(exist_ok=True)
            shutil.copyfile(artifacts / "labeling_round_in_progress.png", DOCS_SCREENSHOT)

        # Enter too early: the page says what is missing and sends nothing.
        page.keyboard.press("Enter")
        assert "3 left" in page.locator("#status").inner_text()
        for k in (6, 7, 8):
            page.keyboard.press(str(k))
            page.keyboard.press("b")
        page.keyboard.press("ArrowDown")  # from image 8 in the last row: stays or moves, never breaks
        page.keyboard.press("Enter")
        page.wait_for_selector("#status.ok")
        assert "Submitted" in page.locator("#status").inner_text()
        page.screenshot(path=str(artifacts / "labeling_round_submitted.png"), full_page=True)

        ids = r1.image_ids
        expected = {ids[0]: "good", ids[1]: "bad", ids[2]: "good", ids[3]: "bad", ids[4]: "good",
                    ids[5]: "bad", ids[6]: "bad", ids[7]: "bad"}
        subs = store.submissions(r1.id)
        assert len(subs) == 1
        assert subs[0]["evaluator"] == "carol" and subs[0]["labels"] == expected
        assert subs[0]["best_image_id"] == ids[0]
        assert store.round_complete(r1.id) and store.label_count(r1.run_id) == 4  # round 1 not trained on yet

        # Reloading remembers the name (localStorage) and shows this evaluator's answer.
        page.reload()
        page.wait_for_selector("#mine:not([hidden])")
        assert page.input_value("#evaluator") == "carol"
        assert page.locator('#grid figure[data-label="good"]').count() == 3
        assert page.locator("#grid figure.starred").count() == 1
        page.keyboard.press("Enter")  # the same answer again: idempotent
        page.wait_for_selector("#status.ok")
        assert len(store.submissions(r1.id)) == 1

        # The trainer reads round 1: the page shows it closed and sends nothing more.
        assert store.close_round(r1.id).labels_used == 8 and store.label_count(r1.run_id) == 4 + 8
        page.reload()
        page.wait_for_selector("#closed:not([hidden])")
        assert "closed" in page.locator("#closed").inner_text() and page.locator("#submit").is_disabled()

        page.goto(f"{server.url}/runs/{r1.run_id}")
        page.wait_for_selector("#rounds table")
        assert "37.5 %" in page.locator("#stats").inner_text()
        assert "12" in page.locator("#stats").inner_text()  # labels used
        page.screenshot(path=str(artifacts / "labeling_run_page.png"), full_page=True)
        assert not errors, errors
    finally:
        context.close()


def test_previous_best_can_win_and_a_wrong_token_is_reported(chromium, labeling, artifacts):
    store, r0, r1, server = labeling
    context, page, errors = _page(chromium)
    try:
        page.goto(f"{server.url}/rounds/{r1.id}?token=wrong")
        page.wait_for_selector("#grid figure.card >> nth=7")
        page.fill("#evaluator", "dave")
        page.press("#evaluator", "Enter")
        for k in range(1, 9):
            page.keyboard.press(str(k))
            page.keyboard.press("b")
        page.locator("#previous button.star").click()
        page.keyboard.press("Enter")
        page.wait_for_selector("#status.error")
        assert "wrong access token" in page.locator("#status").inner_text()
        assert store.submissions(r1.id) == []

        page.evaluate(f"sessionStorage.setItem('diffalign.token', '{TOKEN}')")
        page.keyboard.press("Enter")
        page.wait_for_selector("#status.ok")
        fb = store.round_feedback(r1.id)
        assert fb.good == [False] * 8
        assert fb.best_image_id == r0.image_ids[1] and fb.best_index is None
        page.screenshot(path=str(artifacts / "labeling_previous_best.png"), full_page=True)
        assert [e for e in errors if "401" not in e and "403" not in e] == []
    finally:
        context.close()


def test_a_late_submission_gets_the_closed_message(chromium, labeling):
    """The issue's scenario: a third evaluator has the round open while training reads it, then submits."""
    store, r0, r1, server = labeling
    context, page, errors = _page(chromium)
    try:
        page.goto(f"{server.url}/rounds/{r1.id}?token={TOKEN}")
        page.wait_for_selector("#grid figure.card >> nth=7")
        page.fill("#evaluator", "erin")
        page.press("#evaluator", "Enter")
        for k in range(1, 9):
            page.keyboard.press(str(k))
            page.keyboard.press("b")
        store.submit(r1.id, "alice", {i: "bad" for i in r1.image_ids}, None)
        store.close_round(r1.id)  # meanwhile alice completed the round and training read it
        page.keyboard.press("Enter")
        page.wait_for_selector("#closed:not([hidden])")
        assert "is closed" in page.locator("#status").inner_text()
        assert page.locator("#submit").is_disabled()
        assert [s["evaluator"] for s in store.submissions(r1.id)] == ["alice"]
        assert store.label_count(r1.run_id) == 4 + 8
        assert [e for e in errors if "409" not in e] == []
    finally:
        context.close()
