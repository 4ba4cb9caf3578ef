// hushgate web page. Rules of this file: every piece of text from the server goes into the page
// with textContent (host and device names can come from a speaker: hostile text, never markup);
// every POST carries the CSRF token and a same-origin Origin; held uploads update once a second,
// devices, rules and the log every few seconds and at once after a change.
"use strict";

const POLL_MS = 1000; // a held upload expires in ~20 s: a person must see it at once
const SLOW_EVERY = 5; // devices, rules and the log: every 5th poll, and after each change
const FETCH_TIMEOUT_MS = 8000;
const LOG_LIMIT = 100;
const KIND = { voice: "audio upload", unknown: "unknown upload" };
const DENYING = new Set(["denied", "expired", "quiet", "capped", "lost", "blocked"]);
const ALLOW_FOR = [ // [label, data-action, seconds (null: until midnight), duration text]
  ["10 min", "allow-10min", 600, "10m"],
  ["30 min", "allow-30min", 1800, "30m"],
  ["1 h", "allow-1h", 3600, "1h"],
  ["Today", "allow-today", null, "today"],
];
const MUTE_FOR = [["1 h", 3600, "1h"], ["8 h", 28800, "8h"], ["24 h", 86400, "24h"],
                  ["7 days", 604800, "7d"]];
const MODES = [["strict", "strict: ask for every upload"],
               ["followups", "follow-ups: first turn passes"],
               ["monitor", "monitor: log only"], ["off", "off: not inspected"]];
const RULE_KIND = { "allow-window": "Allow window", "mute": "Muted",
                    "always-allow": "Always allow", "always-deny": "Always deny" };
const OUTCOME_LABEL = { blocked: "blocked", quiet: "muted", window: "window", rule: "rule" };

const state = { csrf: null, offset: 0, cards: new Map(), decided: new Set(), polls: 0,
                timer: null, running: false, generation: 0, panel: "panel-held",
                devices: [], logSeq: 0, textTimer: null, focusAt: 0 };

function $(id) { return document.getElementById(id); }

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function button(cls, text, action) {
  const b = el("button", "btn " + cls, text);
  b.type = "button";
  if (action) b.dataset.action = action;
  return b;
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
  if (s < 172800) return Math.round(s / 3600) + " h";
  return Math.round(s / 86400) + " days";
}

function fmtAgo(t) {
  return typeof t === "number" ? fmtSeconds(serverNow() - t) + " ago" : "never";
}

function fmtClock(t) { // a server time as the phone's local clock ("14:05", or "Tue 14:05")
  const d = new Date((t - state.offset) * 1000);
  const hm = d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  const sameDay = d.toDateString() === new Date().toDateString();
  return sameDay ? hm : d.toLocaleDateString([], { weekday: "short" }) + " " + hm;
}

function untilMidnight() { // "today": until the phone's local midnight, at least a minute
  const now = new Date();
  const midnight = new Date(now.getFullYear(), now.getMonth(), now.getDate() + 1);
  return Math.max(60, Math.min(86400, Math.round((midnight - now) / 1000)));
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

// -- sections (tabs on a phone, side by side on a wide screen) --------------------------------

function showPanel(id) {
  state.panel = id;
  for (const tab of $("tabs").querySelectorAll("button")) {
    const on = tab.dataset.panel === id;
    tab.classList.toggle("active", on);
    tab.setAttribute("aria-current", on ? "page" : "false");
  }
  for (const panel of document.querySelectorAll(".panel")) {
    panel.classList.toggle("active", panel.id === id);
  }
  updateBanner();
  refreshSlow();
  window.scrollTo(0, 0);
}

function updateBanner() {
  const n = state.cards.size;
  const banner = $("held-banner");
  banner.hidden = !(n > 0 && state.panel !== "panel-held");
  banner.textContent = n === 1 ? "1 upload is held: answer it" : n + " uploads are held: answer";
}

// -- the live lists ---------------------------------------------------------------------------

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
  if (current() && state.polls++ % SLOW_EVERY === 0) await refreshSlow();
  if (current()) state.timer = setTimeout(() => tick(generation), POLL_MS);
}

async function refreshSlow() {
  await Promise.all([refreshDevices(), refreshRules(), refreshLog()]);
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
  $("tab-count").textContent = n ? String(n) : "";
  document.title = n ? "(" + n + ") hushgate" : "hushgate";
  updateBanner();
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
  const once = button("allow", "Allow once", "allow-once");
  const deny = button("deny", "Deny", "deny");
  const main = el("div", "buttons two");
  main.append(once, deny);
  const forLabel = el("div", "row-label", "Allow this device for");
  const forRow = el("div", "buttons four");
  const all = [once, deny];
  const card = { root, device, kind, host, remote, facts, fill, left, buttons: all, item };
  for (const [label, action, seconds, text] of ALLOW_FOR) {
    const b = button("window", label, action);
    b.addEventListener("click", () => decide(card, "allow", "for", seconds ?? untilMidnight(),
                                             text));
    forRow.append(b);
    all.push(b);
  }
  const alwaysLabel = el("div", "row-label", "Always, for this device and host");
  const always = el("div", "buttons two");
  const allowAlways = button("allow ghost", "Always allow", "allow-always");
  const denyAlways = button("deny ghost", "Always deny", "deny-always");
  always.append(allowAlways, denyAlways);
  all.push(allowAlways, denyAlways);
  const error = el("p", "error");
  error.setAttribute("role", "alert");
  root.append(head, host, remote, facts, bar, left, main, forLabel, forRow, alwaysLabel, always,
              error);
  card.error = error;
  once.addEventListener("click", () => decide(card, "allow", "once", null));
  deny.addEventListener("click", () => decide(card, "deny", "once", null));
  allowAlways.addEventListener("click", () => decide(card, "allow", "always", null));
  denyAlways.addEventListener("click", () => decide(card, "deny", "always", null));
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

async function decide(card, verb, scope, duration, durationText) {
  for (const b of card.buttons) b.disabled = true;
  card.error.textContent = "";
  const id = card.item.id;
  const body = { id, verb, scope, duration_s: duration };
  if (durationText) body.duration_text = durationText;
  const r = await api("POST", "/api/decide", body);
  if (r.ok) {
    state.decided.add(id);
    card.root.remove();
    state.cards.delete(id);
    renderPending([...state.cards.values()].map((c) => c.item));
    refreshSlow();
    return;
  }
  if (r.status === 401) { showLogin("Signed out. Sign in again."); return; }
  card.error.textContent = r.data.error || "Could not send the decision.";
  for (const b of card.buttons) b.disabled = false;
}

// -- devices ----------------------------------------------------------------------------------

async function refreshDevices() {
  const r = await api("GET", "/api/devices");
  if (!r.ok || !Array.isArray(r.data.devices)) return;
  state.devices = r.data.devices.filter((d) => typeof d.name === "string");
  const list = $("devices");
  const focused = document.activeElement && list.contains(document.activeElement);
  // A select being chosen from is not redrawn under the finger; 15 s later it is anyway.
  if (focused && Date.now() - state.focusAt < 15000) return;
  list.replaceChildren(...state.devices.map(deviceCard));
  $("devices-empty").hidden = state.devices.length > 0;
  fillDeviceFilter();
}

function deviceCard(d) {
  const root = el("li", "card device-card");
  root.dataset.device = d.name;
  const head = el("div", "head");
  head.append(el("span", "device", d.name));
  const badge = el("span", d.online ? "badge online" : "badge", d.online ? "online" : "offline");
  head.append(badge);
  root.append(head);
  const facts = [];
  facts.push("last upload " + fmtAgo(d.last_upload));
  if (typeof d.pending === "number") facts.push(d.pending + " held now");
  if (typeof d.uploads === "number") facts.push(d.uploads + " uploads logged");
  root.append(el("div", "facts", facts.join(" \u00b7 ")));

  const counts = el("div", "counts");
  const c = d.counts_24h && typeof d.counts_24h === "object" ? d.counts_24h : {};
  const names = Object.keys(c).filter((k) => c[k] > 0).sort();
  if (!names.length) counts.append(el("span", "chip", "nothing in 24 h"));
  for (const k of names) {
    const chip = el("span", DENYING.has(k) ? "chip denied" : "chip allowed",
                    (OUTCOME_LABEL[k] || k) + " " + c[k]);
    chip.dataset.outcome = k;
    counts.append(chip);
  }
  root.append(el("div", "row-label", "Last 24 h"), counts);

  const modeRow = el("label", "mode-row");
  modeRow.append(el("span", "row-label", "Mode"));
  const select = el("select", "mode");
  for (const [value, label] of MODES) {
    const o = el("option", null, label);
    o.value = value;
    select.append(o);
  }
  if (d.mode_overridden && d.configured_mode) {
    const o = el("option", null, "back to the config file (" + d.configured_mode + ")");
    o.value = "config";
    select.append(o);
  }
  select.value = d.mode || "strict";
  select.addEventListener("change", () => manage(root, "/api/mode",
                                                 { device: d.name, mode: select.value }));
  modeRow.append(select);
  root.append(modeRow);

  const mute = el("div", "mute-row");
  const now = serverNow();
  if (typeof d.mute_until === "number" && d.mute_until > now) {
    const until = el("span", "muted-until",
                     "Muted until " + fmtClock(d.mute_until) + " (" +
                     fmtSeconds(d.mute_until - now) + " left)");
    const un = button("allow", "Unmute", "unmute");
    un.addEventListener("click", () => manage(root, "/api/unmute", { device: d.name }));
    mute.append(until, un);
    root.classList.add("muted");
  } else {
    const pick = el("select", "mute-for");
    for (const [label, seconds, text] of MUTE_FOR) {
      const o = el("option", null, label);
      o.value = String(seconds);
      o.dataset.text = text;
      pick.append(o);
    }
    const go = button("deny", "Mute", "mute");
    go.addEventListener("click", () => {
      const o = pick.options[pick.selectedIndex];
      manage(root, "/api/mute", { device: d.name, duration_s: Number(o.value),
                                  duration_text: o.dataset.text });
    });
    mute.append(el("span", "row-label", "Mute for"), pick, go);
  }
  root.append(mute);
  const error = el("p", "error");
  error.setAttribute("role", "alert");
  root.append(error);
  return root;
}

async function manage(root, path, body) {
  const controls = root.querySelectorAll("button, select");
  for (const c of controls) c.disabled = true;
  const error = root.querySelector(".error");
  if (error) error.textContent = "";
  const r = await api("POST", path, body);
  if (r.status === 401) { showLogin("Signed out. Sign in again."); return; }
  if (!r.ok) {
    if (error) error.textContent = r.data.error || "Could not change it.";
    for (const c of controls) c.disabled = false;
  }
  if (document.activeElement && root.contains(document.activeElement)) {
    document.activeElement.blur(); // let the refresh redraw this card
  }
  await refreshSlow();
  if (!r.ok && error && error.isConnected) error.textContent = r.data.error || "";
}

// -- windows, mutes and always-rules ----------------------------------------------------------

async function refreshRules() {
  const r = await api("GET", "/api/rules");
  if (!r.ok || !Array.isArray(r.data.rules)) return;
  const now = serverNow();
  const items = [];
  for (const rule of r.data.rules) {
    if (typeof rule.id !== "string") continue;
    const li = el("li", "rule " + (rule.kind || ""));
    li.dataset.id = rule.id;
    li.dataset.kind = rule.kind || "";
    const text = el("div", "what");
    text.append(el("span", "badge kind-" + (rule.kind || "other"),
                   RULE_KIND[rule.kind] || rule.kind || "?"));
    text.append(el("span", "device", rule.device || "?"));
    const scope = rule.host || (rule.category ? rule.category + " uploads" : "every upload");
    text.append(el("span", "host", scope));
    let when;
    if (typeof rule.until === "number") {
      when = "until " + fmtClock(rule.until) + " \u00b7 " + fmtSeconds(rule.until - now) +
        " left" + (rule.duration_text ? " of " + rule.duration_text : "");
    } else {
      when = "until revoked";
    }
    text.append(el("span", "when", [when, rule.source ? "by " + rule.source : ""]
      .filter(Boolean).join(" \u00b7 ")));
    const revoke = button("deny small", "Revoke", "revoke");
    revoke.addEventListener("click", () => manage(li, "/api/revoke", { id: rule.id }));
    const error = el("p", "error");
    error.setAttribute("role", "alert");
    li.append(text, revoke, error);
    items.push(li);
  }
  $("rules").replaceChildren(...items);
  $("rules-empty").hidden = items.length > 0;
  $("rules-count").textContent = items.length ? String(items.length) : "";
}

// -- the log ----------------------------------------------------------------------------------

function fillDeviceFilter() {
  const select = $("f-device");
  const have = [...select.options].map((o) => o.value).slice(1).join("\n");
  const want = state.devices.map((d) => d.name);
  if (have === want.join("\n")) return;
  const chosen = select.value;
  const options = [el("option", null, "all")];
  options[0].value = "";
  for (const name of want) {
    const o = el("option", null, name);
    o.value = name;
    options.push(o);
  }
  select.replaceChildren(...options);
  select.value = want.includes(chosen) ? chosen : "";
}

function logQuery() {
  const q = new URLSearchParams();
  q.set("limit", String(LOG_LIMIT));
  if ($("f-device").value) q.set("device", $("f-device").value);
  if ($("f-outcome").value) q.set("outcome", $("f-outcome").value);
  const range = Number($("f-range").value);
  if (range > 0) q.set("since", String(Math.floor(serverNow() - range)));
  const text = $("f-text").value.trim();
  if (text) q.set("text", text);
  return q.toString();
}

async function refreshLog() {
  const seq = ++state.logSeq; // an older answer that returns late is dropped
  const r = await api("GET", "/api/log?" + logQuery());
  if (seq !== state.logSeq) return;
  if (r.status === 400) { $("log-error").textContent = r.data.error || "bad filter"; return; }
  if (!r.ok || !Array.isArray(r.data.log)) return;
  $("log-error").textContent = "";
  const items = [];
  const now = serverNow();
  for (const rec of r.data.log) {
    const li = el("li", DENYING.has(rec.outcome) ? "entry denied" : "entry allowed");
    li.dataset.outcome = rec.outcome || "";
    li.append(el("span", "outcome", OUTCOME_LABEL[rec.outcome] || rec.outcome || "?"));
    li.append(el("span", "device", rec.device || "?"));
    li.append(el("span", "host", rec.host || rec.remote || "?"));
    let size;
    if (rec.outcome === "blocked" || rec.kind === "blocked") {
      const n = typeof rec.attempts === "number" ? rec.attempts : 1;
      size = (rec.category || "messaging") + " connection refused" +
        (n > 1 ? " \u00d7" + n : "") + (rec.reason ? " \u00b7 " + rec.reason : "");
    } else {
      size = fmtBytes(rec.bytes) + (typeof rec.packets === "number" ? " \u00b7 " +
        rec.packets + " packets" : "") + (rec.category ? " \u00b7 " + rec.category : "");
    }
    li.append(el("span", "size", size));
    const when = typeof rec.decided_at === "number" ? fmtSeconds(now - rec.decided_at) + " ago"
                                                    : "";
    li.append(el("span", "when", [when, rec.decided_by ? "by " + rec.decided_by : ""]
      .filter(Boolean).join(" \u00b7 ")));
    items.push(li);
  }
  $("log").replaceChildren(...items);
  const filtered = Boolean($("f-device").value || $("f-outcome").value ||
                           $("f-text").value.trim());
  $("log-empty").textContent = filtered ? "Nothing matches these filters." : "No decisions yet.";
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
  for (const tab of $("tabs").querySelectorAll("button")) {
    tab.addEventListener("click", () => showPanel(tab.dataset.panel));
  }
  $("held-banner").addEventListener("click", () => showPanel("panel-held"));
  $("devices").addEventListener("focusin", () => { state.focusAt = Date.now(); });
  $("filters").addEventListener("submit", (ev) => { ev.preventDefault(); refreshLog(); });
  for (const id of ["f-device", "f-outcome", "f-range"]) {
    $(id).addEventListener("change", () => refreshLog());
  }
  $("f-text").addEventListener("input", () => {
    clearTimeout(state.textTimer);
    state.textTimer = setTimeout(refreshLog, 300);
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
