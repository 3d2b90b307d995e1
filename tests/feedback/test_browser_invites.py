"""Personal links in a real headless Chromium: the link signs the evaluator in, a typed name alone does not."""

from __future__ import annotations

import pytest

PROMPT = "a red circle left of a blue square"

pytestmark = pytest.mark.browser


@pytest.fixture
def invited(store, images, live_server):
    run = store.create_run("team", {"algorithm": "hero"})
    info = store.create_round(run, 0, PROMPT, images.toy(PROMPT, 4), evaluators_required=2)
    tokens = dict(store.invite(["alice", "bob"], invited_by="owner"))
    return store, info, tokens, live_server()


def _page(chromium):
    context = chromium.new_context(viewport={"width": 1280, "height": 860})
    context.set_default_timeout(30_000)  # generous: the suite shares two cores with training runs
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    return context, page, errors


def _label_all_bad(page):
    for k in range(4):
        card = page.locator("#grid figure.card").nth(k)
        card.click()  # unlabeled -> good
        card.click()  # good -> bad
    page.wait_for_selector("#left.done")


def test_a_personal_link_signs_the_evaluator_in(chromium, invited):
    store, info, tokens, server = invited
    context, page, errors = _page(chromium)
    try:
        page.goto(f"{server.url}/#invite={tokens['alice']}")
        page.wait_for_function("document.getElementById('evaluator').readOnly")
        assert page.input_value("#evaluator") == "alice"
        assert "invite" not in page.url and tokens["alice"] not in page.url  # out of the address bar and history
        assert page.locator("#signin").is_hidden()
        page.get_by_role("link", name="Label →").first.click()
        page.wait_for_url(f"**/rounds/{info.id}")
        page.wait_for_selector("#grid figure.card >> nth=3")
        assert page.input_value("#evaluator") == "alice"
        _label_all_bad(page)
        page.click("#submit")
        page.wait_for_selector("#status.ok")
        assert "waiting for 1 more evaluator" in page.locator("#status").inner_text()
        assert [s["evaluator"] for s in store.submissions(info.id)] == ["alice"]
        assert errors == []
    finally:
        context.close()


def test_without_the_link_a_typed_name_is_refused(chromium, invited):
    store, info, tokens, server = invited
    context, page, errors = _page(chromium)
    try:
        page.goto(f"{server.url}/")
        page.wait_for_selector("#signin:not([hidden])")
        assert "personal link" in page.locator("#signin").inner_text()
        page.goto(f"{server.url}/rounds/{info.id}")
        page.wait_for_selector("#grid figure.card >> nth=3")
        assert not page.locator("#evaluator").evaluate("e => e.readOnly")
        page.fill("#evaluator", "alice")
        page.press("#evaluator", "Enter")
        _label_all_bad(page)
        page.click("#submit")
        page.wait_for_selector("#status.error")
        assert "personal link" in page.locator("#status").inner_text()
        assert store.submissions(info.id) == []
    finally:
        context.close()
