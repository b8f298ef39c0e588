"""Budgets on the console (docs/admin.md "Managing from the page", docs/budgets.md): set,
list and delete them from the page, in Debian's headless Chromium against a live gateway
and a real store, through the same /admin/budgets API as the CLI.

A user's page shows the user's budgets and its keys' (ceiling, spent, remaining, the
period's end) and sets either; the workspaces page shows each workspace's budget and, to
the master key only, sets and deletes it. A budget set on the page is the real thing: a
real OpenAI SDK client is refused with 429 budget_exceeded when it is spent.
"""

from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

import openai
import pytest

from tests.conftest import MASTER_KEY
from tests.test_accounting import HELLO
from tests.test_console import BOTH, XSS, by_id, call, choose, confirm, fill, go, ok, rows, shown_error, status, wait_status
from tests.test_dashboard import sign_in
from tests import test_console, test_dashboard

browser = test_dashboard.browser  # the same headless Chromium fixture (Debian's chromium + chromedriver)
console = test_console.console  # acme and globex, each a user with traffic and a workspace admin


def set_on_page(driver: Any, prefix: str, *, unit: str, amount: str, period: str, tz: str = "UTC",
                alerts: str = "", hard: str = "refuse", button: str = "#budget-form button[type=submit]") -> None:
    choose(driver, f"{prefix}-unit", unit)
    fill(driver, f"{prefix}-amount", amount)
    choose(driver, f"{prefix}-period", period)
    fill(driver, f"{prefix}-timezone", tz)
    fill(driver, f"{prefix}-alerts", alerts)
    choose(driver, f"{prefix}-hard", hard)
    driver.find_element("css selector", button).click()


def budgets(gw: Any, key: str = MASTER_KEY, **params: str) -> list[dict]:
    return ok(call(gw, "GET", "/admin/budgets", key, params=params))


def usd(value: Any) -> str:
    """A dollar amount as the page writes it (console.js usd()): to the nano-dollar, at least cents."""
    text = f"{Decimal(str(value)):.9f}".rstrip("0")
    return "$" + (text if len(text.split(".")[1]) >= 2 else f"{Decimal(str(value)):.2f}")


def utc(epoch: float | None) -> str:
    return "never (life)" if epoch is None else \
        datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def budget_rows(driver: Any, table_id: str) -> dict[str, list[str]]:
    """The table's rows by the budget id their Delete button names ('' for a read-only row)."""
    # Pairs, not an object: the driver hands an object's keys back in its own order.
    pairs = driver.execute_script("""
        return [...document.querySelectorAll(arguments[0])].filter((tr) => tr.cells.length > 1).map((tr, i) => {
          const button = tr.querySelector('button[data-action="delete-budget"]');
          return [button ? button.dataset.budget : 'row' + i, [...tr.cells].map((td) => td.innerText.trim())];
        });""", f"#{table_id} tbody tr")
    return dict(pairs)


def delete_on_page(driver: Any, budget_id: str, accept: bool) -> str:
    driver.find_element("css selector", f'button[data-action="delete-budget"][data-budget="{budget_id}"]').click()
    return confirm(driver, accept)


@BOTH
def test_the_master_key_sets_lists_and_deletes_budgets_from_the_page(browser, console):
    """A user budget and a key budget on the user's page, a workspace budget on the
    workspaces page: each as the API stored it, listed with its ceiling, spent, remaining
    and period end; a delete asks first (Cancel changes nothing); a bad field is the API's
    400 beside the form; every change is in the audit log."""
    gw, ids = console
    user = ids["acme_user"]
    (key,) = ok(call(gw, "GET", "/admin/keys", params={"user": user}))
    key_id, prefix = key["id"], key["prefix"]
    sign_in(browser, gw, MASTER_KEY)

    go(browser, f"#/users/{user}")
    assert rows(browser, "user-budgets-table") == [["no budgets"]]
    options = browser.execute_script("return [...document.querySelectorAll('#budget-target option')].map((o) => o.value)")
    assert options == [f"user:{user}", f"key:{key_id}"]

    # The API's own error, in place: nothing is set.
    set_on_page(browser, "budget", unit="usd", amount="0.1234567891", period="day")
    assert shown_error(browser, "budget-error") == "a USD budget's amount has at most 9 decimals (HTTP 400)"
    set_on_page(browser, "budget", unit="usd", amount="5", period="day", tz="Mars/Olympus_Mons")
    assert "unknown timezone 'Mars/Olympus_Mons'" in shown_error(browser, "budget-error")
    assert budgets(gw) == []

    choose(browser, "budget-target", f"user:{user}")
    set_on_page(browser, "budget", unit="energy", amount="30", period="day", tz="Europe/Berlin", alerts="80, 50,100")
    wait_status(browser, "budget ")
    assert not by_id(browser, "budget-error").is_displayed()
    (user_budget,) = budgets(gw)
    assert {k: user_budget[k] for k in ("scope", "scope_id", "unit", "amount", "period", "timezone", "alerts", "hard")} \
        == {"scope": "user", "scope_id": user, "unit": "energy", "amount": 30, "period": "day",
            "timezone": "Europe/Berlin", "alerts": [50, 80, 100], "hard": "refuse"}
    assert status(browser) == f"budget {user_budget['id']} set: user {user}: 30 energy per day"

    choose(browser, "budget-target", f"key:{key_id}")
    set_on_page(browser, "budget", unit="usd", amount="2.5", period="month", hard="none")
    wait_status(browser, "budget ")
    key_budget = next(b for b in budgets(gw) if b["scope"] == "key")
    assert (key_budget["scope_id"], key_budget["amount"], key_budget["hard"], key_budget["alerts"]) == (key_id, 2.5, "none", [])

    # Traffic: both budgets count it; the page shows what the API says was spent.
    gw.client(ids["acme_key"]).chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    gw.settle()
    go(browser, f"#/users/{user}")
    shown = budget_rows(browser, "user-budgets-table")
    listed = {b["id"]: b for b in budgets(gw, workspace="acme")}
    assert list(shown) == [user_budget["id"], key_budget["id"]]  # the user's first, then its keys'
    u, k = listed[user_budget["id"]], listed[key_budget["id"]]
    assert (u["spent"], u["remaining"]) == (2, 28)  # gpt-4o-mini costs 2 energy here
    assert shown[u["id"]] == [f"user {user}", "day (Europe/Berlin)", "30 energy", "2 energy", "28 energy",
                              utc(u["period_ends_at"]), "50%, 80%, 100%", "refuse (429)", "Edit Delete"]
    assert 0 < k["spent"] < 2.5 and Decimal(str(k["spent"])) + Decimal(str(k["remaining"])) == Decimal("2.5")
    assert shown[k["id"]] == [f"key {prefix}…", "month (UTC)", "$2.50", usd(k["spent"]), usd(k["remaining"]),
                              utc(k["period_ends_at"]), "—", "alerts only", "Edit Delete"]
    assert u["period_ends_at"] > datetime.now().timestamp()

    # Edit: the form takes the budget's values; set again, the same budget changes and keeps its spend.
    browser.find_element("css selector", f'button[data-action="edit-budget"][data-budget="{k["id"]}"]').click()
    assert by_id(browser, "budget-amount").get_attribute("value") == "2.5"
    browser.find_element("css selector", f'button[data-action="edit-budget"][data-budget="{u["id"]}"]').click()
    form = {name: by_id(browser, f"budget-{name}").get_attribute("value")
            for name in ("target", "unit", "amount", "period", "timezone", "alerts", "hard")}
    assert form == {"target": f"user:{user}", "unit": "energy", "amount": "30", "period": "day",
                    "timezone": "Europe/Berlin", "alerts": "50,80,100", "hard": "refuse"}
    fill(browser, "budget-amount", "40")
    browser.find_element("css selector", "#budget-form button[type=submit]").click()
    wait_status(browser, f"budget {u['id']} set: user {user}: 40 energy per day")
    edited = {b["id"]: b for b in budgets(gw)}[u["id"]]
    assert (edited["amount"], edited["spent"], edited["remaining"], len(budgets(gw))) == (40, 2, 38, 2)
    assert budget_rows(browser, "user-budgets-table")[u["id"]][2:5] == ["40 energy", "2 energy", "38 energy"]

    # The workspace's budget: the workspaces page.
    acme = ok(call(gw, "GET", "/admin/workspaces/acme"))["id"]
    go(browser, "#/workspaces")
    assert rows(browser, "workspace-budgets-table") == [["no budgets"]]
    choose(browser, "ws-budget-workspace", acme)
    set_on_page(browser, "ws-budget", unit="usd", amount="50", period="week", tz="Europe/Berlin", alerts="50,80,100",
                button="#workspace-budget-form button[type=submit]")
    wait_status(browser, "budget ")
    ws_budget = next(b for b in budgets(gw) if b["scope"] == "workspace")
    assert (ws_budget["scope_id"], ws_budget["amount"], ws_budget["period"]) == (acme, 50, "week")
    (row,) = budget_rows(browser, "workspace-budgets-table").values()
    assert row[:5] == ["workspace acme", "week (Europe/Berlin)", "$50.00", usd(ws_budget["spent"]),
                       usd(ws_budget["remaining"])]

    # Delete: Cancel first (nothing changes), then confirmed.
    message = delete_on_page(browser, ws_budget["id"], accept=False)
    assert message.startswith("Delete the budget of workspace acme: $50.00 per week?")
    wait_status(browser, "nothing changed")
    assert len(budgets(gw)) == 3
    delete_on_page(browser, ws_budget["id"], accept=True)
    wait_status(browser, f"budget {ws_budget['id']} deleted")
    assert rows(browser, "workspace-budgets-table") == [["no budgets"]]
    go(browser, f"#/users/{user}")
    assert f"key {prefix}…" in delete_on_page(browser, key_budget["id"], accept=True)
    wait_status(browser, f"budget {key_budget['id']} deleted")
    assert list(budget_rows(browser, "user-budgets-table")) == [user_budget["id"]]
    assert [b["id"] for b in budgets(gw)] == [user_budget["id"]]

    audit = ok(call(gw, "GET", "/admin/audit", params={"limit": 1000}))
    made = [(r["action"], r["target"], r["via"]) for r in reversed(audit) if r["action"].startswith("budget.")]
    assert made == [("budget.set", user_budget["id"], "api"), ("budget.set", key_budget["id"], "api"),
                    ("budget.set", user_budget["id"], "api"), ("budget.set", ws_budget["id"], "api"), ("budget.delete", ws_budget["id"], "api"),
                    ("budget.delete", key_budget["id"], "api")]
    change = next(r for r in audit if r["action"] == "budget.set" and r["before"] is not None)
    assert (change["target"], change["before"]["amount"], change["after"]["amount"]) == (user_budget["id"], 30, 40)


def test_a_budget_set_on_the_page_refuses_a_request(browser, console):
    """End to end: 3 energy a day for the user, set on the page; the first gpt-4o-mini call
    (2 energy) is answered, the second is refused by the OpenAI SDK with 429
    budget_exceeded, nothing charged; the page then shows 2 spent, 1 remaining."""
    gw, ids = console
    user = ids["acme_user"]
    sign_in(browser, gw, MASTER_KEY)
    go(browser, f"#/users/{user}")
    choose(browser, "budget-target", f"user:{user}")
    set_on_page(browser, "budget", unit="energy", amount="3", period="day")
    wait_status(browser, "budget ")

    client = gw.client(ids["acme_key"])
    answered = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=HELLO)
    assert (answered.headers["x-budget-remaining"], answered.headers["x-budget-unit"]) == ("1", "energy")
    balance = gw.balance(user)
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    assert refused.value.status_code == 429 and refused.value.code == "budget_exceeded"
    assert refused.value.body["type"] == "insufficient_quota"
    assert gw.balance(user) == balance

    gw.settle()
    go(browser, f"#/users/{user}")
    (row,) = budget_rows(browser, "user-budgets-table").values()
    assert row[2:5] == ["3 energy", "2 energy", "1 energy"]


def test_a_workspace_admin_sets_its_users_budgets_but_not_its_workspaces_nor_another_workspaces(browser, console):
    """acme's admin: sets and deletes its users' and keys' budgets on the page; sees its
    workspace's budget read-only (no form, no Delete: the API answers 403); globex's
    budgets are not on its pages, and edited requests at them answer 404 or 403."""
    gw, ids = console
    admin, globex_user = ids["acme_admin"], ids["globex_user"]
    ws_budget = ok(call(gw, "POST", "/admin/budgets", json={"workspace": "acme", "unit": "usd", "amount": 40,
                                                           "period": "month"}))
    globex_budget = ok(call(gw, "POST", "/admin/budgets", json={"user": globex_user, "unit": "energy", "amount": 9,
                                                               "period": "day"}))
    globex_ws_budget = ok(call(gw, "POST", "/admin/budgets", json={"workspace": "globex", "unit": "usd", "amount": 7,
                                                                  "period": "week"}))
    sign_in(browser, gw, admin)

    go(browser, "#/workspaces")
    assert not by_id(browser, "workspace-budget-form").is_displayed()
    assert browser.execute_script("return document.querySelectorAll('[data-action=\"delete-budget\"]').length") == 0
    assert list(budget_rows(browser, "workspace-budgets-table").values()) == [
        ["workspace acme", "month (UTC)", "$40.00", "$0.00", "$40.00", utc(ws_budget["period_ends_at"]), "—",
         "refuse (429)", "—"]]
    assert "globex" not in browser.find_element("id", "app").text

    go(browser, f"#/users/{ids['acme_user']}")
    choose(browser, "budget-target", f"user:{ids['acme_user']}")
    set_on_page(browser, "budget", unit="energy", amount="10", period="week")
    wait_status(browser, "budget ")
    mine = next(b for b in budgets(gw, admin) if b["scope"] == "user")
    assert mine["scope_id"] == ids["acme_user"]
    delete_on_page(browser, mine["id"], accept=True)
    wait_status(browser, f"budget {mine['id']} deleted")

    # The page's own form aimed at globex's user (the option's value edited in the page):
    # the API's 404 beside the form, nothing set.
    before = budgets(gw)
    browser.execute_script("document.querySelector('#budget-target option').value = arguments[0]", f"user:{globex_user}")
    set_on_page(browser, "budget", unit="energy", amount="1", period="day")
    assert shown_error(browser, "budget-error").endswith("(HTTP 404)")
    assert budgets(gw) == before

    # Edited requests: another workspace's user or budget, or a workspace's own budget.
    for body in ({"user": globex_user}, {"workspace": "globex"}):
        answer = call(gw, "POST", "/admin/budgets", admin, json={**body, "unit": "energy", "amount": 1, "period": "day"})
        assert answer.status_code == 404 and answer.json()["error"]["message"], answer.text
    answer = call(gw, "POST", "/admin/budgets", admin, json={"workspace": "acme", "unit": "usd", "amount": 1000,
                                                             "period": "month"})
    assert answer.status_code == 403 and answer.json()["error"]["code"] == "forbidden"
    for budget_id in (globex_budget["id"], globex_ws_budget["id"], ws_budget["id"]):
        assert call(gw, "DELETE", f"/admin/budgets/{budget_id}", admin).status_code in (403, 404)
    assert call(gw, "GET", "/admin/budgets", admin, params={"workspace": "globex"}).status_code == 404
    assert {b["id"] for b in budgets(gw, admin)} == {ws_budget["id"]}
    assert budgets(gw) == before


def test_a_key_label_with_markup_shows_as_text_in_the_budget_list(browser, console):
    """A key labelled `<img src=x onerror=...>`: its budget's row, the key choice and the
    delete confirmation show the label's characters; no element made of it, no script run."""
    gw, ids = console
    user = ok(call(gw, "POST", "/admin/users", json={"workspace": "acme", "name": XSS}))
    key = ok(call(gw, "POST", f"/admin/users/{user['id']}/keys", json={"label": XSS}))
    sign_in(browser, gw, MASTER_KEY)
    go(browser, f"#/users/{user['id']}")
    choose(browser, "budget-target", f"key:{key['id']}")
    assert browser.execute_script("return document.getElementById('budget-target').selectedOptions[0].text") \
        == f"key {key['prefix']}… ({XSS})"
    set_on_page(browser, "budget", unit="energy", amount="5", period="life", alerts="100")
    wait_status(browser, "budget ")
    assert XSS in status(browser)
    (budget,) = budgets(gw)
    row = budget_rows(browser, "user-budgets-table")[budget["id"]]
    assert row[:2] == [f"key {key['prefix']}… ({XSS})", "life"] and row[5] == "never (life)"
    assert XSS in delete_on_page(browser, budget["id"], accept=False)
    assert browser.execute_script("return window.__xss") is None
    assert browser.execute_script("return document.querySelectorAll('#app img').length") == 0



def test_edit_puts_a_usd_amount_into_the_form_exactly_or_not_at_all(browser, console):
    """The page reads a USD amount as a JSON number (a double: 15 significant digits): one
    it holds exactly goes into the form to the nano-dollar; a longer one leaves the field
    empty for the operator to type, so setting the budget again never rounds it silently."""
    gw, ids = console
    user = ids["acme_user"]
    (key,) = ok(call(gw, "GET", "/admin/keys", params={"user": user}))
    exact = ok(call(gw, "POST", "/admin/budgets", json={"user": user, "unit": "usd", "amount": "999999.123456789",
                                                       "period": "day"}))
    longer = ok(call(gw, "POST", "/admin/budgets", json={"key": key["id"], "unit": "usd", "amount": "1234567.123456789",
                                                        "period": "day"}))
    sign_in(browser, gw, MASTER_KEY)
    go(browser, f"#/users/{user}")
    browser.find_element("css selector", f'button[data-action="edit-budget"][data-budget="{exact["id"]}"]').click()
    assert by_id(browser, "budget-amount").get_attribute("value") == "999999.123456789"
    browser.find_element("css selector", f'button[data-action="edit-budget"][data-budget="{longer["id"]}"]').click()
    assert by_id(browser, "budget-target").get_attribute("value") == f"key:{key['id']}"
    assert by_id(browser, "budget-amount").get_attribute("value") == ""
    browser.find_element("css selector", "#budget-form button[type=submit]").click()  # required: not sent
    assert browser.execute_script("return document.getElementById('budget-amount').validity.valueMissing")
    actions = [r["action"] for r in ok(call(gw, "GET", "/admin/audit", params={"limit": 1000}))]
    assert actions.count("budget.set") == 2  # the two made above; nothing from the page
