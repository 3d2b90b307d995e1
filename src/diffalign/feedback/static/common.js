// Shared helpers of the labeling app pages: the access token, JSON requests, small DOM helpers.
"use strict";

const Diffalign = (() => {
  const TOKEN_KEY = "diffalign.token";
  const NAME_KEY = "diffalign.evaluator";
  const INVITE_KEY = "diffalign.invite";

  // The server prints a URL with ?token=...; keep the token in sessionStorage and take it out of the
  // address bar, so it does not linger in the history, bookmarks or screenshots.
  (function captureToken() {
    const url = new URL(window.location.href);
    const token = url.searchParams.get("token");
    if (token) {
      sessionStorage.setItem(TOKEN_KEY, token);
      url.searchParams.delete("token");
      window.history.replaceState(null, "", url.pathname + url.search + url.hash);
    }
  })();

  // A personal link (diffalign feedback invite) carries the evaluator's token in the fragment, #invite=...,
  // which the browser never sends to the server or a proxy's log; keep it for this tab and clear the address.
  (function captureInvite() {
    const match = /(?:^#|&)invite=([^&]+)/.exec(window.location.hash);
    if (match) {
      sessionStorage.setItem(INVITE_KEY, decodeURIComponent(match[1]));
      window.history.replaceState(null, "", window.location.pathname + window.location.search);
    }
  })();

  function token() {
    return sessionStorage.getItem(TOKEN_KEY);
  }

  function inviteToken() {
    return sessionStorage.getItem(INVITE_KEY);
  }

  async function request(method, path, body) {
    const headers = { Accept: "application/json" };
    const t = token();
    if (t) headers["Authorization"] = "Bearer " + t;
    const invite = inviteToken();
    if (invite) headers["X-Diffalign-Evaluator-Token"] = invite;
    const init = { method, headers, cache: "no-store" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (err) {
      throw new Error("the labeling server cannot be reached (" + err.message + ")");
    }
    let data = null;
    try {
      data = await response.json();
    } catch (err) {
      data = null;
    }
    if (!response.ok) {
      const detail = data && data.detail ? data.detail : response.statusText;
      const error = new Error(typeof detail === "string" ? detail : JSON.stringify(detail));
      error.status = response.status;
      throw error;
    }
    return data;
  }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : value);
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function evaluatorName() {
    return localStorage.getItem(NAME_KEY) || "";
  }

  function setEvaluatorName(name) {
    localStorage.setItem(NAME_KEY, name);
  }

  // With invitations the personal link says who you are: the name field shows it and cannot be edited.
  // Without a link in an invited session, say how to get in (the server would refuse a typed name).
  async function signIn(nameInput, onNotice) {
    let who;
    try {
      who = await request("GET", "/api/whoami");
    } catch (err) {
      return null;
    }
    if (!who.invites) return null;
    if (who.evaluator) {
      nameInput.value = who.evaluator;
      nameInput.readOnly = true;
      nameInput.title = "signed in by your personal link";
    } else if (onNotice) {
      onNotice(inviteToken()
        ? "Your personal link is unknown or was replaced: ask the session owner for your current link."
        : "This session labels by invitation: open the personal link the session owner sent you.");
    }
    return who;
  }

  // "What is the session doing?": the run's session line (session.py), with when that began.
  function sessionLine(session, runName) {
    const since = session.since ? ` Since ${new Date(session.since).toLocaleTimeString()}.` : "";
    return el("p", { class: "session " + session.state, "data-state": session.state },
      runName ? el("strong", {}, runName + ": ") : null, session.message + since);
  }

  function fmtPercent(x) {
    return x === null || x === undefined ? "–" : (100 * x).toFixed(1) + " %";
  }

  function fmtTime(iso) {
    if (!iso) return "";
    const d = new Date(iso);
    return isNaN(d) ? iso : d.toLocaleString();
  }

  return { request, el, token, inviteToken, signIn, sessionLine, evaluatorName, setEvaluatorName, fmtPercent, fmtTime };
})();
