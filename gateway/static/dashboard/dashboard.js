// The Duragate dashboard: polls the admin API (/admin/api) and renders calls, one call's
// timeline, pending approvals, policies and tools. Everything shown is set with textContent
// (never innerHTML), so nothing from a call, a tool or a policy can run as code.
"use strict";

(function () {
  const POLL_MS = 1500;
  const MAX_PAGES = 3; // cursor pages followed per refresh of the call list (bounded work)
  const TOKEN_KEY = "duragate.token";
  let selected = null; // the task id shown in the detail panel
  let timer = null;

  // --- helpers ------------------------------------------------------------------------

  function $(id) {
    return document.getElementById(id);
  }

  function el(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (className) node.className = className;
    return node;
  }

  function row(cells) {
    const tr = document.createElement("tr");
    for (const cell of cells) {
      const td = document.createElement("td");
      if (cell instanceof Node) td.appendChild(cell);
      else td.textContent = cell === null || cell === undefined ? "" : String(cell);
      tr.appendChild(td);
    }
    return tr;
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
  }

  function when(text) {
    if (!text) return "";
    const d = new Date(text);
    return isNaN(d) ? String(text) : d.toLocaleString();
  }

  function ms(value) {
    if (value === null || value === undefined) return "";
    return value < 1000 ? value.toFixed(0) + " ms" : (value / 1000).toFixed(2) + " s";
  }

  function shortId(id) {
    return id.length > 14 ? id.slice(0, 12) + "…" : id;
  }

  function showError(message) {
    const box = $("error");
    if (message) {
      box.textContent = message;
      box.hidden = false;
    } else {
      box.hidden = true;
    }
  }

  async function api(path, options) {
    const headers = { Accept: "application/json" };
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) headers.Authorization = "Bearer " + token;
    const init = Object.assign({ credentials: "same-origin", cache: "no-store" }, options || {});
    if (init.body !== undefined) headers["Content-Type"] = "application/json";
    init.headers = headers;
    const response = await fetch(path, init);
    let body = null;
    try {
      body = await response.json();
    } catch (e) {
      body = null;
    }
    if (!response.ok) {
      const reason = body && body.message ? body.message : response.statusText;
      const err = new Error(response.status + ": " + reason);
      err.status = response.status;
      throw err;
    }
    return body;
  }

  // --- who is signed in ---------------------------------------------------------------

  async function loadMe() {
    const me = await api("/admin/api/me");
    const scope = me.scope === "global" ? "every tenant" : "tenant " + me.tenants.join(", ");
    $("who").textContent = me.principal + " (" + me.via + "), admin of " + scope;
  }

  // --- calls --------------------------------------------------------------------------

  function callQuery() {
    const params = new URLSearchParams({ limit: "100" });
    const status = $("filter-status").value;
    const tenant = $("filter-tenant").value.trim();
    const tool = $("filter-tool").value.trim();
    if (status) params.set("status", status);
    if (tenant) params.set("tenant", tenant);
    if (tool) params.set("tool", tool);
    return params;
  }

  let shownCalls = null;

  async function loadCalls() {
    const params = callQuery();
    let calls = [];
    let pages = 0;
    let cursor = null;
    do {
      if (cursor) params.set("cursor", cursor);
      const page = await api("/admin/api/calls?" + params.toString());
      calls = calls.concat(page.calls);
      cursor = page.next_cursor;
      pages += 1;
    } while (cursor && pages < MAX_PAGES && calls.length < 100);
    calls.sort((a, b) => (a.created_at < b.created_at ? 1 : -1));
    const signature = JSON.stringify([selected, calls.map((c) => [c.task_id, c.state, c.message, c.updated_at])]);
    if (signature === shownCalls) return;
    shownCalls = signature;
    $("calls-note").textContent = cursor ? "showing the first " + calls.length + " found" : calls.length + " call(s)";
    const body = $("calls").tBodies[0];
    clear(body);
    for (const call of calls.slice(0, 100)) {
      const state = el("span", call.state + (call.waiting_for ? " (" + call.waiting_for + ")" : ""), "state state-" + call.state);
      const tr = row([el("span", shortId(call.task_id), "mono"), call.tool, call.tenant, call.principal, state, call.message, when(call.created_at), when(call.updated_at)]);
      tr.className = "call" + (call.task_id === selected ? " selected" : "");
      tr.dataset.taskId = call.task_id;
      tr.dataset.state = call.state;
      tr.addEventListener("click", () => {
        selected = call.task_id;
        shownCalls = null;
        refresh();
      });
      body.appendChild(tr);
    }
  }

  // --- one call -----------------------------------------------------------------------

  function fact(list, name, value) {
    if (value === null || value === undefined || value === "") return;
    list.appendChild(el("dt", name));
    list.appendChild(el("dd", typeof value === "object" ? JSON.stringify(value) : value));
  }

  function lane(container, label, start, end, origin, span, kind) {
    const line = el("div", null, "lane");
    line.appendChild(el("span", label, "label"));
    const track = el("div", null, "track");
    const bar = el("div", null, "bar " + kind);
    const left = Math.max(0, (start - origin) / span) * 100;
    const width = Math.max(0.5, ((end || Date.now()) - start) / span * 100);
    // CSSOM assignments, not style attributes: allowed by the page's style-src 'self'.
    bar.style.left = Math.min(left, 99.5) + "%";
    bar.style.width = Math.min(width, 100 - Math.min(left, 99.5)) + "%";
    track.appendChild(bar);
    line.appendChild(track);
    container.appendChild(line);
  }

  async function loadDetail() {
    const section = $("detail-section");
    if (!selected) {
      section.hidden = true;
      return;
    }
    let call;
    try {
      call = await api("/admin/api/calls/" + encodeURIComponent(selected));
    } catch (e) {
      if (e.status === 404) {
        selected = null;
        section.hidden = true;
        return;
      }
      throw e;
    }
    section.hidden = false;
    $("detail-id").textContent = call.task_id;
    const facts = $("detail-facts");
    clear(facts);
    fact(facts, "tool", call.tool);
    fact(facts, "state", call.state + (call.waiting_for ? " (" + call.waiting_for + ")" : ""));
    fact(facts, "message", call.message);
    fact(facts, "tenant", call.tenant);
    fact(facts, "caller", call.principal + (call.via ? " via " + call.via : ""));
    if (call.chain && call.chain.length) fact(facts, "on behalf of", call.chain.join(" → "));
    fact(facts, "front door", call.front_door);
    fact(facts, "created", when(call.created_at));
    fact(facts, "updated", when(call.updated_at));
    fact(facts, "duration", ms(call.duration_ms));
    fact(facts, "timeout", call.timeout_seconds ? call.timeout_seconds + " s" : "");
    fact(facts, "retry", call.retry);
    fact(facts, "error", call.error);

    const origin = new Date(call.created_at).getTime();
    const endAt = call.duration_ms ? origin + call.duration_ms : Date.now();
    const span = Math.max(1, endAt - origin);
    const tl = $("timeline");
    clear(tl);
    for (const a of call.activities) {
      const start = new Date(a.scheduled_at).getTime();
      const end = a.ended_at ? new Date(a.ended_at).getTime() : null;
      lane(tl, a.name + " #" + a.attempt, start, end, origin, span, a.outcome);
    }
    for (const t of call.timers) {
      const start = new Date(t.created_at).getTime();
      const end = t.fired_at ? new Date(t.fired_at).getTime() : null;
      // A timer that has not fired (a timeout, an approval's expiry) is drawn up to now.
      lane(tl, (t.purpose === "retry" ? "retry wait" : "timer") + " #" + t.event_id, start, end, origin, span, t.purpose);
    }

    const acts = $("activities").tBodies[0];
    clear(acts);
    for (const a of call.activities) {
      const offset = new Date(a.scheduled_at).getTime() - origin;
      acts.appendChild(row([a.name, a.attempt, "+" + ms(offset), ms(a.duration_ms), el("span", a.outcome, "state state-" + (a.outcome === "running" ? "working" : a.outcome)), a.error]));
    }
    const waits = $("waits").tBodies[0];
    clear(waits);
    for (const t of call.timers) {
      const detail = "fires " + when(t.fire_at) + (t.fired_at ? ", fired " + when(t.fired_at) : "");
      waits.appendChild(row([t.purpose === "retry" ? "retry back-off" : "timer", when(t.created_at), detail]));
    }
    for (const ev of call.events) {
      waits.appendChild(row(["event " + ev.name, when(ev.at), ev.detail ? JSON.stringify(ev.detail) : ""]));
    }
    const io = { arguments: call.arguments, result: call.result, usage: call.usage };
    $("detail-io").textContent = JSON.stringify(io, null, 2);
  }

  // --- approvals ----------------------------------------------------------------------

  async function decide(taskId, approve, reasonInput, buttons) {
    const reason = reasonInput.value.trim();
    if (!approve && !reason) {
      showError("Give a reason to deny the call.");
      reasonInput.focus();
      return;
    }
    for (const b of buttons) b.disabled = true;
    try {
      await api("/admin/api/approvals/" + encodeURIComponent(taskId) + (approve ? "/approve" : "/deny"), {
        method: "POST",
        body: JSON.stringify({ reason: reason }),
      });
      showError(null);
    } catch (e) {
      showError("Decision refused: " + e.message);
      shownApprovals = null; // re-enable the buttons
    }
    refresh();
  }

  let shownApprovals = null; // what the table shows, so a poll with no change leaves it alone

  async function loadApprovals() {
    const page = await api("/admin/api/approvals?limit=100");
    // Re-render only on change: a reason being typed must survive the polls.
    const signature = JSON.stringify(page.approvals.map((a) => [a.task_id, a.may_decide]));
    if (signature === shownApprovals) return;
    shownApprovals = signature;
    const body = $("approvals").tBodies[0];
    clear(body);
    $("approvals-count").textContent = page.approvals.length ? "(" + page.approvals.length + ")" : "";
    $("approvals-empty").hidden = page.approvals.length > 0;
    for (const a of page.approvals) {
      const cell = el("div");
      const reason = el("input");
      reason.type = "text";
      reason.placeholder = "reason";
      reason.className = "reason";
      reason.maxLength = 1000;
      const ok = el("button", "Approve", "approve");
      const no = el("button", "Deny", "deny");
      ok.type = no.type = "button";
      ok.dataset.taskId = no.dataset.taskId = a.task_id;
      if (!a.may_decide) {
        ok.disabled = no.disabled = true;
        ok.title = no.title = a.why_not || "";
      }
      ok.addEventListener("click", () => decide(a.task_id, true, reason, [ok, no]));
      no.addEventListener("click", () => decide(a.task_id, false, reason, [ok, no]));
      cell.appendChild(reason);
      cell.appendChild(ok);
      cell.appendChild(no);
      if (!a.may_decide) cell.appendChild(el("div", a.why_not, "note"));
      const tr = row([el("span", shortId(a.task_id), "mono"), a.tool, a.tenant, a.principal, when(a.created_at), cell]);
      tr.dataset.taskId = a.task_id;
      body.appendChild(tr);
    }
  }

  // --- policies and tools -------------------------------------------------------------

  async function loadPolicies() {
    const status = await api("/admin/api/policies");
    $("policies-note").textContent = status.enabled
      ? "from " + status.directory + " (generation " + status.generation + ")"
      : "No policy directory is configured: every configured tool is allowed to every authenticated caller.";
    const body = $("policies").tBodies[0];
    clear(body);
    for (const f of status.files) {
      body.appendChild(row([f.file || "(directory)", f.tenant, f.loaded ? "yes" : "no", f.tools.join(", "), f.admins.join(", "), f.errors.join("\n")]));
    }
  }

  async function loadTools() {
    const list = await api("/admin/api/tools");
    const body = $("tools").tBodies[0];
    clear(body);
    for (const t of list.tools) {
      body.appendChild(row([t.name, t.kind, t.description, t.timeout_seconds + " s", t.retry.max_attempts, t.task_support]));
    }
  }

  // --- the loop -----------------------------------------------------------------------

  let running = false;

  async function refresh() {
    if (running) return;
    running = true;
    try {
      await loadApprovals();
      await loadCalls();
      await loadDetail();
      showError(null);
    } catch (e) {
      showError(e.status === 401 || e.status === 403 ? "Not allowed: " + e.message + " (paste an admin's token above)" : String(e.message || e));
    } finally {
      running = false;
    }
  }

  async function refreshStatic() {
    try {
      await loadMe();
      await loadPolicies();
      await loadTools();
    } catch (e) {
      $("who").textContent = "not an admin: " + e.message;
    }
  }

  function start() {
    $("token-input").value = sessionStorage.getItem(TOKEN_KEY) ? "********" : "";
    $("token-save").addEventListener("click", () => {
      const value = $("token-input").value.trim();
      if (value && value !== "********") sessionStorage.setItem(TOKEN_KEY, value);
      shownCalls = shownApprovals = null;
      $("token-input").value = value ? "********" : "";
      refreshStatic();
      refresh();
    });
    $("token-clear").addEventListener("click", () => {
      sessionStorage.removeItem(TOKEN_KEY);
      shownCalls = shownApprovals = null;
      $("token-input").value = "";
      refreshStatic();
      refresh();
    });
    for (const id of ["filter-status", "filter-tenant", "filter-tool"]) {
      $(id).addEventListener("change", () => {
        shownCalls = null;
        refresh();
      });
    }
    refreshStatic();
    refresh();
    timer = setInterval(() => {
      if (!document.hidden) refresh();
    }, POLL_MS);
    setInterval(() => {
      if (!document.hidden) refreshStatic();
    }, POLL_MS * 10);
  }

  document.addEventListener("DOMContentLoaded", start);
})();
