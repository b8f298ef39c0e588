"""Bounded inputs on the operator's paths (docs/admin.md "Parameter limits"):
feedback values finite and within ±1e9 (400 otherwise), at most 20 distinct metrics per
request (400) and 50 per user per minute (429); the experiments report survives values
stored before these limits; every numeric /admin parameter range-checked with a 400, and a
fuzz test over every admin route and parameter: never a 5xx, never much slower than a
normal call."""

from __future__ import annotations

import json
import statistics
import time
import urllib.parse

import httpx
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.feedback import METRICS_PER_REQUEST, METRICS_PER_USER_MINUTE, VALUE_LIMIT
from tests.conftest import MASTER_KEY

MSGS = [{"role": "user", "content": "Write a reply"}]
CHAIN = ["auth", "experiments", "tier_policy", "energy", {"name": "accounting", "settings": {"flush_interval": 0.05}}]
EXPERIMENT = {"name": "drafts", "match": {"actions": ["email_draft"]},
              "variants": [{"name": "current", "weight": 50}, {"name": "mini", "weight": 50, "model": "gpt-4o-mini"}]}
BOTH = pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)


def start(gateway_factory):
    return gateway_factory(plugins=CHAIN, experiments=[EXPERIMENT])


def ask(gw, key) -> str:
    raw = gw.client(key).chat.completions.with_raw_response.create(model="gpt-4o", messages=MSGS,
                                                                   metadata={"action": "email_draft"})
    return raw.headers["X-Request-Id"]


def feedback(gw, key, request_id, metric, value) -> httpx.Response:
    return httpx.post(gw.url + "/v1/feedback", json={"request_id": request_id, "metric": metric, "value": value},
                      headers={"Authorization": f"Bearer {key}"})


def admin_get(gw, path, key=MASTER_KEY, **params) -> httpx.Response:
    return httpx.get(gw.url + path, params=params, headers={"Authorization": f"Bearer {key}"}, timeout=60)


# ------------------------------------------------------------------------------ feedback


@BOTH
def test_feedback_values_are_finite_and_within_the_documented_range(gateway_factory, store_url):
    gw = start(gateway_factory)
    _, key = gw.make_user()
    request_id = ask(gw, key)
    for value in (1e200, 1.7e308, -1.7e308, VALUE_LIMIT * 1.000001, -1e10, 10**400):
        answer = feedback(gw, key, request_id, "score", value) if value != 10**400 else httpx.post(
            gw.url + "/v1/feedback", content=f'{{"request_id": "{request_id}", "metric": "score", "value": {value}}}',
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
        assert answer.status_code == 400, (value, answer.text)
        assert answer.json()["error"]["param"] == ("value" if value != 10**400 else None)  # not JSON to the parser
    for value in (VALUE_LIMIT, -VALUE_LIMIT, 0.5, True):
        assert feedback(gw, key, request_id, "score", value).status_code == 200
    rows = gw.run(gw.store.report_query("SELECT value FROM feedback", []))
    assert rows == [{"value": 1.0}]


def test_a_request_takes_at_most_the_documented_number_of_distinct_metrics(gateway_factory):
    gw = start(gateway_factory)
    _, key = gw.make_user()
    request_id = ask(gw, key)
    for i in range(METRICS_PER_REQUEST):
        assert feedback(gw, key, request_id, f"m{i}", 1).status_code == 200
    over = feedback(gw, key, request_id, "one_more", 1)
    assert over.status_code == 400 and over.json()["error"]["code"] == "feedback_metric_limit"
    assert feedback(gw, key, request_id, "m0", 0).status_code == 200  # a known metric may be sent again
    stored = gw.run(gw.store.report_query("SELECT COUNT(*) AS n FROM feedback WHERE request_id = ?", [request_id]))
    assert stored[0]["n"] == METRICS_PER_REQUEST


def test_300_distinct_metrics_on_one_request_are_not_accepted(gateway_factory):
    gw = start(gateway_factory)
    _, key = gw.make_user()
    request_id = ask(gw, key)
    statuses = [feedback(gw, key, request_id, f"metric_{i}", 1).status_code for i in range(300)]
    assert statuses.count(200) == METRICS_PER_REQUEST and set(statuses[METRICS_PER_REQUEST:]) == {400}


def test_a_user_reports_at_most_the_documented_number_of_distinct_metrics_per_minute(gateway_factory):
    gw = start(gateway_factory)
    _, key = gw.make_user(energy=1000)
    _, other_key = gw.make_user(energy=1000)
    sent = 0
    while sent < METRICS_PER_USER_MINUTE:
        request_id = ask(gw, key)
        for _ in range(min(METRICS_PER_REQUEST, METRICS_PER_USER_MINUTE - sent)):
            assert feedback(gw, key, request_id, f"m{sent}", 1).status_code == 200
            sent += 1
    request_id = ask(gw, key)
    over = feedback(gw, key, request_id, "one_more", 1)
    assert over.status_code == 429 and over.json()["error"]["code"] == "feedback_metric_limit"
    assert over.headers["Retry-After"] == "60"
    assert feedback(gw, key, request_id, "m0", 1).status_code == 200  # a metric of this minute: fine
    assert feedback(gw, other_key, ask(gw, other_key), "one_more", 1).status_code == 200  # per user


def test_the_per_minute_window_forgets_metrics_after_a_minute():
    from gateway.feedback import MetricWindow

    window = MetricWindow(limit=2, window=60)
    assert window.admit("u", "a", now=0) and window.admit("u", "b", now=1)
    assert not window.admit("u", "c", now=30) and window.admit("u", "a", now=30)
    assert window.admit("u", "c", now=61.5)  # b's minute is over


@BOTH
def test_reports_survive_huge_values_stored_before_the_limits(gateway_factory, store_url, tmp_path, capsys):
    """Values stored before the range check (1.7e308: its square overflows a double) are
    left out of the report; the report answers 200 and the CLI exits 0."""
    import proxy

    gw = start(gateway_factory)
    user, key = gw.make_user()
    good, huge, huger = ask(gw, key), ask(gw, key), ask(gw, key)
    assert feedback(gw, key, good, "score", 3).status_code == 200
    gw.run(gw.store.record_feedback(huge, user, "score", 1e200))
    gw.run(gw.store.record_feedback(huger, user, "score", 1.7e308))
    gw.settle()
    answer = admin_get(gw, "/admin/usage/experiments", days=1)
    assert answer.status_code == 200, answer.text
    (row,) = answer.json()["rows"]
    (variant,) = [v for v in row["variants"] if v["feedback"]]
    assert variant["feedback"]["score"]["n"] == 1 and variant["feedback"]["score"]["mean"] == 3.0
    config = tmp_path / "cli.yaml"
    config.write_text(yaml.safe_dump({"store": {"url": gw.config.store.url},
                                      "models": [{"name": "demo", "litellm_params": {"model": "demo/offline"}}]}))
    capsys.readouterr()
    assert proxy.main(["usage", "experiments", "--days", "1", "--json", "--config", str(config)]) == 0
    assert json.loads(capsys.readouterr().out)["rows"][0]["experiment"] == "drafts"


# ------------------------------------------------------------------------------ admin parameters


@BOTH
@pytest.mark.parametrize("window", ["1000000000d", "1000000000h", "3661d", "0s", "9" * 400 + "h"])
def test_a_metrics_window_outside_one_second_to_ten_years_is_a_400(gateway_factory, store_url, window):
    gw = start(gateway_factory)
    _, admin_key = gw.make_user(role="workspace_admin")
    for key in (MASTER_KEY, admin_key):
        answer = admin_get(gw, "/admin/metrics", key, window=window)
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["param"] == "window"
    assert admin_get(gw, "/admin/metrics", window="3660d").status_code == 200


@pytest.mark.parametrize("path,param,bad,good", [
    ("/admin/usage/daily", "days", ["0", "3661", "99999999999999999", "-1", "1.5", "x"], "3660"),
    ("/admin/usage/top-users", "limit", ["0", "1001", "99999999999999999", "-5"], "1000"),
    ("/admin/usage/experiments", "days", ["0", "3661", "99999999999999999"], "1"),
    ("/admin/users/{user}/ledger", "limit", ["0", "10001", "99999999999999999", "1e3"], "10000"),
    ("/admin/users/{user}/requests", "limit", ["0", "501", "99999999999999999", "1e3"], "500"),
    ("/admin/audit", "limit", ["0", "1001", "99999999999999999", "1e3"], "1000"),
    ("/admin/audit", "since", ["0s", "3661d", "1000000000d", "9" * 400 + "h", "x"], "3660d"),
    ("/admin/alerts", "limit", ["0", "1001", "99999999999999999", "1e3"], "1000"),
    ("/admin/alerts", "since", ["0s", "3661d", "1000000000d", "9" * 400 + "h", "x"], "3660d"),
])
def test_numeric_admin_parameters_are_range_checked(gateway_factory, path, param, bad, good):
    gw = start(gateway_factory)
    user, _ = gw.make_user()
    path = path.format(user=user)
    for value in bad:
        answer = admin_get(gw, path, **{param: value})
        assert answer.status_code == 400 and answer.json()["error"]["param"] == param, (value, answer.text)
    assert admin_get(gw, path, **{param: good}).status_code == 200


# Every /admin route and its parameters: (method, path template, query parameters, body fields).
ADMIN_ROUTES: list[tuple[str, str, tuple[str, ...], tuple[str, ...]]] = [
    ("GET", "/admin/usage/{report}", ("days", "limit", "workspace"), ()),
    ("GET", "/admin/metrics", ("window", "workspace"), ()),
    ("GET", "/admin/audit", ("limit", "since", "workspace"), ()),
    ("GET", "/admin/alerts", ("limit", "since", "status", "workspace"), ()),
    ("GET", "/admin/budgets", ("workspace",), ()),
    ("POST", "/admin/budgets", (), ("workspace", "user", "key", "unit", "amount", "period", "timezone", "alerts",
                                    "hard")),
    ("DELETE", "/admin/budgets/{budget}", (), ()),
    ("GET", "/admin/dashboard/live", ("workspace",), ()),
    ("GET", "/admin/session", (), ()),  # a dashboard OIDC session (tests/test_oidc.py); a key gets a 401
    ("DELETE", "/admin/session", (), ()),
    ("GET", "/admin/config", (), ()),
    ("POST", "/admin/workspaces", (), ("name", "profile", "ai_settings")),
    ("GET", "/admin/workspaces", (), ()),
    ("GET", "/admin/workspaces/{workspace}", (), ()),
    ("PATCH", "/admin/workspaces/{workspace}", (), ("profile", "ai_settings")),
    ("POST", "/admin/users", (), ("workspace", "tier", "energy", "name", "role")),
    ("GET", "/admin/users", ("workspace", "q", "limit"), ()),
    ("GET", "/admin/users/{user}", (), ()),
    ("PATCH", "/admin/users/{user}", (), ("tier",)),
    ("POST", "/admin/users/{user}/energy", (), ("amount", "reason", "kind")),
    ("GET", "/admin/users/{user}/ledger", ("limit",), ()),
    ("GET", "/admin/users/{user}/requests", ("limit",), ()),
    ("GET", "/admin/tiers", (), ()),
    ("POST", "/admin/users/{user}/keys", (), ("role", "service", "label", "expires", "models", "rpm", "tpm")),
    ("GET", "/admin/keys", ("user",), ()),
    ("PATCH", "/admin/keys/{key}", (), ("label", "expires", "models", "rpm", "tpm")),
    ("POST", "/admin/keys/{key}/revoke", (), ()),
    ("POST", "/admin/keys/{key}/rotate", (), ()),
]

NUMBER_TEXT = st.one_of(
    st.integers(-10**30, 10**30).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.builds(lambda n, unit: f"{n}{unit}", st.integers(0, 10**30), st.sampled_from(["", "ms", "s", "m", "h", "d", "w"])),
    st.builds(lambda n, unit: f"{n}{unit}", st.floats(0, 1e300), st.sampled_from(["s", "h", "d"])),
    st.sampled_from(["", " ", "-1", "0", "1e400", "9" * 400, "NaN", "inf", "1000000000d", "\x00", "７"]),
    st.text(max_size=20),
)
JSON_VALUE = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-10**30, 10**30), st.floats(allow_nan=False, allow_infinity=False),
              st.text(max_size=20), st.sampled_from(["\x00", "free", "pro", "user", "workspace_admin", "grant", "adjust"])),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=8)


def _ident(real: list[str]) -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(real), st.text(min_size=1, max_size=300), st.just("\x00"), st.just("x" * 5000))


def test_the_fuzz_table_lists_every_admin_route(gateway_factory):
    gw = start(gateway_factory)
    served = {(route.method, route.resource.canonical) for route in gw.app.router.routes()
              if route.resource is not None and route.resource.canonical.startswith("/admin")
              and route.method != "HEAD"}
    assert served == {(method, path) for method, path, _, _ in ADMIN_ROUTES}


@BOTH
def test_fuzzing_every_admin_route_and_parameter_never_answers_5xx_nor_runs_long(gateway_factory, store_url):
    gw = start(gateway_factory)
    user, key = gw.make_user(energy=100)
    _, admin_key = gw.make_user(role="workspace_admin")
    ask(gw, key)
    gw.settle()
    workspace = gw.run(gw.store.get_workspace("acme")).id
    key_ids = [k.id for k in gw.run(gw.store.list_keys())]
    real = {"report": ["daily", "top-users", "actions", "weekly", "experiments", "nope"],
            "workspace": [workspace, "acme", "globex"], "user": [user, "usr_nope"], "key": [*key_ids, "key_nope"],
            "budget": ["bud_nope"]}
    # The baseline: the heaviest normal calls (every report over its longest window), timed here.
    baseline_calls = [("/admin/usage/" + r, {"days": "3660"}) for r in real["report"][:5]]
    baseline_calls.append(("/admin/metrics", {"window": "3660d"}))
    timings = []
    for _ in range(3):
        for path, params in baseline_calls:
            started = time.perf_counter()
            assert admin_get(gw, path, **params).status_code == 200
            timings.append(time.perf_counter() - started)
    allowed = 20 * max(statistics.median(timings), 0.01) + 1.0  # generous: a loaded machine, a GC pause
    client = httpx.Client(timeout=60)

    @st.composite
    def calls(draw):
        method, template, query_names, body_names = draw(st.sampled_from(ADMIN_ROUTES))
        path = template
        for name in ("report", "workspace", "user", "key", "budget"):
            if "{" + name + "}" in path:
                path = path.replace("{" + name + "}", urllib.parse.quote(draw(_ident(real[name])), safe=""))
        query = {name: draw(NUMBER_TEXT | _ident(real.get(name, ["x"])))
                 for name in query_names if draw(st.booleans())}
        body = {name: draw(JSON_VALUE) for name in body_names if draw(st.booleans())}
        token = draw(st.sampled_from([MASTER_KEY, admin_key]))
        return method, path, query, body, token

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(calls())
    @example(("GET", "/admin/metrics", {"window": "1000000000d"}, {}, MASTER_KEY))  # the 500s found by hand
    @example(("GET", "/admin/metrics", {"window": "1000000000h"}, {}, admin_key))
    @example(("GET", "/admin/usage/top-users", {"limit": "99999999999999999"}, {}, MASTER_KEY))
    @example(("GET", "/admin/users", {"workspace": "\x00"}, {}, MASTER_KEY))
    def never_5xx(call):
        method, path, query, body, token = call
        started = time.perf_counter()
        answer = client.request(method, gw.url + path, params=query, headers={"Authorization": f"Bearer {token}"},
                                content=json.dumps(body) if body else None)
        elapsed = time.perf_counter() - started
        assert answer.status_code < 500, (call, answer.status_code, answer.text)
        if answer.status_code >= 400:
            assert set(answer.json()["error"]) >= {"message", "type", "param", "code"}, answer.text
        assert elapsed <= allowed, (call, elapsed, allowed)

    try:
        never_5xx()
    finally:
        client.close()


def test_a_huge_energy_or_amount_in_an_admin_body_is_a_400(gateway_factory):
    gw = start(gateway_factory)
    user, _ = gw.make_user()
    headers = {"Authorization": f"Bearer {MASTER_KEY}"}
    for body in ({"amount": 10**30}, {"amount": 1e300}, {"amount": 5, "reason": "a\x00b"}):
        answer = httpx.post(gw.url + f"/admin/users/{user}/energy", json=body, headers=headers)
        assert answer.status_code == 400, (body, answer.text)
    answer = httpx.patch(gw.url + "/admin/workspaces/acme", json={"profile": {"a": "\x00"}}, headers=headers)
    assert answer.status_code == 400, answer.text

