"""Workspaces: isolation of workspace admins on every /admin endpoint, and the
workspace system prompt the gateway injects (served from the Directory cache)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import httpx
import pytest

from gateway.admin.operations import MASTER
from tests.conftest import MASTER_KEY

HELLO = [{"role": "user", "content": "hi"}]


def call(gw, method: str, path: str, key: str, body: dict | None = None) -> httpx.Response:
    return httpx.request(method, gw.url + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=10)


@dataclass
class TwoWorkspaces:
    gw: object
    acme_admin_key: str
    acme_user: str
    acme_key_id: str
    globex_user: str
    globex_key_id: str
    globex_id: str

    def snapshot(self) -> tuple:
        """Everything a cross-workspace call could change in globex."""
        store = self.gw.store
        run = self.gw.run
        return (
            run(store.get_workspace("globex")),
            run(store.list_users(workspace_id=self.globex_id)),
            run(store.list_keys(workspace_id=self.globex_id)),
            run(store.ledger(self.globex_user)),
        )


@pytest.fixture
def two_workspaces(gateway) -> TwoWorkspaces:
    _, admin_key = gateway.make_user(workspace="acme", role="workspace_admin", energy=0)
    acme_user, _ = gateway.make_user(workspace="acme", tier="free", energy=10)
    globex_user, _ = gateway.make_user(workspace="globex", tier="free", energy=10)
    store = gateway.store
    return TwoWorkspaces(
        gateway, admin_key, acme_user,
        gateway.run(store.list_keys(user_id=acme_user))[0].id,
        globex_user,
        gateway.run(store.list_keys(user_id=globex_user))[0].id,
        gateway.run(store.get_workspace("globex")).id,
    )


# Every /admin endpoint, aimed at another workspace's objects.
CROSS_WORKSPACE_CALLS = [
    ("POST", "/admin/workspaces", {"name": "sneaky"}, 403),
    ("GET", "/admin/workspaces/globex", None, 404),
    ("GET", "/admin/workspaces/{globex_id}", None, 404),
    ("PATCH", "/admin/workspaces/globex", {"profile": {"company_name": "pwned"}}, 404),
    ("POST", "/admin/users", {"workspace": "globex", "tier": "pro", "energy": 5}, 404),
    ("GET", "/admin/users?workspace=globex", None, 404),
    ("GET", "/admin/users/{globex_user}", None, 404),
    ("PATCH", "/admin/users/{globex_user}", {"tier": "pro"}, 404),
    ("POST", "/admin/users/{globex_user}/energy", {"amount": 100}, 404),
    ("GET", "/admin/users/{globex_user}/ledger", None, 404),
    ("POST", "/admin/users/{globex_user}/keys", {}, 404),
    ("GET", "/admin/keys?user={globex_user}", None, 404),
    ("POST", "/admin/keys/{globex_key_id}/revoke", None, 404),
    ("POST", "/admin/keys/{globex_key_id}/rotate", None, 404),
    ("GET", "/admin/usage/daily?workspace=globex", None, 404),
    ("GET", "/admin/metrics?workspace=globex", None, 404),
]


@pytest.mark.parametrize("method,path,body,status", CROSS_WORKSPACE_CALLS,
                         ids=[f"{m} {p}" for m, p, _, _ in CROSS_WORKSPACE_CALLS])
def test_workspace_admin_cannot_touch_another_workspace(two_workspaces, method, path, body, status):
    ws = two_workspaces
    before = ws.snapshot()
    path = path.format(globex_id=ws.globex_id, globex_user=ws.globex_user, globex_key_id=ws.globex_key_id)
    response = call(ws.gw, method, path, ws.acme_admin_key, body)
    assert response.status_code == status, response.text
    assert set(response.json()) == {"error"}
    assert ws.snapshot() == before
    assert ws.gw.run(ws.gw.store.get_workspace("sneaky")) is None


def test_other_workspaces_objects_look_exactly_like_missing_ones(two_workspaces):
    ws = two_workspaces
    theirs = call(ws.gw, "GET", f"/admin/users/{ws.globex_user}", ws.acme_admin_key)
    missing = call(ws.gw, "GET", "/admin/users/usr_doesnotexist", ws.acme_admin_key)
    assert theirs.status_code == missing.status_code == 404
    assert theirs.json() == missing.json()


def test_workspace_admin_listings_show_only_its_own_workspace(two_workspaces):
    ws = two_workspaces
    workspaces = call(ws.gw, "GET", "/admin/workspaces", ws.acme_admin_key).json()
    assert [w["name"] for w in workspaces] == ["acme"]
    users = call(ws.gw, "GET", "/admin/users", ws.acme_admin_key).json()
    assert users and {u["workspace_id"] for u in users} == {workspaces[0]["id"]}
    keys = call(ws.gw, "GET", "/admin/keys", ws.acme_admin_key).json()
    assert keys and {k["workspace_id"] for k in keys} == {workspaces[0]["id"]}


def test_workspace_admin_manages_its_own_workspace(two_workspaces):
    ws = two_workspaces
    gw, key, user = ws.gw, ws.acme_admin_key, ws.acme_user
    assert call(gw, "GET", "/admin/workspaces/acme", key).json()["users"] == 2
    assert call(gw, "PATCH", "/admin/workspaces/acme", key, {"profile": {"company_name": "Acme"}}).status_code == 200
    created = call(gw, "POST", "/admin/users", key, {"tier": "free"})
    assert created.status_code == 201 and created.json()["api_key"].startswith("gw-")
    assert call(gw, "GET", f"/admin/users/{user}", key).status_code == 200
    assert len(call(gw, "GET", f"/admin/users/{user}/ledger", key).json()) == 1
    new_key = call(gw, "POST", f"/admin/users/{user}/keys", key, {})
    assert new_key.status_code == 201
    rotated = call(gw, "POST", f"/admin/keys/{ws.acme_key_id}/rotate", key)
    assert rotated.status_code == 201 and rotated.json()["replaces"] == ws.acme_key_id
    assert call(gw, "POST", f"/admin/keys/{new_key.json()['id']}/revoke", key).json()["revoked"] is True


@pytest.mark.parametrize("method,path,body", [
    ("POST", "/admin/users", {"tier": "free", "energy": 3}),
    ("POST", "/admin/users", {"tier": "pro"}),
    ("PATCH", "/admin/users/{user}", {"tier": "pro"}),
    ("POST", "/admin/users/{user}/energy", {"amount": 5}),
    ("POST", "/admin/users/{user}/energy", {"amount": -5, "kind": "adjust"}),
], ids=["new-user-with-energy", "new-user-with-tier", "set-tier", "grant", "adjust"])
def test_workspace_admin_cannot_mint_energy_or_change_tiers_even_in_its_own_workspace(two_workspaces, method, path, body):
    """Energy and tiers are what the operator sells: they need the master key."""
    ws = two_workspaces
    gw, key, user = ws.gw, ws.acme_admin_key, ws.acme_user
    before = gw.balance(user)
    response = call(gw, method, path.format(user=user), key, body)
    assert response.status_code == 403, response.text
    assert response.json()["error"]["code"] == "forbidden"
    assert gw.balance(user) == before
    assert gw.run(gw.store.get_user(user)).tier != "pro" or body.get("tier") != "pro"
    assert len(call(gw, "GET", "/admin/users", key).json()) == 2  # nobody was created


def test_master_key_manages_every_workspace(two_workspaces):
    ws = two_workspaces
    gw = ws.gw
    assert call(gw, "POST", "/admin/workspaces", MASTER_KEY, {"name": "initech"}).status_code == 201
    assert {w["name"] for w in call(gw, "GET", "/admin/workspaces", MASTER_KEY).json()} == {"acme", "globex", "initech"}
    assert call(gw, "PATCH", f"/admin/users/{ws.globex_user}", MASTER_KEY, {"tier": "pro"}).json()["tier"] == "pro"
    assert call(gw, "POST", f"/admin/users/{ws.globex_user}/energy", MASTER_KEY, {"amount": 1}).json()["energy"] == 11
    assert call(gw, "POST", f"/admin/keys/{ws.globex_key_id}/revoke", MASTER_KEY).status_code == 200
    assert len(call(gw, "GET", "/admin/users", MASTER_KEY).json()) == 3


def test_plain_user_key_is_refused_on_admin_endpoints(gateway):
    _, key = gateway.make_user()
    response = call(gateway, "GET", "/admin/users", key)
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "forbidden"
    assert call(gateway, "GET", "/admin/users", "gw-unknown-key-123456789").status_code == 401


# --------------------------------------------------------------------------- workspace prompt

PROFILE = {"company_name": "Acme", "industry": "Logistics", "brand_voice": "friendly", "products": ["Tracker", "Fleet"]}
TEMPLATE = "You write for {company_name} ({industry}). Voice: {brand_voice}. Products: {products}.{missing}"
RENDERED = "You write for Acme (Logistics). Voice: friendly. Products: Tracker, Fleet."


def set_workspace(gw, profile: dict, ai_settings: dict) -> None:
    gw.run(gw.admin().update_workspace(MASTER, "acme", profile=profile, ai_settings=ai_settings))


def test_workspace_system_prompt_is_the_first_message_at_the_upstream(gateway, upstream):
    _, key = gateway.make_user()
    set_workspace(gateway, PROFILE, {"inject_system_prompt": True, "system_prompt_template": TEMPLATE})
    gateway.client(key).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "system", "content": "client system"}, *HELLO])
    messages = upstream.last.json["messages"]
    assert messages[0] == {"role": "system", "content": RENDERED}
    assert messages[1] == {"role": "system", "content": "client system"}
    assert messages[2] == HELLO[0]


def test_workspace_prompt_is_not_injected_when_switched_off(gateway, upstream):
    _, key = gateway.make_user()
    set_workspace(gateway, PROFILE, {"inject_system_prompt": False, "system_prompt_template": TEMPLATE})
    gateway.client(key).chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    assert upstream.last.json["messages"] == HELLO


def test_workspace_default_model_and_temperature_apply(gateway, upstream):
    _, key = gateway.make_user()
    set_workspace(gateway, PROFILE, {"default_model": "gpt-4o-mini", "temperature": 0.4})
    completion = gateway.client(key).chat.completions.create(model="default", messages=HELLO)
    assert completion.model == "gpt-4o-mini"
    assert upstream.last.json["model"] == "gpt-4o-mini"
    assert upstream.last.json["temperature"] == 0.4
    gateway.client(key).chat.completions.create(model="gpt-4o-mini", messages=HELLO, temperature=1.0)
    assert upstream.last.json["temperature"] == 1.0


def test_workspace_change_through_admin_api_applies_at_once(gateway, upstream):
    _, key = gateway.make_user()
    set_workspace(gateway, PROFILE, {"inject_system_prompt": True, "system_prompt_template": "v1"})
    client = gateway.client(key)
    client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    assert upstream.last.json["messages"][0]["content"] == "v1"
    response = call(gateway, "PATCH", "/admin/workspaces/acme", MASTER_KEY,
                    {"ai_settings": {"inject_system_prompt": True, "system_prompt_template": "v2"}})
    assert response.status_code == 200, response.text
    client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    assert upstream.last.json["messages"][0]["content"] == "v2"


def test_workspace_change_made_directly_in_the_store_is_seen_only_after_cache_ttl(gateway_factory, upstream):
    gw = gateway_factory(auth={"master_key": MASTER_KEY, "cache_ttl": "0.5s", "default_tier": "free"})
    _, key = gw.make_user()
    set_workspace(gw, PROFILE, {"inject_system_prompt": True, "system_prompt_template": "v1"})
    client = gw.client(key)
    client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    changed_at = time.monotonic()
    workspace_id = gw.run(gw.store.get_workspace("acme")).id
    gw.run(gw.store.update_workspace(workspace_id, ai_settings={"inject_system_prompt": True,
                                                                "system_prompt_template": "v2"}))
    client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    assert time.monotonic() - changed_at < 0.5
    assert upstream.last.json["messages"][0]["content"] == "v1", "served from the cache"
    time.sleep(0.6)
    client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    assert upstream.last.json["messages"][0]["content"] == "v2"
