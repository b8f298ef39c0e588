"""Secure by default (gateway/exposure.py): a config without a `plugins:` section runs the
standard chain; a chain without `auth` (or without `energy`/`accounting` in front of a
model that calls a provider) is refused by `check-config`, at start-up and by config
validation, unless the operator states `server.allow_unauthenticated: true`, which is
accepted on a loopback address only; the ready line then says so in words."""

from __future__ import annotations

import copy
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

import proxy
from gateway.config import ConfigError, load_config_data
from gateway.exposure import STANDARD_CHAIN
from tests.conftest import base_config
from tests.fakes import free_port

ROOT = Path(__file__).resolve().parent.parent
MSGS = [{"role": "user", "content": "hi"}]


def stated_nothing(upstream: Any, store_url: str, **changes: Any) -> dict[str, Any]:
    """The harness's config as an operator would write it: no statement about the chain."""
    data = base_config(upstream, store_url=store_url)
    data["server"].pop("allow_unauthenticated")
    data.update(changes)
    return data


def write(tmp_path: Path, data: dict[str, Any], name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def check_config(path: Path, capsys) -> tuple[int, str]:
    capsys.readouterr()
    rc = proxy.main(["check-config", str(path)])
    out = capsys.readouterr()
    return rc, out.out + out.err


def demo_only(tmp_path: Path, **server: Any) -> dict[str, Any]:
    return {"server": {"host": "127.0.0.1", "port": free_port(), "shutdown_grace": 2, **server},
            "store": {"url": f"sqlite:///{tmp_path}/gateway.db"},
            "models": [{"name": "demo", "litellm_params": {"model": "demo/offline"}}],
            "tiers": {"free": {"models": ["*"]}}}


def serve(path: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "proxy.py", "serve", "--config", str(path), *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def refused_at_start(path: Path, *args: str) -> str:
    """`serve` exits 1 before listening; its stderr. (A gateway that starts instead is
    stopped and the test fails: it would have served.)"""
    process = serve(path, *args)
    try:
        _, err = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)
        raise AssertionError("the gateway started: it should have refused the config") from None
    assert process.returncode == 1, err
    return err


def test_the_standard_chain_is_the_shipped_config_yaml_list():
    shipped = yaml.safe_load((ROOT / "config.yaml").read_text())["plugins"]
    assert [p if isinstance(p, str) else p["name"] for p in shipped] == list(STANDARD_CHAIN)


def test_without_a_plugins_section_every_call_needs_a_key_and_is_charged_and_logged(gateway_factory, upstream,
                                                                                    store_url):
    data = stated_nothing(upstream, store_url)
    del data["plugins"]
    gw = gateway_factory(raw=data)
    assert [p.name for p in gw.config.plugins] == list(STANDARD_CHAIN)
    with pytest.raises(openai.AuthenticationError):
        gw.client().chat.completions.create(model="gpt-4o-mini", messages=MSGS)
    user, key = gw.make_user(tier="pro", energy=50)
    gw.client(key).chat.completions.create(model="gpt-4o-mini", messages=MSGS)
    gw.settle()
    assert gw.balance(user) == 50 - 2  # ai_message on gpt-4o-mini
    rows = gw.run(gw.store.usage_rows(since=0))
    assert sorted((r["status"], r["user_id"] or "") for r in rows) == [(200, user), (401, "")]
    assert len(upstream.requests) == 1  # the unauthenticated call never reached the provider


def test_an_empty_plugins_key_is_the_standard_chain_too():
    config = load_config_data({"models": [{"name": "demo", "litellm_params": {"model": "demo/offline"}}],
                               "plugins": None})
    assert [p.name for p in config.plugins] == list(STANDARD_CHAIN)


@pytest.mark.parametrize("chain", [[], ["request_log"], ["request_log", "tier_policy", "energy", "accounting"],
                                   [{"name": "auth", "enabled": False}, "energy", "accounting"]])
def test_check_config_refuses_a_chain_without_auth(tmp_path, upstream, capsys, chain):
    rc, out = check_config(write(tmp_path, stated_nothing(upstream, "sqlite:///x.db", plugins=chain)), capsys)
    assert rc == 1
    assert "plugins: the chain runs unauthenticated" in out and "server.allow_unauthenticated: true" in out


@pytest.mark.parametrize("chain,missing", [(["auth"], "'energy' or 'accounting'"),
                                           (["auth", "energy"], "'accounting'"),
                                           (["auth", "accounting"], "'energy'")])
def test_check_config_refuses_a_chain_without_energy_or_accounting_in_front_of_a_provider(
        tmp_path, upstream, capsys, chain, missing):
    rc, out = check_config(write(tmp_path, stated_nothing(upstream, "sqlite:///x.db", plugins=chain)), capsys)
    assert rc == 1 and f"plugins: the chain runs unmetered (no {missing} plugin" in out
    assert "gpt-4o-mini" in out


def test_a_chain_with_auth_in_front_of_the_offline_demo_only_needs_no_energy(tmp_path, capsys):
    rc, out = check_config(write(tmp_path, {**demo_only(tmp_path), "plugins": ["auth"]}), capsys)
    assert rc == 0, out


def test_the_standard_chain_passes_check_config_without_any_statement(tmp_path, upstream, capsys):
    rc, out = check_config(write(tmp_path, stated_nothing(upstream, "sqlite:///x.db", plugins=list(STANDARD_CHAIN))),
                           capsys)
    assert rc == 0, out


def test_serve_refuses_a_chain_without_auth(tmp_path):
    err = refused_at_start(write(tmp_path, {**demo_only(tmp_path), "plugins": ["request_log"]}))
    assert "plugins: the chain runs unauthenticated" in err and "Traceback" not in err


def test_allow_unauthenticated_is_refused_off_loopback(tmp_path, capsys):
    data = {**demo_only(tmp_path, host="0.0.0.0", allow_unauthenticated=True), "plugins": ["request_log"]}
    rc, out = check_config(write(tmp_path, data), capsys)
    assert rc == 1 and "server.allow_unauthenticated: accepted only when the server binds a loopback address" in out
    err = refused_at_start(write(tmp_path, data, "open.yaml"))
    assert "server.allow_unauthenticated" in err


def test_allow_unauthenticated_is_refused_when_serve_is_told_another_host(tmp_path):
    data = {**demo_only(tmp_path, allow_unauthenticated=True), "plugins": ["request_log"]}
    err = refused_at_start(write(tmp_path, data), "--host", "0.0.0.0")
    assert "accepted only when the server binds a loopback address" in err and "'0.0.0.0'" in err


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_allow_unauthenticated_is_accepted_on_loopback_addresses(host):
    config = load_config_data({"server": {"host": host, "allow_unauthenticated": True}, "plugins": [],
                               "models": [{"name": "demo", "litellm_params": {"model": "demo/offline"}}]})
    assert config.server.allow_unauthenticated


def test_allow_unauthenticated_on_loopback_serves_and_the_ready_line_says_so(tmp_path):
    data = {**demo_only(tmp_path, allow_unauthenticated=True), "plugins": ["request_log"]}
    process = serve(write(tmp_path, data))
    try:
        deadline, line = time.monotonic() + 60, ""
        while "gateway ready" not in line and time.monotonic() < deadline:
            line = process.stderr.readline()
            assert line or process.poll() is None, "the gateway exited"
        assert "UNAUTHENTICATED (server.allow_unauthenticated): no 'auth' plugin: anyone who reaches the port " \
               "can call every model" in line, line
        port = data["server"]["port"]
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                            json={"model": "demo", "messages": MSGS}, timeout=30)
        assert answer.status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)


def test_the_ready_line_of_a_guarded_chain_warns_of_nothing(upstream):
    from proxy import ready_line

    config = load_config_data(stated_nothing(upstream, "sqlite:///x.db", plugins=list(STANDARD_CHAIN)))
    line = ready_line(config, "config.yaml", "http://127.0.0.1:8080")
    assert "UNAUTHENTICATED" not in line and "UNMETERED" not in line
    open_chain = copy.deepcopy(stated_nothing(upstream, "sqlite:///x.db", plugins=["auth"]))
    open_chain["server"]["allow_unauthenticated"] = True
    line = ready_line(load_config_data(open_chain), "config.yaml", "http://127.0.0.1:8080")
    assert "UNMETERED (server.allow_unauthenticated): no 'energy' or 'accounting' plugin" in line
    assert "UNAUTHENTICATED" not in line


def test_a_live_reload_to_a_chain_without_auth_is_refused(tmp_path, upstream):
    path = write(tmp_path, stated_nothing(upstream, "sqlite:///x.db", plugins=list(STANDARD_CHAIN)))
    proxy.check_config(path)
    write(tmp_path, stated_nothing(upstream, "sqlite:///x.db", plugins=["request_log"]))
    with pytest.raises(ConfigError, match="unauthenticated"):
        proxy.check_config(path)  # what reload_config runs before swapping the chain
