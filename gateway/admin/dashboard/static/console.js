// The console: the dashboard's management pages (users, a user's page, workspaces, the
// audit log, alert deliveries). Every change is a call to the same /admin API the CLI
// uses, through api(method, path, body) (api.js), so the server checks the key's scope and
// writes the audit row; the page only hides what a workspace admin may not do.
//
// Everything a user or a client typed (names, labels, reasons, actions, models, audit
// values, error messages) reaches the page as text: nodes are built with textContent and
// append(string), never innerHTML. A new API key is shown once, in a read-only field with
// a copy button, and dropped from the page when the operator is done or leaves the page.
"use strict";

(() => {
  const DASH = "—";
  const $ = (selector) => document.querySelector(selector);
  const session = { scope: null, workspaceId: null };
  const cache = { workspaces: [], tiers: [] };
  let currentUser = null;

  // ---------------------------------------------------------------- building blocks

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(props || {})) {
      if (/^(inner|outer)HTML$/.test(name)) throw new Error("el(): text only, never HTML");
      if (name === "text") node.textContent = value;
      else if (name === "dataset") Object.assign(node.dataset, value);
      else node[name] = value;
    }
    for (const child of children) {
      if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  function when(epoch) {
    if (typeof epoch !== "number" || !Number.isFinite(epoch)) return DASH;
    return new Date(epoch * 1000).toISOString().slice(0, 19).replace("T", " ");
  }

  const int = (v) => (typeof v === "number" && Number.isFinite(v) ? Math.round(v).toLocaleString("en-US") : DASH);
  const textOr = (v) => (v === null || v === undefined || v === "" ? DASH : String(v));

  function usd(v) {
    if (typeof v !== "number" || !Number.isFinite(v)) return DASH;
    let text = v.toFixed(9).replace(/0+$/, "");
    if ((text.split(".")[1] || "").length < 2) text = v.toFixed(2);
    return "$" + text;
  }

  function userLink(id, label) {
    return el("a", { href: "#/users/" + encodeURIComponent(id), text: label === undefined ? id : label });
  }

  function workspaceName(id) {
    const found = cache.workspaces.find((w) => w.id === id);
    return found ? found.name : textOr(id);
  }

  function fill(tableSelector, rows, cells, emptyText) {
    const body = $(tableSelector + " tbody");
    body.replaceChildren();
    if (!rows.length) {
      const td = body.insertRow().insertCell();
      td.colSpan = $(tableSelector + " thead tr").children.length;
      td.className = "empty";
      td.textContent = emptyText || "nothing here";
      return;
    }
    for (const row of rows) {
      const tr = body.insertRow();
      for (const value of cells(row)) {
        const td = tr.insertCell();
        const [content, className] = Array.isArray(value) ? value : [value, ""];
        if (className) td.className = className;
        if (content instanceof Node) td.append(content); else td.textContent = textOr(content);
      }
    }
  }

  // An error from the API, shown in place (beside the form or table it belongs to).
  function showError(selector, err) {
    const box = $(selector);
    if (!err) { box.hidden = true; box.textContent = ""; return; }
    const status = err instanceof ApiFailure && err.status ? " (HTTP " + err.status + ")" : "";
    box.textContent = (err.message || String(err)) + status;
    box.hidden = false;
  }

  function status(message) { $("#console-status").textContent = message; }

  // Runs a form's action with its button disabled, its error box cleared or filled. An action
  // reports success in the status line after the page shows the new state.
  async function submitting(form, errorSelector, action) {
    const buttons = form.querySelectorAll("button");
    buttons.forEach((b) => { b.disabled = true; });
    showError(errorSelector, null);
    try {
      await action();
    } catch (err) {
      showError(errorSelector, err);
    } finally {
      buttons.forEach((b) => { b.disabled = false; });
    }
  }

  // Confirmation before a destructive action: a modal <dialog> (Esc or Cancel refuses).
  function confirmAction(message, okLabel) {
    const dialog = $("#confirm-dialog");
    $("#confirm-message").textContent = message;
    $("#confirm-ok").textContent = okLabel || "Confirm";
    return new Promise((resolve) => {
      dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
      dialog.returnValue = "";
      dialog.showModal();
      $("#confirm-cancel").focus();
    });
  }

  // A new key, shown once: a read-only field, a copy button, and "Done" which drops it.
  function showSecret(holderSelector, title, apiKey) {
    const holder = $(holderSelector);
    const input = el("input", { id: "new-key-value", readOnly: true, value: apiKey, spellcheck: false });
    input.setAttribute("aria-label", "New API key");
    const copied = el("span", { className: "muted", role: "status" });
    const copy = el("button", { type: "button", id: "copy-key", text: "Copy" });
    copy.addEventListener("click", async () => {
      input.select();
      try {
        await navigator.clipboard.writeText(apiKey);
        copied.textContent = "copied";
      } catch (_) {
        copied.textContent = document.execCommand("copy") ? "copied" : "select the field and copy it";
      }
    });
    const done = el("button", { type: "button", id: "key-done", className: "secondary", text: "Done" });
    done.addEventListener("click", () => holder.replaceChildren());
    holder.replaceChildren(el("div", { className: "secret", role: "region", ariaLabel: title },
      el("strong", { text: title }),
      el("p", { text: "Shown once: copy it now. The gateway keeps only its hash and cannot show it again." }),
      el("div", { className: "secret-row" }, input, copy, done, copied)));
    input.focus();
    input.select();
  }

  function dropSecrets() {
    for (const selector of ["#create-user-secret", "#key-secret"]) $(selector).replaceChildren();
  }

  // ---------------------------------------------------------------- shared lists

  async function loadWorkspaces() {
    cache.workspaces = await api("GET", "/admin/workspaces");
    for (const selector of ["#new-user-workspace", "#audit-workspace", "#users-workspace"]) {
      const select = $(selector);
      const keep = select.value;
      const options = selector === "#new-user-workspace" ? [] : [new Option("all workspaces", "")];
      for (const w of cache.workspaces) options.push(new Option(w.name, w.id));
      select.replaceChildren(...options);
      if ([...select.options].some((o) => o.value === keep)) select.value = keep;
    }
  }

  async function loadTiers() {
    cache.tiers = await api("GET", "/admin/tiers");
    const select = $("#new-user-tier");
    select.replaceChildren(...cache.tiers.map((t) => new Option(t.name, t.name, t.default, t.default)));
  }

  // ---------------------------------------------------------------- users

  const USERS_SHOWN = 200;

  function renderUsers(users) {
    const note = $("#users-list-note");
    note.hidden = users.length <= USERS_SHOWN;
    note.textContent = "showing " + USERS_SHOWN + " of " + int(users.length) + " users: search to narrow";
    fill("#users-list", users.slice(0, USERS_SHOWN), (u) => [
      userLink(u.id), u.name, workspaceName(u.workspace_id), u.tier, [int(u.energy), "num"],
      u.disabled ? "disabled" : "active",
    ], "no user found");
  }

  async function showUsers() {
    await loadWorkspaces();
    await searchUsers();
  }

  async function searchUsers() {
    const q = $("#user-search").value.trim();
    const params = new URLSearchParams();
    if (q) params.set("q", q);
    if (session.scope === "master" && $("#users-workspace").value) params.set("workspace", $("#users-workspace").value);
    showError("#users-list-error", null);
    try {
      renderUsers(await api("GET", "/admin/users" + (params.size ? "?" + params : "")));
    } catch (err) {
      showError("#users-list-error", err);
    }
  }

  $("#user-search-form").addEventListener("submit", (event) => { event.preventDefault(); searchUsers(); });
  $("#user-search-clear").addEventListener("click", () => { $("#user-search").value = ""; searchUsers(); });

  $("#create-user").addEventListener("submit", (event) => {
    event.preventDefault();
    const form = event.currentTarget;
    submitting(form, "#create-user-error", async () => {
      const body = { workspace: $("#new-user-workspace").value, role: $("#new-user-role").value };
      const name = $("#new-user-name").value.trim();
      if (name) body.name = name;
      if (session.scope === "master") {
        body.tier = $("#new-user-tier").value;
        const energy = $("#new-user-energy").value.trim();
        if (energy !== "") body.energy = Number(energy);
      }
      const created = await api("POST", "/admin/users", body);
      form.reset();
      showSecret("#create-user-secret", "API key of " + (created.name || created.id), created.api_key);
      $("#create-user-secret .secret").append(el("p", {}, "User ", userLink(created.id), " created in " + created.workspace + "."));
      await searchUsers();
      status("user " + created.id + " created");
    });
  });

  // ---------------------------------------------------------------- a user's page

  function keyStatus(k) {
    if (k.revoked_at) return "revoked " + when(k.revoked_at);
    if (k.expires_at && k.expires_at * 1000 <= Date.now()) return "expired";
    return "live";
  }

  function keyActions(k) {
    if (k.revoked_at) return "";
    const edit = el("button", { type: "button", className: "secondary", text: "Edit", dataset: { action: "edit", key: k.id } });
    edit.setAttribute("aria-label", "Edit key " + k.prefix);
    edit.addEventListener("click", () => editKey(k));
    const rotate = el("button", { type: "button", className: "secondary", text: "Rotate", dataset: { action: "rotate", key: k.id } });
    rotate.setAttribute("aria-label", "Rotate key " + k.prefix);
    const revoke = el("button", { type: "button", className: "danger", text: "Revoke", dataset: { action: "revoke", key: k.id } });
    revoke.setAttribute("aria-label", "Revoke key " + k.prefix);
    rotate.addEventListener("click", () => rotateKey(k));
    revoke.addEventListener("click", () => revokeKey(k));
    return el("span", { className: "row-actions" }, edit, " ", rotate, " ", revoke);
  }

  function renderUser(user, ledger, requests) {
    currentUser = user;
    $("#user-title").textContent = user.name ? user.name + " (" + user.id + ")" : user.id;
    const facts = [["User id", user.id], ["Name", user.name], ["Workspace", workspaceName(user.workspace_id)],
                   ["Tier", user.tier], ["Energy balance", int(user.energy)], ["Created (UTC)", when(user.created_at)],
                   ["Status", user.disabled ? "disabled" : "active"], ["End-user id", user.external_id]];
    $("#user-facts").replaceChildren(...facts.map(([name, value]) =>
      el("div", {}, el("dt", { text: name }), el("dd", { text: textOr(value), dataset: { fact: name } }))));
    const tier = $("#tier-select");
    tier.replaceChildren(...cache.tiers.map((t) => new Option(t.name, t.name)));
    tier.value = user.tier;
    fill("#keys-table", user.keys, (k) => [
      k.prefix, k.label, k.role === "workspace_admin" ? "workspace admin" : (k.service ? "service" : k.role),
      when(k.created_at), k.expires_at ? when(k.expires_at) : "never",
      k.models ? k.models.join(", ") : "every model of the tier", keyStatus(k), keyActions(k),
    ], "no keys");
    modelBoxes("#key-models", "key-model-", user.tier, []);
    $("#key-edit-form").hidden = true;
    // #user-budgets (index.html) is left to the budgets work (/admin/budgets): nothing here fills it.
    fill("#requests-table", requests, (r) => [
      when(r.created_at), r.error_type ? r.status + " " + r.error_type : r.status, r.model, r.action,
      [int(r.tokens_total), "num"], [usd(r.cost_usd), "num"], [int(r.energy_cost), "num"],
      [r.latency_ms === null ? DASH : int(r.latency_ms) + " ms", "num"], r.request_id,
    ], "no requests yet");
    fill("#ledger-table", ledger.slice().reverse(), (e) => [
      when(e.created_at), e.kind, [(e.amount > 0 ? "+" : "") + int(e.amount), "num"], [int(e.balance_after), "num"],
      e.reason, e.request_id,
    ], "no ledger entries");
  }

  // The tier's models as labelled checkboxes (a key narrows its tier, never widens it).
  function modelBoxes(selector, idPrefix, tier, ticked) {
    const models = (cache.tiers.find((t) => t.name === tier) || { models: [] }).models;
    const holder = $(selector);
    holder.replaceChildren(holder.querySelector("legend"), ...models.map((m, i) => {
      const box = el("input", { type: "checkbox", id: idPrefix + i, value: m, name: "models", checked: ticked.includes(m) });
      return el("label", { className: "check", htmlFor: idPrefix + i }, box, " " + m);
    }));
  }

  const tickedModels = (selector) => [...document.querySelectorAll(selector + " input:checked")].map((box) => box.value);

  async function showUser(userId) {
    showError("#user-error", null);
    for (const id of ["#tier-error", "#energy-error", "#keys-error", "#key-error"]) showError(id, null);
    const path = "/admin/users/" + encodeURIComponent(userId);
    try {
      if (!cache.workspaces.length) await loadWorkspaces();
      const [user, ledger, requests] = await Promise.all([
        api("GET", path), api("GET", path + "/ledger?limit=50"), api("GET", path + "/requests?limit=50")]);
      renderUser(user, ledger, requests);
    } catch (err) {
      currentUser = null;
      $("#user-title").textContent = "User";
      $("#user-facts").replaceChildren();
      for (const table of ["#keys-table", "#requests-table", "#ledger-table"]) fill(table, [], () => [], DASH);
      showError("#user-error", err);
    }
  }

  const reloadUser = () => (currentUser ? showUser(currentUser.id) : Promise.resolve());

  $("#tier-form").addEventListener("submit", (event) => {
    event.preventDefault();
    submitting(event.currentTarget, "#tier-error", async () => {
      const tier = $("#tier-select").value;
      await api("PATCH", "/admin/users/" + encodeURIComponent(currentUser.id), { tier });
      await reloadUser();
      status("tier of " + currentUser.id + " set to " + tier);
    });
  });

  $("#energy-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const form = event.currentTarget;
    submitting(form, "#energy-error", async () => {
      const kind = $("#energy-kind").value;
      const raw = $("#energy-amount").value.trim();
      const amount = Number(raw);
      if (raw === "" || !Number.isInteger(amount)) throw new Error("the amount must be a whole number");
      const body = { amount, kind };
      const reason = $("#energy-reason").value.trim();
      if (reason) body.reason = reason;
      if (kind === "adjust" && amount < 0 && !(await confirmAction("Remove " + int(-amount) + " energy from " + currentUser.id + "?",
                                              "Remove energy"))) {
        status("nothing changed");
        return;
      }
      const answer = await api("POST", "/admin/users/" + encodeURIComponent(currentUser.id) + "/energy", body);
      form.reset();
      await reloadUser();
      status("energy of " + answer.user_id + " is now " + int(answer.energy));
    });
  });

  const keyName = (k) => k.prefix + "…" + (k.label ? " (" + k.label + ")" : "");

  async function revokeKey(k) {
    if (!(await confirmAction("Revoke key " + keyName(k) + "? Requests with it are refused at once; this cannot be undone.",
                              "Revoke key"))) {
      status("nothing changed");
      return;
    }
    try {
      showError("#keys-error", null);
      await api("POST", "/admin/keys/" + encodeURIComponent(k.id) + "/revoke");
      await reloadUser();
      status("key " + k.prefix + "… revoked");
    } catch (err) {
      showError("#keys-error", err);
    }
  }

  async function rotateKey(k) {
    if (!(await confirmAction("Rotate key " + keyName(k) + "? It stops working now; a new key with the same controls replaces it.",
                              "Rotate key"))) {
      status("nothing changed");
      return;
    }
    try {
      showError("#keys-error", null);
      const created = await api("POST", "/admin/keys/" + encodeURIComponent(k.id) + "/rotate");
      await reloadUser();
      showSecret("#key-secret", "New key replacing " + keyName(k), created.api_key);
      status("key " + k.prefix + "… rotated");
    } catch (err) {
      showError("#keys-error", err);
    }
  }

  $("#key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const form = event.currentTarget;
    submitting(form, "#key-error", async () => {
      const body = { role: $("#key-role").value };
      const label = $("#key-label").value.trim();
      const expires = $("#key-expires").value.trim();
      const models = tickedModels("#key-models");
      if (label) body.label = label;
      if (expires) body.expires = expires;
      if (models.length) body.models = models;
      const created = await api("POST", "/admin/users/" + encodeURIComponent(currentUser.id) + "/keys", body);
      form.reset();
      await reloadUser();
      showSecret("#key-secret", "New key " + keyName(created), created.api_key);
      status("key " + created.prefix + "… created");
    });
  });

  // Editing a key's label, expiry and models (PATCH /admin/keys/{id}): null removes a control.
  let editing = null;

  function editKey(k) {
    editing = k;
    showError("#key-edit-error", null);
    $("#key-edit-title").textContent = "Edit key " + keyName(k);
    $("#key-edit-label").value = k.label || "";
    $("#key-edit-expires").value = "";
    $("#key-edit-never").checked = false;
    modelBoxes("#key-edit-models", "key-edit-model-", currentUser.tier, k.models || []);
    $("#key-edit-form").hidden = false;
    $("#key-edit-label").focus();
  }

  $("#key-edit-cancel").addEventListener("click", () => { $("#key-edit-form").hidden = true; editing = null; });

  $("#key-edit-form").addEventListener("submit", (event) => {
    event.preventDefault();
    submitting(event.currentTarget, "#key-edit-error", async () => {
      const label = $("#key-edit-label").value.trim();
      const models = tickedModels("#key-edit-models");
      const body = { label: label || null, models: models.length ? models : null };
      const expires = $("#key-edit-expires").value.trim();
      if ($("#key-edit-never").checked) body.expires = null;
      else if (expires) body.expires = expires;
      const updated = await api("PATCH", "/admin/keys/" + encodeURIComponent(editing.id), body);
      editing = null;
      await reloadUser();
      status("key " + updated.prefix + "… updated");
    });
  });

  // ---------------------------------------------------------------- workspaces

  // A workspace's users: the Users page, narrowed to it.
  function usersOf(w) {
    const link = el("a", { href: "#/users", text: "users of " + w.name });
    link.addEventListener("click", () => {
      $("#users-workspace").value = w.id;
      $("#user-search").value = "";
    });
    return link;
  }

  async function showWorkspaces() {
    showError("#workspaces-error", null);
    try {
      await loadWorkspaces();
      fill("#workspaces-list", cache.workspaces, (w) => [w.name, w.id, when(w.created_at), usersOf(w)], "no workspaces");
    } catch (err) {
      showError("#workspaces-error", err);
    }
  }

  $("#create-workspace").addEventListener("submit", (event) => {
    event.preventDefault();
    const form = event.currentTarget;
    submitting(form, "#create-workspace-error", async () => {
      const created = await api("POST", "/admin/workspaces", { name: $("#new-workspace-name").value.trim() });
      form.reset();
      await showWorkspaces();
      status("workspace " + created.name + " created");
    });
  });

  // ---------------------------------------------------------------- audit log, alert deliveries

  // What an audit row changed, one line per field: "tier: pro → free" for an update, the
  // fields set for a creation (secrets never reach the audit log, so none are shown).
  function change(before, after) {
    const show = (v) => (typeof v === "string" ? v : JSON.stringify(v));
    const lines = [];
    const isObject = (v) => v !== null && typeof v === "object" && !Array.isArray(v);
    if (isObject(after)) {
      for (const [name, value] of Object.entries(after)) {
        if (isObject(before) && name in before) {
          if (JSON.stringify(before[name]) !== JSON.stringify(value)) {
            lines.push(name + ": " + show(before[name]) + " → " + show(value));
          }
        } else if (value !== null && name !== "created_at") {
          lines.push(name + ": " + show(value));
        }
      }
    } else if (after !== null && after !== undefined) {
      lines.push(show(after));
    }
    if (!lines.length) return DASH;
    return el("div", { className: "change" }, ...lines.map((line) => el("div", { text: line })));
  }

  async function showAudit() {
    showError("#audit-error", null);
    const params = new URLSearchParams({ limit: "200" });
    if ($("#audit-since").value) params.set("since", $("#audit-since").value);
    if (session.scope === "master" && $("#audit-workspace").value) params.set("workspace", $("#audit-workspace").value);
    try {
      if (!cache.workspaces.length) await loadWorkspaces();
      const rows = await api("GET", "/admin/audit?" + params);
      fill("#audit-table", rows, (r) => [
        when(r.created_at), r.actor === "workspace_admin" ? "workspace admin " + textOr(r.actor_key_prefix) + "…" : r.actor,
        r.via, r.action, r.target, r.workspace_id ? workspaceName(r.workspace_id) : DASH,
        [change(r.before, r.after), "json"], r.request_id,
      ], "no audit entries in this window");
    } catch (err) {
      showError("#audit-error", err);
    }
  }

  async function showAlerts() {
    showError("#alerts-error", null);
    const params = new URLSearchParams({ limit: "200" });
    if ($("#alerts-since").value) params.set("since", $("#alerts-since").value);
    if ($("#alerts-status").value) params.set("status", $("#alerts-status").value);
    try {
      if (!cache.workspaces.length) await loadWorkspaces();
      const rows = await api("GET", "/admin/alerts?" + params);
      fill("#alerts-table", rows, (r) => [
        when(r.created_at), r.event_type, r.summary, r.endpoint, r.status, [int(r.attempts), "num"],
        r.last_error ? (r.last_status ? r.last_status + " " : "") + r.last_error : DASH,
        r.workspace_id ? workspaceName(r.workspace_id) : "(gateway)",
      ], "no alert deliveries in this window");
    } catch (err) {
      showError("#alerts-error", err);
    }
  }

  $("#audit-form").addEventListener("submit", (event) => { event.preventDefault(); showAudit(); });
  $("#alerts-form").addEventListener("submit", (event) => { event.preventDefault(); showAlerts(); });

  // ---------------------------------------------------------------- pages (the URL's #/...)

  const VIEWS = {
    overview: () => Promise.resolve(),
    users: showUsers,
    user: showUser,
    workspaces: showWorkspaces,
    audit: showAudit,
    alerts: showAlerts,
  };

  function route() {
    const parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
    if (parts[0] === "users" && parts[1]) return ["user", parts[1]];
    return [VIEWS[parts[0]] ? parts[0] : "overview", null];
  }

  async function show() {
    if (!session.scope) return;
    dropSecrets();
    const [view, arg] = route();
    for (const node of document.querySelectorAll("#app > .view")) node.hidden = node.id !== "view-" + view;
    for (const link of document.querySelectorAll("#console-nav a")) {
      const active = link.dataset.view === (view === "user" ? "users" : view);
      if (active) link.setAttribute("aria-current", "page"); else link.removeAttribute("aria-current");
    }
    document.body.dataset.view = view;
    delete document.body.dataset.viewReady;
    await VIEWS[view](arg);
    document.body.dataset.viewReady = view;
  }

  window.addEventListener("hashchange", () => { status(""); show(); });

  document.addEventListener("gateway:signed-in", async (event) => {
    session.scope = event.detail.scope;
    session.workspaceId = event.detail.workspaceId;
    try {
      await loadTiers();
    } catch (err) {
      status("could not load the tiers: " + err.message);
    }
    show();
  });

  document.addEventListener("gateway:signed-out", () => {
    session.scope = null;
    session.workspaceId = null;
    currentUser = null;
    cache.workspaces = [];
    dropSecrets();
    status("");
    for (const table of document.querySelectorAll("#app > .view:not(#view-overview) table tbody")) table.replaceChildren();
    $("#user-facts").replaceChildren();
  });
})();
