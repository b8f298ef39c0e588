"""The console: managing the gateway from the dashboard page (docs/admin.md "Managing from
the page"), in Debian's headless Chromium driven by selenium, against a live gateway and a
real store.

Every action is taken on the page the way an operator takes it (forms, buttons, the
confirmation dialog) and then checked where it lands: the /admin API, the audit log, and a
real OpenAI SDK client using the key the page showed. A workspace admin is held to its
workspace on the page and, by editing requests, on the API; stored-XSS payloads in every
user-controlled field come back as text and never run.
"""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import MASTER_KEY
from tests.test_accounting import COMPLETION, HELLO, PROMPT, models, usage_rows
from tests import test_dashboard
from tests.test_dashboard import sign_in

browser = test_dashboard.browser  # the same headless Chromium fixture (Debian's chromium + chromedriver)

WAIT = 20
BOTH = pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)
XSS = "<img src=x onerror=window.__xss=1>"
CHAIN = ["auth", "tier_policy", "energy", {"name": "accounting", "settings": {"flush_interval": 0.05}}]


def call(gw: Any, method: str, path: str, key: str = MASTER_KEY, **kw: Any) -> httpx.Response:
    return httpx.request(method, gw.url + path, headers={"Authorization": f"Bearer {key}"}, timeout=30, **kw)


def ok(answer: httpx.Response) -> Any:
    assert answer.status_code in (200, 201), answer.text
    return answer.json()


def audit_actions(gw: Any, key: str = MASTER_KEY) -> list[str]:
    return [row["action"] for row in ok(call(gw, "GET", "/admin/audit", key, params={"limit": 1000}))]


@pytest.fixture
def console(gateway_factory, upstream):
    """acme (a user with traffic, a workspace admin) and globex (a user, a workspace admin);
    one configured model is named like an XSS payload (what an operator types is data too)."""
    upstream.prompt_tokens, upstream.completion_tokens = PROMPT, COMPLETION
    energy = {"default_action": "ai_message",
              "actions": {"ai_message": {"default": 1, "models": {"gpt-4o": 5, "gpt-4o-mini": 2, "demo": 1}},
                          XSS: {"default": 1}}}
    gw = gateway_factory(plugins=CHAIN, energy=energy,
                         models=[*models(upstream), {"name": XSS, "litellm_params": {"model": "demo/offline"}}])
    acme_user, acme_key = gw.make_user(workspace="acme", energy=100)
    globex_user, globex_key = gw.make_user(workspace="globex", energy=50)
    _, acme_admin = gw.make_user(workspace="acme", role="workspace_admin", energy=0)
    _, globex_admin = gw.make_user(workspace="globex", role="workspace_admin", energy=0)
    gw.client(acme_key).chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    gw.client(globex_key).chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    usage_rows(gw, 2)
    return gw, {"acme_user": acme_user, "acme_key": acme_key, "globex_user": globex_user, "globex_key": globex_key,
                "acme_admin": acme_admin, "globex_admin": globex_admin}


# ------------------------------------------------------------------ page helpers


def wait(driver: Any, condition: Any, message: str = "") -> Any:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT, ignored_exceptions=(StaleElementReferenceException,)).until(condition, message)


def go(driver: Any, hash_: str) -> None:
    """Open a console page (#/users, #/users/<id>, ...) and wait until it has loaded."""
    if driver.execute_script("return location.hash") == hash_:
        driver.execute_script("location.hash = '#/'")
        wait(driver, lambda d: d.find_element("tag name", "body").get_attribute("data-view-ready") == "overview")
    driver.execute_script("delete document.body.dataset.viewReady; location.hash = arguments[0]", hash_)
    view = "user" if hash_.startswith("#/users/") else hash_[2:] or "overview"
    wait(driver, lambda d: d.find_element("tag name", "body").get_attribute("data-view-ready") == view, hash_)


def by_id(driver: Any, element_id: str) -> Any:
    return driver.find_element("id", element_id)


def fill(driver: Any, element_id: str, value: str) -> None:
    element = by_id(driver, element_id)
    element.clear()
    element.send_keys(value)


def choose(driver: Any, element_id: str, value: str) -> None:
    from selenium.webdriver.support.ui import Select

    Select(by_id(driver, element_id)).select_by_value(value)


def rows(driver: Any, table_id: str) -> list[list[str]]:
    # One script, one moment: a table re-rendered between reads cannot be half old, half new.
    return driver.execute_script("return [...document.querySelectorAll(arguments[0])]"
                                 ".map((tr) => [...tr.cells].map((td) => td.innerText.trim()))", f"#{table_id} tbody tr")


def status(driver: Any) -> str:
    return by_id(driver, "console-status").text.strip()


def wait_status(driver: Any, startswith: str) -> None:
    wait(driver, lambda d: status(d).startswith(startswith), f"status {startswith!r}; shown: {status(driver)!r}")


def shown_error(driver: Any, element_id: str) -> str:
    wait(driver, lambda d: by_id(d, element_id).is_displayed(), element_id)
    return by_id(driver, element_id).text.strip()


def new_key(driver: Any) -> str:
    """The once-shown key, then 'Done': gone from the page."""
    wait(driver, lambda d: d.find_elements("id", "new-key-value"))
    value = by_id(driver, "new-key-value").get_attribute("value")
    assert value.startswith("gw-")
    by_id(driver, "copy-key").click()
    wait(driver, lambda d: "cop" in d.find_element("css selector", ".secret [role=status]").text)
    by_id(driver, "key-done").click()
    assert not driver.find_elements("id", "new-key-value")
    assert value not in driver.page_source
    return value


def confirm(driver: Any, accept: bool) -> str:
    wait(driver, lambda d: by_id(d, "confirm-dialog").is_displayed())
    message = by_id(driver, "confirm-message").text
    by_id(driver, "confirm-ok" if accept else "confirm-cancel").click()
    wait(driver, lambda d: not by_id(d, "confirm-dialog").is_displayed())
    return message


def key_row(driver: Any, prefix: str) -> list[str]:
    return next(r for r in rows(driver, "keys-table") if r[0] == prefix)


def click_key_action(driver: Any, action: str, key_id: str) -> None:
    driver.find_element("css selector", f'#keys-table button[data-action="{action}"][data-key="{key_id}"]').click()


def answers(gw: Any, key: str, model: str = "gpt-4o-mini") -> bool:
    try:
        gw.client(key).chat.completions.create(model=model, messages=HELLO)
        return True
    except openai.AuthenticationError:
        return False


# ------------------------------------------------------------------ the page, master key


@BOTH
def test_the_master_key_manages_everything_from_the_page(browser, console):
    """Create a workspace and a user (the key shown once and working), grant and adjust
    energy with a reason (a removal confirmed first), change the tier, create a key with
    label, expiry and models, rotate and revoke it (each confirmed); every action is in the
    audit log, made through the API."""
    gw, ids = console
    sign_in(browser, gw, MASTER_KEY)

    go(browser, "#/workspaces")
    assert {r[0] for r in rows(browser, "workspaces-list")} == {"acme", "globex"}
    fill(browser, "new-workspace-name", "initech")
    browser.find_element("css selector", "#create-workspace button").click()
    wait_status(browser, "workspace initech created")
    assert "initech" in [r[0] for r in rows(browser, "workspaces-list")]

    go(browser, "#/users")
    assert {r[0] for r in rows(browser, "users-list")} >= {ids["acme_user"], ids["globex_user"]}
    initech = ok(call(gw, "GET", "/admin/workspaces/initech"))["id"]
    choose(browser, "new-user-workspace", initech)
    fill(browser, "new-user-name", "Ada Lovelace")
    choose(browser, "new-user-tier", "pro")
    fill(browser, "new-user-energy", "5")
    browser.find_element("css selector", "#create-user button[type=submit]").click()
    wait_status(browser, "user ")
    user_id = status(browser).split()[1]
    user_key = new_key(browser)
    assert answers(gw, user_key), "the key the page showed works"
    user = ok(call(gw, "GET", f"/admin/users/{user_id}"))
    assert (user["name"], user["tier"], user["workspace_id"]) == ("Ada Lovelace", "pro", initech)

    go(browser, "#/workspaces")
    browser.find_element("link text", "users of initech").click()
    energy = ok(call(gw, "GET", f"/admin/users/{user_id}"))["energy"]
    wait(browser, lambda d: rows(d, "users-list") == [[user_id, "Ada Lovelace", "initech", "pro", f"{energy:,}", "active"]])

    go(browser, f"#/users/{user_id}")
    assert by_id(browser, "user-title").text == f"Ada Lovelace ({user_id})"
    balance = ok(call(gw, "GET", f"/admin/users/{user_id}"))["energy"]
    fill(browser, "energy-amount", "10")
    fill(browser, "energy-reason", "ticket 42")
    browser.find_element("css selector", "#energy-form button").click()
    wait_status(browser, f"energy of {user_id} is now {balance + 10}")
    assert rows(browser, "ledger-table")[0][1:5] == ["grant", "+10", f"{balance + 10}", "ticket 42"]

    choose(browser, "energy-kind", "adjust")
    fill(browser, "energy-amount", "-3")
    fill(browser, "energy-reason", "refund reversed")
    browser.find_element("css selector", "#energy-form button").click()
    assert "Remove 3 energy" in confirm(browser, accept=False)
    wait_status(browser, "nothing changed")
    assert gw.balance(user_id) == balance + 10
    browser.find_element("css selector", "#energy-form button").click()
    confirm(browser, accept=True)
    wait_status(browser, f"energy of {user_id} is now {balance + 7}")
    assert gw.balance(user_id) == balance + 7
    assert rows(browser, "ledger-table")[0][1:5] == ["adjust", "-3", f"{balance + 7}", "refund reversed"]

    choose(browser, "tier-select", "free")
    browser.find_element("css selector", "#tier-form button").click()
    wait_status(browser, f"tier of {user_id} set to free")
    assert ok(call(gw, "GET", f"/admin/users/{user_id}"))["tier"] == "free"
    assert browser.find_element("css selector", '[data-fact="Tier"]').text == "free"

    fill(browser, "key-label", "ci runner")
    fill(browser, "key-expires", "30d")
    browser.find_element("css selector", '#key-models input[value="gpt-4o-mini"]').click()
    browser.find_element("css selector", "#key-form button[type=submit]").click()
    wait_status(browser, "key ")
    second_key = new_key(browser)
    created = next(k for k in ok(call(gw, "GET", "/admin/keys", params={"user": user_id})) if k["label"] == "ci runner")
    assert created["models"] == ["gpt-4o-mini"] and created["expires_at"] is not None
    row = key_row(browser, created["prefix"])
    assert row[1] == "ci runner" and row[5] == "gpt-4o-mini" and row[6] == "live" and row[4] != "never"
    assert answers(gw, second_key)
    with pytest.raises(openai.APIStatusError):  # the key's models narrow the tier's
        gw.client(second_key).chat.completions.create(model="demo", messages=HELLO)

    click_key_action(browser, "rotate", created["id"])
    assert "Rotate key" in confirm(browser, accept=True)
    wait_status(browser, f"key {created['prefix']}… rotated")
    rotated_key = new_key(browser)
    assert not answers(gw, second_key) and answers(gw, rotated_key)
    rotated = next(k for k in ok(call(gw, "GET", "/admin/keys", params={"user": user_id}))
                   if k["label"] == "ci runner" and k["revoked_at"] is None)
    assert rotated["models"] == ["gpt-4o-mini"]

    click_key_action(browser, "revoke", rotated["id"])
    assert "cannot be undone" in confirm(browser, accept=False)
    wait_status(browser, "nothing changed")
    assert answers(gw, rotated_key)
    click_key_action(browser, "revoke", rotated["id"])
    confirm(browser, accept=True)
    wait_status(browser, f"key {rotated['prefix']}… revoked")
    assert key_row(browser, rotated["prefix"])[6].startswith("revoked")
    assert not answers(gw, rotated_key)

    first = next(k for k in ok(call(gw, "GET", "/admin/keys", params={"user": user_id})) if k["label"] is None)
    click_key_action(browser, "edit", first["id"])
    wait(browser, lambda d: by_id(d, "key-edit-form").is_displayed())
    fill(browser, "key-edit-label", "laptop")
    fill(browser, "key-edit-expires", "12h")
    browser.find_element("css selector", '#key-edit-models input[value="demo"]').click()
    browser.find_element("css selector", "#key-edit-form button[type=submit]").click()
    wait_status(browser, f"key {first['prefix']}… updated")
    edited = next(k for k in ok(call(gw, "GET", "/admin/keys", params={"user": user_id})) if k["id"] == first["id"])
    assert (edited["label"], edited["models"]) == ("laptop", ["demo"]) and edited["expires_at"] is not None
    assert key_row(browser, first["prefix"])[1:2] == ["laptop"] and key_row(browser, first["prefix"])[5] == "demo"
    click_key_action(browser, "edit", first["id"])
    assert by_id(browser, "key-edit-label").get_attribute("value") == "laptop"
    fill(browser, "key-edit-label", "")
    by_id(browser, "key-edit-never").click()
    browser.find_element("css selector", '#key-edit-models input[value="demo"]').click()  # none ticked: the tier's
    browser.find_element("css selector", "#key-edit-form button[type=submit]").click()
    wait_status(browser, f"key {first['prefix']}… updated")
    edited = next(k for k in ok(call(gw, "GET", "/admin/keys", params={"user": user_id})) if k["id"] == first["id"])
    assert (edited["label"], edited["models"], edited["expires_at"]) == (None, None, None)
    assert answers(gw, user_key)

    actions = audit_actions(gw)
    assert actions.count("key.update") == 2
    for action in ("workspace.create", "user.create", "energy.grant", "energy.adjust", "user.set_tier",
                   "key.create", "key.rotate", "key.revoke"):
        assert action in actions, action
    assert actions.count("energy.adjust") == 1 and actions.count("key.revoke") == 1  # the cancelled ones did nothing
    go(browser, "#/audit")
    shown = rows(browser, "audit-table")
    assert [r[3] for r in shown][:10] == ["key.update", "key.update", "key.revoke", "key.rotate", "key.create", "user.set_tier", "energy.adjust",
                                         "energy.grant", "user.create", "workspace.create"]
    assert all(r[1] == "master" and r[2] == "api" for r in shown[:10])
    change = {r[3]: r[6] for r in shown}
    assert "tier: pro → free" in change["user.set_tier"].splitlines()
    assert {"amount: 10", "reason: ticket 42", f"energy: {balance} → {balance + 10}"} <= set(change["energy.grant"].splitlines())
    assert "label: ci runner" in change["key.create"].splitlines()
    for secret in (user_key, second_key, rotated_key):
        assert secret not in browser.page_source


def test_a_users_page_shows_its_last_requests_and_search_finds_users(browser, console):
    """Last requests: time, status, model, tokens, cost, energy, latency from the usage log
    (never content); search by name, id and key prefix."""
    gw, ids = console
    with pytest.raises(openai.APIStatusError):
        gw.client(ids["acme_key"]).chat.completions.create(model="not-a-model", messages=HELLO)
    gw.settle()
    logged = ok(call(gw, "GET", f"/admin/users/{ids['acme_user']}/requests"))
    sign_in(browser, gw, MASTER_KEY)
    go(browser, f"#/users/{ids['acme_user']}")
    shown = rows(browser, "requests-table")
    assert len(shown) == len(logged) >= 1
    for row, entry in zip(shown, logged):
        assert row[2] == (entry["model"] or "—") and row[8] == entry["request_id"]
        if entry["error_type"] is None:
            assert row[1] == "200" and row[4] == f"{PROMPT + COMPLETION:,}" and row[5].startswith("$")
            assert row[6] == f"{entry['energy_cost']:,}" and row[7] == f"{entry['latency_ms']:,} ms"
    assert "hi" not in [cell for row in shown for cell in row]  # the prompt is never stored nor shown

    acme_prefix = next(k["prefix"] for k in ok(call(gw, "GET", "/admin/keys", params={"user": ids["acme_user"]})))
    ok(call(gw, "POST", "/admin/users", json={"workspace": "acme", "name": "Grace Hopper"}))
    go(browser, "#/users")
    for query, expected in (("grace", "Grace Hopper"), (ids["globex_user"], ids["globex_user"]),
                            (acme_prefix, ids["acme_user"])):
        fill(browser, "user-search", query)
        browser.find_element("css selector", "#user-search-form button[type=submit]").click()
        wait(browser, lambda d: [r for r in rows(d, "users-list") if expected in r[:2]] and len(rows(d, "users-list")) == 1,
             query)
    fill(browser, "user-search", "nobody-by-that-name")
    browser.find_element("css selector", "#user-search-form button[type=submit]").click()
    wait(browser, lambda d: rows(d, "users-list") == [["no user found"]])


def test_api_errors_are_shown_in_place(browser, console):
    gw, ids = console
    sign_in(browser, gw, MASTER_KEY)
    go(browser, "#/workspaces")
    fill(browser, "new-workspace-name", "acme")
    browser.find_element("css selector", "#create-workspace button").click()
    assert shown_error(browser, "create-workspace-error") == "workspace 'acme' already exists (HTTP 409)"
    fill(browser, "new-workspace-name", "Not A Name")
    browser.find_element("css selector", "#create-workspace button").click()
    wait(browser, lambda d: "lowercase" in by_id(d, "create-workspace-error").text)

    go(browser, f"#/users/{ids['acme_user']}")
    fill(browser, "energy-amount", "-5")
    browser.find_element("css selector", "#energy-form button").click()  # a grant must be positive
    assert "a grant must be a positive amount" in shown_error(browser, "energy-error")
    choose(browser, "energy-kind", "adjust")
    fill(browser, "energy-amount", "-1000000")
    browser.find_element("css selector", "#energy-form button").click()
    confirm(browser, accept=True)
    wait(browser, lambda d: "balance would go below zero" in by_id(d, "energy-error").text)
    fill(browser, "key-expires", "soon")
    browser.find_element("css selector", "#key-form button[type=submit]").click()
    assert "expires must be a duration" in shown_error(browser, "key-error")

    go(browser, "#/users/usr_does_not_exist")
    assert shown_error(browser, "user-error") == "unknown user 'usr_does_not_exist' (HTTP 404)"


# ------------------------------------------------------------------ a workspace admin


def test_a_workspace_admin_manages_its_workspace_and_sees_no_other_on_the_page(browser, console):
    gw, ids = console
    sign_in(browser, gw, ids["acme_admin"])
    assert browser.find_element("tag name", "body").get_attribute("data-scope") == "workspace_admin"

    go(browser, "#/users")
    listed = {r[0] for r in rows(browser, "users-list")}
    assert ids["acme_user"] in listed and ids["globex_user"] not in listed
    assert [o.text for o in by_id(browser, "new-user-workspace").find_elements("tag name", "option")] == ["acme"]
    assert not by_id(browser, "new-user-tier").is_displayed() and not by_id(browser, "new-user-energy").is_displayed()
    fill(browser, "new-user-name", "New Hire")
    browser.find_element("css selector", "#create-user button[type=submit]").click()
    wait_status(browser, "user ")
    hire = status(browser).split()[1]
    assert answers(gw, new_key(browser), model="demo")
    assert ok(call(gw, "GET", f"/admin/users/{hire}"))["workspace_id"] == ok(call(gw, "GET", "/admin/workspaces/acme"))["id"]

    fill(browser, "user-search", ids["globex_user"])
    browser.find_element("css selector", "#user-search-form button[type=submit]").click()
    wait(browser, lambda d: rows(d, "users-list") == [["no user found"]])

    go(browser, f"#/users/{ids['acme_user']}")
    assert not by_id(browser, "tier-form").is_displayed() and not by_id(browser, "energy-form").is_displayed()
    fill(browser, "key-label", "admin-made")
    browser.find_element("css selector", "#key-form button[type=submit]").click()
    wait_status(browser, "key ")
    assert answers(gw, new_key(browser))

    go(browser, f"#/users/{ids['globex_user']}")  # by editing the URL
    assert shown_error(browser, "user-error") == "not found in your workspace (HTTP 404)"
    assert rows(browser, "keys-table") == [["—"]]

    go(browser, "#/workspaces")
    assert [r[0] for r in rows(browser, "workspaces-list")] == ["acme"]
    assert not browser.find_element("css selector", "#create-workspace").is_displayed()
    go(browser, "#/audit")
    assert {r[5] for r in rows(browser, "audit-table")} == {"acme"}
    go(browser, "#/alerts")
    for hash_ in ("#/users", "#/workspaces", "#/audit", "#/alerts"):
        go(browser, hash_)
        assert "globex" not in browser.page_source and ids["globex_user"] not in browser.page_source


@BOTH
def test_a_workspace_admin_cannot_reach_another_workspace_by_editing_requests(console):
    """Every route the console calls, aimed at globex with acme's admin key: 404 (as if it
    did not exist) or 403 for what needs the master key; nothing changes."""
    gw, ids = console
    acme_admin, globex_user = ids["acme_admin"], ids["globex_user"]
    globex_key_id = next(k["id"] for k in ok(call(gw, "GET", "/admin/keys", params={"user": globex_user})))
    before = (gw.balance(globex_user), ok(call(gw, "GET", f"/admin/users/{globex_user}")),
              ok(call(gw, "GET", "/admin/keys", params={"user": globex_user})), audit_actions(gw))
    refused = [
        ("GET", f"/admin/users/{globex_user}", {}),
        ("GET", f"/admin/users/{globex_user}/ledger", {}),
        ("GET", f"/admin/users/{globex_user}/requests", {}),
        ("GET", "/admin/keys", {"params": {"user": globex_user}}),
        ("GET", "/admin/users", {"params": {"workspace": "globex"}}),
        ("GET", "/admin/users", {"params": {"q": "x", "workspace": "globex"}}),
        ("GET", "/admin/workspaces/globex", {}),
        ("GET", "/admin/audit", {"params": {"workspace": "globex"}}),
        ("GET", "/admin/alerts", {"params": {"workspace": "globex"}}),
        ("POST", "/admin/users", {"json": {"workspace": "globex", "name": "mole"}}),
        ("PATCH", f"/admin/users/{globex_user}", {"json": {"tier": "pro"}}),
        ("POST", f"/admin/users/{globex_user}/energy", {"json": {"amount": 5}}),
        ("POST", f"/admin/users/{globex_user}/keys", {"json": {"label": "mole"}}),
        ("PATCH", f"/admin/keys/{globex_key_id}", {"json": {"label": "mole"}}),
        ("POST", f"/admin/keys/{globex_key_id}/rotate", {}),
        ("POST", f"/admin/keys/{globex_key_id}/revoke", {}),
        ("PATCH", "/admin/workspaces/globex", {"json": {"profile": {"x": 1}}}),
    ]
    for method, path, kw in refused:
        answer = call(gw, method, path, acme_admin, **kw)
        assert answer.status_code in (403, 404), (method, path, answer.status_code, answer.text)
        assert "error" in answer.json() and globex_user not in answer.text.replace(path, "")
    assert call(gw, "POST", "/admin/workspaces", acme_admin, json={"name": "mine"}).status_code == 403
    # Reads that are not aimed at globex answer acme's rows only.
    assert ids["globex_user"] not in call(gw, "GET", "/admin/users", acme_admin, params={"q": globex_user}).text
    assert all(u["workspace_id"] != before[1]["workspace_id"] for u in ok(call(gw, "GET", "/admin/users", acme_admin)))
    assert all(k["user_id"] != globex_user for k in ok(call(gw, "GET", "/admin/keys", acme_admin)))
    assert {r["workspace_id"] for r in ok(call(gw, "GET", "/admin/audit", acme_admin))} <= {
        ok(call(gw, "GET", "/admin/workspaces/acme"))["id"]}
    after = (gw.balance(globex_user), ok(call(gw, "GET", f"/admin/users/{globex_user}")),
             ok(call(gw, "GET", "/admin/keys", params={"user": globex_user})), audit_actions(gw))
    assert after == before
    assert answers(gw, ids["globex_key"])


# ------------------------------------------------------------------ the API routes the console added


@BOTH
def test_search_and_last_requests_answer_within_the_scope(console):
    gw, ids = console
    mark = ok(call(gw, "POST", "/admin/users", json={"workspace": "acme", "name": "Percent_50% Wild"}))
    acme_prefix = mark["key"]["prefix"]

    def found(q: str, key: str = MASTER_KEY, **params: Any) -> list[str]:
        return [u["id"] for u in ok(call(gw, "GET", "/admin/users", key, params={"q": q, **params}))]

    assert found("percent_50%") == [mark["id"]]
    assert found("PERCENT") == [mark["id"]]
    assert found("_") == [mark["id"]] and found("%") == [mark["id"]]  # LIKE wildcards matched literally
    assert found(mark["id"]) == [mark["id"]] and found(acme_prefix) == [mark["id"]]
    assert found(acme_prefix[:4]) != []  # a prefix of a prefix: every key starts "gw-"
    assert found(ids["globex_user"], ids["acme_admin"]) == []
    assert found(ids["acme_user"], ids["acme_admin"]) == [ids["acme_user"]]
    assert found(ids["acme_user"], workspace="globex") == []
    for params in ({"q": ""}, {"q": "x" * 201}, {"q": "a", "limit": "0"}, {"q": "a", "limit": "201"}):
        answer = call(gw, "GET", "/admin/users", params=params)
        assert answer.status_code == 400 and answer.json()["error"]["param"] in ("q", "limit"), answer.text

    (entry,) = ok(call(gw, "GET", f"/admin/users/{ids['acme_user']}/requests"))
    assert set(entry) == {"request_id", "created_at", "status", "error_type", "model", "provider", "action",
                          "tokens_prompt", "tokens_completion", "tokens_total", "cost_usd", "energy_cost",
                          "latency_ms", "ttfb_ms", "cache_hit", "streamed"}
    assert (entry["status"], entry["model"], entry["tokens_total"]) == (200, "gpt-4o-mini", PROMPT + COMPLETION)
    assert entry["cost_usd"] > 0 and entry["energy_cost"] > 0 and isinstance(entry["created_at"], float)
    assert call(gw, "GET", f"/admin/users/{ids['acme_user']}/requests", params={"limit": "501"}).status_code == 400
    tiers = {t["name"]: t for t in ok(call(gw, "GET", "/admin/tiers", ids["acme_admin"]))}
    assert set(tiers) == {"free", "pro"} and tiers["free"]["default"] and XSS in tiers["pro"]["models"]
    assert XSS not in tiers["free"]["models"]


# ------------------------------------------------------------------ stored XSS


def test_stored_xss_payloads_in_every_user_controlled_field_show_as_text(browser, console):
    """A name, a key label, an energy reason, a request's action, a model's name and an
    alert's summary carrying `<img src=x onerror=...>`: shown literally on every page, no
    element made of them, no script run."""
    gw, ids = console
    user = ok(call(gw, "POST", "/admin/users", json={"workspace": "acme", "tier": "pro", "energy": 50, "name": XSS}))
    key = ok(call(gw, "POST", f"/admin/users/{user['id']}/keys", json={"label": XSS, "models": [XSS, "gpt-4o-mini"]}))
    ok(call(gw, "POST", f"/admin/users/{user['id']}/energy", json={"amount": 3, "reason": XSS}))
    gw.client(key["api_key"]).chat.completions.create(model=XSS, messages=HELLO, extra_headers={"X-Action": XSS})
    gw.client(key["api_key"]).chat.completions.create(model="gpt-4o-mini", messages=HELLO,
                                                      extra_body={"metadata": {"action": XSS}})
    gw.settle()
    from gateway.alerts import new_event

    event = new_event("provider.circuit_opened", {"model": XSS, "deployment": XSS, "consecutive_failures": 3,
                                                  "cooldown_s": 30})
    gw.run(gw.store.enqueue_alerts([{"event_id": event["id"], "endpoint": "ops", "event_type": event["type"],
                                     "workspace_id": None, "payload": json.dumps(event)}]))

    sign_in(browser, gw, MASTER_KEY)

    def assert_inert(where: str, at_least: int) -> None:
        assert browser.execute_script("return window.__xss") is None, where
        assert browser.execute_script("return document.querySelectorAll('#app img').length") == 0, where
        shown = browser.find_element("id", "app").text
        assert shown.count(XSS) >= at_least, (where, shown.count(XSS))

    go(browser, "#/users")
    assert_inert("users list", 1)
    go(browser, f"#/users/{user['id']}")
    assert by_id(browser, "user-title").text == f"{XSS} ({user['id']})"
    label_row = key_row(browser, key["prefix"])
    assert label_row[1] == XSS and label_row[5] == f"{XSS}, gpt-4o-mini"
    assert [r[4] for r in rows(browser, "ledger-table") if r[1] == "grant"][0] == XSS
    requests = rows(browser, "requests-table")
    assert {(r[2], r[3]) for r in requests} == {(XSS, XSS), ("gpt-4o-mini", XSS)}
    assert XSS in by_id(browser, "key-models").text  # the tier's models, as checkbox labels
    assert_inert("user page", 8)

    # Confirmation messages and once-shown keys carry the label / prefix as text too.
    click_key_action(browser, "rotate", key["id"])
    confirm(browser, accept=True)
    wait(browser, lambda d: d.find_elements("id", "new-key-value"))
    assert XSS in browser.find_element("css selector", ".secret strong").text
    new_key(browser)
    assert_inert("after rotating", 4)

    go(browser, "#/audit")
    audit = browser.find_element("id", "audit-table").text
    assert audit.count(XSS) >= 4  # the name, the label, the reason, the rotated key's label
    assert_inert("audit log", 4)
    go(browser, "#/alerts")
    (alert,) = rows(browser, "alerts-table")
    assert alert[1] == "provider.circuit_opened" and XSS in alert[2] and alert[7] == "(gateway)"
    assert_inert("alert deliveries", 1)

    # An API error that quotes what was typed is text as well.
    go(browser, "#/workspaces")
    fill(browser, "new-workspace-name", XSS)
    browser.find_element("css selector", "#create-workspace button").click()
    wait(browser, lambda d: by_id(d, "create-workspace-error").is_displayed())
    go(browser, "#/users/" + XSS)
    assert XSS in shown_error(browser, "user-error")
    assert_inert("error messages", 1)


# ------------------------------------------------------------------ accessible, keyboard, a laptop screen


def test_the_console_is_labelled_keyboard_operable_and_fits_a_laptop_screen(browser, console):
    """Every field has a label, every action is a <button> or a link; a form submits with
    Enter, the confirmation dialog cancels with Esc (nothing changes); at 1280 px no page
    scrolls sideways."""
    from selenium.webdriver.common.keys import Keys

    gw, ids = console
    sign_in(browser, gw, MASTER_KEY)
    browser.set_window_size(1280, 800)
    try:
        for hash_ in ("#/users", f"#/users/{ids['acme_user']}", "#/workspaces", "#/audit", "#/alerts"):
            go(browser, hash_)
            unlabelled = browser.execute_script("""
                return [...document.querySelectorAll('#app input, #app select')]
                  .filter((f) => f.offsetParent !== null && !f.labels.length && !f.getAttribute('aria-label'))
                  .map((f) => f.id || f.outerHTML);""")
            assert unlabelled == [], (hash_, unlabelled)
            clickable_divs = browser.execute_script(
                "return document.querySelectorAll('#app [onclick], #app div[tabindex], #app span[tabindex]').length")
            assert clickable_divs == 0
            assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth"), hash_

        go(browser, "#/workspaces")
        field = by_id(browser, "new-workspace-name")
        field.send_keys("keyboard-made", Keys.ENTER)
        wait_status(browser, "workspace keyboard-made created")

        go(browser, f"#/users/{ids['acme_user']}")
        key_id = next(k["id"] for k in ok(call(gw, "GET", "/admin/keys", params={"user": ids["acme_user"]})))
        button = browser.find_element("css selector", f'#keys-table button[data-action="revoke"][data-key="{key_id}"]')
        assert button.tag_name == "button" and button.get_attribute("aria-label").startswith("Revoke key ")
        button.send_keys(Keys.ENTER)  # a focused button, activated from the keyboard
        wait(browser, lambda d: by_id(d, "confirm-dialog").is_displayed())
        assert browser.switch_to.active_element.get_attribute("id") == "confirm-cancel"  # the safe choice first
        browser.switch_to.active_element.send_keys(Keys.ESCAPE)
        wait_status(browser, "nothing changed")
        assert answers(gw, ids["acme_key"])
    finally:
        browser.set_window_size(1280, 2400)


def test_the_page_runs_only_its_own_scripts(console):
    """A Content-Security-Policy: no inline script, nothing from elsewhere (a second wall
    behind writing every stored text as text)."""
    gw, _ = console
    answer = httpx.get(gw.url + "/dashboard", timeout=10)
    policy = dict(part.strip().split(" ", 1) for part in answer.headers["Content-Security-Policy"].split(";"))
    assert policy["script-src"] == "'self'" and policy["default-src"] == "'self'" and policy["object-src"] == "'none'"
    assert re.search(r"<script(?![^>]*\bsrc=)", answer.text) is None  # no inline script the policy would block
    assert re.search(r"\son[a-z]+\s*=", answer.text) is None  # no inline event handler either
