// The page's one door to the gateway: every read and every change the dashboard and the
// console make goes through api(method, path, body), to the same /admin JSON API the CLI
// uses. How a call is authenticated lives here and only here: today the admin key the
// operator signed in with (sessionStorage, gone when the tab closes) as a Bearer header;
// a cookie session with a CSRF header is added in this function too.
"use strict";

const KEY_STORAGE = "gateway.adminKey";

class ApiFailure extends Error {
  constructor(status, message, code, param) {
    super(message);
    this.status = status;
    this.code = code || null;
    this.param = param || null;
  }
}

async function api(method, path, body) {
  const key = sessionStorage.getItem(KEY_STORAGE);
  const headers = { Authorization: "Bearer " + key };
  const init = { method, headers, cache: "no-store" };
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
  let answer = null;
  try { answer = await response.json(); } catch (_) { /* not JSON: described below */ }
  if (!response.ok) {
    const error = answer && answer.error ? answer.error : {};
    throw new ApiFailure(response.status, error.message || "HTTP " + response.status, error.code, error.param);
  }
  return answer;
}
