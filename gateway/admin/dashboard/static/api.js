// The one way the dashboard's pages call the gateway's /admin API: gatewayApi.request(method,
// path, body). It authenticates with whichever sign-in the operator used:
//   - an admin key (master or workspace admin) kept in this tab's sessionStorage, sent as
//     `Authorization: Bearer ...` (no ambient credential, so no CSRF token is needed);
//   - or a dashboard sign-in session (OIDC, gateway/admin/oidc.py): the HttpOnly cookie goes
//     along by itself (same origin), and every change (POST, PUT, PATCH, DELETE) carries the
//     session's CSRF token in X-CSRF-Token, read from GET /admin/session.
// Errors come back as ApiFailure(status, message, code) with the API's own message.
"use strict";

const gatewayApi = (() => {
  const KEY_STORAGE = "gateway.adminKey";
  const SAFE = new Set(["GET", "HEAD"]);
  let csrf = null;  // this session's token; null with a key or when signed out

  class ApiFailure extends Error {
    constructor(status, message, code, param) {
      super(message); this.status = status; this.code = code || null; this.param = param || null;
    }
  }

  async function request(method, path, body) {
    method = (method || "GET").toUpperCase();
    const headers = {};
    const key = sessionStorage.getItem(KEY_STORAGE);
    if (key) headers.Authorization = "Bearer " + key;
    else if (!SAFE.has(method) && csrf) headers["X-CSRF-Token"] = csrf;
    const init = { method, headers, credentials: "same-origin", cache: "no-store" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (err) {
      throw new ApiFailure(0, "could not reach the gateway (" + err.message + ")");
    }
    let payload = null;
    if (response.status !== 204) {
      try { payload = await response.json(); } catch (_) { /* not JSON: described below */ }
    }
    if (!response.ok) {
      const error = payload && payload.error ? payload.error : {};
      throw new ApiFailure(response.status, error.message || "HTTP " + response.status, error.code, error.param);
    }
    return payload;
  }

  // The sign-in session of this browser (an OIDC sign-in), or null when there is none.
  async function session() {
    if (sessionStorage.getItem(KEY_STORAGE)) return null;
    try {
      const me = await request("GET", "/admin/session");
      csrf = me.csrfToken;
      return me;
    } catch (err) {
      csrf = null;
      if (err instanceof ApiFailure && err.status === 401) return null;
      throw err;
    }
  }

  // The identity provider the page offers a button for ({name, login}), or null.
  async function provider() {
    try { return (await request("GET", "/dashboard/oidc/provider")).oidc; } catch (_) { return null; }
  }

  function useKey(key) { csrf = null; sessionStorage.setItem(KEY_STORAGE, key); }

  // Forget this tab's key; end the sign-in session on the server (every gateway process).
  async function signOut() {
    const hadSession = csrf !== null && !sessionStorage.getItem(KEY_STORAGE);
    sessionStorage.removeItem(KEY_STORAGE);
    if (hadSession) {
      try { await request("DELETE", "/admin/session"); } catch (_) { /* already ended */ }
    }
    csrf = null;
  }

  return { request, session, provider, useKey, signOut, ApiFailure, hasKey: () => !!sessionStorage.getItem(KEY_STORAGE) };
})();

// The names the pages use: api(method, path, body) and ApiFailure.
const ApiFailure = gatewayApi.ApiFailure;
function api(method, path, body) { return gatewayApi.request(method, path, body); }
