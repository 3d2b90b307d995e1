// The round page: label every image good/bad, star the best good one, submit.
// Focus model: every image is one Tab stop (its buttons are not: s and z do what they do); the focused image
// is the current one, which arrow keys move and g/b/Space/s/z act on, so a round of any size is reachable.
"use strict";

(() => {
  const { request, el, evaluatorName, setEvaluatorName, signIn, sessionLine, fmtTime } = Diffalign;
  const roundId = Number(window.location.pathname.split("/").filter(Boolean).pop());

  const state = {
    round: null,
    labels: new Map(), // image id -> "good" | "bad"
    best: null, // image id or null
    cursor: 0, // index into candidates()
    submitting: false,
  };

  const $ = (id) => document.getElementById(id);
  const nameInput = $("evaluator");

  function candidates() {
    // Keyboard order: the round's images, then the previous best.
    const ids = state.round.images.map((im) => im.id);
    if (state.round.previous_best) ids.push(state.round.previous_best.id);
    return ids;
  }

  function isPrevious(id) {
    return state.round.previous_best !== null && state.round.previous_best.id === id;
  }

  function isHidden(id) {
    const image = state.round.images.find((im) => im.id === id);
    return Boolean(image && image.flagged);
  }

  function setLabel(id, label) {
    if (isPrevious(id)) return;
    if (isHidden(id)) {  // never shown, so it stays bad (the server labels it bad in any case)
      say("This image was hidden by the safety filter; it counts as bad.", "warn");
      return;
    }
    state.labels.set(id, label);
    if (label === "bad" && state.best === id) state.best = null;
    render();
  }

  function toggle(id) {
    if (isPrevious(id)) return;
    setLabel(id, state.labels.get(id) === "good" ? "bad" : "good");
  }

  function star(id) {
    if (!isPrevious(id) && state.labels.get(id) !== "good") {
      say("Only a good image can be the best: mark it good first (g).", "warn");
      return;
    }
    state.best = state.best === id ? null : id;
    say("");
    render();
  }

  function say(text, kind) {
    const status = $("status");
    status.textContent = text;
    status.className = "status" + (kind ? " " + kind : "");
  }

  function card(image, index, previous) {
    const id = image.id;
    const label = state.labels.get(id);
    const starred = state.best === id;
    const current = candidates()[state.cursor] === id;
    const cls = ["card", previous ? "prev" : label || "unlabeled", starred ? "starred" : "", current ? "current" : ""];
    const starButton = el("button", {
      type: "button",
      class: "star" + (starred ? " on" : ""),
      title: starred ? "the best image (click to unstar)" : "star as the best (s)",
      "aria-pressed": starred ? "true" : "false",
      "aria-label": "best",
      disabled: !previous && label !== "good",
      onclick: (ev) => { ev.stopPropagation(); state.cursor = candidates().indexOf(id); star(id); },
      tabindex: "-1",
    }, starred ? "★" : "☆");
    const zoomButton = image.flagged ? null : el("button", {
      type: "button", class: "zoom-button", title: "enlarge (z)", "aria-label": "enlarge", tabindex: "-1",
      onclick: (ev) => { ev.stopPropagation(); state.cursor = candidates().indexOf(id); openZoom(); },
    }, "⤢");
    const badge = previous
      ? el("span", { class: "badge prev" }, "last round")
      : el("span", { class: "badge " + (label || "unlabeled") }, label || "unlabeled");
    const img = image.flagged
      ? el("div", { class: "ab-hidden small-hidden", title: image.flag_reason },
        el("strong", {}, "Hidden"), el("span", {}, image.flag_reason))
      : el("img", {
        src: image.url, width: 160, height: 160, alt: (previous ? "previous best image" : "image " + (index + 1)),
        draggable: "false",
      });
    const node = el("figure", {
      class: cls.filter(Boolean).join(" "),
      "data-image-id": String(id),
      "data-label": previous ? "previous" : label || "unlabeled",
      tabindex: "0",
      "aria-label": (previous ? "previous best" : `image ${index + 1}`) + `, ${previous ? "candidate" : label || "unlabeled"}` +
        (starred ? ", best" : ""),
      onfocus: () => { if (candidates()[state.cursor] !== id) { state.cursor = candidates().indexOf(id); markCurrent(); } },
      onclick: () => {
        state.cursor = candidates().indexOf(id);
        if (state.round.state === "closed") explain(id);  // labels are final: show why HERO rewarded it
        else if (previous) star(id);
        else toggle(id);
      },
    },
      el("div", { class: "frame" }, img, starred ? el("span", { class: "ribbon" }, "★ best") : null),
      el("figcaption", {}, el("span", { class: "num" }, previous ? "P" : String(index + 1)), badge, zoomButton, starButton));
    return node;
  }

  async function explain(id) {
    const box = $("explain");
    box.hidden = false;
    box.replaceChildren(el("p", { class: "muted" }, "Loading…"));
    try {
      const ex = await request("GET", `/api/images/${id}/explanation?k=6`);
      box.replaceChildren(
        el("h2", {}, `Why this reward? Image ${id}` + (ex.reward === null ? "" : ` · HERO reward ${ex.reward.toFixed(3)}`)),
        el("p", { class: "muted small" }, `The labelled images nearest to it (${ex.similarity}).`),
        el("div", { class: "grid" }, ...ex.neighbours.map((n) => el("figure", { class: "card " + (n.label || "unlabeled") },
          n.flagged ? el("div", { class: "ab-hidden small-hidden" }, el("strong", {}, "Hidden"), el("span", {}, n.flag_reason))
            : el("img", { src: n.url, width: 120, height: 120, alt: `labelled image ${n.image_id}` }),
          el("figcaption", {}, `${n.label || "–"} · sim ${n.similarity.toFixed(2)} · iteration ${n.iteration}`,
            el("br"), el("span", { class: "small" },
              Object.entries(n.labels).map(([who, label]) => `${who}: ${label}`).join(", ")))))));
    } catch (err) {
      box.replaceChildren(el("p", { class: "status error" }, err.message));
    }
  }

  function cardNode(id) {
    return document.querySelector(`figure.card[data-image-id="${id}"]`);
  }

  // Only the "current" outline changes: rebuilding the cards on focus would detach a card mid-click.
  function markCurrent() {
    const currentId = candidates()[state.cursor];
    for (const node of document.querySelectorAll("figure.card[data-image-id]")) {
      node.classList.toggle("current", Number(node.dataset.imageId) === currentId);
    }
    if (!$("zoom").hidden) showZoom();
  }

  // Keyboard moves are focus moves: the focused card is the current image (and Tab goes on from there).
  function focusCurrent() {
    if (!$("zoom").hidden) return;  // the enlarged view keeps the focus; it follows the current image
    const node = cardNode(candidates()[state.cursor]);
    if (node && document.activeElement !== node) node.focus({ preventScroll: true });
    if (node) node.scrollIntoView({ block: "nearest" });
  }

  function zoomTarget() {
    const id = candidates()[state.cursor];
    if (isPrevious(id)) return { image: state.round.previous_best, index: -1 };
    const index = state.round.images.findIndex((im) => im.id === id);
    return { image: state.round.images[index], index };
  }

  function showZoom() {
    const { image, index } = zoomTarget();
    const label = isPrevious(image.id) ? "previous best" : state.labels.get(image.id) || "unlabeled";
    const big = $("zoom-image");
    if (image.flagged) {
      big.removeAttribute("src");
      big.alt = "hidden by the safety filter";
    } else {
      big.src = image.url;
      big.alt = index < 0 ? "previous best image, enlarged" : `image ${index + 1}, enlarged`;
    }
    $("zoom-caption").textContent = (index < 0 ? "Previous best" : `Image ${index + 1} of ${state.round.images.length}`) +
      ` · ${label}` + (state.best === image.id ? " · ★ best" : "");
    $("zoom").dataset.imageId = String(image.id);
    $("zoom").dataset.label = label;
  }

  function openZoom() {
    if (zoomTarget().image.flagged) {
      say("This image was hidden by the safety filter; it cannot be enlarged.", "warn");
      return;
    }
    $("zoom").hidden = false;
    showZoom();
    $("zoom-close").focus({ preventScroll: true });
  }

  function closeZoom() {
    $("zoom").hidden = true;
    focusCurrent();
  }

  function render() {
    const round = state.round;
    const grid = $("grid");
    const hadFocus = Boolean(document.activeElement && document.activeElement.closest &&
      document.activeElement.closest("figure.card"));
    grid.replaceChildren(...round.images.map((im, i) => card(im, i, false)));
    if (round.previous_best) {
      $("previous").hidden = false;
      $("previous-slot").replaceChildren(card(round.previous_best, -1, true));
    }
    const left = round.images.filter((im) => !state.labels.has(im.id)).length;
    const good = round.images.filter((im) => state.labels.get(im.id) === "good").length;
    const needBest = good > 0 && state.best === null;
    $("left").textContent = left > 0
      ? `${left} of ${round.images.length} left to label`
      : needBest ? "all labeled · star the best" : "ready to submit";
    $("left").className = "left" + (left === 0 && !needBest ? " done" : "");
    $("evaluators").textContent = `${good} good · evaluators ${round.evaluators_submitted.length} of ${round.evaluators_required} submitted`;
    const currentId = candidates()[state.cursor];
    const node = cardNode(currentId);
    if (hadFocus && node) node.focus({ preventScroll: true });  // the rebuilt card keeps the focus
    if (node && document.activeElement !== nameInput) node.scrollIntoView({ block: "nearest" });
    if (!$("zoom").hidden) showZoom();
  }

  function moveCursor(dx, dy) {
    const ids = candidates();
    if (dy === 0) {
      state.cursor = Math.max(0, Math.min(ids.length - 1, state.cursor + dx));
    } else {
      // Move to the nearest card in the next row above/below, by on-screen position.
      const nodes = ids.map((id) => document.querySelector(`[data-image-id="${id}"]`).getBoundingClientRect());
      const here = nodes[state.cursor];
      let bestIdx = state.cursor;
      let bestScore = Infinity;
      nodes.forEach((r, i) => {
        const vertical = dy > 0 ? r.top - here.top : here.top - r.top;
        if (vertical <= 4) return;
        const score = vertical * 10 + Math.abs(r.left - here.left);
        if (score < bestScore) { bestScore = score; bestIdx = i; }
      });
      state.cursor = bestIdx;
    }
    markCurrent();
    focusCurrent();
  }

  async function submit() {
    if (state.submitting) return;
    const round = state.round;
    if (round.state === "closed") {
      say("Not submitted: this round is closed (training already used its labels).", "error");
      return;
    }
    const evaluator = nameInput.value.trim();
    if (!evaluator) {
      say("Enter your name first (top right), so your labels are attributed.", "warn");
      nameInput.focus();
      return;
    }
    const left = round.images.filter((im) => !state.labels.has(im.id));
    if (left.length) {
      say(`Label every image first: ${left.length} left.`, "warn");
      state.cursor = round.images.indexOf(left[0]);
      render();
      return;
    }
    const anyGood = round.images.some((im) => state.labels.get(im.id) === "good");
    if (anyGood && state.best === null) {
      say("Star the best of the good images (s) before submitting.", "warn");
      return;
    }
    const labels = {};
    for (const im of round.images) labels[im.id] = state.labels.get(im.id);
    state.submitting = true;
    $("submit").disabled = true;
    say("Submitting…");
    try {
      const res = await request("POST", `/api/rounds/${roundId}/submissions`, {
        evaluator, labels, best_image_id: state.best,
      });
      const more = res.evaluators_required - res.evaluators_submitted;
      say(res.complete
        ? "Submitted ✓ — the round is complete; the training loop can go on."
        : `Submitted ✓ — waiting for ${more} more evaluator${more === 1 ? "" : "s"}.`, "ok");
      await refresh(false);
      await offerNext();
    } catch (err) {
      say("Not submitted: " + err.message, "error");
      if (err.status === 409) {  // closed meanwhile: show it, and where to go on
        await refresh(false).catch(() => {});
        await offerNext();
      }
    } finally {
      state.submitting = false;
      $("submit").disabled = state.round.state === "closed";
    }
  }

  async function offerNext() {
    try {
      const open = await request("GET", "/api/rounds");
      const me = nameInput.value.trim();
      const next = open.find((r) => r.id !== roundId && !r.evaluators_submitted.includes(me));
      if (next) {
        const status = $("status");
        status.append(" ", el("a", { href: `/rounds/${next.id}`, class: "next" }, `Next open round (#${next.id}) →`));
      }
    } catch (err) {
      /* the link is a convenience */
    }
  }

  async function refresh(loadMine) {
    const name = nameInput.value.trim();
    const q = name ? `?evaluator=${encodeURIComponent(name)}` : "";
    const round = await request("GET", `/api/rounds/${roundId}${q}`);
    state.round = round;
    document.title = `Round ${round.id}: ${round.prompt} · diffalign`;
    $("round-title").textContent = `Round ${round.iteration + 1} · iteration ${round.iteration} · id ${round.id}`;
    $("prompt").textContent = round.prompt;
    $("crumbs").replaceChildren(el("a", { href: `/runs/${round.run_id}` }, `run ${round.run_name}`),
      el("span", { class: "sep" }, "›"), el("span", {}, `round ${round.id}`));
    const mine = $("mine");
    if (round.mine) {
      mine.hidden = false;
      mine.textContent = `You submitted this round on ${fmtTime(round.mine.created_at)}. Your labels are shown; ` +
        "submitting a change records it as your new answer (the old one stays in the audit log).";
      if (loadMine) {
        state.labels = new Map(Object.entries(round.mine.labels).map(([k, v]) => [Number(k), v]));
        state.best = round.mine.best_image_id;
      }
    } else {
      mine.hidden = true;
    }
    for (const im of round.images) if (im.flagged) state.labels.set(im.id, "bad");
    // A closed round: training has read it, so a submission would change nothing (the server answers 409).
    const closed = $("closed");
    closed.hidden = round.state !== "closed";
    if (round.state === "closed") {
      closed.textContent = `This round is closed: the training loop used its labels on ${fmtTime(round.closed_at)} ` +
        `(${round.labels_used} labels). New labels are no longer accepted here; label the open round instead. ` +
        "Click an image to see the labelled images nearest to it in HERO's embedding (HERO runs).";
    }
    $("submit").disabled = round.state === "closed";
    render();
    await showSession();
  }

  // The session line and "round N of M", refreshed while the page is open (training may finish meanwhile).
  async function showSession() {
    if (!state.round) return;
    try {
      const run = await request("GET", `/api/runs/${state.round.run_id}`);
      $("session").replaceChildren(sessionLine(run.session));
      if (run.planned_rounds) {
        $("round-title").textContent = `Round ${state.round.iteration + 1} of ${run.planned_rounds} · ` +
          `iteration ${state.round.iteration} · id ${state.round.id}`;
      }
    } catch (err) {
      /* the line is information only */
    }
  }
  setInterval(showSession, 10000);

  document.addEventListener("keydown", (ev) => {
    if (!state.round || ev.target === nameInput || ev.altKey || ev.ctrlKey || ev.metaKey) return;
    const ids = candidates();
    const id = ids[state.cursor];
    const zoomed = !$("zoom").hidden;
    if (ev.key === "Escape" || (zoomed && (ev.key === "z" || ev.key === "Z"))) {
      if (zoomed) { closeZoom(); ev.preventDefault(); }
      return;
    }
    if (ev.key === "Tab" || (ev.target instanceof HTMLButtonElement && (ev.key === " " || ev.key === "Enter"))) {
      return;  // Tab moves focus; a focused button (submit, close) handles its own Space/Enter
    }
    let handled = true;
    switch (ev.key) {
      case "ArrowLeft": moveCursor(-1, 0); break;
      case "ArrowRight": moveCursor(1, 0); break;
      case "ArrowUp": moveCursor(0, -1); break;
      case "ArrowDown": moveCursor(0, 1); break;
      case "g": case "G": setLabel(id, "good"); break;
      case "b": case "B": setLabel(id, "bad"); break;
      case " ": toggle(id); break;
      case "s": case "S": star(id); break;
      case "z": case "Z": openZoom(); break;
      case "Enter": if (zoomed) closeZoom(); else submit(); break;
      default:
        if (/^[1-9]$/.test(ev.key) && Number(ev.key) <= state.round.images.length) {
          state.cursor = Number(ev.key) - 1;  // a shortcut for the first nine; Tab and arrows reach all
          markCurrent();
          focusCurrent();
        } else {
          handled = false;
        }
    }
    if (handled) ev.preventDefault();
  });

  nameInput.value = evaluatorName();
  nameInput.addEventListener("change", () => {
    setEvaluatorName(nameInput.value.trim());
    refresh(state.labels.size === 0).catch((err) => say(err.message, "error"));
  });
  nameInput.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter") { ev.preventDefault(); nameInput.blur(); }
  });
  $("submit").addEventListener("click", (ev) => { ev.currentTarget.blur(); submit(); });
  $("zoom-close").addEventListener("click", closeZoom);
  $("zoom").addEventListener("click", (ev) => { if (ev.target === $("zoom")) closeZoom(); });

  signIn(nameInput, (text) => say(text, "warn")).then(() => refresh(true)).catch((err) => {
    $("round-title").textContent = "Cannot load this round";
    say(err.message, "error");
  });
})();
