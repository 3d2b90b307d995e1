"""The round page for a real team, in headless Chromium: a focus model that reaches every image of a
16-image round, an enlarged view, and pages that fit a 390 px phone screen."""

from __future__ import annotations

import pytest

PROMPT = "a red circle left of a blue square"
OTHER = "two yellow triangles"

pytestmark = pytest.mark.browser


@pytest.fixture
def big_round(store, images, live_server):
    """A finished round 0 and an open round 1 of 16 images (no previous best: the grid is the whole Tab order)."""
    run = store.create_run("team-session", {"feedback": {"algorithm": "hero", "rounds": 3, "images_per_round": 16}})
    r0 = store.create_round(run, 0, PROMPT, images.toy(PROMPT, 4, seed=3))
    store.submit(r0.id, "alice", {i: "bad" for i in r0.image_ids}, None)
    store.close_round(r0.id)
    r1 = store.create_round(run, 1, PROMPT, images.toy(PROMPT, 8, seed=5) + images.toy(OTHER, 8, seed=6))
    return store, r1, live_server()


def _page(chromium, width=1280, height=860):
    context = chromium.new_context(viewport={"width": width, "height": height})
    context.set_default_timeout(30_000)  # generous: the suite shares two cores with training runs
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    return context, page, errors


def _focused_id(page):
    return page.evaluate("document.activeElement && document.activeElement.dataset.imageId || null")


def test_tab_and_arrows_reach_every_image_of_a_16_image_round(chromium, big_round):
    store, info, server = big_round
    context, page, errors = _page(chromium)
    try:
        page.goto(f"{server.url}/rounds/{info.id}")
        page.wait_for_selector("#grid figure.card >> nth=15")
        page.fill("#evaluator", "carol")
        page.press("#evaluator", "Enter")
        page.focus("#evaluator")
        visited = []
        for k in range(16):
            page.keyboard.press("Tab")  # one Tab stop per image: the star and enlarge buttons are not stops
            page.wait_for_function(f"document.activeElement.dataset.imageId === '{info.image_ids[k]}'")
            visited.append(int(_focused_id(page)))
            page.keyboard.press("g" if k < 8 else "b")  # acts on the focused image
        assert visited == info.image_ids
        labels = page.locator("#grid figure.card").evaluate_all("nodes => nodes.map(n => n.dataset.label)")
        assert labels == ["good"] * 8 + ["bad"] * 8
        # Arrows move the focus too, and Space toggles the focused image: image 16 -> 15, bad -> good.
        page.keyboard.press("ArrowLeft")
        page.wait_for_function(f"document.activeElement.dataset.imageId === '{info.image_ids[14]}'")
        page.keyboard.press(" ")
        page.keyboard.press("s")  # image 15 is the best
        page.keyboard.press("Enter")
        page.wait_for_selector("#status.ok")
        sub, = store.submissions(info.id)
        assert sub["labels"] == {i: ("good" if k < 8 or k == 14 else "bad") for k, i in enumerate(info.image_ids)}
        assert sub["best_image_id"] == info.image_ids[14]
        assert errors == []
    finally:
        context.close()


def test_an_image_opens_large_by_key_and_by_its_own_button(chromium, big_round, artifacts):
    store, info, server = big_round
    context, page, errors = _page(chromium)
    try:
        page.goto(f"{server.url}/rounds/{info.id}")
        page.wait_for_selector("#grid figure.card >> nth=15")
        cards = page.locator("#grid figure.card")
        small = cards.nth(3).locator("img").bounding_box()
        cards.nth(3).focus()
        page.keyboard.press("z")
        page.wait_for_selector("#zoom:not([hidden])")
        page.wait_for_function("document.getElementById('zoom-image').complete")
        big = page.locator("#zoom-image").bounding_box()
        assert big["width"] >= 3 * small["width"] and big["width"] <= 1280
        assert page.locator("#zoom").get_attribute("data-image-id") == str(info.image_ids[3])
        assert "Image 4 of 16" in page.locator("#zoom-caption").inner_text()
        page.keyboard.press("g")  # labels the enlarged image
        page.wait_for_function("document.getElementById('zoom').dataset.label === 'good'")
        assert cards.nth(3).get_attribute("data-label") == "good"
        page.keyboard.press("ArrowRight")  # the next image, still large
        page.wait_for_function(f"document.getElementById('zoom').dataset.imageId === '{info.image_ids[4]}'")
        page.screenshot(path=str(artifacts / "labeling_zoom.png"))
        page.keyboard.press("Escape")
        page.wait_for_selector("#zoom", state="hidden")
        assert _focused_id(page) == str(info.image_ids[4])  # back on the grid where the view left off
        # The enlarge button is its own click target: it does not toggle the label.
        cards.nth(6).locator("button.zoom-button").click()
        page.wait_for_selector("#zoom:not([hidden])")
        assert page.locator("#zoom").get_attribute("data-image-id") == str(info.image_ids[6])
        assert cards.nth(6).get_attribute("data-label") == "unlabeled"
        page.click("#zoom-close")
        page.wait_for_selector("#zoom", state="hidden")
        assert cards.nth(6).get_attribute("data-label") == "unlabeled"
        assert store.submissions(info.id) == [] and errors == []
    finally:
        context.close()


def test_every_page_fits_a_390_px_phone(chromium, big_round, images, artifacts):
    store, info, server = big_round
    cid = store.create_comparison("ab", "model-a", "model-b", [PROMPT] * 2, images.toy(PROMPT, 2),
                                  images.toy(PROMPT, 2, seed=1), created_by="owner")
    context, page, errors = _page(chromium, width=390, height=844)
    try:
        for path, ready in (("/", "#runs table"), (f"/rounds/{info.id}", "#grid figure.card >> nth=15"),
                            (f"/runs/{info.run_id}", "#rounds table"), (f"/compare/{cid}", "#left img")):
            page.goto(server.url + path)
            page.wait_for_selector(ready)
            widths = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
            assert widths[0] <= widths[1], (path, widths)  # no horizontal scroll
            if not path.startswith("/runs"):  # the run page has no name field
                name = page.locator("#evaluator").bounding_box()
                assert name["x"] >= 0 and name["x"] + name["width"] <= widths[1] and name["width"] >= 120, (path, name)
            if path.startswith("/rounds"):
                page.screenshot(path=str(artifacts / "labeling_phone.png"), full_page=True)
                card = page.locator("#grid figure.card").nth(1).bounding_box()
                assert card["x"] + card["width"] <= widths[1]
        assert errors == []
    finally:
        context.close()


def test_the_pages_say_what_the_session_is_doing(chromium, big_round):
    store, info, server = big_round
    context, page, errors = _page(chromium)
    try:
        page.goto(f"{server.url}/")
        page.wait_for_selector("#session .session")
        line = page.locator("#session .session")
        assert line.get_attribute("data-state") == "waiting_for_labels"
        text = line.inner_text()
        assert "team-session" in text and "Waiting for labels on round 2 of 3" in text and "The last round took" in text
        page.goto(f"{server.url}/rounds/{info.id}")
        page.wait_for_selector("#session .session")
        assert page.locator("#round-title").inner_text().upper().startswith("ROUND 2 OF 3")
        store.submit(info.id, "alice", {i: "bad" for i in info.image_ids}, None)
        store.close_round(info.id)  # the trainer read it: the page says training is running
        page.reload()
        page.wait_for_selector('#session .session[data-state="training"]')
        assert "Training on the labels of round 2 of 3; round 3 of 3 comes" in page.locator("#session").inner_text()
        assert errors == []
    finally:
        context.close()
