"""End users by the app's own ids (docs/admin.md "End users by your app's ids"): one service
key acts for the end users a request names (OpenAI's `user` field, `metadata.user_id` on
/v1/messages, or an `X-End-User-Id` header). Each is provisioned once, on first sight, in
the key's workspace, with the configured starting tier and energy, and charged, limited and
logged as any user. An ordinary key acts for itself only. SQLite and PostgreSQL.

Real HTTP: openai SDK (and httpx) -> gateway -> fake upstream; the admin API over httpx.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import httpx
import openai
import pytest

import proxy
from gateway.admin.operations import MASTER
from tests.conftest import MASTER_KEY

MSGS = [{"role": "user", "content": "hi"}]
BOTH = pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)
CHAIN = ["auth", "rate_limit", "tier_policy", "energy", "accounting"]
HEADERS = {"Authorization": f"Bearer {MASTER_KEY}"}
START = {"tier": "free", "energy": 20}  # gpt-4o-mini costs 2 (tests/conftest.py)


def start(gateway_factory, **kw):
    return gateway_factory(plugins=CHAIN, end_users=kw.pop("end_users", START), **kw)


def service_key(gw, workspace: str = "acme") -> tuple[str, str]:
    """(the service key's own user, the service key)."""
    owner, _ = gw.make_user(workspace=workspace, tier="pro", energy=0)
    answer = httpx.post(gw.url + f"/admin/users/{owner}/keys", json={"service": True, "label": "app"},
                        headers=HEADERS)
    assert answer.status_code == 201, answer.text
    assert answer.json()["service"] is True
    return owner, answer.json()["api_key"]


def end_users(gw, workspace: str = "acme") -> dict[str, object]:
    """The workspace's end users by the app's id."""
    ws = gw.run(gw.store.get_workspace(workspace))
    return {u.external_id: u for u in gw.run(gw.store.list_users(workspace_id=ws.id)) if u.external_id}


def settled_rows(gw, n: int) -> list[dict]:
    gw.settle()
    rows = gw.run(gw.store.usage_rows())
    assert len(rows) == n, rows
    return rows


@BOTH
def test_a_service_key_acting_for_50_new_end_users_at_once_provisions_each_once_and_charges_exactly(
        gateway_factory, store_url, upstream):
    gw = start(gateway_factory)
    other = start(gateway_factory)  # a second gateway on the same database: its own cache, its own connections
    owner, key = service_key(gw)
    ids = [f"app-user-{i}" for i in range(50)]

    async def burst():
        async with gw.aclient(key) as one, other.aclient(key) as two:
            calls = [client.chat.completions.create(model="gpt-4o-mini", messages=MSGS, user=external)
                     for external in ids for client in (one, two)]  # each new end user on both at once
            return await asyncio.gather(*calls)

    answers = gw.run(burst(), timeout=60)
    assert len(answers) == 100
    found = end_users(gw)
    assert sorted(found) == sorted(ids)  # exactly one user per id, none for the key's own
    other.settle()
    rows = settled_rows(gw, 100)
    by_user = Counter(row["user_id"] for row in rows)
    for external in ids:
        user = found[external]
        assert user.tier == "free"
        assert by_user[user.id] == 2  # the usage rows name the end user
        ledger = gw.ledger(user.id)
        assert [(e.kind, e.amount) for e in ledger if e.kind == "grant"] == [("grant", 20)]  # provisioned once
        assert gw.balance(user.id) == 20 - 2 * 2  # charged exactly
    assert gw.balance(owner) == 0 and gw.ledger(owner) == []  # the service key's own user paid nothing
    provisions = [r for r in gw.run(gw.store.audit_entries(limit=1000)) if r["action"] == "user.provision"]
    assert sorted(r["after"]["external_id"] for r in provisions) == sorted(ids)
    assert {r["actor"] for r in provisions} == {"service_key"}
    assert all(r["workspace_id"] == user.workspace_id for r in provisions)
    # The app's id reaches the upstream as it was sent (OpenAI's abuse-monitoring id).
    assert {r.json["user"] for r in upstream.requests} == set(ids)


@BOTH
def test_ids_are_scoped_to_the_workspace_and_a_service_key_cannot_reach_another_workspaces_users(
        gateway_factory, store_url):
    gw = start(gateway_factory)
    _, acme_key = service_key(gw, "acme")
    _, globex_key = service_key(gw, "globex")
    gw.client(globex_key).chat.completions.create(model="gpt-4o-mini", messages=MSGS, user="alice")
    globex_alice = end_users(gw, "globex")["alice"]
    gw.settle()
    assert gw.balance(globex_alice.id) == 18
    # acme's key naming "alice", or globex's user by its gateway id, names acme's own users.
    acme_client = gw.client(acme_key)
    acme_client.chat.completions.create(model="gpt-4o-mini", messages=MSGS, user="alice")
    acme_client.chat.completions.create(model="gpt-4o-mini", messages=MSGS, user=globex_alice.id)
    gw.settle()
    acme = end_users(gw, "acme")
    assert set(acme) == {"alice", globex_alice.id}
    assert acme["alice"].id != globex_alice.id and acme[globex_alice.id].id != globex_alice.id
    assert {u.workspace_id for u in acme.values()} == {gw.run(gw.store.get_workspace("acme")).id}
    assert gw.balance(globex_alice.id) == 18  # untouched by acme's key
    assert list(end_users(gw, "globex")) == ["alice"]


@BOTH
def test_an_ordinary_key_acts_only_for_itself(gateway_factory, store_url, upstream):
    gw = start(gateway_factory)
    user, key = gw.make_user(tier="pro", energy=100)
    client = gw.client(key)
    client.chat.completions.create(model="gpt-4o-mini", messages=MSGS, user="someone-else")
    assert upstream.last.json["user"] == "someone-else"  # forwarded, as before
    gw.settle()
    assert gw.balance(user) == 98 and end_users(gw) == {}
    with pytest.raises(openai.PermissionDeniedError) as refused:
        client.chat.completions.create(model="gpt-4o-mini", messages=MSGS,
                                       extra_headers={"X-End-User-Id": "someone-else"})
    assert refused.value.body["code"] == "end_user_not_allowed"
    gw.settle()
    assert gw.balance(user) == 98 and end_users(gw) == {}
    row = settled_rows(gw, 2)[0]
    assert row["user_id"] == user


def test_a_service_key_must_name_a_valid_end_user(gateway_factory, upstream):
    gw = start(gateway_factory)
    owner, key = service_key(gw)
    client = gw.client(key)
    with pytest.raises(openai.BadRequestError) as missing:
        client.chat.completions.create(model="gpt-4o-mini", messages=MSGS)
    assert missing.value.body["code"] == "end_user_required" and missing.value.body["param"] == "user"
    for bad in ("", "x" * 129, "has space", "naïve", "a\nb"):
        with pytest.raises(openai.BadRequestError) as invalid:
            client.chat.completions.create(model="gpt-4o-mini", messages=MSGS, user=bad)
        assert invalid.value.body["code"] == "invalid_end_user", bad
    answer = httpx.post(gw.base_url + "/chat/completions", headers={"Authorization": f"Bearer {key}",
                                                                   "X-End-User-Id": "bob"},
                        json={"model": "gpt-4o-mini", "messages": MSGS, "user": "alice"})
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_end_user", answer.text
    answer = httpx.post(gw.base_url + "/chat/completions", headers={"Authorization": f"Bearer {key}",
                                                                   "X-End-User-Id": "bad id"},
                        json={"model": "gpt-4o-mini", "messages": MSGS})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "X-End-User-Id", answer.text
    assert upstream.count() == 0 and end_users(gw) == {}
    # Not billed, nothing to name: GET /v1/models lists what the key's own user may use.
    assert client.models.list().data


def test_every_surface_names_the_end_user(gateway_factory, upstream):
    gw = start(gateway_factory, end_users={"tier": "free", "energy": 20, "workspaces": {"acme": {"tier": "pro"}}})
    _, key = service_key(gw)
    client = gw.client(key)
    client.chat.completions.create(model="gpt-4o-mini", messages=MSGS, extra_headers={"X-End-User-Id": "by-header"})
    assert "user" not in upstream.last.json  # the header is not added to the body
    client.chat.completions.create(model="gpt-4o-mini", messages=MSGS, user="by-header",
                                   extra_headers={"X-End-User-Id": "by-header"})
    client.embeddings.create(model="embed", input="hello", user="embedder")
    answer = httpx.post(gw.url + "/v1/messages", headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
                        json={"model": "gpt-4o-mini", "max_tokens": 20, "messages": MSGS,
                              "metadata": {"user_id": "claude-user"}})
    assert answer.status_code == 200, answer.text
    found = end_users(gw)
    assert set(found) == {"by-header", "embedder", "claude-user"}
    assert {u.tier for u in found.values()} == {"pro"}  # acme's own starting tier
    rows = settled_rows(gw, 4)
    assert Counter(r["user_id"] for r in rows) == {found["by-header"].id: 2, found["embedder"].id: 1,
                                                   found["claude-user"].id: 1}


def test_service_keys_are_made_by_the_master_key_audited_and_kept_by_a_rotation(gateway_factory, tmp_path, capsys):
    gw = start(gateway_factory)
    owner, key = service_key(gw)
    _, admin_key = gw.make_user(role="workspace_admin")
    answer = httpx.post(gw.url + f"/admin/users/{owner}/keys", json={"service": True},
                        headers={"Authorization": f"Bearer {admin_key}"})
    assert answer.status_code == 403, answer.text
    for body in ({"service": "yes"}, {"service": True, "role": "workspace_admin"}):
        answer = httpx.post(gw.url + f"/admin/users/{owner}/keys", json=body, headers=HEADERS)
        assert answer.status_code == 400, (body, answer.text)
    created = [r for r in gw.run(gw.store.audit_entries()) if r["action"] == "key.create"]
    assert created[0]["after"]["service"] is True and key not in str(created)
    service = next(k for k in gw.run(gw.store.list_keys(user_id=owner)) if k.service)
    rotated = gw.run(gw.admin().rotate_key(MASTER, service.id))
    assert rotated["service"] is True
    gw.client(rotated["api_key"]).chat.completions.create(model="gpt-4o-mini", messages=MSGS, user="carol")
    assert "carol" in end_users(gw)
    # The CLI: keys create --service.
    config = tmp_path / "config.yaml"
    config.write_text(f"store: {{url: '{gw.config.store.url}'}}\nmodels: [{{name: demo, litellm_params: {{model: demo/offline}}}}]\n")
    assert proxy.main(["keys", "create", owner, "--service", "--json", "--config", str(config)]) == 0
    assert '"service": true' in capsys.readouterr().out


def test_end_users_are_limited_each_by_their_own_tier_and_an_operators_change_applies_at_once(
        gateway_factory, upstream):
    tiers = {"free": {"models": ["gpt-4o-mini", "demo", "claude", "embed"], "limits": {"rpm": 2}},
             "pro": {"models": ["*"]}}
    gw = start(gateway_factory, tiers=tiers)
    _, key = service_key(gw)
    client = gw.client(key)
    for _ in range(2):
        client.chat.completions.create(model="gpt-4o-mini", messages=MSGS, user="ann")
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="gpt-4o-mini", messages=MSGS, user="ann")
    client.chat.completions.create(model="gpt-4o-mini", messages=MSGS, user="ben")  # ben's own minute
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MSGS, user="ben")
    assert raw.headers["X-Model-Downgraded-From"] == "gpt-4o"  # gpt-4o is not on the free tier
    gw.run(gw.admin().set_tier(MASTER, end_users(gw)["ann"].id, "pro"))  # no limits, every model
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MSGS, user="ann")
    assert "X-Model-Downgraded-From" not in raw.headers and raw.parse().model
