// The run page: iteration, labels used so far, measured metrics and every round; refreshed every few seconds.
"use strict";

(() => {
  const { request, el, fmtPercent, fmtTime } = Diffalign;
  const runId = Number(window.location.pathname.split("/").filter(Boolean).pop());

  function stat(label, value) {
    return el("div", { class: "stat" }, el("div", { class: "value" }, value), el("div", { class: "label" }, label));
  }

  function fmtMetric(name, value) {
    return /rate|success|accuracy/i.test(name) && value >= 0 && value <= 1 ? fmtPercent(value) : value.toPrecision(4);
  }

  function measuredSuccess(run, metric) {
    // A recorded metric wins; else the latest round whose image metadata carried a "success" flag.
    if (metric) {
      const it = metric[1].iteration === null ? "" : ` (iteration ${metric[1].iteration})`;
      return stat("measured success" + it, fmtMetric(metric[0], metric[1].value));
    }
    const measured = run.rounds.filter((r) => r.measured_success !== null);
    if (measured.length) {
      const last = measured[measured.length - 1];
      return stat(`measured success (iteration ${last.iteration})`, fmtPercent(last.measured_success));
    }
    return stat("measured success (not yet)", "–");
  }

  const fmtNum = (v) => (v === null || v === undefined ? "–" : v.toFixed(2));

  function agreementTable(rep) {
    // One row per evaluator; a flagged one lists its evidence (the thresholds are in each flag's text).
    if (!rep.evaluators.length) return el("p", { class: "empty" }, "No labels yet.");
    const fo = rep.fleiss.overall;
    return el("div", {},
      el("p", {}, `Fleiss' kappa overall: ${fmtNum(fo.kappa)} (${fo.items} images × ${fo.raters} evaluators)`),
      el("table", { id: "agreement-table" }, el("thead", {}, el("tr", {}, ...["Evaluator", "Images", "Good",
        "Agrees with others", "Mean Cohen's κ", "Status"].map((h) => el("th", {}, h)))),
      el("tbody", {}, ...rep.evaluators.map((r) => el("tr", { class: r.flagged ? "flagged" : "" },
        el("td", {}, r.evaluator), el("td", { class: "num" }, String(r.items)),
        el("td", { class: "num" }, fmtPercent(r.good_rate)), el("td", { class: "num" }, fmtPercent(r.agreement)),
        el("td", { class: "num" }, fmtNum(r.mean_kappa)),
        el("td", {}, r.flagged ? el("span", { class: "tag bad" }, "flagged") : el("span", { class: "tag good" }, "ok"),
          r.excluded ? el("span", { class: "tag" }, `excluded by ${r.excluded.decided_by}`) : null,
          ...r.flags.map((f) => el("div", { class: "flag" }, f))))))));
  }

  async function load() {
    try {
      const run = await request("GET", `/api/runs/${runId}`);
      document.title = `Run ${run.name} · diffalign`;
      document.getElementById("name").textContent = run.name;
      document.getElementById("crumbs").replaceChildren(el("span", {}, `run ${run.name}`));
      const success = Object.entries(run.metrics).find(([k]) => /success/i.test(k));
      document.getElementById("stats").replaceChildren(
        stat("round", run.iteration === null ? "–"
          : `${run.iteration + 1}${run.planned_rounds ? " of " + run.planned_rounds : ""}`),
        stat("labels used", String(run.labels_used)),
        stat("open rounds", String(run.open_rounds)),
        measuredSuccess(run, success));
      const metrics = Object.entries(run.metrics);
      document.getElementById("metrics").replaceChildren(metrics.length
        ? el("table", {}, el("thead", {}, el("tr", {}, el("th", {}, "Metric"), el("th", {}, "Value"),
          el("th", {}, "At iteration"), el("th", {}, "Recorded"))),
        el("tbody", {}, ...metrics.map(([k, m]) => el("tr", {}, el("td", {}, k),
          el("td", { class: "num" }, fmtMetric(k, m.value)),
          el("td", { class: "num" }, m.iteration === null ? "–" : String(m.iteration)),
          el("td", {}, fmtTime(m.recorded_at))))))
        : el("p", { class: "empty" }, "No metric recorded yet."));
      document.getElementById("rounds").replaceChildren(run.rounds.length
        ? el("table", {}, el("thead", {}, el("tr", {}, ...["Iteration", "Round", "Prompt", "Evaluators",
          "Labels used", "Measured success", "Hidden (safety)", "Status"].map((h) => el("th", {}, h)))),
        el("tbody", {}, ...run.rounds.slice().reverse().map((r) => el("tr", {},
          el("td", { class: "num" }, String(r.iteration)),
          el("td", {}, el("a", { href: `/rounds/${r.id}` }, `#${r.id}`)),
          el("td", { class: "prompt-cell" }, r.prompt),
          el("td", { class: "num" }, `${r.evaluators_submitted.length} / ${r.evaluators_required}`),
          el("td", { class: "num" }, String(r.labels_used)),
          el("td", { class: "num" }, fmtPercent(r.measured_success)),
          el("td", { class: "num" }, String(r.flagged)),
          el("td", {}, r.state === "closed" ? el("span", { class: "tag good" }, "closed · trained on")
            : r.complete ? el("span", { class: "tag" }, "complete · training reads it")
              : el("a", { href: `/rounds/${r.id}`, class: "button" }, "Label →"))))))
        : el("p", { class: "empty" }, "No round yet."));
      const rep = await request("GET", `/api/runs/${runId}/agreement`);
      document.getElementById("agreement").replaceChildren(agreementTable(rep));
      document.getElementById("config").textContent = JSON.stringify(run.config, null, 2);
    } catch (err) {
      document.getElementById("name").textContent = "Cannot load this run";
      document.getElementById("stats").replaceChildren(el("p", { class: "status error" }, err.message));
    }
  }

  load();
  setInterval(load, 5000);
})();
