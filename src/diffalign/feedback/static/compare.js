// The blind A/B page: one pair at a time, the evaluator picks left, right or no preference.
// The server only ever tells this page "left" and "right"; which model made which image stays on the server.
"use strict";

(() => {
  const { request, el, evaluatorName, setEvaluatorName, signIn } = Diffalign;
  const comparisonId = Number(window.location.pathname.split("/").pop());
  const nameInput = document.getElementById("evaluator");
  const status = document.getElementById("status");
  let pair = null;
  let busy = false;
  nameInput.value = evaluatorName();
  nameInput.addEventListener("change", () => { setEvaluatorName(nameInput.value.trim()); load(); });

  function side(box, info) {
    box.replaceChildren(info.flagged
      ? el("div", { class: "ab-hidden" }, el("strong", {}, "Hidden"), el("span", {}, info.flag_reason))
      : el("img", { src: info.url, alt: box.id + " image", width: 256, height: 256 }));
  }

  async function load() {
    const me = nameInput.value.trim();
    const query = me ? "?evaluator=" + encodeURIComponent(me) : "";
    try {
      const data = await request("GET", `/api/comparisons/${comparisonId}/next${query}`);
      document.getElementById("progress").textContent = `${data.decided} / ${data.total} picked`;
      pair = data.pair;
      document.getElementById("done").hidden = pair !== null;
      document.getElementById("pair").hidden = pair === null;
      if (pair) {
        document.getElementById("prompt").textContent = pair.prompt;
        side(document.getElementById("left"), pair.left);
        side(document.getElementById("right"), pair.right);
      }
      status.textContent = "";
    } catch (err) {
      status.textContent = err.message;
      status.className = "status error";
    }
  }

  async function pick(choice) {
    const me = nameInput.value.trim();
    if (!me) { status.textContent = "Enter your name first (top right)."; status.className = "status error"; return; }
    if (!pair || busy) return;
    busy = true;
    try {
      await request("POST", `/api/pairs/${pair.id}/choices`, { evaluator: me, choice });
      await load();
    } catch (err) {
      status.textContent = err.message;
      status.className = "status error";
    } finally {
      busy = false;
    }
  }

  document.getElementById("pick-left").addEventListener("click", () => pick("left"));
  document.getElementById("pick-right").addEventListener("click", () => pick("right"));
  document.getElementById("pick-none").addEventListener("click", () => pick("none"));
  document.addEventListener("keydown", (e) => {
    if (e.target === nameInput) return;
    if (e.key === "ArrowLeft") pick("left");
    else if (e.key === "ArrowRight") pick("right");
    else if (e.key === "n" || e.key === "ArrowDown") pick("none");
  });
  let notice = "";
  signIn(nameInput, (text) => { notice = text; }).then(load).then(() => {
    if (notice) { status.textContent = notice; status.className = "status error"; }
  });
})();
