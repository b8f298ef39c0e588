"""The dashboard page (GET /dashboard) in a real browser: headless Chromium from Debian's
packages, driven by selenium through chromium-driver.

Usage is seeded by real requests (OpenAI SDK -> gateway -> fake upstream), then the page is
read the way an operator reads it and every number is compared with what the /admin JSON
API answers for the same key.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import MASTER_KEY
from tests.test_accounting import HELLO, start, usage_rows

PRICING = {"input_per_million": 1000, "output_per_million": 2000}
THRESHOLD = 1.0
WAIT = 20  # seconds for the page to sign in and render


def find_chromium() -> tuple[str, str] | None:
    """(chromium, chromedriver); installs Debian's packages when missing and we may."""
    def found() -> tuple[str, str] | None:
        browser = shutil.which("chromium") or shutil.which("chromium-browser")
        driver = shutil.which("chromedriver")
        return (browser, driver) if browser and driver else None

    if found() is None and shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", "chromium", "chromium-driver"],
                       capture_output=True, timeout=600, check=False)
    return found()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    webdriver = pytest.importorskip("selenium.webdriver")
    paths = find_chromium()
    if paths is None:
        pytest.skip("chromium and chromium-driver are not installed and could not be installed (apt-get)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = paths[0]
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1280,2400", f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=paths[1]))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture
def seeded(gateway_factory, upstream):
    """Two workspaces with traffic: acme (a pro user with gpt-4o and demo calls, a user out of
    energy) and globex (one gpt-4o-mini call), and an admin key for acme."""
    gw = start(gateway_factory, upstream, plugins=["metrics", "request_log", "auth", "workspace_prompt",
                                                   "idempotency", "tier_policy", "energy",
                                                   {"name": "accounting", "settings": {"flush_interval": 0.05}}],
               pricing=PRICING, reports={"weekly_cost_threshold_usd": THRESHOLD})
    acme_user, acme_key = gw.make_user(workspace="acme", energy=100)
    broke_user, broke_key = gw.make_user(workspace="acme", energy=0)
    globex_user, globex_key = gw.make_user(workspace="globex", energy=50)
    _, acme_admin_key = gw.make_user(workspace="acme", role="workspace_admin", energy=0)
    gw.client(acme_key).chat.completions.create(model="gpt-4o", messages=HELLO)
    gw.client(acme_key).chat.completions.create(model="gpt-4o", messages=HELLO)
    gw.client(acme_key).chat.completions.create(model="demo", messages=HELLO)
    with pytest.raises(openai.RateLimitError):
        gw.client(broke_key).chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    gw.client(globex_key).chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    usage_rows(gw, 5)
    return gw, {"acme_user": acme_user, "broke_user": broke_user, "globex_user": globex_user,
                "acme_admin_key": acme_admin_key, "user_key": acme_key}


def api(gw: Any, key: str, path: str) -> Any:
    response = httpx.get(gw.url + path, headers={"Authorization": f"Bearer {key}"}, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def sign_in(driver: Any, gw: Any, key: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(gw.url + "/dashboard")
    driver.execute_script("sessionStorage.clear()")
    driver.find_element(By.ID, "key").send_keys(key)
    driver.find_element(By.ID, "signin-button").click()
    WebDriverWait(driver, WAIT).until(
        lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-refreshed-at")
        or d.find_element(By.ID, "signin-error").is_displayed())


def text(driver: Any, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id).text.strip()


def table(driver: Any, table_id: str) -> list[list[str]]:
    from selenium.webdriver.common.by import By

    rows = driver.find_elements(By.CSS_SELECTOR, f"#{table_id} tbody tr")
    return [[td.text.strip() for td in row.find_elements(By.TAG_NAME, "td")] for row in rows]


def number(shown: str) -> float:
    """The number in '$1,234.5', '12.50%', '3.2 ms' or '1,024'."""
    assert shown != "—", "expected a number, the page shows none"
    return float(re.sub(r"[$,%]|\sms$", "", shown))


def pick(obj: dict[str, Any], names: list[str]) -> Any:
    """The page's own rule for fields added later under one of several names."""
    for name in names:
        value: Any = obj
        for part in name.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is not None:
            return value
    return None


def assert_totals_match(driver: Any, metrics: dict[str, Any], live: dict[str, Any]) -> None:
    assert number(text(driver, "total-requests")) == metrics["totalRequests"]
    assert number(text(driver, "total-tokens")) == metrics["totalTokens"]
    assert number(text(driver, "total-cost")) == pytest.approx(metrics["totalCost"], abs=1e-9)
    assert number(text(driver, "unbilled-calls")) == metrics["unbilledCalls"]
    assert number(text(driver, "unbilled-cost")) == pytest.approx(metrics["unbilledCostUsd"], abs=1e-9)
    assert text(driver, "error-rate") == f"{metrics['errorRate'] * 100:.2f}%"
    assert text(driver, "cache-hit-rate") == f"{metrics['cacheHitRate'] * 100:.2f}%"
    assert number(text(driver, "saved-usd")) == pytest.approx(metrics["savedUsd"], abs=1e-9)
    assert number(text(driver, "latency-avg")) == pytest.approx(metrics["averageLatency"], abs=0.006)
    later = {"latency-p50": ["latencyP50", "latencyP50Ms", "p50Latency", "latency_p50_ms", "latency.p50", "latencyMs.p50"],
             "latency-p95": ["latencyP95", "latencyP95Ms", "p95Latency", "latency_p95_ms", "latency.p95", "latencyMs.p95"],
             "energy-spent": ["energySpent", "energy_spent", "energy.spent", "totalEnergy"],
             "energy-refunded": ["energyRefunded"], "downgrades": ["downgrades"], "retries": ["retries"]}
    for element_id, names in later.items():  # fields being added to /admin/metrics: a number, or "—"
        value = pick(metrics, names)
        if value is None:
            assert text(driver, element_id) == "—"
        else:
            assert number(text(driver, element_id)) == pytest.approx(value, abs=0.006)
    if live["inFlight"] is None:
        assert text(driver, "inflight") == "—"
    else:
        assert number(text(driver, "inflight")) == live["inFlight"]


def test_the_master_key_sees_every_workspace_with_the_apis_numbers(browser, seeded, tmp_path):
    """Signed in with the master key, every number on the page equals the API's for the same window."""
    gw, ids = seeded
    sign_in(browser, gw, MASTER_KEY)
    assert browser.find_element("id", "app").is_displayed()
    assert text(browser, "whoami") == "master key: every workspace"

    metrics = api(gw, MASTER_KEY, "/admin/metrics?window=24h")
    live = api(gw, MASTER_KEY, "/admin/dashboard/live")
    assert metrics["totalRequests"] == 5 and live["inFlight"] == 0
    assert_totals_match(browser, metrics, live)

    daily = api(gw, MASTER_KEY, "/admin/usage/daily?days=1")["rows"]
    assert [[r[0], *map(number, r[1:])] for r in table(browser, "daily-table")] == [
        [d["date"], d["requests"], d["errors"], d["tokens"], pytest.approx(d["cost_usd"], abs=1e-9), d["cache_hits"],
         pytest.approx(d["saved_usd"], abs=1e-9)] for d in daily]
    assert browser.find_elements("css selector", "#daily-chart canvas"), "the chart is drawn"

    models = {r[0]: number(r[1]) for r in table(browser, "models-table")}
    assert models == metrics["modelDistribution"]
    assert {r[0]: number(r[1]) for r in table(browser, "providers-table")} == metrics["providerDistribution"]

    # /admin/metrics' topUsers (tier and balance included) when it has them, else the report.
    top = metrics.get("topUsers") or api(gw, MASTER_KEY, "/admin/usage/top-users?days=1&limit=10")["rows"]
    users = {u["id"]: u for u in api(gw, MASTER_KEY, "/admin/users")}
    shown = table(browser, "users-table")
    assert [r[0] for r in shown] == [t["user_id"] for t in top]
    for row, expected in zip(shown, top):
        user = users[expected["user_id"]]
        tier, balance = expected.get("tier", user["tier"]), expected.get("balance", user["energy"])
        assert (tier, balance) == (user["tier"], user["energy"])
        assert row[2:] == [tier, f"{balance:,}", f"{expected['requests']:,}", f"{expected['tokens']:,}",
                           f"{expected['energy']:,}", row[7]]
        assert number(row[7]) == pytest.approx(expected["cost_usd"], abs=1e-9)
    assert {r[1] for r in shown} == {"acme", "globex"}

    balances = metrics.get("workspaceBalances")
    if balances is not None:  # added to /admin/metrics with the reports in the database
        assert [(r[0], number(r[1]), number(r[2])) for r in table(browser, "balances-table")] == [
            (b["name"], b["users"], b["energy"]) for b in balances]

    actions = api(gw, MASTER_KEY, "/admin/usage/actions?days=1")["rows"]
    assert [(r[0], number(r[1]), number(r[3])) for r in table(browser, "actions-table")] == [
        (a["action"], a["count"], pytest.approx(a["total_cost_usd"], abs=1e-9)) for a in actions]

    weekly = api(gw, MASTER_KEY, "/admin/usage/weekly?days=28")["rows"]
    assert [(r[0], number(r[2]), number(r[3])) for r in table(browser, "weekly-table")] == [
        (w["week"], pytest.approx(w["cost_usd"], abs=1e-9), THRESHOLD) for w in weekly]

    errors = table(browser, "errors-table")
    assert [(r[1], r[2], r[4]) for r in errors] == [("429", "insufficient_energy", ids["broke_user"])]
    assert errors[0][6] == live["recentErrors"][0]["request_id"]

    screenshot = tmp_path / "dashboard-master.png"
    assert browser.save_screenshot(str(screenshot))
    assert screenshot.stat().st_size > 10_000


def test_unbilled_calls_are_shown_next_to_the_total_cost(browser, gateway_factory, upstream):
    """A dispatch whose overlapped reservation lost (another process spent the balance) is
    on the page: how many such calls, and their USD, which the total cost includes."""
    from tests.test_unbilled_calls import spend_behind_the_gateways_back

    gw = start(gateway_factory, upstream, plugins=["auth", "energy",
                                                   {"name": "accounting", "settings": {"flush_interval": 0.05}}],
               pricing=PRICING)
    user_id, key = gw.make_user(energy=4)
    gw.client(key).chat.completions.create(model="gpt-4o-mini", messages=HELLO)  # 2 energy; 2 left, seen
    spend_behind_the_gateways_back(gw, user_id, 2)
    with pytest.raises(openai.RateLimitError):
        gw.client(key).chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    usage_rows(gw, 2)
    sign_in(browser, gw, MASTER_KEY)
    metrics = api(gw, MASTER_KEY, "/admin/metrics?window=24h")
    assert metrics["unbilledCalls"] == 1 and metrics["unbilledCostUsd"] > 0
    assert text(browser, "unbilled-calls") == "1"
    assert number(text(browser, "unbilled-cost")) == pytest.approx(metrics["unbilledCostUsd"], abs=1e-9)
    assert number(text(browser, "total-cost")) == pytest.approx(metrics["totalCost"], abs=1e-9)


def test_the_latency_percentiles_say_when_they_are_approximate(browser, gateway_factory, upstream):
    """The page shows the API's percentiles (the fine histogram: within 4%), and marks them
    approximate while the window reaches history its backfill has not added yet."""
    import asyncio

    from tests.test_latency_percentiles import forget_histogram

    gw = gateway_factory()
    now = time.time()
    rows = [{"request_id": f"r{i}", "latency_ms": 1500 + 7 * i, "ttfb_ms": 200 + i, "created_at": now - 60 * i}
            for i in range(200)]
    assert gw.run(gw.store.insert_usage(rows)) == 200
    sign_in(browser, gw, MASTER_KEY)
    metrics = api(gw, MASTER_KEY, "/admin/metrics?window=24h")
    assert metrics["percentilesApproximate"] is False
    for element_id, field in (("latency-p50", "latencyP50"), ("latency-p95", "latencyP95"),
                              ("latency-p99", "latencyP99"), ("ttfb-p50", "ttfbP50")):
        assert number(text(browser, element_id)) == pytest.approx(metrics[field], abs=0.006)
        assert "approximate" not in browser.find_element("id", element_id).get_attribute("class")
        assert browser.find_element("id", element_id).get_attribute("title") == "within 4% of the exact value"

    asyncio.run(forget_histogram(gw.config.store.url))  # as a store upgraded with history looks
    browser.execute_script("sessionStorage.clear()")  # signed out: the page loads afresh
    sign_in(browser, gw, MASTER_KEY)
    metrics = api(gw, MASTER_KEY, "/admin/metrics?window=24h")
    assert metrics["percentilesApproximate"] is True
    shown = browser.find_element("id", "latency-p95")
    assert number(shown.text) == pytest.approx(metrics["latencyP95"], abs=0.006)
    assert "approximate" in shown.get_attribute("class") and shown.get_attribute("title").startswith("approximate")


def test_a_workspace_admin_sees_only_its_own_workspace(browser, seeded, tmp_path):
    """An acme admin key: acme's numbers, never a globex user or globex's traffic."""
    gw, ids = seeded
    key = ids["acme_admin_key"]
    sign_in(browser, gw, key)
    assert browser.find_element("id", "app").is_displayed()
    assert not browser.find_element("id", "workspace-control").is_displayed()

    metrics = api(gw, key, "/admin/metrics?window=24h")
    live = api(gw, key, "/admin/dashboard/live")
    assert metrics["totalRequests"] == 4 and live["inFlight"] is None
    assert_totals_match(browser, metrics, live)
    assert "gpt-4o-mini" in metrics["modelDistribution"]  # the broke user's refused request
    shown_users = [r[0] for r in table(browser, "users-table")]
    assert ids["acme_user"] in shown_users and ids["globex_user"] not in shown_users
    assert ids["globex_user"] not in browser.page_source
    assert "globex" not in browser.page_source
    browser.save_screenshot(str(tmp_path / "dashboard-workspace-admin.png"))
    assert (tmp_path / "dashboard-workspace-admin.png").stat().st_size > 10_000


def test_a_bad_key_gets_a_clear_message_and_no_dashboard(browser, seeded):
    gw, ids = seeded
    sign_in(browser, gw, "gw-not-a-real-key")
    assert not browser.find_element("id", "app").is_displayed()
    message = text(browser, "signin-error")
    assert message.startswith("That key was not accepted") and "master key or a workspace admin key" in message
    assert browser.execute_script("return sessionStorage.length") == 0

    sign_in(browser, gw, ids["user_key"])
    assert not browser.find_element("id", "app").is_displayed()
    assert text(browser, "signin-error").startswith("That key is not an admin key")


def test_the_page_loads_nothing_from_outside_the_gateway(browser, seeded):
    """No CDN, no network at run time: every resource the page fetched came from the gateway."""
    gw, _ = seeded
    sign_in(browser, gw, MASTER_KEY)
    urls = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert any(u.endswith("/uPlot.iife.min.js") for u in urls)
    assert all(u.startswith(gw.url + "/") for u in urls), urls


def test_the_page_refreshes_itself(browser, seeded):
    """A request made after sign-in shows up without a reload (here every second: ?refresh=1)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    gw, ids = seeded
    browser.get(gw.url + "/dashboard?refresh=1")
    browser.execute_script("sessionStorage.clear()")
    browser.find_element(By.ID, "key").send_keys(MASTER_KEY)
    browser.find_element(By.ID, "signin-button").click()
    WebDriverWait(browser, WAIT).until(lambda d: text(d, "total-requests") == "5")
    gw.client(ids["user_key"]).chat.completions.create(model="demo", messages=HELLO)
    usage_rows(gw, 6)
    WebDriverWait(browser, WAIT).until(lambda d: text(d, "total-requests") == "6")


@pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)
def test_live_answers_recent_errors_newest_first_and_scoped_to_the_workspace(gateway_factory, upstream):
    """GET /admin/dashboard/live (no browser): errors newest first with ISO times; the
    in-flight count for the master key only; another workspace's admin sees none of them."""
    gw = start(gateway_factory, upstream)
    broke_user, broke_key = gw.make_user(workspace="acme", energy=0)
    _, globex_admin = gw.make_user(workspace="globex", role="workspace_admin", energy=0)
    for model in ("gpt-4o-mini", "demo"):
        with pytest.raises(openai.RateLimitError):
            gw.client(broke_key).chat.completions.create(model=model, messages=HELLO)
    usage_rows(gw, 2)
    live = api(gw, MASTER_KEY, "/admin/dashboard/live")
    assert live["inFlight"] == 0 and live["scope"] == "master"
    assert [(e["model"], e["status"], e["error_type"], e["user_id"]) for e in live["recentErrors"]] == [
        ("demo", 429, "insufficient_energy", broke_user), ("gpt-4o-mini", 429, "insufficient_energy", broke_user)]
    assert all(re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$", e["created_at"]) for e in live["recentErrors"])
    other = api(gw, globex_admin, "/admin/dashboard/live")
    assert (other["inFlight"], other["recentErrors"], other["scope"]) == (None, [], "workspace_admin")
    assert httpx.get(gw.url + "/admin/dashboard/live", timeout=10).status_code == 401


# ------------------------------------------------- the response cache and the experiments panel

DRAFTS = {"name": "drafts", "match": {"actions": ["email_draft"]}, "variants": [
    {"name": "current", "weight": 50},
    {"name": "mini", "weight": 50, "model": "gpt-4o-mini", "params": {"temperature": 0.3}}]}
RATINGS = {"current": {"good": [1, 0, 1, 1], "reply_sent": [1, 1, 0, 1]}, "mini": {"good": [0, 0, 1], "reply_sent": [1]}}


@pytest.fixture
def cached_and_experimented(gateway_factory, upstream):
    """acme: a gpt-4o-mini question asked three times (one miss, two cache hits, the upstream
    reporting cached and reasoning tokens) and the `drafts` experiment's traffic with feedback
    (`reply_sent` asked once of `mini`: no interval); a globex admin."""
    from tests.test_experiments import ask, users_in_both_variants

    upstream.prompt_tokens, upstream.completion_tokens = 1000, 400
    upstream.cached_tokens, upstream.reasoning_tokens = 300, 120
    gw = gateway_factory(plugins=["auth", "experiments", "tier_policy",
                                  {"name": "cache", "settings": {"models": ["gpt-4o-mini"]}}, "energy",
                                  {"name": "accounting", "settings": {"flush_interval": 0.05}}],
                         experiments=[DRAFTS])
    _, asker = gw.make_user(workspace="acme")
    served = [gw.client(asker).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=HELLO, temperature=0).headers["X-Cache"] for _ in range(3)]
    assert served == ["MISS", "HIT", "HIT"]
    users = users_in_both_variants(gw)
    for variant, metrics in RATINGS.items():
        key = users[variant][1]
        request_ids = [ask(gw, key).headers["X-Request-Id"] for _ in range(max(map(len, metrics.values())))]
        for metric, values in metrics.items():
            for request_id, value in zip(request_ids, values):
                httpx.post(gw.url + "/v1/feedback", json={"request_id": request_id, "metric": metric, "value": value},
                           headers={"Authorization": f"Bearer {key}"}, timeout=10).raise_for_status()
    gw.settle()
    _, acme_admin = gw.make_user(workspace="acme", role="workspace_admin", energy=0)
    _, globex_admin = gw.make_user(workspace="globex", role="workspace_admin", energy=0)
    return gw, {"acme_admin": acme_admin, "globex_admin": globex_admin}


def stat(shown: str) -> float | None:
    return None if shown == "—" else float(shown.replace(",", "").lstrip("+"))


def interval(shown: str) -> list[float | None]:
    assert shown.startswith("[") and shown.endswith("]"), shown
    return [stat(part) for part in shown[1:-1].split(", ")]  # "1,234.5": a comma without a space


def experiments_panel(driver: Any) -> dict[str, Any]:
    """What the Experiments panel shows: {experiment: {"control": ..., "variants": {variant:
    {"usage": [cells], metric: {"mean", "ci95", "n"} and f"{metric} diff": ...}}}}."""
    from selenium.webdriver.common.by import By

    panel = {}
    for box in driver.find_elements(By.CSS_SELECTOR, "#experiments .experiment"):
        headers = [th.text.strip() for th in box.find_elements(By.CSS_SELECTOR, "thead th")]
        variants = {}
        for row in box.find_elements(By.CSS_SELECTOR, "tbody tr"):
            cells = row.find_elements(By.TAG_NAME, "td")
            shown: dict[str, Any] = {"usage": [td.text.strip() for td in cells[:8]]}
            for header, td in zip(headers[8:], cells[8:]):
                metric, _, kind = header.partition(" ")
                spans = {s.get_attribute("class"): s.text.strip() for s in td.find_elements(By.TAG_NAME, "span")
                         if s.get_attribute("class")}
                if kind.startswith("mean"):
                    shown[metric] = None if td.text.strip() == "—" else {
                        "mean": stat(spans["mean"]), "ci95": interval(spans["ci"]), "n": int(spans["n"][2:])}
                else:
                    shown[metric + " diff"] = td.text.strip() if not spans else {
                        "diff": stat(spans["diff"]), "ci95": interval(spans["ci"])}
            variants[shown["usage"][0]] = shown
        title = box.find_element(By.TAG_NAME, "h3").text
        panel[box.get_attribute("data-experiment")] = {"control": title.rsplit("control: ", 1)[-1], "variants": variants}
    return panel


def sign_in_again(driver: Any, gw: Any, key: str) -> None:
    """sign_in on a gateway this tab may already be signed in to (the page would sign in
    with the stored key as it loads)."""
    if driver.current_url.startswith(gw.url):
        driver.execute_script("sessionStorage.clear()")
    sign_in(driver, gw, key)


def four(value: float | None) -> Any:
    """The page shows feedback statistics to 4 decimals."""
    return None if value is None else pytest.approx(value, abs=5e-5)


def test_the_experiments_panel_shows_the_reports_numbers_per_variant(browser, cached_and_experimented, tmp_path):
    """Each variant's usage and each feedback metric's mean [95% CI] n and its difference to
    the control, as GET /admin/usage/experiments answers them (no interval: "—")."""
    gw, keys = cached_and_experimented
    sign_in(browser, gw, MASTER_KEY)
    (report,) = api(gw, MASTER_KEY, "/admin/usage/experiments?days=1")["rows"]
    panel = experiments_panel(browser)
    assert list(panel) == ["drafts"] and panel["drafts"]["control"] == report["control"] == "current"
    shown = panel["drafts"]["variants"]
    assert list(shown) == [v["variant"] for v in report["variants"]] == ["current", "mini"]
    for variant in report["variants"]:
        row = shown[variant["variant"]]
        usage = row["usage"]
        assert [number(c) for c in usage[1:5]] == [variant["requests"], pytest.approx(variant["cost_usd"], abs=1e-9),
                                                   variant["energy"], variant["tokens"]]
        assert [number(usage[5]), number(usage[6])] == [variant["latency_p50_ms"], variant["latency_p95_ms"]]
        assert usage[7] == f"{variant['error_rate'] * 100:.2f}%"
        assert sorted(variant["feedback"]) == ["good", "reply_sent"]
        for metric, stats in variant["feedback"].items():
            assert row[metric] == {"mean": four(stats["mean"]), "ci95": [four(x) for x in stats["ci95"]],
                                   "n": stats["n"]}
            if variant["variant"] == report["control"]:
                assert row[metric + " diff"] == "control"
            else:
                vs = stats["vs_control"]
                assert row[metric + " diff"] == {"diff": four(vs["diff"]), "ci95": [four(x) for x in vs["ci95"]]}
    mini = shown["mini"]
    assert mini["good"]["n"] == 3 and mini["good"]["mean"] == four(1 / 3)
    assert mini["good diff"]["diff"] == four(1 / 3 - 3 / 4)
    assert mini["reply_sent"]["ci95"] == [None, None]  # one value: no interval
    browser.find_element("id", "experiments-section").screenshot(str(tmp_path / "experiments.png"))
    assert (tmp_path / "experiments.png").stat().st_size > 5_000


def test_the_cache_savings_and_experiments_are_per_workspace(browser, cached_and_experimented):
    """The saved USD card is what the two hits would have cost (the miss's cost twice); a
    workspace admin sees its own workspace's savings and experiments, another's none."""
    gw, keys = cached_and_experimented
    miss = next(r for r in gw.run(gw.store.usage_rows()) if r["model"] == "gpt-4o-mini" and not r["cache_hit"]
                and r["experiment"] is None)
    for key in (MASTER_KEY, keys["acme_admin"]):
        sign_in_again(browser, gw, key)
        metrics = api(gw, key, "/admin/metrics?window=24h")
        assert metrics["savedUsd"] == float(2 * miss["cost_usd"]) > 0 and metrics["cacheHits"] == 2
        assert_totals_match(browser, metrics, api(gw, key, "/admin/dashboard/live"))
        assert list(experiments_panel(browser)) == ["drafts"]
    sign_in_again(browser, gw, keys["globex_admin"])
    assert text(browser, "saved-usd") == "$0.00" and text(browser, "cache-hit-rate") == "0.00%"
    assert experiments_panel(browser) == {}
    assert text(browser, "experiments") == "no experiment traffic in this window"
