// The gateway's dashboard: reads the /admin JSON API with the admin key the operator
// signed in with (kept in sessionStorage: gone when the tab closes), or with the session of
// a sign-in with the identity provider (static/api.js sends either), and renders it.
// Every number shown is a number the API returned; a field the API does not return is "—".
"use strict";

const REFRESH_SECONDS = Number(new URLSearchParams(location.search).get("refresh")) || 15;
const DASH = "—";
const WINDOW_DAYS = { "1h": 1, "24h": 1, "7d": 7, "30d": 30 };
const WEEKLY_DAYS = 28;

const $ = (selector) => document.querySelector(selector);
let timer = null;
let chart = null;
let scope = null;

// api(method, path, body) and ApiFailure: api.js, the page's one door to the gateway.

function signInMessage(failure) {
  if (!gatewayApi.hasKey() && (failure.status === 401 || failure.status === 403)) {
    return "Your sign-in session has ended (" + failure.message + "). Sign in again.";
  }
  if (failure.status === 401) {
    return "That key was not accepted (" + failure.message + "). Use the master key or a workspace admin key.";
  }
  if (failure.status === 403) {
    return "That key is not an admin key (" + failure.message + "). The dashboard needs the master key or a workspace admin key.";
  }
  return "Sign-in failed: " + failure.message;
}

// ---------------------------------------------------------------- formatting

function pick(obj, names) {
  for (const name of names) {
    let value = obj;
    for (const part of name.split(".")) value = value == null ? undefined : value[part];
    if (value !== undefined && value !== null) return value;
  }
  return undefined;
}

const isNumber = (v) => typeof v === "number" && Number.isFinite(v);
const fmtInt = (v) => (isNumber(v) ? Math.round(v).toLocaleString("en-US") : DASH);
const fmtNum = (v, digits) => (isNumber(v) ? v.toLocaleString("en-US", { maximumFractionDigits: digits }) : DASH);
const fmtPct = (v) => (isNumber(v) ? (v * 100).toFixed(2) + "%" : DASH);
const fmtMs = (v) => (isNumber(v) ? fmtNum(v, 2) + " ms" : DASH);
function fmtUsd(v) {
  if (!isNumber(v)) return DASH;
  // Costs are exact to 1e-9 USD (docs/billing.md); show every decimal, without trailing zeros past the cents.
  let text = v.toFixed(9).replace(/0+$/, "");
  const decimals = text.split(".")[1] || "";
  if (decimals.length < 2) text = v.toFixed(2);
  const [whole, frac] = text.split(".");
  return "$" + Number(whole).toLocaleString("en-US") + "." + frac;
}

function setText(selector, text) { $(selector).textContent = text; }

function fillTable(selector, rows, columns, emptyText) {
  const body = $(selector + " tbody");
  body.replaceChildren();
  if (!rows.length) {
    const tr = body.insertRow();
    const td = tr.insertCell();
    td.colSpan = columns.length;
    td.className = "empty";
    td.textContent = emptyText || "nothing in this window";
    return;
  }
  const headers = document.querySelectorAll(selector + " thead th");
  for (const row of rows) {
    const tr = body.insertRow();
    if (row.__class) tr.className = row.__class;
    for (const [i, [value, numeric]] of columns.map((column) => column(row)).entries()) {
      const td = tr.insertCell();
      if (numeric) td.className = headers[i].className = "num";
      if (value instanceof Node) td.appendChild(value); else td.textContent = value;
    }
  }
}

// ---------------------------------------------------------------- sections

function renderTotals(m, live) {
  // "backfilling, 42%" while a migration's history is filled in (docs/upgrades.md)
  $("#backfill").hidden = !m.backfill;
  setText("#backfill", m.backfill ? m.backfill.note : "");
  setText("#total-requests", fmtInt(pick(m, ["totalRequests", "requests"])));
  setText("#total-tokens", fmtInt(pick(m, ["totalTokens", "tokens"])));
  setText("#total-cost", fmtUsd(pick(m, ["totalCost", "costUsd", "cost_usd"])));
  setText("#unbilled-calls", fmtInt(pick(m, ["unbilledCalls"])));
  setText("#unbilled-cost", fmtUsd(pick(m, ["unbilledCostUsd"])));
  setText("#energy-spent", fmtInt(pick(m, ["energySpent", "energy_spent", "energy.spent", "totalEnergy"])));
  setText("#energy-refunded", fmtInt(pick(m, ["energyRefunded", "energy_refunded", "energy.refunded"])));
  setText("#error-rate", fmtPct(pick(m, ["errorRate", "error_rate"])));
  setText("#cache-hit-rate", fmtPct(pick(m, ["cacheHitRate", "cache_hit_rate"])));
  setText("#saved-usd", fmtUsd(pick(m, ["savedUsd", "saved_usd"])));
  setText("#latency-avg", fmtMs(pick(m, ["averageLatency", "latency.avg", "latencyMs.avg"])));
  for (const p of ["p50", "p95", "p99"]) {
    const P = p.toUpperCase();
    setText("#latency-" + p, fmtMs(pick(m, ["latency" + P, "latency" + P + "Ms", p + "Latency", "latency_" + p + "_ms",
                                            "latency." + p, "latencyMs." + p])));
  }
  setText("#ttfb-p50", fmtMs(pick(m, ["ttfbP50", "ttfbP50Ms", "timeToFirstByteP50", "ttfb_p50_ms", "ttfb.p50", "ttfbMs.p50"])));
  // Within 4% of the exact value, unless the window reaches history not yet in the fine histogram.
  for (const id of ["#latency-p50", "#latency-p95", "#latency-p99", "#ttfb-p50"]) {
    $(id).title = m.percentilesApproximate ? "approximate: this window reaches history the fine latency histogram"
      + " does not cover yet (its backfill), estimated inside the coarse buckets" : "within 4% of the exact value";
    $(id).classList.toggle("approximate", m.percentilesApproximate === true);
  }
  setText("#downgrades", fmtInt(pick(m, ["downgrades"])));
  setText("#retries", fmtInt(pick(m, ["retries"])));
  setText("#inflight", fmtInt(live.inFlight));
  $("#inflight").title = live.inFlight == null ? "the gateway-wide in-flight count is shown to the master key only" : "";
}

function renderDaily(rows) {
  fillTable("#daily-table", rows, [
    (r) => [r.date], (r) => [fmtInt(r.requests), true], (r) => [fmtInt(r.errors), true],
    (r) => [fmtInt(r.tokens), true], (r) => [fmtUsd(r.cost_usd), true],
    (r) => [fmtInt(r.cache_hits), true], (r) => [fmtUsd(r.saved_usd), true],
  ]);
  const holder = $("#daily-chart");
  if (chart) { chart.destroy(); chart = null; }
  holder.replaceChildren();
  if (!rows.length || typeof uPlot === "undefined") return;
  const xs = rows.map((r) => Date.parse(r.date + "T00:00:00Z") / 1000);
  const opts = {
    width: Math.max(320, holder.clientWidth || 800),
    height: 240,
    scales: { x: { time: true },
              usd: { range: (u, min, max) => [0, Math.max(max, 0.01) * 1.1] },
              req: { range: (u, min, max) => [0, Math.max(max, 1) * 1.1] } },
    series: [
      {},
      { label: "Cost (USD)", scale: "usd", stroke: "#2f6fde", width: 2, points: { show: true },
        value: (u, v) => (v == null ? DASH : fmtUsd(v)) },
      { label: "Requests", scale: "req", stroke: "#e08a1e", width: 2, points: { show: true },
        value: (u, v) => (v == null ? DASH : fmtInt(v)) },
    ],
    axes: [
      {},
      { scale: "usd", values: (u, ticks) => ticks.map((t) => "$" + t) },
      { scale: "req", side: 1, grid: { show: false } },
    ],
  };
  // An empty day either side: one day of data is a point in a few days' width, not in years.
  const padded = [[xs[0] - 86400, ...xs, xs[xs.length - 1] + 86400],
                  [null, ...rows.map((r) => r.cost_usd), null], [null, ...rows.map((r) => r.requests), null]];
  chart = new uPlot(opts, padded, holder);
}

function distributionRows(dist) {
  // {name: count} today; {name: {requests, cost_usd, ...}} is rendered too.
  return Object.entries(dist || {}).map(([name, v]) => ({ name, requests: isNumber(v) ? v : pick(v, ["requests", "count"]) }))
    .sort((a, b) => (b.requests || 0) - (a.requests || 0));
}

function renderDistributions(m) {
  const columns = [(r) => [r.name], (r) => [fmtInt(r.requests), true]];
  fillTable("#models-table", distributionRows(pick(m, ["modelDistribution", "models"])), columns);
  fillTable("#providers-table", distributionRows(pick(m, ["providerDistribution", "providers"])), columns);
}

function renderUsers(rows, users, workspaces) {
  const byId = new Map(users.map((u) => [u.id, u]));
  const wsName = new Map(workspaces.map((w) => [w.id, w.name]));
  fillTable("#users-table", rows, [
    (r) => [r.user_id == null ? "(no user)" : r.user_id],
    (r) => [wsName.get(r.workspace_id) || r.workspace_id || DASH],
    (r) => [pick(r, ["tier"]) ?? (byId.get(r.user_id) || {}).tier ?? DASH],
    (r) => [fmtInt(pick(r, ["balance", "energy_balance"]) ?? (byId.get(r.user_id) || {}).energy), true],
    (r) => [fmtInt(r.requests), true], (r) => [fmtInt(r.tokens), true],
    (r) => [fmtInt(pick(r, ["energy", "energy_spent"])), true], (r) => [fmtUsd(r.cost_usd), true],
  ]);
}

function renderBalances(m) {
  const rows = pick(m, ["workspaceBalances"]);
  fillTable("#balances-table", rows || [], [
    (r) => [r.name || r.workspace_id], (r) => [fmtInt(r.users), true], (r) => [fmtInt(r.energy), true],
  ], rows ? "no users" : "not reported by this gateway's /admin/metrics");
}

function renderActions(rows) {
  fillTable("#actions-table", rows, [
    (r) => [r.action == null ? "(none)" : r.action], (r) => [fmtInt(r.count), true],
    (r) => [fmtUsd(r.avg_cost_usd), true], (r) => [fmtUsd(r.total_cost_usd), true],
    (r) => [fmtNum(r.avg_tokens, 1), true],
  ]);
}

function renderWeekly(rows) {
  fillTable("#weekly-table", rows.map((w) => ({ ...w, __class: w.over_threshold ? "over" : "" })), [
    (r) => [r.week], (r) => [fmtInt(r.requests), true], (r) => [fmtUsd(r.cost_usd), true],
    (r) => [isNumber(r.threshold_usd) ? fmtUsd(r.threshold_usd) : "no threshold set", true],
    (r) => {
      if (!isNumber(r.threshold_usd) || r.threshold_usd <= 0) return [""];
      const share = r.cost_usd / r.threshold_usd;
      const wrap = document.createElement("span");
      const bar = document.createElement("span");
      bar.className = "bar";
      bar.style.width = Math.min(100, Math.round(share * 100)) + "px";
      wrap.append(bar, " " + (share * 100).toFixed(0) + "%" + (r.over_threshold ? " over" : ""));
      return [wrap];
    },
  ]);
}

// An experiment's variants, one table each (GET /admin/usage/experiments): the usage
// columns, then per feedback metric its mean [95% CI] n=… and the difference to the control.
function span(className, text) {
  const el = document.createElement("span");
  el.className = className;
  el.textContent = text;
  return el;
}

const fmtStat = (v) => fmtNum(v, 4);
const fmtInterval = (ci) => "[" + fmtStat((ci || [])[0]) + ", " + fmtStat((ci || [])[1]) + "]";

function metricCell(stats) {
  if (!stats) return [DASH, true];
  const wrap = document.createElement("span");
  wrap.append(span("mean", fmtStat(stats.mean)), " ", span("ci", fmtInterval(stats.ci95)), " ", span("n", "n=" + stats.n));
  return [wrap, true];
}

function diffCell(stats, isControl) {
  if (isControl) return ["control", true];
  if (!stats || !stats.vs_control) return [DASH, true];
  const wrap = document.createElement("span");
  const d = stats.vs_control;
  const sign = isNumber(d.diff) && d.diff > 0 ? "+" : "";
  wrap.append(span("diff", sign + fmtStat(d.diff)), " ", span("ci", fmtInterval(d.ci95)));
  const [lo, hi] = d.ci95 || [];
  if (isNumber(lo) && isNumber(hi) && (lo > 0 || hi < 0)) wrap.title = "the interval excludes 0";
  return [wrap, true];
}

function renderExperiments(rows) {
  const holder = $("#experiments");
  holder.replaceChildren();
  if (!rows.length) {
    holder.append(span("muted", "no experiment traffic in this window"));
    return;
  }
  rows.forEach((experiment, index) => {
    const metrics = [...new Set(experiment.variants.flatMap((v) => Object.keys(v.feedback || {})))].sort();
    const box = document.createElement("div");
    box.className = "experiment";
    box.dataset.experiment = experiment.experiment;
    const title = document.createElement("h3");
    title.append(experiment.experiment + " ", span("muted", "control: " + (experiment.control ?? DASH)));
    const table = document.createElement("table");
    table.id = "experiment-" + index;
    const head = table.createTHead().insertRow();
    for (const name of ["Variant", "Requests", "Cost (USD)", "Energy", "Tokens", "Latency p50", "Latency p95",
                        "Error rate", ...metrics.flatMap((m) => [m + " mean [95% CI]", m + " vs control [95% CI]"])]) {
      head.appendChild(document.createElement("th")).textContent = name;
    }
    table.createTBody();
    box.append(title, table);
    holder.append(box);
    fillTable("#" + table.id, experiment.variants.map((v) => ({ ...v, __class: v.variant === experiment.control ? "control" : "" })), [
      (v) => [v.variant], (v) => [fmtInt(v.requests), true], (v) => [fmtUsd(v.cost_usd), true],
      (v) => [fmtInt(v.energy), true], (v) => [fmtInt(v.tokens), true], (v) => [fmtMs(v.latency_p50_ms), true],
      (v) => [fmtMs(v.latency_p95_ms), true], (v) => [fmtPct(v.error_rate), true],
      ...metrics.flatMap((m) => [(v) => metricCell((v.feedback || {})[m]),
                                 (v) => diffCell((v.feedback || {})[m], v.variant === experiment.control)]),
    ]);
    for (const td of table.querySelectorAll("td")) {
      if (td.querySelector("[title]")) td.classList.add("significant");
    }
  });
}

function renderErrors(live) {
  const minutes = Math.round((live.recentErrorsWindowSeconds || 0) / 60);
  setText("#errors-note", minutes ? "(last " + minutes + " min, newest first)" : "");
  fillTable("#errors-table", live.recentErrors || [], [
    (r) => [r.created_at], (r) => [r.status ?? DASH], (r) => [r.error_type], (r) => [r.model ?? DASH],
    (r) => [r.user_id ?? DASH], (r) => [r.action ?? DASH], (r) => [r.request_id],
  ], "no errors");
}

// ---------------------------------------------------------------- refresh loop

// Budgets (GET /admin/budgets): a read-only table; text only through textContent (fillTable).
function fmtBudget(unit, v) {
  return unit === "usd" ? fmtUsd(v) : fmtInt(v) + " energy";
}

async function refreshBudgets() {
  let rows;
  try {
    rows = await api("/admin/budgets" + query({}));
  } catch (err) {
    if (err instanceof ApiFailure && (err.status === 401 || err.status === 403)) throw err;
    rows = [];
  }
  fillTable("#budgets-table", rows, [
    (b) => [b.id],
    (b) => [b.scope + " " + b.scope_id],
    (b) => [b.period === "life" ? "lifetime" : b.period + " (" + b.timezone + ")"],
    (b) => [fmtBudget(b.unit, b.amount), true],
    (b) => [fmtBudget(b.unit, b.spent), true],
    (b) => [fmtBudget(b.unit, b.remaining), true],
    (b) => [b.hard === "none" ? "alerts only" : b.hard],
  ], "no budgets");
}

function query(params) {
  const workspace = $("#workspace").value;
  const all = workspace ? { ...params, workspace } : params;
  return "?" + new URLSearchParams(all).toString();
}

async function refresh() {
  const windowValue = $("#window").value;
  const days = WINDOW_DAYS[windowValue] || 1;
  try {
    const [metrics, daily, actions, weekly, experiments, workspaces, live] = await Promise.all([
      api("GET", "/admin/metrics" + query({ window: windowValue })),
      api("GET", "/admin/usage/daily" + query({ days })),
      api("GET", "/admin/usage/actions" + query({ days })),
      api("GET", "/admin/usage/weekly" + query({ days: WEEKLY_DAYS })),
      api("GET", "/admin/usage/experiments" + query({ days })),
      api("GET", "/admin/workspaces"),
      api("GET", "/admin/dashboard/live" + query({})),
    ]);
    // /admin/metrics' own top users (the chosen window, with tier and balance) when it has
    // them; otherwise the top-users report joined with the user list.
    let top = pick(metrics, ["topUsers"]);
    let users = [];
    if (top === undefined) {
      [top, users] = await Promise.all([api("GET", "/admin/usage/top-users" + query({ days, limit: 10 })).then((r) => r.rows),
                                        api("GET", "/admin/users" + query({}))]);
    }
    renderTotals(metrics, live);
    renderDaily(daily.rows);
    renderDistributions(metrics);
    renderUsers(top, users, workspaces);
    renderBalances(metrics);
    renderActions(actions.rows);
    renderWeekly(weekly.rows);
    renderExperiments(experiments.rows);
    renderErrors(live);
    await refreshBudgets();
    if (scope === "master") fillWorkspaces(workspaces);
    $("#refresh-error").hidden = true;
    const now = new Date();
    setText("#updated", "updated " + now.toISOString().slice(11, 19) + " UTC · refreshes every " + REFRESH_SECONDS + " s");
    document.body.dataset.refreshedAt = String(now.getTime());
  } catch (err) {
    if (err instanceof ApiFailure && (err.status === 401 || err.status === 403)) {
      signOut(signInMessage(err));
      return;
    }
    $("#refresh-error").hidden = false;
    setText("#refresh-error", "refresh failed: " + err.message);
  }
}

function fillWorkspaces(workspaces) {
  const select = $("#workspace");
  const known = new Set([...select.options].map((o) => o.value));
  for (const w of workspaces) {
    if (!known.has(w.id)) select.add(new Option(w.name, w.id));
  }
}

function startRefreshing() {
  stopRefreshing();
  refresh();
  timer = setInterval(refresh, REFRESH_SECONDS * 1000);
}

function stopRefreshing() {
  if (timer) clearInterval(timer);
  timer = null;
}

// ---------------------------------------------------------------- sign-in

async function signIn(key, session) {
  if (key) gatewayApi.useKey(key);
  try {
    const live = await api("GET", "/admin/dashboard/live");
    scope = live.scope;
    setText("#whoami", session ? sessionText(session)
      : scope === "master" ? "master key: every workspace" : "workspace admin: " + live.workspaceId);
    document.body.dataset.role = session ? session.role : scope;
    $("#workspace-control").hidden = scope !== "master";
    $("#signin-panel").hidden = true;
    $("#signin-error").hidden = true;
    $("#session").hidden = false;
    $("#app").hidden = false;
    document.body.dataset.scope = scope;
    // The management pages (console.js) learn who signed in from this event.
    document.dispatchEvent(new CustomEvent("gateway:signed-in", { detail: { scope, workspaceId: live.workspaceId } }));
    startRefreshing();
  } catch (err) {
    signOut(err instanceof ApiFailure ? signInMessage(err) : String(err));
  }
}

function signOut(message) {
  stopRefreshing();
  gatewayApi.signOut();
  scope = null;
  delete document.body.dataset.scope;
  delete document.body.dataset.role;
  delete document.body.dataset.refreshedAt;
  document.dispatchEvent(new CustomEvent("gateway:signed-out"));
  $("#app").hidden = true;
  $("#session").hidden = true;
  $("#signin-panel").hidden = false;
  $("#key").value = "";
  const error = $("#signin-error");
  error.hidden = !message;
  error.textContent = message || "";
}

$("#signin").addEventListener("submit", (event) => {
  event.preventDefault();
  const key = $("#key").value.trim();
  if (key) signIn(key);
});
$("#signout").addEventListener("click", () => signOut(""));
$("#window").addEventListener("change", refresh);
$("#workspace").addEventListener("change", refresh);

// ---------------------------------------------------------------- sign-in with the identity provider

function sessionText(session) {
  const who = session.email || session.subject;
  if (session.role === "master") return who + " · master: every workspace";
  const workspace = session.workspaceName || session.workspaceId;
  if (session.role === "workspace_admin") return who + " · workspace admin: " + workspace;
  return who + " · viewer (read-only)" + (session.workspaceId ? ": " + workspace : "");
}

async function boot() {
  if (gatewayApi.hasKey()) { signIn(null, null); return; }
  const [session, provider] = await Promise.all([gatewayApi.session().catch(() => null), gatewayApi.provider()]);
  if (provider) {
    setText("#sso-name", provider.name);
    $("#sso-button").href = provider.login;
    $("#sso").hidden = false;
  }
  if (session) signIn(null, session);
}

boot();
