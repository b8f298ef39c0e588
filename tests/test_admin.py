"""Admin: the same operations through the CLI (`python proxy.py users|keys|workspaces|
energy ...`) and over HTTP (/admin/...), and bad input refused with nothing changed.

The CLI tests call `proxy.main(argv)` in this process: the exact code `python proxy.py`
runs, minus an interpreter start per call. The real subprocess (`python proxy.py users
create ...` printing the key once) runs in test_multiprocess.py.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import httpx
import pytest
import yaml

import proxy
from gateway.admin.operations import MASTER
from gateway.store import open_store
from tests.conftest import MASTER_KEY


# --------------------------------------------------------------------------- CLI helpers


@pytest.fixture
def cli_config(tmp_path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({
        "store": {"url": f"sqlite:///{tmp_path}/admin.db"},
        "auth": {"master_key": MASTER_KEY},
        "models": [{"name": "demo", "litellm_params": {"model": "demo/offline"}}],
        "tiers": {"free": {"models": ["*"]}, "pro": {"models": ["*"]}},
    }))
    return path


class Cli:
    def __init__(self, config: Path, capsys):
        self.config = config
        self.capsys = capsys
        self.url = yaml.safe_load(config.read_text())["store"]["url"]

    def __call__(self, *argv: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        try:
            rc = proxy.main([*argv, "--config", str(self.config)])
        except SystemExit as exc:  # argparse refusing the command line
            rc = exc.code
        out, err = self.capsys.readouterr()
        return rc, out, err

    def json(self, *argv: str):
        rc, out, err = self(*argv, "--json")
        assert rc == 0, err
        return json.loads(out)

    def store(self, operation):
        """Run `operation(store)` against the CLI's database (to verify what changed)."""
        async def go():
            async with open_store(self.url) as store:
                return await operation(store)

        return asyncio.run(go())

    def state(self) -> tuple:
        async def everything(store):
            users = await store.list_users()
            return (await store.list_workspaces(), users, await store.list_keys(),
                    [await store.ledger(u.id) for u in users])

        return self.store(everything)


@pytest.fixture
def cli(cli_config, capsys) -> Cli:
    return Cli(cli_config, capsys)


@pytest.fixture
def acme_user(cli) -> dict:
    cli.json("workspaces", "create", "acme")
    return cli.json("users", "create", "--workspace", "acme", "--tier", "pro", "--energy", "500")


# --------------------------------------------------------------------------- CLI


def test_cli_shows_times_as_iso_8601_not_epoch_floats(cli, acme_user):
    iso = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{3})?Z$")
    shown = cli.json("users", "show", acme_user["id"])
    assert iso.match(shown["created_at"]) and iso.match(shown["keys"][0]["created_at"])
    assert shown["keys"][0]["revoked_at"] is None
    rc, out, _ = cli("users", "show", acme_user["id"])
    created = next(line for line in out.splitlines() if line.startswith("created_at"))
    assert rc == 0 and iso.match(created.split()[-1]), created


def test_cli_users_create_json_carries_the_key_and_show_never_does(cli, acme_user):
    key = acme_user["api_key"]
    assert key.startswith("gw-") and acme_user["tier"] == "pro" and acme_user["energy"] == 500
    shown = cli.json("users", "show", acme_user["id"])
    assert shown["energy"] == 500 and len(shown["keys"]) == 1
    for argv in (("users", "show", acme_user["id"]), ("users", "list"), ("keys", "list")):
        rc, out, _ = cli(*argv)
        assert rc == 0 and key not in out
        rc, out, _ = cli(*argv, "--json")
        assert rc == 0 and key not in out


def test_cli_lists_users_and_workspaces_as_json(cli, acme_user):
    cli.json("workspaces", "create", "globex")
    assert [w["name"] for w in cli.json("workspaces", "list")] == ["acme", "globex"]
    assert cli.json("workspaces", "show", "acme")["users"] == 1
    assert [u["id"] for u in cli.json("users", "list", "--workspace", "acme")] == [acme_user["id"]]
    assert cli.json("users", "list", "--workspace", "globex") == []


def test_cli_workspaces_update_sets_profile_and_ai_settings(cli, acme_user):
    updated = cli.json("workspaces", "update", "acme", "--profile", '{"company_name": "Acme"}',
                       "--ai-settings", '{"inject_system_prompt": true, "default_model": "demo"}')
    assert updated["profile"] == {"company_name": "Acme"}
    assert updated["ai_settings"] == {"inject_system_prompt": True, "default_model": "demo"}
    assert cli.store(lambda s: s.get_workspace("acme")).profile == {"company_name": "Acme"}


def test_cli_set_tier_changes_the_tier(cli, acme_user):
    assert cli.json("users", "set-tier", acme_user["id"], "free")["tier"] == "free"
    assert cli.store(lambda s: s.get_user(acme_user["id"])).tier == "free"


def test_cli_energy_grant_adds_energy_with_a_ledger_row(cli, acme_user):
    assert cli.json("energy", "grant", acme_user["id"], "25", "--reason", "bonus") == {
        "user_id": acme_user["id"], "energy": 525}
    ledger = cli.json("energy", "ledger", acme_user["id"])
    assert [(e["kind"], e["amount"], e["reason"]) for e in ledger][-1] == ("grant", 25, "bonus")
    assert cli.json("energy", "adjust", acme_user["id"], "-25")["energy"] == 500


def test_cli_keys_revoke_and_rotate(cli, acme_user):
    old_key_id = acme_user["key"]["id"]
    rotated = cli.json("keys", "rotate", old_key_id)
    assert rotated["replaces"] == old_key_id and rotated["api_key"].startswith("gw-")
    assert cli.store(lambda s: s.lookup_key(acme_user["api_key"])).revoked
    assert not cli.store(lambda s: s.lookup_key(rotated["api_key"])).revoked
    assert cli.json("keys", "revoke", rotated["id"]) == {"id": rotated["id"], "revoked": True}
    assert cli.store(lambda s: s.lookup_key(rotated["api_key"])).revoked
    created = cli.json("keys", "create", acme_user["id"], "--admin")
    assert created["role"] == "workspace_admin"
    assert len(cli.json("keys", "list", "--user", acme_user["id"])) == 3


BAD_CLI_INPUT = [
    ("unknown tier", ("users", "create", "--workspace", "acme", "--tier", "gold"), "unknown tier"),
    ("negative energy", ("users", "create", "--workspace", "acme", "--energy", "-1"), "energy"),
    ("unknown workspace", ("users", "create", "--workspace", "nowhere"), "nowhere"),
    ("negative grant", ("energy", "grant", "{user}", "-5"), "positive"),
    ("zero grant", ("energy", "grant", "{user}", "0"), "positive"),
    ("huge grant", ("energy", "grant", "{user}", str(10**19)), "amount"),
    ("huge initial energy", ("users", "create", "--workspace", "acme", "--energy", str(10**19)), "energy"),
    ("overdraw", ("energy", "adjust", "{user}", "-501"), "below zero"),
    ("unknown user: show", ("users", "show", "usr_nobody"), "usr_nobody"),
    ("unknown user: grant", ("energy", "grant", "usr_nobody", "5"), "usr_nobody"),
    ("unknown user: set-tier", ("users", "set-tier", "usr_nobody", "pro"), "usr_nobody"),
    ("set unknown tier", ("users", "set-tier", "{user}", "gold"), "unknown tier"),
    ("unknown key: revoke", ("keys", "revoke", "key_nothing"), "key_nothing"),
    ("unknown key: rotate", ("keys", "rotate", "key_nothing"), "key_nothing"),
    ("duplicate workspace", ("workspaces", "create", "acme"), "already exists"),
    ("bad workspace name", ("workspaces", "create", "Bad Name"), "workspace name"),
    ("underscore workspace name", ("workspaces", "create", "my_ws"), "workspace name"),
    ("unknown default model", ("workspaces", "update", "acme", "--ai-settings", '{"default_model": "gpt-9"}'),
     "gpt-9"),
]


@pytest.mark.parametrize("argv,needle", [(a, n) for _, a, n in BAD_CLI_INPUT], ids=[i for i, _, _ in BAD_CLI_INPUT])
def test_cli_bad_input_fails_clearly_and_changes_nothing(cli, acme_user, argv, needle):
    argv = [a.replace("{user}", acme_user["id"]) for a in argv]
    before = cli.state()
    rc, out, err = cli(*argv)
    assert rc != 0
    assert needle in err
    assert "Traceback" not in err
    assert cli.state() == before
    rc, out, err = cli(*argv, "--json")
    assert rc != 0
    assert json.loads(err)["error"]["message"]
    assert cli.state() == before


def test_cli_rotating_a_revoked_key_is_refused(cli, acme_user):
    cli.json("keys", "revoke", acme_user["key"]["id"])
    before = cli.state()
    rc, _, err = cli("keys", "rotate", acme_user["key"]["id"])
    assert rc != 0 and "revoked" in err
    assert cli.state() == before


# --------------------------------------------------------------------------- HTTP


def http(gw, method: str, path: str, key: str = MASTER_KEY, body=None) -> httpx.Response:
    return httpx.request(method, gw.url + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=10)


@pytest.fixture(params=["master", "workspace_admin"])
def admin_key(request, gateway) -> str:
    if request.param == "master":
        gateway.run(gateway.admin().create_workspace(MASTER, "acme"))
        return MASTER_KEY
    return gateway.make_user(workspace="acme", role="workspace_admin", energy=0)[1]


@pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)
def test_http_admin_user_lifecycle(gateway, admin_key):
    # Energy and tiers are the master's (a workspace admin gets 403 for them, see
    # test_workspace.py); the money steps run with the master key in both variants.
    created = http(gateway, "POST", "/admin/users", MASTER_KEY, {"workspace": "acme", "tier": "pro", "energy": 500})
    assert created.status_code == 201, created.text
    user = created.json()
    assert user["api_key"].startswith("gw-")
    uid = user["id"]
    shown = http(gateway, "GET", f"/admin/users/{uid}", admin_key).json()
    assert shown["energy"] == 500 and user["api_key"] not in json.dumps(shown)
    assert uid in [u["id"] for u in http(gateway, "GET", "/admin/users", admin_key).json()]
    assert http(gateway, "PATCH", f"/admin/users/{uid}", MASTER_KEY, {"tier": "free"}).json()["tier"] == "free"
    assert http(gateway, "POST", f"/admin/users/{uid}/energy", MASTER_KEY, {"amount": 10}).json()["energy"] == 510
    ledger = http(gateway, "GET", f"/admin/users/{uid}/ledger", admin_key).json()
    assert [(e["kind"], e["amount"]) for e in ledger] == [("grant", 500), ("grant", 10)]
    assert len(http(gateway, "GET", f"/admin/users/{uid}/ledger?limit=1", admin_key).json()) == 1
    key_id = user["key"]["id"]
    rotated = http(gateway, "POST", f"/admin/keys/{key_id}/rotate", admin_key)
    assert rotated.status_code == 201 and rotated.json()["replaces"] == key_id
    revoked = http(gateway, "POST", f"/admin/keys/{rotated.json()['id']}/revoke", admin_key)
    assert revoked.json() == {"id": rotated.json()["id"], "revoked": True}
    keys = http(gateway, "GET", f"/admin/keys?user={uid}", admin_key).json()
    assert len(keys) == 2 and all(k["revoked_at"] is not None for k in keys)
    assert user["api_key"] not in json.dumps(keys)


def test_http_admin_workspaces_create_and_list_with_master_key(gateway):
    created = http(gateway, "POST", "/admin/workspaces", body={"name": "acme", "profile": {"company_name": "Acme"}})
    assert created.status_code == 201, created.text
    assert created.json()["profile"] == {"company_name": "Acme"}
    assert [w["name"] for w in http(gateway, "GET", "/admin/workspaces").json()] == ["acme"]
    again = http(gateway, "POST", "/admin/workspaces", body={"name": "acme"})
    assert again.status_code == 409


def test_http_admin_refuses_missing_and_wrong_credentials(gateway):
    assert httpx.get(gateway.url + "/admin/users").status_code == 401
    response = http(gateway, "GET", "/admin/users", "gw-not-a-real-key-0000000")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


BAD_HTTP_INPUT = [
    ("unknown tier", "POST", "/admin/users", {"workspace": "acme", "tier": "gold"}, 400),
    ("negative energy", "POST", "/admin/users", {"workspace": "acme", "energy": -1}, 400),
    ("fractional energy", "POST", "/admin/users", {"workspace": "acme", "energy": 2.5}, 400),
    ("bad role", "POST", "/admin/users", {"workspace": "acme", "role": "master"}, 400),
    ("tier not a string", "POST", "/admin/users", {"workspace": "acme", "tier": ["pro"]}, 400),
    ("workspace not a string", "POST", "/admin/users", {"workspace": ["acme"]}, 400),
    ("set tier not a string", "PATCH", "/admin/users/{user}", {"tier": {"pro": 1}}, 400),
    ("name not a string", "POST", "/admin/users", {"workspace": "acme", "name": {"x": 1}}, 400),
    ("reason not a string", "POST", "/admin/users/{user}/energy", {"amount": 5, "reason": ["x"]}, 400),
    ("negative grant", "POST", "/admin/users/{user}/energy", {"amount": -5}, 400),
    ("fractional grant", "POST", "/admin/users/{user}/energy", {"amount": 1.5}, 400),
    ("boolean grant", "POST", "/admin/users/{user}/energy", {"amount": True}, 400),
    ("huge grant", "POST", "/admin/users/{user}/energy", {"amount": 10**19}, 400),
    ("huge initial energy", "POST", "/admin/users", {"workspace": "acme", "energy": 10**19}, 400),
    ("textual grant", "POST", "/admin/users/{user}/energy", {"amount": "lots"}, 400),
    ("missing grant", "POST", "/admin/users/{user}/energy", {}, 400),
    ("bad kind", "POST", "/admin/users/{user}/energy", {"amount": 5, "kind": "refill"}, 400),
    ("overdraw", "POST", "/admin/users/{user}/energy", {"amount": -501, "kind": "adjust"}, 400),
    ("unknown user grant", "POST", "/admin/users/usr_nobody/energy", {"amount": 5}, 404),
    ("set unknown tier", "PATCH", "/admin/users/{user}", {"tier": "gold"}, 400),
    ("set no tier", "PATCH", "/admin/users/{user}", {}, 400),
    ("unknown user tier", "PATCH", "/admin/users/usr_nobody", {"tier": "pro"}, 404),
    ("zero ledger limit", "GET", "/admin/users/{user}/ledger?limit=0", None, 400),
    ("negative ledger limit", "GET", "/admin/users/{user}/ledger?limit=-2", None, 400),
    ("unknown key revoke", "POST", "/admin/keys/key_nothing/revoke", None, 404),
    ("bad workspace name", "POST", "/admin/workspaces", {"name": "Bad Name"}, 400),
    ("underscore workspace name", "POST", "/admin/workspaces", {"name": "my_ws"}, 400),
    ("profile not an object", "PATCH", "/admin/workspaces/acme", {"profile": ["x"]}, 400),
    ("body not an object", "POST", "/admin/users", [1, 2], 400),
]


@pytest.mark.parametrize("method,path,body,status", [x[1:] for x in BAD_HTTP_INPUT], ids=[x[0] for x in BAD_HTTP_INPUT])
def test_http_admin_bad_input_is_refused_and_changes_nothing(gateway, method, path, body, status):
    uid, _ = gateway.make_user(workspace="acme", tier="pro", energy=500)
    store, run = gateway.store, gateway.run

    def state():
        users = run(store.list_users())
        return (run(store.list_workspaces()), users, run(store.list_keys()), [run(store.ledger(u.id)) for u in users])

    before = state()
    response = http(gateway, method, path.format(user=uid), body=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error"
    assert state() == before


def test_cli_with_an_unreachable_store_fails_clearly_without_a_traceback(tmp_path, capsys):
    config = tmp_path / "down.yaml"
    config.write_text(yaml.safe_dump({
        "store": {"url": "postgresql://postgres:hunter2@127.0.0.1:1/test"},
        "models": [{"name": "demo", "litellm_params": {"model": "demo/offline"}}],
    }))
    rc, _, err = Cli(config, capsys)("users", "list")
    assert rc != 0
    assert "cannot open the store" in err
    assert "Traceback" not in err and "hunter2" not in err
