// hushgate web prompt. Rules of this file: every piece of text from the server goes into the page
// with textContent (host names come from the speaker: they are hostile text, never markup); every
// POST carries the CSRF token and a same-origin Origin; the list updates itself once a second.
"use strict";

const POLL_MS = 1000; // a held upload expires in ~20 s: a person must see it at once
const LOG_EVERY = 5; // the decisions list is refreshed every 5th poll, and after each decision
const FETCH_TIMEOUT_MS = 8000;
const KIND = { voice: "audio upload", unknown: "unknown upload" };
const DENYING = new Set(["denied", "expired", "quiet", "capped", "lost"]);

const state = { csrf: null, offset: 0, cards: new Map(), decided: new Set(), polls: 0,
                timer: null, running: false, generation: 0 };

function $(id) { return document.getElementById(id); }

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

async function api(method, path, body) {
  const ctl = new AbortController();
  const timer = setTimeout(() => ctl.abort(), FETCH_TIMEOUT_MS);
  // The page's Referrer-Policy is no-referrer, under which a browser sends "Origin: null" with a
  // POST; same-origin here lets the server see our own origin, and nothing leaves the site.
  const opts = { method, credentials: "same-origin", cache: "no-store",
                 referrerPolicy: "same-origin", headers: {}, signal: ctl.signal };
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  if (method !== "GET" && state.csrf) opts.headers["X-CSRF-Token"] = state.csrf;
  try {
    const res = await fetch(path, opts);
    let data = {};
    try { data = await res.json(); } catch (e) { data = {}; }
    return { status: res.status, ok: res.ok, data: data || {} };
  } catch (e) {
    return { status: 0, ok: false, data: { error: "no connection to the router" } };
  } finally {
    clearTimeout(timer);
  }
}

function serverNow() { return Date.now() / 1000 + state.offset; }

function fmtBytes(n) {
  if (typeof n !== "number") return "?";
  if (n < 1000) return n + " B";
  if (n < 1e6) return (n / 1000).toFixed(n < 1e4 ? 1 : 0) + " KB";
  return (n / 1e6).toFixed(1) + " MB";
}

function fmtSeconds(s) {
  s = Math.max(0, Math.round(s));
  if (s < 90) return s + " s";
  if (s < 5400) return Math.round(s / 60) + " min";
  return Math.round(s / 3600) + " h";
}

function setConn(text, kind) { // kind: "live", "bad" or "" (neutral)
  const conn = $("conn");
  conn.textContent = text;
  conn.className = "conn " + (kind || "");
}

// -- sign-in ----------------------------------------------------------------------------------

function showLogin(message) {
  stopPolling();
  state.csrf = null;
  $("app").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  setConn("signed out", "");
  document.title = "hushgate";
  $("secret").focus();
}

async function login(secret) {
  $("login-error").textContent = "";
  const r = await api("POST", "/api/login", { secret });
  if (r.ok && r.data.csrf) {
    $("secret").value = "";
    showApp(r.data.csrf);
  } else if (r.status === 429) {
    $("login-error").textContent = "Too many wrong attempts. Wait a moment and try again.";
  } else if (r.status === 403 && /wrong/.test(r.data.error || "")) {
    $("login-error").textContent = "Wrong token or password.";
  } else {
    $("login-error").textContent = r.data.error || "Sign-in failed.";
  }
}

// -- the live list ----------------------------------------------------------------------------

function showApp(csrf) {
  state.csrf = csrf;
  $("login").hidden = true;
  $("app").hidden = false;
  startPolling();
}

function startPolling() {
  if (state.running) return;
  state.running = true;
  state.polls = 0;
  tick(++state.generation);
}

function stopPolling() {
  state.running = false;
  state.generation++; // a poll still in flight ends its chain when it returns
  if (state.timer) clearTimeout(state.timer);
  state.timer = null;
}

async function tick(generation) {
  const current = () => state.running && generation === state.generation;
  if (!current()) return;
  await refreshPending();
  if (current() && state.polls++ % LOG_EVERY === 0) await refreshLog();
  if (current()) state.timer = setTimeout(() => tick(generation), POLL_MS);
}

async function refreshPending() {
  const r = await api("GET", "/api/pending");
  if (r.status === 401) { showLogin("Signed out. Sign in again."); return; }
  if (!r.ok) { setConn(r.data.error || "router unreachable, retrying", "bad"); return; }
  setConn("live", "live");
  if (typeof r.data.now === "number") state.offset = r.data.now - Date.now() / 1000;
  renderPending(Array.isArray(r.data.pending) ? r.data.pending : []);
}

function renderPending(items) {
  const seen = new Set();
  let added = false;
  for (const item of items) {
    if (typeof item.id !== "number" || state.decided.has(item.id)) continue;
    seen.add(item.id);
    let card = state.cards.get(item.id);
    if (!card) {
      card = makeCard(item);
      state.cards.set(item.id, card);
      $("pending").appendChild(card.root);
      added = true;
    }
    updateCard(card, item);
  }
  for (const [id, card] of state.cards) {
    if (!seen.has(id)) { card.root.remove(); state.cards.delete(id); }
  }
  const n = state.cards.size;
  $("empty").hidden = n > 0;
  $("count").textContent = n ? String(n) : "";
  document.title = n ? "(" + n + ") hushgate" : "hushgate";
  if (added) {
    refreshLog();
    if (navigator.vibrate && navigator.userActivation && navigator.userActivation.hasBeenActive) {
      navigator.vibrate(200);
    }
  }
}

function makeCard(item) {
  const root = el("li", "card");
  root.dataset.id = String(item.id);
  const head = el("div", "head");
  const device = el("span", "device");
  const kind = el("span", "kind");
  head.append(device, kind);
  const host = el("div", "host");
  const remote = el("div", "remote");
  const facts = el("div", "facts");
  const bar = el("div", "bar-track");
  const fill = el("div", "bar-fill");
  bar.appendChild(fill);
  const left = el("div", "left");
  const buttons = el("div", "buttons");
  const once = el("button", "btn allow", "Allow once");
  const window30 = el("button", "btn window", "Allow 30 min");
  const deny = el("button", "btn deny", "Deny");
  for (const b of [once, window30, deny]) b.type = "button";
  once.dataset.action = "allow-once";
  window30.dataset.action = "allow-30min";
  deny.dataset.action = "deny";
  buttons.append(once, window30, deny);
  const error = el("p", "error");
  error.setAttribute("role", "alert");
  root.append(head, host, remote, facts, bar, left, buttons, error);
  const card = { root, device, kind, host, remote, facts, fill, left, error,
                 buttons: [once, window30, deny], item };
  once.addEventListener("click", () => decide(card, "allow", "once", null));
  window30.addEventListener("click", () => decide(card, "allow", "for", 1800));
  deny.addEventListener("click", () => decide(card, "deny", "once", null));
  return card;
}

function updateCard(card, item) {
  card.item = item;
  const now = serverNow();
  card.device.textContent = item.device || "unknown device";
  card.kind.textContent = KIND[item.category] || item.category || "upload";
  card.host.textContent = item.host || "(no host name)";
  card.remote.textContent = item.remote || "";
  const waiting = typeof item.started === "number" ? now - item.started : 0;
  card.facts.textContent = (item.held_packets ?? "?") + " packets \u00b7 " +
    fmtBytes(item.held_bytes) + " held \u00b7 waiting " + fmtSeconds(waiting);
  if (typeof item.expires === "number") {
    const left = item.expires - now;
    const total = typeof item.started === "number" ? item.expires - item.started : 0;
    const share = total > 0 ? Math.min(1, Math.max(0, left / total)) : 0;
    card.fill.style.width = (share * 100).toFixed(1) + "%"; // CSSOM: allowed under the CSP
    card.left.textContent = left > 0 ? fmtSeconds(left) + " left, then denied"
                                     : "expiring: denied";
  } else {
    card.left.textContent = "";
  }
}

async function decide(card, verb, scope, duration) {
  for (const b of card.buttons) b.disabled = true;
  card.error.textContent = "";
  const id = card.item.id;
  const r = await api("POST", "/api/decide", { id, verb, scope, duration_s: duration });
  if (r.ok) {
    state.decided.add(id);
    card.root.remove();
    state.cards.delete(id);
    renderPending([...state.cards.values()].map((c) => c.item));
    refreshLog();
    return;
  }
  if (r.status === 401) { showLogin("Signed out. Sign in again."); return; }
  card.error.textContent = r.data.error || "Could not send the decision.";
  for (const b of card.buttons) b.disabled = false;
}

async function refreshLog() {
  const r = await api("GET", "/api/log");
  if (!r.ok || !Array.isArray(r.data.log)) return;
  const list = $("log");
  const items = [];
  const now = serverNow();
  for (const rec of r.data.log) {
    const li = el("li", DENYING.has(rec.outcome) ? "entry denied" : "entry allowed");
    li.append(el("span", "outcome", rec.outcome || "?"));
    li.append(el("span", "device", rec.device || "?"));
    li.append(el("span", "host", rec.host || rec.remote || "?"));
    const when = typeof rec.decided_at === "number" ? fmtSeconds(now - rec.decided_at) + " ago"
                                                    : "";
    li.append(el("span", "when", [when, rec.decided_by ? "by " + rec.decided_by : ""]
      .filter(Boolean).join(" \u00b7 ")));
    items.push(li);
  }
  list.replaceChildren(...items);
  $("log-empty").hidden = items.length > 0;
}

// -- start ------------------------------------------------------------------------------------

async function start() {
  $("login-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    login($("secret").value);
  });
  $("logout").addEventListener("click", async () => {
    await api("POST", "/api/logout", {});
    showLogin("");
  });
  // A link like https://router:8787/#token=... signs in at once; the token leaves the address
  // bar (and this history entry) immediately, and never reaches the server in a URL.
  const m = /^#token=([A-Za-z0-9_-]{32,})$/.exec(location.hash);
  if (m) {
    history.replaceState(null, "", location.pathname);
    await login(m[1]);
    if (!state.csrf) showLogin($("login-error").textContent);
    return;
  }
  const r = await api("GET", "/api/session");
  if (r.ok && r.data.csrf) showApp(r.data.csrf);
  else showLogin(r.status === 401 || r.status === 0 ? "" : r.data.error);
}

document.addEventListener("DOMContentLoaded", start);
