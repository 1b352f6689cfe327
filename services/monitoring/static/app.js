// SWE AI Fleet monitoring page: plain JS, no build step. Everything comes from the JSON API and the SSE feed.
// With authentication on, the tab's bearer token (sessionStorage, this tab only) goes with every /api/ request,
// the live feed included (read with fetch: EventSource cannot send headers, and a token never goes in a URL).
"use strict";

const TOKEN_KEY = "fleet.token"; // sessionStorage: this tab only, never localStorage

const MAX_EVENTS = 3000; // events kept in the page
const MAX_ROWS = 500; // timeline rows drawn
const TOKEN_TEXT_LIMIT = 20000;

const state = {
  catalog: null,
  events: [], // oldest first
  seen: new Set(),
  tokens: new Map(), // "<deliberation>/<agent>" -> {deliberation_id, agent_id, phase, text, done, story_id, seq}
  deadLetters: [],
  approval: null, // {story_id, plan_id, event_id}
  idempotencyKey: null, // of the approval form as filled in now (see formChanged)
  submitting: false,
  selectedTask: null,
  feed: null, // the AbortController of the live feed's connection loop
  me: null, // GET /api/me: {authentication, actor, subject, roles}; null while not signed in
  authentication: null, // true once the server asked for a token or said so; false when it trusts everyone
  retryApproval: false, // the approval was refused for want of a token: submitted again after signing in
};

// --- small helpers -----------------------------------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "text") el.textContent = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}
const $ = (id) => document.getElementById(id);
const clip = (s, n) => (s && s.length > n ? s.slice(0, n - 1) + "…" : s || "");
const time = (iso) => (iso ? new Date(iso).toLocaleTimeString([], { hour12: false }) : "");
// At most one call per `ms`, the last one always made (keeps updating during a steady stream of events).
const throttle = (fn, ms) => {
  let timer = null;
  return () => {
    if (timer === null) timer = setTimeout(() => ((timer = null), fn()), ms);
  };
};
const debounce = (fn, ms) => {
  let t = null;
  return (...a) => {
    clearTimeout(t);
    t = setTimeout(() => fn(...a), ms);
  };
};

function tabToken() {
  try {
    return sessionStorage.getItem(TOKEN_KEY) || "";
  } catch (_) {
    return "";
  }
}

// The request's headers with the tab's token, when it has one.
function withToken(headers) {
  const all = new Headers(headers || {});
  const token = tabToken();
  if (token) all.set("Authorization", `Bearer ${token}`);
  return all;
}

async function readJson(res) {
  try {
    return await res.json();
  } catch (_) {
    return null;
  }
}

// Every /api/ call: the token goes along; a 401 shows the sign-in box (the caller sees the 401 too), unless the
// tab has another token by then (a request sent before signing in).
async function api(path, options) {
  const sent = tabToken();
  const res = await fetch(path, { ...options, headers: withToken(options && options.headers) });
  const r = { ok: res.ok, status: res.status, body: await readJson(res) };
  if (r.status === 401 && tabToken() === sent) needSignIn(problem(r));
  return r;
}

function problem(r) {
  if (r.body && typeof r.body.detail === "string") return r.body.detail;
  return `HTTP ${r.status}`;
}

// --- who is calling ---------------------------------------------------------------------------------------------

let signInWaiters = [];
const whenSignedIn = () => new Promise((resolve) => signInWaiters.push(resolve));

// The server wants a token (none, or the tab's was refused: expired, wrong issuer...): the sign-in box says why.
function needSignIn(detail) {
  state.authentication = true;
  state.me = null;
  renderUser();
  const box = $("signin");
  const why = $("signin-why");
  why.textContent = tabToken() ? `Your token was refused: ${detail}` : "This dashboard needs you to sign in: paste a bearer token.";
  why.className = tabToken() ? "error" : "";
  if (box.hidden) {
    box.hidden = false;
    $("signin-token").focus();
  }
}

// Who the tab's token says it is (GET /api/me); false when the server refused it (the sign-in box then shows).
async function loadMe() {
  const r = await api("/api/me");
  if (r.ok) {
    state.me = r.body;
    state.authentication = Boolean(r.body.authentication);
  } else if (r.status === 404) {
    state.me = { authentication: false, actor: "anonymous", subject: "anonymous", roles: [] }; // an older server
    state.authentication = false;
  }
  renderUser();
  return r.ok || r.status === 404;
}

async function signIn(e) {
  e.preventDefault();
  const token = $("signin-token").value.trim().replace(/^Bearer\s+/i, "");
  if (!token) {
    $("signin-why").textContent = "Paste a token first.";
    $("signin-why").className = "error";
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  if (!(await loadMe())) {
    sessionStorage.removeItem(TOKEN_KEY); // refused: the box says why (needSignIn); no bad token kept
    return;
  }
  $("signin-token").value = "";
  $("signin").hidden = true;
  // Everything a missing token stopped starts again: the feed, the dependencies, the tab, a waiting approval.
  if (state.catalog) {
    connectFeed();
    pollDependencies();
    showTab();
  }
  const waiters = signInWaiters;
  signInWaiters = [];
  for (const resolve of waiters) resolve();
  if (state.retryApproval) {
    state.retryApproval = false;
    $("approve-form").requestSubmit();
  }
}

function signOut() {
  sessionStorage.removeItem(TOKEN_KEY);
  state.me = null;
  if (state.feed) state.feed.abort();
  setPill("pill-feed", null, "signed out");
  renderUser();
  loadMe(); // 401: the sign-in box
}

// The header says who is signed in; the approval form shows the approver (the token's) instead of asking for one.
function renderUser() {
  const me = state.me;
  const signedIn = Boolean(me && me.authentication);
  $("user").hidden = !signedIn;
  if (signedIn) $("user-name").textContent = `signed in as ${me.actor} · ${me.roles.join(", ") || "no roles"}`;
  const fromToken = state.authentication === true;
  $("f-by").hidden = fromToken;
  $("f-by-label").hidden = fromToken;
  const approver = $("f-by-token");
  approver.hidden = !fromToken;
  approver.replaceChildren(
    ...(signedIn ? ["approved by ", h("strong", {}, me.actor)] : [h("span", { class: "muted" }, "approved by whoever signs in")]),
  );
}

// --- tabs ----------------------------------------------------------------------------------------------------------

function showTab() {
  const name = (location.hash || "#timeline").slice(1);
  const known = [...document.querySelectorAll("section.tab")].map((s) => s.dataset.tab);
  const tab = known.includes(name) ? name : "timeline";
  for (const s of document.querySelectorAll("section.tab")) s.hidden = s.dataset.tab !== tab;
  for (const a of document.querySelectorAll("nav.tabs a")) a.classList.toggle("active", a.dataset.tab === tab);
  if (tab === "councils") loadCouncils();
  if (tab === "deliberations") loadDeliberations();
}

// --- dependencies banner ------------------------------------------------------------------------------------------

function setPill(id, ok, title) {
  const pill = $(id);
  pill.dataset.state = ok === null ? "unknown" : ok ? "ok" : "down";
  if (title) pill.title = title;
}

async function pollDependencies() {
  const lines = [];
  try {
    const r = await api("/api/dependencies");
    if (r.status === 401 || r.status === 403) return; // the sign-in box or the banner says it
    if (!r.ok) throw new Error(problem(r));
    for (const d of r.body.dependencies) {
      setPill(`pill-${d.name}`, d.ok, `${d.name} ${d.address}: ${d.detail}`);
      if (!d.ok) lines.push({ dependency: d.name, text: d.detail });
    }
    if (r.body.dependencies.find((d) => d.name === "nats" && d.ok)) {
      for (const s of r.body.streams) {
        if (!s.ok) lines.push({ dependency: "stream", text: `live feed, ${s.stream}: ${s.detail}` });
      }
    }
  } catch (e) {
    lines.push({ dependency: "monitoring", text: `monitoring service unreachable (${e.message}); retrying` });
    setPill("pill-nats", null);
    setPill("pill-orchestrator", null);
  }
  const banner = $("banner");
  banner.replaceChildren(...lines.map((l) => h("div", { class: "banner-line", dataset: { dependency: l.dependency } }, l.text)));
  banner.hidden = lines.length === 0;
}

// --- live feed -------------------------------------------------------------------------------------------------------

// The feed is Server-Sent Events read with fetch (EventSource cannot send the Authorization header): the body is
// read as it comes, `event:` / `data:` / `id:` / `retry:` lines make events, a blank line dispatches one. The loop
// reconnects when the stream ends or fails, waiting longer after each failure in a row (up to 30 s); the server
// replays its history on each connection, addEvent drops what the page has already seen.
const FEED_MAX_WAIT_MS = 30_000;

function connectFeed() {
  if (state.feed) state.feed.abort();
  const feed = new AbortController();
  state.feed = feed;
  runFeed(feed.signal);
}

const pause = (ms, signal) =>
  new Promise((resolve) => {
    const t = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => (clearTimeout(t), resolve()), { once: true });
  });

async function runFeed(signal) {
  const conn = { retryMs: 1000, lastEventId: "", ended: "" };
  let failures = 0;
  while (!signal.aborted) {
    setPill("pill-feed", null, "connecting");
    let why;
    try {
      const headers = { Accept: "text/event-stream" };
      if (conn.lastEventId) headers["Last-Event-ID"] = conn.lastEventId;
      const res = await fetch("/api/events/stream", { headers: withToken(headers), cache: "no-store", signal });
      if (res.status === 401) {
        if (signal.aborted) return;
        setPill("pill-feed", false, "live feed: sign in first");
        needSignIn(problem({ status: 401, body: await readJson(res) }));
        return; // signing in connects again
      }
      if (!res.ok || !res.body) throw new Error(problem({ status: res.status, body: await readJson(res) }));
      setPill("pill-feed", true, "live feed connected");
      failures = 0;
      conn.ended = "";
      await readEvents(res.body, conn);
      why = conn.ended || "the server ended the stream";
    } catch (e) {
      if (signal.aborted) return;
      failures += 1;
      why = e.message;
    }
    if (signal.aborted) return;
    const wait = Math.min(conn.retryMs * 2 ** failures, FEED_MAX_WAIT_MS) * (0.8 + 0.4 * Math.random());
    setPill("pill-feed", false, `live feed disconnected (${why}); reconnecting in ${(wait / 1000).toFixed(1)} s`);
    await pause(wait, signal);
  }
}

async function readEvents(body, conn) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let type = "";
  let data = [];
  const line = (text) => {
    if (text === "") {
      if (data.length) onFeedMessage(type || "message", data.join("\n"), conn);
      type = "";
      data = [];
      return;
    }
    if (text.startsWith(":")) return; // a comment (keep-alive)
    const colon = text.indexOf(":");
    const field = colon < 0 ? text : text.slice(0, colon);
    let value = colon < 0 ? "" : text.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") type = value;
    else if (field === "data") data.push(value);
    else if (field === "id" && !value.includes("\0")) conn.lastEventId = value;
    else if (field === "retry" && /^\d+$/.test(value)) conn.retryMs = Number(value);
  };
  for (;;) {
    const { value, done } = await reader.read();
    buffer += done ? "" : value;
    const ends = /\r\n|\r|\n/g;
    let from = 0;
    for (let m; (m = ends.exec(buffer)); ) {
      if (!done && m[0] === "\r" && m.index === buffer.length - 1) break; // perhaps half of a \r\n: next chunk
      line(buffer.slice(from, m.index));
      from = ends.lastIndex;
    }
    buffer = buffer.slice(from);
    if (done) return; // an event without its blank line is dropped, as EventSource does
  }
}

function onFeedMessage(type, text, conn) {
  try {
    const data = JSON.parse(text);
    if (type === "feed") addEvent(data);
    else if (type === "replayed") renderTimeline();
    else if (type === "dropped") conn.ended = `dropped: ${data.reason}`; // the server ends the stream next
  } catch (e) {
    setTimeout(() => {
      throw e; // a page error (the tests see it), while the feed goes on
    });
  }
}

const refreshDeliberations = throttle(() => {
  if (!$("tab-deliberations").hidden) loadDeliberations();
  if (state.selectedTask && !$("tab-deliberations").hidden) showDeliberation(state.selectedTask, false);
}, 700);

const seenKey = (ev) => `${ev.id}/${ev.event_id}`; // a stream created again reuses sequences

function addEvent(ev) {
  if (state.seen.has(seenKey(ev))) return;
  state.seen.add(seenKey(ev));
  state.events.push(ev);
  if (state.events.length > MAX_EVENTS) {
    const gone = state.events.splice(0, state.events.length - MAX_EVENTS);
    for (const g of gone) state.seen.delete(seenKey(g));
  }
  if (isTokens(ev)) onToken(ev);
  else if (isDeadLetter(ev)) onDeadLetter(ev);
  else if (ev.deliberation_id) refreshDeliberations();
  if (timelineWants(ev) && !$("filter-pause").checked) prependRow(ev);
  onApprovalProgress(ev);
}

const isTokens = (ev) => ev.family === state.catalog.token_family;
const isDeadLetter = (ev) => ev.family === state.catalog.dead_letter_family;

// --- timeline ----------------------------------------------------------------------------------------------------------

function timelineWants(ev) {
  const family = $("filter-family").value;
  const story = $("filter-story").value.trim();
  if (family === "" && isTokens(ev)) return false;
  if (family && family !== "*" && ev.family !== family) return false;
  if (story && ev.story_id !== story) return false;
  return true;
}

function summary(ev) {
  const p = ev.payload || {};
  if (ev.dead_letter) {
    const d = ev.dead_letter;
    return `${d.reason} (from ${d.original_subject}${d.consumer ? ", consumer " + d.consumer : ""})`;
  }
  if (ev.error) return `invalid event: ${ev.error}`;
  switch (ev.event_type) {
    case "planning.plan.approved": {
      const roles = p.roles ? p.roles.join(", ") : "all roles";
      const tasks = p.tasks ? `, ${p.tasks.length} task(s)` : "";
      return `plan ${p.plan_id} of story ${p.story_id} approved by ${p.approved_by} (${roles}${tasks})`;
    }
    case "orchestration.task.dispatched":
      return `task ${p.task_id} → ${p.role} council (deliberation ${p.deliberation_id})`;
    case "orchestration.deliberation.started":
      return `${p.role} council ${p.council_id} started on ${p.task_id} with ${p.num_agents} agents${p.executor ? " (" + p.executor + ")" : ""}`;
    case "orchestration.deliberation.completed":
      return `${p.role} on ${p.task_id}: winner ${p.winner_id} (score ${Number(p.winner_score).toFixed(2)}, ${p.selection_method}) in ${(p.duration_ms / 1000).toFixed(1)} s, ${p.verified ? "VERIFIED" : "NOT VERIFIED"}${p.verified_reason ? ": " + p.verified_reason : ""}`;
    case "orchestration.deliberation.failed":
      return `${p.role} on ${p.task_id}: ${p.status}: ${p.error}`;
    case "agent.request.dispatched":
      return `${p.agent_id} asked for ${p.phase}${p.executor ? " on " + p.executor : ""}`;
    case "agent.response.completed":
      return `${p.agent_id} answered ${p.phase} (${p.prompt_tokens}+${p.completion_tokens} tokens, ${Math.round(p.latency_ms)} ms)`;
    case "agent.response.failed":
      return `${p.agent_id} failed in ${p.phase}: ${p.error}`;
    case "vllm.streaming.chunk":
      return `${p.agent_id} ${p.phase} ${p.kind} #${p.seq}: ${clip(p.text, 80)}`;
    case "context.updated":
      return `context of ${p.story_id} is now ${p.version} (${p.changes} changes${p.reason ? ": " + p.reason : ""})`;
    case "context.decision.added":
      return `decision ${p.decision_id}: ${p.title}`;
    default:
      return clip(JSON.stringify(p), 160);
  }
}

function eventRow(ev) {
  const fam = ev.family;
  const details = h("pre", { class: "json" }, JSON.stringify(ev.payload ?? ev.raw, null, 2));
  const row = h(
    "tr",
    {
      class: `ev fam-${fam}${ev.error && !ev.dead_letter ? " invalid" : ""}`,
      dataset: { id: ev.id, eventType: ev.event_type || "", eventId: ev.event_id || "" },
      title: `${ev.stream} #${ev.seq} · ${ev.event_id || "no event id"} · producer ${ev.producer || "?"}`,
    },
    h("td", { class: "t" }, time(ev.time)),
    h("td", {}, h("span", { class: `badge fam-${fam}` }, fam)),
    h("td", { class: "subject" }, ev.subject),
    h("td", {}, ev.story_id),
    h("td", { class: "what" }, h("details", {}, h("summary", {}, summary(ev)), details)),
  );
  return row;
}

function prependRow(ev) {
  const body = $("timeline");
  body.prepend(eventRow(ev));
  while (body.children.length > MAX_ROWS) body.lastElementChild.remove();
  $("timeline-empty").hidden = true;
  $("timeline-count").textContent = `${body.children.length} shown`;
}

function renderTimeline() {
  const rows = state.events.filter(timelineWants).slice(-MAX_ROWS).reverse().map(eventRow);
  $("timeline").replaceChildren(...rows);
  $("timeline-empty").hidden = rows.length > 0;
  $("timeline-count").textContent = `${rows.length} shown`;
}

// --- token streams ------------------------------------------------------------------------------------------------

function onToken(ev) {
  const p = ev.payload;
  if (!p) return;
  const key = `${p.deliberation_id}/${p.agent_id}`;
  let t = state.tokens.get(key);
  if (!t || (p.kind === "start" && t.done)) {
    t = { deliberation_id: p.deliberation_id, agent_id: p.agent_id, phase: p.phase, text: "", done: false, seq: -1 };
    state.tokens.set(key, t);
  }
  if (p.seq <= t.seq) return;
  t.seq = p.seq;
  t.phase = p.phase;
  t.story_id = ev.story_id;
  if (p.kind === "start") t.text = "";
  t.text = (t.text + (p.text || "")).slice(-TOKEN_TEXT_LIMIT);
  if (p.kind === "end") t.done = true;
  if (state.tokens.size > 60) state.tokens.delete(state.tokens.keys().next().value);
  renderTokenBox(t, $("tokens"));
  $("tokens-empty").hidden = true;
  if (state.approval && t.story_id === state.approval.story_id) renderProgressDeliberations();
}

function tokenBox(t) {
  return h(
    "div",
    { class: `card token${t.done ? " done" : ""}`, dataset: { key: `${t.deliberation_id}/${t.agent_id}` } },
    h("div", { class: "token-head" }, h("strong", {}, t.agent_id), " ", h("span", { class: "muted" }, `${t.phase} · ${t.deliberation_id}`), " ", h("span", { class: "badge" }, t.done ? "done" : "streaming…")),
    h("pre", { class: "token-text" }, t.text),
  );
}

function renderTokenBox(t, container) {
  const key = `${t.deliberation_id}/${t.agent_id}`;
  const old = [...container.children].find((c) => c.dataset.key === key);
  const box = tokenBox(t);
  if (old) old.replaceWith(box);
  else container.prepend(box);
  const pre = box.querySelector("pre");
  pre.scrollTop = pre.scrollHeight;
}

// --- dead letters -----------------------------------------------------------------------------------------------------

function onDeadLetter(ev) {
  state.deadLetters.unshift(ev);
  const d = ev.dead_letter || {};
  const row = h(
    "tr",
    { class: "ev fam-deadletter", dataset: { id: ev.id } },
    h("td", { class: "t" }, time(ev.time)),
    h("td", { class: "subject" }, d.original_subject),
    h("td", { class: "reason" }, h("details", {}, h("summary", {}, d.reason), h("pre", { class: "json" }, ev.payload ? JSON.stringify(ev.payload, null, 2) : ev.raw))),
    h("td", {}, d.consumer),
    h("td", {}, d.deliveries ?? ""),
    h("td", { class: "mono" }, d.original_event_id || ev.event_id || ""),
  );
  $("dead-letters").prepend(row);
  $("dead-letters-empty").hidden = true;
  const count = $("dl-count");
  count.textContent = String(state.deadLetters.length);
  count.hidden = false;
}

// --- councils ---------------------------------------------------------------------------------------------------------

async function loadCouncils() {
  const box = $("councils");
  const [st, r] = await Promise.all([api("/api/orchestrator/status"), api("/api/councils")]);
  if (st.ok) {
    const s = st.body.stats || {};
    const byStatus = Object.entries(s.deliberations_by_status || {}).map(([k, v]) => `${k} ${v}`).join(" · ");
    $("orch-status").replaceChildren(
      h("div", { class: "card stats" },
        h("strong", {}, `Orchestrator ${st.body.status}`),
        ` · up ${st.body.uptime_seconds} s · ${s.total_deliberations ?? 0} deliberations (${byStatus || "none"}) · average ${Math.round(s.average_duration_ms || 0)} ms · ${s.in_flight ?? 0} in flight · executor ${s.executor || "?"}`),
    );
  } else {
    $("orch-status").replaceChildren(h("p", { class: "error" }, problem(st)));
  }
  if (!r.ok) {
    box.replaceChildren();
    return;
  }
  if (!r.body.councils.length) {
    box.replaceChildren(h("p", { class: "empty" }, "No councils yet."));
    return;
  }
  box.replaceChildren(
    ...r.body.councils.map((c) =>
      h("div", { class: "card council" },
        h("h3", {}, `${c.role} `, h("span", { class: "muted" }, `${c.council_id} · ${c.num_agents} agents`)),
        h("table", { class: "small" },
          h("thead", {}, h("tr", {}, h("th", {}, "agent"), h("th", {}, "persona"), h("th", {}, "temperature"), h("th", {}, "seed"))),
          h("tbody", {}, c.agents.map((a) => h("tr", {}, h("td", { class: "mono" }, a.agent_id), h("td", {}, a.persona), h("td", {}, a.temperature.toFixed(2)), h("td", {}, a.seed))))),
      ),
    ),
  );
}

// --- deliberations -------------------------------------------------------------------------------------------------

const TERMINAL = new Set(["COMPLETED", "FAILED", "TIMEOUT"]);

function statusBadge(status) {
  return h("span", { class: `badge status-${String(status).toLowerCase()}` }, status);
}

// VERIFIED / NOT VERIFIED (did the winner pass every gating check: its code run against the tests) with the reason.
// Nothing while the deliberation runs (`verified` null).
function verifiedBadge(verified, reason, big) {
  if (verified === null || verified === undefined) return null;
  return h("div", { class: `verdict ${verified ? "yes" : "no"}${big ? " big" : ""}`, dataset: { verified: String(verified) } },
    h("span", { class: "verdict-badge" }, verified ? "VERIFIED" : "NOT VERIFIED"),
    reason ? h("span", { class: "verdict-reason" }, reason) : null);
}

async function loadDeliberations() {
  const story = $("delib-story").value.trim();
  const r = await api(`/api/deliberations?limit=200${story ? "&story=" + encodeURIComponent(story) : ""}`);
  if (!r.ok) return;
  const rows = r.body.map((d) =>
    h("tr", { class: `clickable${d.task_id === state.selectedTask ? " selected" : ""}`, dataset: { task: d.task_id }, onclick: () => d.task_id && showDeliberation(d.task_id, true) },
      h("td", {}, statusBadge(d.status)),
      h("td", { class: "verified-cell" }, verifiedBadge(d.verified, d.verified_reason || d.error)),
      h("td", {}, d.role),
      h("td", { class: "mono" }, d.task_id),
      h("td", {}, d.story_id),
      h("td", {}, d.winner_id ? `${d.winner_id} (${Number(d.winner_score).toFixed(2)})` : ""),
      h("td", { class: "t" }, time(d.updated_at)),
    ),
  );
  $("delib-list").replaceChildren(...rows);
  $("delib-empty").hidden = rows.length > 0;
}

function section(title, ...content) {
  return h("section", { class: "detail-section" }, h("h3", {}, title), ...content);
}

async function showDeliberation(taskId, scroll) {
  state.selectedTask = taskId;
  const box = $("delib-detail");
  const r = await api(`/api/deliberations/${encodeURIComponent(taskId)}`);
  if (!r.ok) {
    const seen = (await api(`/api/deliberations?limit=500`)).body || [];
    const s = seen.find((d) => d.task_id === taskId);
    box.replaceChildren(
      h("h2", {}, `Task ${taskId}`),
      h("p", { class: "error" }, problem(r)),
      s ? eventSummary(s) : h("p", { class: "muted" }, "Nothing about this task in the events either."),
    );
    return;
  }
  const d = r.body;
  const sel = d.selection;
  const tokens = d.usage.reduce((n, u) => n + u.prompt_tokens + u.completion_tokens, 0);
  const winner = d.results.find((rp) => d.winner_id && rp.proposal.author_id === d.winner_id);
  const parts = [
    h("h2", {}, `Task ${d.task_id} `, statusBadge(d.status)),
    TERMINAL.has(d.status) ? verifiedBadge(d.verified, d.verified_reason || d.error_message, true) : null,
    h("p", { class: "muted" }, `${d.role} · council ${d.council_id} · deliberation ${d.deliberation_id} · story ${d.story_id || "-"} · ${d.executor || "?"} executor · ${(d.duration_ms / 1000).toFixed(1)} s · ${tokens} tokens${d.context_version ? " · context " + d.context_version : ""}`),
  ];
  if (d.requested_by) parts.push(h("p", { class: "requested-by" }, "started by ", h("strong", {}, d.requested_by)));
  if (d.error_message) parts.push(h("p", { class: "error" }, d.error_message));
  if (d.context_note) parts.push(h("p", { class: "muted" }, `context: ${d.context_note}`));
  if (d.notes.length) parts.push(section("Notes", h("ul", { class: "notes" }, d.notes.map((n) => h("li", {}, n)))));
  if (sel) {
    parts.push(section("Winner",
      h("p", {}, h("strong", {}, sel.winner_id), ` chosen by ${sel.method}${sel.selected_by ? " (" + sel.selected_by + ")" : ""}`),
      h("blockquote", { class: "rationale" }, sel.rationale || "(no rationale)"),
      winner ? h("pre", { class: "content winner-code" }, winner.proposal.content) : null));
  }
  const phases = Object.entries(d.phase_durations_ms);
  if (phases.length) {
    parts.push(section("Phases", h("p", {}, phases.map(([phase, ms]) => h("span", { class: "chip" }, `${phase} ${Math.round(ms)} ms`)))));
  }
  parts.push(section(`Proposals (${d.results.length})`, ...d.results.map((rp) => proposalCard(rp, d.winner_id))));
  if (d.critiques.length) {
    parts.push(section(`Critiques (${d.critiques.length})`,
      h("table", { class: "small" },
        h("thead", {}, h("tr", {}, h("th", {}, "round"), h("th", {}, "critic → author"), h("th", {}, "verdict"), h("th", {}, "summary and issues"))),
        h("tbody", {}, d.critiques.map((c) => h("tr", {}, h("td", {}, c.round), h("td", { class: "mono" }, `${c.critic_id} → ${c.author_id}`), h("td", {}, c.verdict), h("td", {}, c.summary, c.issues.length ? h("ul", {}, c.issues.map((i) => h("li", {}, i))) : null)))))));
  }
  if (d.usage.length) {
    parts.push(section("Tokens",
      h("table", { class: "small" },
        h("thead", {}, h("tr", {}, h("th", {}, "agent"), h("th", {}, "phase"), h("th", {}, "prompt"), h("th", {}, "completion"))),
        h("tbody", {}, d.usage.map((u) => h("tr", {}, h("td", { class: "mono" }, u.agent_id), h("td", {}, u.phase), h("td", {}, u.prompt_tokens), h("td", {}, u.completion_tokens)))))));
  }
  if (d.failures.length) {
    parts.push(section("Agent failures", h("ul", {}, d.failures.map((f) => h("li", {}, `${f.agent_id} in ${f.phase}: ${f.error}`)))));
  }
  box.replaceChildren(...parts);
  if (scroll) box.scrollIntoView({ block: "nearest" });
}

const checkState = (c) => (!c.applicable ? "na" : c.passed ? "pass" : "fail");
const CHECK_MARK = { pass: "✓ pass", fail: "✗ FAIL", na: "– n/a" };

function findingText(f) {
  const where = [f.block ? `block ${f.block}` : "", f.line ? `line ${f.line}` : ""].filter(Boolean).join(" ");
  return `${f.severity}${where ? " (" + where + ")" : ""}: ${f.message}`;
}

const gatingBadge = (c) => (c.gating ? h("span", { class: "badge gating", title: "gating: failing it keeps a proposal out of the finals" }, "gating") : null);

// Each check that applied: pass / FAIL, gating marked, what it checked, and its findings (for tests.*: the failing
// tests and their assertions). The checks that had nothing to check: one line of names (n/a).
function checkList(checks) {
  const applied = checks.filter((c) => c.applicable);
  const na = checks.filter((c) => !c.applicable);
  return h("ul", { class: "checks" },
    applied.map((c) => {
      const s = checkState(c);
      return h("li", { class: `check ${s}`, dataset: { check: c.name, state: s } },
        h("span", { class: "mark" }, CHECK_MARK[s]), " ", h("strong", {}, c.name), gatingBadge(c),
        c.detail ? h("span", { class: "muted" }, ` ${c.detail}`) : null,
        c.findings.length ? h("ul", { class: "findings" }, c.findings.map((f) => h("li", { class: `finding ${f.severity}` }, findingText(f)))) : null);
    }),
    na.length
      ? h("li", { class: "check-na" }, h("span", { class: "mark" }, CHECK_MARK.na), " ",
          na.map((c) => h("span", { class: "check na", dataset: { check: c.name, state: "na" }, title: c.detail }, c.name, gatingBadge(c))))
      : null);
}

// The names of the checks a revision failed: revisions worth opening are those whose failures changed (a fix).
const failedNames = (checks) => checks.filter((c) => checkState(c) === "fail").map((c) => c.name).join(",");

function proposalCard(rp, winnerId) {
  const p = rp.proposal;
  const winner = winnerId && p.author_id === winnerId;
  return h("div", { class: `card proposal${winner ? " winner" : ""}`, dataset: { author: p.author_id } },
    h("div", { class: "proposal-head" },
      h("strong", {}, `#${rp.rank} ${p.author_id}`), winner ? h("span", { class: "badge status-completed" }, "winner") : null,
      h("span", { class: "muted" }, ` score ${rp.score.toFixed(2)} (peers ${rp.peer_score.toFixed(2)}, checks ${rp.check_score.toFixed(2)})`)),
    rp.checks.length ? checkList(rp.checks) : null,
    h("pre", { class: "content" }, p.content),
    p.revisions.length > 1
      ? h("details", { class: "revisions", open: new Set(p.revisions.map((rv) => failedNames(rv.checks))).size > 1 },
          h("summary", {}, `${p.revisions.length} revisions`),
          p.revisions.map((rv) => h("div", { class: "revision", dataset: { revision: rv.number } },
            h("strong", {}, `revision ${rv.number}`), rv.reason ? ` — ${rv.reason}` : "",
            rv.checks.length ? checkList(rv.checks) : h("p", { class: "muted" }, "not checked"),
            h("details", {}, h("summary", {}, "code"), h("pre", {}, rv.content)))))
      : null,
    rp.votes.length
      ? h("table", { class: "small votes" },
          h("thead", {}, h("tr", {}, h("th", {}, "voter"), h("th", {}, "position"), h("th", {}, "scores"), h("th", {}, "reason"))),
          h("tbody", {}, rp.votes.map((v) => h("tr", {}, h("td", { class: "mono" }, v.voter_id), h("td", {}, v.position), h("td", {}, Object.entries(v.scores).sort().map(([k, s]) => `${k} ${s}`).join(", ")), h("td", {}, v.reason)))))
      : null,
  );
}

function eventSummary(s) {
  return h("div", { class: "card" },
    h("p", {}, statusBadge(s.status), ` ${s.role} · deliberation ${s.deliberation_id} · agents ${s.agents.join(", ") || "?"}`),
    verifiedBadge(s.verified, s.verified_reason || s.error),
    s.winner_id ? h("p", {}, `Winner ${s.winner_id} (score ${Number(s.winner_score).toFixed(2)}, ${s.selection_method})`) : null,
    s.rationale ? h("blockquote", { class: "rationale" }, s.rationale) : null,
    s.winner_content ? h("pre", { class: "content" }, s.winner_content) : null,
    s.error ? h("p", { class: "error" }, s.error) : null,
    h("p", { class: "muted" }, "From the events (the orchestrator has the full result)."),
  );
}

// --- the approval form ------------------------------------------------------------------------------------------------

function addTaskRow(task) {
  const index = $("f-tasks").children.length;
  const n = index + 1;
  const roleSelect = h("select", { name: "role", "aria-label": `task ${n} role` }, state.catalog.roles.map((r) => h("option", { value: r }, r)));
  if (task && task.role) roleSelect.value = task.role;
  const field = (name, cls, ...control) => h("div", { class: `field${cls ? " " + cls : ""}`, dataset: { field: `tasks.${index}.${name}` } }, ...control, h("div", { class: "field-error" }));
  const row = h("div", { class: "task-row" },
    h("div", { class: "task-main" },
      field("task_id", "", h("input", { name: "task_id", placeholder: "task id", "aria-label": `task ${n} id` })),
      field("role", "", roleSelect),
      field("description", "grow", h("input", { name: "description", placeholder: "what to do", "aria-label": `task ${n} description` })),
      h("button", { type: "button", class: "secondary remove", title: "remove this task", onclick: () => { row.remove(); renumberTasks(); formChanged(); } }, "×"),
    ),
    field("depends_on", "", h("input", { name: "depends_on", placeholder: "depends on (task ids, comma-separated; optional)", "aria-label": `task ${n} depends on` })),
    field("tests", "", h("textarea", { name: "tests", rows: 4, spellcheck: "false", placeholder: "acceptance tests (optional): pytest source that imports from solution\n\nfrom solution import slugify\n\ndef test_spaces():\n    assert slugify(\"a b\") == \"a-b\"", "aria-label": `task ${n} tests` })),
  );
  $("f-tasks").append(row);
}

function renumberTasks() {
  [...$("f-tasks").children].forEach((row, i) => {
    for (const f of row.querySelectorAll(".field")) f.dataset.field = f.dataset.field.replace(/^tasks\.\d+\./, `tasks.${i}.`);
  });
}

function formData() {
  const form = $("approve-form");
  const value = (name) => form.elements[name].value.trim();
  // With authentication on, the server records the token's actor (and ignores this field).
  const approver = state.authentication ? (state.me && state.me.actor) || "" : value("approved_by");
  const data = { story_id: value("story_id"), plan_id: value("plan_id"), approved_by: approver };
  // Empty required fields are left out, so the catalog's model names them as missing.
  for (const k of Object.keys(data)) if (!data[k]) delete data[k];
  if (value("title")) data.title = value("title");
  if (value("description")) data.description = value("description");
  const roles = [...form.querySelectorAll("#f-roles input:checked")].map((i) => i.value);
  if (roles.length) data.roles = roles;
  const tasks = [...$("f-tasks").children].map((row) => {
    const t = { role: row.querySelector("[name=role]").value };
    const id = row.querySelector("[name=task_id]").value.trim();
    if (id) t.task_id = id;
    t.description = row.querySelector("[name=description]").value.trim();
    const deps = row.querySelector("[name=depends_on]").value.split(/[\s,]+/).filter(Boolean);
    if (deps.length) t.depends_on = deps;
    const tests = row.querySelector("[name=tests]").value;
    if (tests.trim()) t.tests = tests;
    return t;
  });
  if (tasks.length) data.tasks = tasks;
  return data;
}

function clearErrors() {
  for (const e of document.querySelectorAll("#approve-form .field-error")) e.textContent = "";
  for (const f of document.querySelectorAll("#approve-form .field.has-error")) f.classList.remove("has-error");
  $("form-errors").replaceChildren();
}

function showErrors(detail) {
  const general = [];
  for (const err of detail) {
    let loc = (err.loc || []).slice(err.loc && err.loc[0] === "body" ? 1 : 0).map(String);
    let msg = err.msg.replace(/^Value error, /, "");
    // The plan's rules across tasks (depends_on a DAG) name the task's field in the message: put it there.
    const named = msg.match(/^tasks\[(\d+)\]\.(\w+): ([\s\S]*)$/);
    if (named) [loc, msg] = [["tasks", named[1], named[2]], named[3]];
    let field = null;
    for (let n = loc.length; n > 0 && !field; n--) {
      field = document.querySelector(`#approve-form .field[data-field="${CSS.escape(loc.slice(0, n).join("."))}"]`);
    }
    if (err.type === "string_pattern_mismatch") msg = `not a valid id (${state.catalog.id_rule})`;
    if (field) {
      const box = field.querySelector(".field-error");
      box.textContent = box.textContent ? `${box.textContent}; ${msg}` : msg;
      field.classList.add("has-error");
    } else {
      general.push(`${loc.join(".") || "request"}: ${msg}`);
    }
  }
  $("form-errors").replaceChildren(...general.map((g) => h("div", {}, g)));
}

// One approval per intent: the form as filled in has one Idempotency-Key (the API makes it the event id, so JetStream
// publishes a repeat once and answers `duplicate`). The key is kept while the same form is submitted again (a double
// click, a retry after a network error) and renewed as soon as the user changes the form.
function newIdempotencyKey() {
  if (crypto.randomUUID) return `approve-${crypto.randomUUID()}`;
  // crypto.randomUUID exists only in secure contexts (https, localhost); getRandomValues everywhere
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return `approve-${[...bytes].map((b) => b.toString(16).padStart(2, "0")).join("")}`;
}

function formChanged() {
  state.idempotencyKey = newIdempotencyKey();
}

async function submitApproval(e) {
  e.preventDefault();
  const button = $("approve-submit");
  if (state.submitting) return; // one request at a time (Enter in a field submits too)
  state.submitting = true;
  button.disabled = true;
  try {
    await publishApproval();
  } finally {
    state.submitting = false;
    button.disabled = false;
  }
}

async function publishApproval() {
  clearErrors();
  const result = $("approve-result");
  result.textContent = "publishing…";
  result.className = "result";
  result.dataset.status = "";
  state.idempotencyKey = state.idempotencyKey || newIdempotencyKey();
  let r;
  try {
    r = await api("/api/approve-plan", {
      method: "POST",
      headers: { "Content-Type": "application/json", "Idempotency-Key": state.idempotencyKey },
      body: JSON.stringify(formData()),
    });
  } catch (err) {
    // The request may or may not have reached the server: submitting again sends the same key (published once).
    result.textContent = `Not sent: ${err.message}; submit again to retry (it is published once)`;
    result.className = "result error";
    pollDependencies();
    return;
  }
  result.dataset.status = String(r.status);
  if (r.status === 201) {
    result.textContent = `Published ${r.body.event_type} ${r.body.event_id} (${r.body.stream} #${r.body.seq})${r.body.duplicate ? " — already published" : ""}`;
    result.className = "result ok";
    startProgress(r.body);
  } else if (r.status === 401) {
    result.textContent = "Not published: sign in first (above); it is sent once you have.";
    result.className = "result error";
    state.retryApproval = true;
  } else if (r.status === 403) {
    result.textContent = `Not published: ${problem(r)}`;
    result.className = "result error";
  } else if (r.status === 422 && Array.isArray(r.body?.detail)) {
    result.textContent = "Please fix the highlighted fields.";
    result.className = "result error";
    showErrors(r.body.detail);
  } else {
    result.textContent = `Not published: ${problem(r)}`;
    result.className = "result error";
    pollDependencies();
  }
}

function startProgress(accepted) {
  state.approval = { story_id: accepted.story_id, plan_id: accepted.plan_id, event_id: accepted.event_id };
  $("progress-hint").textContent = `Story ${accepted.story_id}, plan ${accepted.plan_id}: events as they happen.`;
  $("progress-events").replaceChildren();
  $("progress-deliberations").replaceChildren();
  for (const ev of state.events) onApprovalProgress(ev);
}

function onApprovalProgress(ev) {
  const a = state.approval;
  if (!a) return;
  const mine = ev.event_id === a.event_id || (ev.story_id === a.story_id && !isTokens(ev));
  if (!mine) return;
  const list = $("progress-events");
  if ([...list.children].some((li) => li.dataset.id === ev.id)) return;
  list.append(h("li", { dataset: { id: ev.id, eventType: ev.event_type || "" } }, h("span", { class: "t" }, time(ev.time)), " ", h("span", { class: `badge fam-${ev.family}` }, ev.event_type || ev.subject), " ", summary(ev)));
  renderProgressDeliberations();
}

const renderProgressDeliberations = throttle(async () => {
  const a = state.approval;
  if (!a) return;
  const r = await api(`/api/deliberations?story=${encodeURIComponent(a.story_id)}`);
  if (!r.ok) return;
  const cards = r.body.map((d) => {
    const streams = [...state.tokens.values()].filter((t) => t.deliberation_id === d.deliberation_id);
    return h("div", { class: "card delib", dataset: { deliberation: d.deliberation_id } },
      h("div", {}, statusBadge(d.status), " ", h("strong", {}, `${d.role} · ${d.task_id}`), h("span", { class: "muted" }, ` ${d.num_agents || d.agents.length} agents`)),
      verifiedBadge(d.verified, d.verified_reason || d.error),
      d.winner_id ? h("p", {}, `Winner ${d.winner_id} (score ${Number(d.winner_score).toFixed(2)}, ${d.selection_method})`) : null,
      d.rationale ? h("blockquote", { class: "rationale" }, clip(d.rationale, 400)) : null,
      d.error ? h("p", { class: "error" }, d.error) : null,
      streams.length ? h("div", { class: "mini-tokens" }, streams.map((t) => h("div", {}, h("span", { class: "mono" }, t.agent_id), `${t.done ? " ✓" : " …"} `, h("span", { class: "muted" }, clip(t.text.slice(-160), 160))))) : null,
      h("a", { href: "#deliberations", onclick: () => setTimeout(() => showDeliberation(d.task_id, true), 50) }, "details →"),
    );
  });
  $("progress-deliberations").replaceChildren(...cards);
}, 300);

// --- start ------------------------------------------------------------------------------------------------------------

async function init() {
  $("signin-form").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", signOut);
  $("approve-form").addEventListener("submit", submitApproval);
  for (const kind of ["input", "change"]) $("approve-form").addEventListener(kind, formChanged);
  formChanged();
  $("add-task").addEventListener("click", () => {
    if (!state.catalog) return; // its roles come from the catalog
    addTaskRow();
    formChanged();
  });
  for (const id of ["filter-family", "filter-story", "filter-pause"]) $(id).addEventListener("input", renderTimeline);
  $("delib-story").addEventListener("input", debounce(loadDeliberations, 300));
  $("delib-lookup").addEventListener("click", () => $("delib-task").value.trim() && showDeliberation($("delib-task").value.trim(), true));
  $("councils-refresh").addEventListener("click", loadCouncils);
  window.addEventListener("hashchange", showTab);
  showTab();
  await loadMe(); // without a token the server wants: the sign-in box
  let r = await api("/api/catalog");
  const waited = r.status === 401 || r.status === 403;
  while (r.status === 401 || r.status === 403) {
    if (r.status === 403) {
      $("banner").replaceChildren(h("div", { class: "banner-line", dataset: { dependency: "auth" } }, `${problem(r)}: sign out and sign in with a token that may read`));
      $("banner").hidden = false;
    }
    await whenSignedIn();
    $("banner").hidden = true;
    r = await api("/api/catalog");
  }
  if (!r.ok) {
    $("banner").replaceChildren(h("div", { class: "banner-line" }, `monitoring API unavailable: ${problem(r)}; reload the page`));
    $("banner").hidden = false;
    return;
  }
  state.catalog = r.body;
  const familySelect = $("filter-family");
  for (const f of state.catalog.families) familySelect.append(h("option", { value: f.name }, `${f.name} (${f.subjects.join(" ")})`));
  $("f-roles").replaceChildren(...state.catalog.roles.map((role) => h("label", { class: "check" }, h("input", { type: "checkbox", name: "roles", value: role }), ` ${role}`)));
  if (waited) showTab(); // what it showed was refused for want of a token
  connectFeed();
  pollDependencies();
  setInterval(pollDependencies, 3000);
}

document.addEventListener("DOMContentLoaded", init);
