"""The audit log (docs/admin.md "Audit log"): every mutating /admin route writes one row with
the actor (the master key, or which workspace admin key), the action, the target, the
values before and after, the request id and the time; never a secret (no key, no key
hash); a workspace admin reads its own workspace's rows only; the CLI's actions are
written too; no statement can change or delete a row. SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3

import asyncpg
import httpx
import pytest
import yaml

from tests.conftest import MASTER_KEY

BOTH = pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)
CHAIN = ["auth", "tier_policy", "energy"]


def call(gw, method: str, path: str, key: str = MASTER_KEY, **kw) -> httpx.Response:
    return httpx.request(method, gw.url + path, headers={"Authorization": f"Bearer {key}"}, timeout=30, **kw)


def audit_rows(gw, key: str = MASTER_KEY, **params) -> list[dict]:
    answer = call(gw, "GET", "/admin/audit", key, params=params)
    assert answer.status_code == 200, answer.text
    return answer.json()


def mutating_routes(gw) -> set[tuple[str, str]]:
    return {(route.method, route.resource.canonical) for route in gw.app.router.routes()
            if route.resource is not None and route.resource.canonical.startswith("/admin")
            and route.method not in ("GET", "HEAD", "OPTIONS")}


@BOTH
def test_every_mutating_admin_route_writes_one_audit_row_without_a_secret(gateway_factory, store_url):
    gw = gateway_factory(plugins=CHAIN)
    secrets: list[str] = []
    state: dict[str, str] = {}

    def remember(answer: httpx.Response) -> dict:
        assert answer.status_code in (200, 201), answer.text
        body = answer.json()
        if body.get("api_key"):
            secrets.append(body["api_key"])
        return body

    # (method, route) -> (how to call it, the action, what the row's target is)
    def create_workspace():
        state["workspace"] = remember(call(gw, "POST", "/admin/workspaces", json={"name": "acme"}))["id"]
        return state["workspace"]

    def create_user():
        body = remember(call(gw, "POST", "/admin/users", json={"workspace": "acme", "tier": "pro", "energy": 5}))
        state["user"], state["key"] = body["id"], body["key"]["id"]
        return body["id"]

    def set_budget():
        state["budget"] = remember(call(gw, "POST", "/admin/budgets", json={
            "user": state["user"], "unit": "usd", "amount": 5, "period": "month", "alerts": [80]}))["id"]
        return state["budget"]

    steps = {
        ("POST", "/admin/workspaces"): (create_workspace, "workspace.create"),
        ("PATCH", "/admin/workspaces/{workspace}"): (lambda: remember(call(
            gw, "PATCH", "/admin/workspaces/acme", json={"profile": {"company_name": "Acme"}}))["id"],
            "workspace.update"),
        ("POST", "/admin/users"): (create_user, "user.create"),
        ("PATCH", "/admin/users/{user}"): (lambda: remember(call(
            gw, "PATCH", f"/admin/users/{state['user']}", json={"tier": "free"}))["id"], "user.set_tier"),
        ("POST", "/admin/users/{user}/energy"): (lambda: remember(call(
            gw, "POST", f"/admin/users/{state['user']}/energy", json={"amount": 7, "reason": "ticket 42"}))["user_id"],
            "energy.grant"),
        ("POST", "/admin/users/{user}/keys"): (lambda: remember(call(
            gw, "POST", f"/admin/users/{state['user']}/keys", json={"label": "second"}))["id"], "key.create"),
        ("PATCH", "/admin/keys/{key}"): (lambda: remember(call(
            gw, "PATCH", f"/admin/keys/{state['key']}", json={"rpm": 5}))["id"], "key.update"),
        ("POST", "/admin/keys/{key}/rotate"): (lambda: remember(call(
            gw, "POST", f"/admin/keys/{state['key']}/rotate"))["replaces"], "key.rotate"),
        ("POST", "/admin/keys/{key}/revoke"): (lambda: remember(call(
            gw, "POST", f"/admin/keys/{state['key']}/revoke"))["id"], "key.revoke"),
        ("POST", "/admin/budgets"): (set_budget, "budget.set"),
        ("DELETE", "/admin/budgets/{budget}"): (lambda: remember(call(
            gw, "DELETE", f"/admin/budgets/{state['budget']}"))["id"], "budget.delete"),
    }
    # DELETE /admin/session (sign-out of a dashboard OIDC session) needs an identity provider:
    # its audit row (session.sign_out) is tested in tests/test_oidc.py.
    signed_in_routes = {("DELETE", "/admin/session")}
    assert set(steps) == mutating_routes(gw) - signed_in_routes, "a mutating /admin route without an audit test"
    for route, (step, action) in steps.items():
        before = len(audit_rows(gw, limit=1000))
        target = step()
        rows = audit_rows(gw, limit=1000)
        assert len(rows) == before + 1, route
        row = rows[0]
        assert (row["action"], row["target"], row["actor"], row["via"]) == (action, target, "master", "api"), row
        assert row["request_id"] and row["created_at"] > 0
    by_action = {row["action"]: row for row in audit_rows(gw)}
    assert (by_action["user.set_tier"]["before"], by_action["user.set_tier"]["after"]) == (
        {"tier": "pro"}, {"tier": "free"})
    assert by_action["energy.grant"]["before"] == {"energy": 5}
    assert by_action["energy.grant"]["after"] == {"energy": 12, "amount": 7, "reason": "ticket 42"}
    assert by_action["key.update"]["before"]["rpm"] is None and by_action["key.update"]["after"]["rpm"] == 5
    assert by_action["key.revoke"]["after"]["revoked_at"] is not None
    assert by_action["workspace.update"]["after"] == {"profile": {"company_name": "Acme"}}

    text = json.dumps(audit_rows(gw, limit=1000))
    assert len(secrets) == 3  # the user's key, the second one, the rotated one
    for secret in secrets:
        assert secret not in text and hashlib.sha256(secret.encode()).hexdigest() not in text
    assert '"api_key"' not in text and "key_hash" not in text


@BOTH
def test_a_workspace_admin_is_named_as_the_actor_and_reads_only_its_workspace(gateway_factory, store_url):
    gw = gateway_factory(plugins=CHAIN)
    _, admin_key = gw.make_user(workspace="acme", role="workspace_admin")
    other, _ = gw.make_user(workspace="globex")
    user = call(gw, "POST", "/admin/users", admin_key, json={}).json()
    call(gw, "POST", f"/admin/users/{other}/keys", json={})  # master, in globex
    acme = gw.run(gw.store.get_workspace("acme")).id
    admin_key_row = next(k for k in gw.run(gw.store.list_keys(workspace_id=acme)) if k.role == "workspace_admin")
    rows = audit_rows(gw, admin_key)
    assert rows and {row["workspace_id"] for row in rows} == {acme}
    mine = next(row for row in rows if row["target"] == user["id"])
    assert (mine["actor"], mine["actor_key_id"], mine["actor_key_prefix"]) == (
        "workspace_admin", admin_key_row.id, admin_key_row.prefix)
    assert admin_key not in json.dumps(rows)
    assert call(gw, "GET", "/admin/audit", admin_key, params={"workspace": "globex"}).status_code == 404
    assert {row["action"] for row in audit_rows(gw, workspace="globex")} >= {"key.create"}


def test_audit_parameters_are_range_checked(gateway_factory):
    gw = gateway_factory(plugins=CHAIN)
    for params in ({"limit": "0"}, {"limit": "1001"}, {"limit": "1.5"}, {"since": "0s"}, {"since": "3661d"},
                   {"since": "yesterday"}, {"since": "9" * 400 + "h"}):
        answer = call(gw, "GET", "/admin/audit", params=params)
        assert answer.status_code == 400 and answer.json()["error"]["param"] == next(iter(params)), answer.text
    assert call(gw, "GET", "/admin/audit", params={"limit": "1000", "since": "3660d"}).status_code == 200


def test_the_cli_writes_its_actions_and_reads_the_log(gateway_factory, tmp_path, capsys):
    import proxy

    gw = gateway_factory(plugins=CHAIN)
    user, _ = gw.make_user(tier="pro")
    config = tmp_path / "cli.yaml"
    config.write_text(yaml.safe_dump({"store": {"url": gw.config.store.url}, "auth": {"default_tier": "pro"},
                                      "tiers": {"pro": {"models": ["*"]}},
                                      "models": [{"name": "demo", "litellm_params": {"model": "demo/offline"}}]}))
    capsys.readouterr()
    assert proxy.main(["keys", "create", user, "--label", "from the cli", "--json", "--config", str(config)]) == 0
    created = json.loads(capsys.readouterr().out)
    assert proxy.main(["audit", "--since", "1h", "--limit", "5", "--json", "--config", str(config)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["action"] == "key.create" and rows[0]["via"] == "cli" and rows[0]["actor"] == "master"
    assert rows[0]["after"]["label"] == "from the cli" and rows[0]["request_id"].startswith("cli-")
    assert created["api_key"] not in json.dumps(rows)
    assert proxy.main(["audit", "--limit", "0", "--config", str(config)]) == 2


@BOTH
def test_no_statement_changes_or_deletes_an_audit_row(gateway_factory, store_url):
    gw = gateway_factory(plugins=CHAIN)
    gw.make_user()
    assert audit_rows(gw)
    if store_url.startswith("sqlite"):
        db = sqlite3.connect(store_url.removeprefix("sqlite:///"))
        try:
            for sql in ("UPDATE audit_log SET actor = 'someone'", "DELETE FROM audit_log"):
                with pytest.raises(sqlite3.DatabaseError, match="append-only"):
                    db.execute(sql)
        finally:
            db.close()
        return

    async def tamper() -> None:
        schema = store_url.rsplit("schema=", 1)[1]
        conn = await asyncpg.connect(store_url.split("?", 1)[0], server_settings={"search_path": schema})
        try:
            for sql in ("UPDATE audit_log SET actor = 'someone'", "DELETE FROM audit_log", "TRUNCATE audit_log"):
                with pytest.raises(asyncpg.RaiseError, match="append-only"):
                    await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(tamper())


@pytest.mark.parametrize("store_url", ["postgres"], indirect=True)
def test_the_documented_grants_let_the_gateway_append_but_never_change_the_log(store_url):
    """docs/admin.md's GRANTs: a schema owned by one role, migrated by it; the gateway's role
    opens it, writes users and audit rows, and cannot update, delete, truncate or unprotect them."""
    import uuid

    from gateway.store import open_store

    base = store_url.split("?", 1)[0]
    schema = store_url.rsplit("schema=", 1)[1] + "_grants"
    owner, app = f"o_{uuid.uuid4().hex[:8]}", f"a_{uuid.uuid4().hex[:8]}"
    as_role = lambda role: base.replace("://postgres@", f"://{role}@")  # noqa: E731

    async def go() -> None:
        admin = await asyncpg.connect(base)
        await admin.execute(f"CREATE ROLE {owner} LOGIN; CREATE ROLE {app} LOGIN;"
                            f" CREATE SCHEMA {schema} AUTHORIZATION {owner}")
        try:
            async with open_store(f"{as_role(owner)}?schema={schema}"):
                pass  # migrated by the owner
            conn = await asyncpg.connect(as_role(owner))
            await conn.execute(f"""GRANT USAGE ON SCHEMA {schema} TO {app};
                GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {schema} TO {app};
                GRANT USAGE ON ALL SEQUENCES IN SCHEMA {schema} TO {app};
                GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA {schema} TO {app};
                REVOKE UPDATE, DELETE, TRUNCATE ON {schema}.audit_log FROM {app};""")
            await conn.close()
            async with open_store(f"{as_role(app)}?schema={schema}") as store:
                workspace = await store.create_workspace("acme")
                await store.create_user(workspace.id, "pro", energy=5)
                await store.append_audit({"actor": "master", "via": "cli", "action": "user.create"})
                assert len(await store.audit_entries()) == 1
            conn = await asyncpg.connect(as_role(app), server_settings={"search_path": schema})
            try:
                for sql in ("UPDATE audit_log SET actor = 'x'", "DELETE FROM audit_log", "TRUNCATE audit_log",
                            "DROP TRIGGER audit_log_no_change ON audit_log",
                            "ALTER TABLE audit_log DISABLE TRIGGER ALL"):
                    with pytest.raises(asyncpg.InsufficientPrivilegeError):
                        await conn.execute(sql)
            finally:
                await conn.close()
        finally:
            await admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE; DROP OWNED BY {app}; DROP ROLE {app};"
                                f" DROP OWNED BY {owner}; DROP ROLE {owner}")
            await admin.close()

    asyncio.run(go())
