// The index page: open rounds and runs, refreshed every few seconds.
"use strict";

(() => {
  const { request, el, evaluatorName, setEvaluatorName, signIn, sessionLine, fmtPercent } = Diffalign;
  const nameInput = document.getElementById("evaluator");
  nameInput.value = evaluatorName();
  nameInput.addEventListener("change", () => { setEvaluatorName(nameInput.value.trim()); load(); });

  function table(headers, rows) {
    return el("table", {},
      el("thead", {}, el("tr", {}, ...headers.map((h) => el("th", {}, h)))),
      el("tbody", {}, ...rows));
  }

  async function load() {
    const roundsBox = document.getElementById("rounds");
    const runsBox = document.getElementById("runs");
    try {
      const [rounds, runs, comparisons] = await Promise.all([request("GET", "/api/rounds"), request("GET", "/api/runs"),
        request("GET", "/api/comparisons")]);
      document.getElementById("comparisons").replaceChildren(comparisons.length
        ? table(["Comparison", "Pairs", ""], comparisons.map((c) => el("tr", {},
          el("td", {}, c.name), el("td", { class: "num" }, String(c.pairs)),
          el("td", {}, el("a", { href: `/compare/${c.id}`, class: "button" }, "Compare →")))))
        : el("p", { class: "empty" }, "No comparison yet."));
      // The newest run is the session going on (older runs are history).
      const newest = runs[runs.length - 1];
      document.getElementById("session").replaceChildren(newest ? sessionLine(newest.session, newest.name) : "");
      const me = nameInput.value.trim();
      if (!rounds.length) {
        roundsBox.replaceChildren(el("p", { class: "empty" }, "No round is waiting for labels right now."));
      } else {
        roundsBox.replaceChildren(table(["Round", "Run", "Iteration", "Prompt", "Images", "Evaluators", ""],
          rounds.map((r) => {
            const done = me && r.evaluators_submitted.includes(me);
            return el("tr", {},
              el("td", {}, `#${r.id}`),
              el("td", {}, el("a", { href: `/runs/${r.run_id}` }, r.run_name)),
              el("td", { class: "num" }, String(r.iteration)),
              el("td", { class: "prompt-cell" }, r.prompt),
              el("td", { class: "num" }, String(r.n_images)),
              el("td", { class: "num" }, `${r.evaluators_submitted.length} / ${r.evaluators_required}`),
              el("td", {}, done
                ? el("a", { href: `/rounds/${r.id}`, class: "muted" }, "submitted ✓ (review)")
                : el("a", { href: `/rounds/${r.id}`, class: "button" }, "Label →")));
          })));
      }
      runsBox.replaceChildren(runs.length
        ? table(["Run", "Iteration", "Labels used", "Open rounds", "Metrics"], runs.map((run) => el("tr", {},
          el("td", {}, el("a", { href: `/runs/${run.id}` }, run.name)),
          el("td", { class: "num" }, run.iteration === null ? "–" : String(run.iteration)),
          el("td", { class: "num" }, String(run.labels_used)),
          el("td", { class: "num" }, String(run.open_rounds)),
          el("td", {}, Object.entries(run.metrics).map(([k, m]) =>
            `${k} ${k.includes("rate") || k.includes("success") ? fmtPercent(m.value) : m.value.toPrecision(4)}`).join(", ") || "–"))))
        : el("p", { class: "empty" }, "No run yet."));
    } catch (err) {
      roundsBox.replaceChildren(el("p", { class: "status error" }, err.message));
    }
  }

  signIn(nameInput, (text) => {
    const notice = document.getElementById("signin");
    notice.textContent = text;
    notice.hidden = false;
  }).then(load);
  setInterval(load, 5000);
})();
