"""Live config: editing config.yaml (or SIGHUP) swaps the config without a restart;
requests in flight finish on the config they started with; an invalid edit keeps the
last good config and says why (with its path); every reload logs what changed and never
a secret; GET /admin/config shows the effective config, redacted, to the master key only.

In-process gateways are built with `create_app(config, config_path=...)` on the harness's
server thread (so the file watcher runs); SIGHUP needs a real `proxy.py serve` process.
"""

from __future__ import annotations

import concurrent.futures
import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import httpx
import openai
import pytest
import yaml
from aiohttp import web
from structlog.testing import capture_logs

import proxy
from tests.conftest import MASTER_KEY, RunningGateway, base_config
from tests.fakes import Fault, free_port

MSGS = [{"role": "user", "content": "hi"}]
PROVIDER_KEYS = ("sk-upstream-openai-SECRET", "sk-ant-upstream-SECRET")
ROOT = Path(__file__).resolve().parent.parent
RELOAD_WITHIN = 15.0  # seconds: a bound for a busy machine, not a speed check (the watcher polls every 1 s)


def write_config(path: Path, data: dict[str, Any] | str) -> None:
    """Write a new file and rename it over the old one, as editors and deploy tools do."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    os.replace(tmp, path)


def model(name: str, upstream: Any, **extra: Any) -> dict[str, Any]:
    return {"name": name, "litellm_params": {"model": "openai/gpt-4o-mini", "api_base": upstream.openai_base,
                                             "api_key": "sk-upstream-openai-SECRET"}, **extra}


def initial(upstream: Any, store_url: str, plugins: list[Any] | None = None) -> dict[str, Any]:
    data = base_config(upstream, store_url=store_url, plugins=plugins if plugins is not None else [])
    data["models"].append(model("alpha", upstream))
    return data


async def _start_live(config: Any, path: str) -> tuple[web.AppRunner, web.Application, str]:
    app = proxy.create_app(config, config_path=path)
    runner = web.AppRunner(app, shutdown_timeout=2)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, app, f"http://127.0.0.1:{runner.addresses[0][1]}"


@pytest.fixture
def live(server_thread, upstream, store_url, tmp_path):
    """live(data=None, plugins=None) -> (gateway watching config.yaml, its path, the data written)."""
    started: list[web.AppRunner] = []

    def start(data: dict[str, Any] | None = None, plugins: list[Any] | None = None):
        data = data or initial(upstream, store_url, plugins)
        path = tmp_path / "config.yaml"
        write_config(path, data)
        config = proxy.check_config(path)
        runner, app, url = server_thread.run(_start_live(config, str(path)))
        started.append(runner)
        return RunningGateway(server_thread, runner, app, url, config), path, copy.deepcopy(data)

    yield start
    for runner in started:
        server_thread.run(runner.cleanup(), timeout=30)


def wait_until(predicate: Callable[[], bool], timeout: float = RELOAD_WITHIN) -> float:
    """Seconds it took for `predicate` to hold; fails after `timeout`."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not true within {timeout}s")
        time.sleep(0.05)
    return time.monotonic() - started


def model_ids(gw_url: str, key: str = "none") -> list[str]:
    return [m.id for m in openai.OpenAI(base_url=gw_url + "/v1", api_key=key, max_retries=0).models.list()]


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in logs if e.get("event") == name]


# ------------------------------------------------------------------------------ file edits


def test_editing_the_file_on_disk_reloads_within_a_couple_of_seconds(live, upstream):
    gw, path, data = live()
    assert "gamma" not in model_ids(gw.url)
    data["models"].append(model("gamma", upstream))
    write_config(path, data)
    wait_until(lambda: "gamma" in model_ids(gw.url))
    reply = gw.client().chat.completions.create(model="gamma", messages=MSGS)
    assert reply.model == "gamma"


def test_a_request_in_flight_finishes_on_its_config_while_a_new_one_uses_the_new(live, upstream):
    gw, path, data = live()
    upstream.push(Fault.slow(1.0))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(gw.client().chat.completions.create, model="alpha", messages=MSGS)
        wait_until(lambda: upstream.count() == 1)  # it is waiting on the (slow) upstream now
        data["models"] = [m for m in data["models"] if m["name"] != "alpha"] + [model("beta", upstream)]
        write_config(path, data)
        assert gw.run(proxy.reload_config(gw.app, reason="test")) is True
        assert gw.client().chat.completions.create(model="beta", messages=MSGS).model == "beta"
        with pytest.raises(openai.NotFoundError):
            gw.client().chat.completions.create(model="alpha", messages=MSGS)
        assert not in_flight.done()  # still on the old config, mid-call
        assert in_flight.result(timeout=10).model == "alpha"


def test_an_invalid_edit_keeps_the_last_good_config_and_logs_the_error_with_its_path(live, upstream):
    gw, path, data = live()
    broken = copy.deepcopy(data)
    broken["models"][0]["fallbacks"] = ["no-such-model"]
    with capture_logs() as logs:
        write_config(path, broken)
        wait_until(lambda: events(logs, "config_reload_rejected"))
    (rejected,) = events(logs, "config_reload_rejected")
    assert rejected["path"] == str(path)
    assert "models[0].fallbacks[0]: unknown model 'no-such-model'" in rejected["errors"]
    assert rejected["log_level"] == "error"
    assert "alpha" in model_ids(gw.url)  # the last good config still serves
    assert gw.client().chat.completions.create(model="alpha", messages=MSGS).model == "alpha"


def test_a_file_that_is_not_yaml_keeps_the_last_good_config(live):
    gw, path, _ = live()
    with capture_logs() as logs:
        write_config(path, "models: [\n  - name: x\n    : :\n")
        wait_until(lambda: events(logs, "config_reload_rejected"))
    assert "not valid YAML" in events(logs, "config_reload_rejected")[0]["errors"][0]
    assert "alpha" in model_ids(gw.url)




def test_a_yaml_syntax_error_next_to_a_literal_key_does_not_log_the_key(live):
    gw, path, data = live()
    text = yaml.safe_dump(data, sort_keys=False).replace(
        "api_key: sk-upstream-openai-SECRET", "api_key: sk-upstream-openai-SECRET: oops", 1)
    with capture_logs() as logs:
        write_config(path, text)
        wait_until(lambda: events(logs, "config_reload_rejected"))
    assert not any(k in repr(logs) for k in PROVIDER_KEYS), events(logs, "config_reload_rejected")


def test_each_reload_logs_what_changed_models_tiers_prices_plugins(live, upstream):
    gw, path, data = live(plugins=[])
    data["models"].append(model("gamma", upstream))
    data["models"] = [m for m in data["models"] if m["name"] != "alpha"]
    data["models"][0]["pricing"] = {"input_per_million": 1.0, "output_per_million": 2.0}
    data["tiers"]["free"]["models"].append("gamma")
    data["plugins"] = ["request_log"]
    write_config(path, data)
    with capture_logs() as logs:
        assert gw.run(proxy.reload_config(gw.app, reason="test")) is True
    (reloaded,) = events(logs, "config_reloaded")
    changes = reloaded["changes"]
    assert changes["models"]["added"] == ["gamma"] and changes["models"]["removed"] == ["alpha"]
    assert "gpt-4o" in changes["models"]["changed"]  # its pricing
    assert changes["prices"] == ["gpt-4o"]
    assert changes["tiers"] == ["free"]
    assert changes["plugins"] == {"before": [], "after": ["request_log"]}


def test_a_reload_that_changes_a_provider_key_names_the_model_never_the_key(live, upstream):
    gw, path, data = live()
    data["models"][0]["litellm_params"]["api_key"] = "sk-rotated-openai-NEWSECRET"
    data["auth"]["master_key"] = "gw-master-rotated-NEWSECRET"
    write_config(path, data)
    with capture_logs() as logs:
        assert gw.run(proxy.reload_config(gw.app, reason="test")) is True
    (reloaded,) = events(logs, "config_reloaded")
    assert reloaded["changes"]["models"]["changed"] == ["gpt-4o"]
    assert reloaded["changes"]["auth"] == ["master_key"]
    dumped = repr(logs)
    for secret in (*PROVIDER_KEYS, "sk-rotated-openai-NEWSECRET", "gw-master-rotated-NEWSECRET", MASTER_KEY):
        assert secret not in dumped


def test_an_unchanged_file_is_not_a_reload(live):
    gw, path, data = live()
    write_config(path, data)
    with capture_logs() as logs:
        assert gw.run(proxy.reload_config(gw.app, reason="test")) is True
    assert events(logs, "config_reload_unchanged") and not events(logs, "config_reloaded")


# ------------------------------------------------------------------------------ SIGHUP


@pytest.fixture
def served(upstream, tmp_path):
    """A real `proxy.py serve --config F` process; yields (url, config path, data, output lines)."""
    port = free_port()
    data = base_config(upstream, store_url=f"sqlite:///{tmp_path}/gw.db", plugins=[])
    data["models"].append(model("alpha", upstream))
    data["server"].update({"port": port, "shutdown_grace": 1})
    path = tmp_path / "config.yaml"
    write_config(path, data)
    out = tmp_path / "stdout.log"
    with out.open("wb") as sink:
        process = subprocess.Popen([sys.executable, str(ROOT / "proxy.py"), "serve", "--config", str(path)],
                                   cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT,
                                   env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _healthy(url), timeout=30)
        yield process, url, path, data, out
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def log_lines(out: Path) -> list[dict[str, Any]]:
    lines = []
    for line in out.read_text(errors="replace").splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            pass
    return lines


def test_sighup_reloads_a_running_gateway(served):
    process, url, path, data, out = served
    before = os.stat(path)
    # Rename alpha -> bravo: same size; put the old mtime back so only SIGHUP can notice.
    text = yaml.safe_dump(data, sort_keys=False).replace("name: alpha", "name: bravo")
    write_config(path, text)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    time.sleep(1.5)  # a poll or more: the watcher saw nothing to do
    assert "alpha" in model_ids(url)
    process.send_signal(signal.SIGHUP)
    wait_until(lambda: "bravo" in model_ids(url))
    assert "alpha" not in model_ids(url)
    reloads = [e for e in log_lines(out) if e.get("event") == "config_reloaded"]
    assert [e["reason"] for e in reloads] == ["SIGHUP"]
    assert reloads[0]["changes"]["models"]["added"] == ["bravo"]
    assert not any(k in out.read_text() for k in PROVIDER_KEYS)


def test_an_invalid_edit_is_logged_with_its_path_by_a_running_gateway(served):
    process, url, path, data, out = served
    broken = copy.deepcopy(data)
    broken["models"][1]["litellm_params"]["model"] = ""
    write_config(path, broken)
    wait_until(lambda: any(e.get("event") == "config_reload_rejected" for e in log_lines(out)))
    (rejected,) = [e for e in log_lines(out) if e.get("event") == "config_reload_rejected"]
    assert rejected["path"] == str(path) and rejected["level"] == "error"
    assert any(err.startswith("models[1].litellm_params.model:") for err in rejected["errors"])
    assert "alpha" in model_ids(url)
    assert not any(k in out.read_text() for k in PROVIDER_KEYS)


# ------------------------------------------------------------------------------ /admin/config


def admin_config(url: str, key: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(url + "/admin/config", headers=headers, timeout=5)


def test_admin_config_shows_the_effective_config_to_the_master_key(live, upstream):
    gw, path, data = live()
    data["models"].append(model("gamma", upstream))
    write_config(path, data)
    gw.run(proxy.reload_config(gw.app, reason="test"))
    response = admin_config(gw.url, MASTER_KEY)
    assert response.status_code == 200
    shown = response.json()
    assert "gamma" in [m["name"] for m in shown["models"]]  # effective = after the reload
    assert shown["retries"]["max_attempts"] == data["retries"]["max_attempts"]
    assert shown["models"][0]["litellm_params"]["api_key"] == "***"
    assert shown["auth"]["master_key"] == "***"


def test_admin_config_redacts_every_secret(live, upstream):
    gw, path, data = live()
    data["models"].append({"name": "proxied", "litellm_params": {
        "model": "openai/gpt-4o", "api_base": "http://bob:hunter2-SECRET@127.0.0.1:9/v1",
        "api_key": "sk-upstream-openai-SECRET", "aws_secret_access_key": "aws-SECRET-value"}})
    write_config(path, data)
    gw.run(proxy.reload_config(gw.app, reason="test"))
    body = admin_config(gw.url, MASTER_KEY).text
    for secret in (*PROVIDER_KEYS, MASTER_KEY, "hunter2-SECRET", "aws-SECRET-value"):
        assert secret not in body




def test_admin_config_redacts_a_password_only_redis_url(live):
    gw, path, data = live()
    data["rate_limits"] = {"redis_url": "redis://:s3cret-redis-PASSWORD@127.0.0.1:6379/0"}
    write_config(path, data)
    gw.run(proxy.reload_config(gw.app, reason="test"))
    assert "s3cret-redis-PASSWORD" not in admin_config(gw.url, MASTER_KEY).text


def test_admin_config_refuses_a_workspace_admin_with_403(live):
    gw, _, _ = live(plugins=["auth"])
    _, admin_key = gw.make_user(role="workspace_admin")
    response = admin_config(gw.url, admin_key)
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "forbidden"
    assert "sk-upstream" not in response.text


def test_admin_config_refuses_a_user_key_with_403(live):
    gw, _, _ = live(plugins=["auth"])
    _, key = gw.make_user()
    assert admin_config(gw.url, key).status_code == 403


def test_admin_config_without_a_key_is_401(live):
    gw, _, _ = live()
    response = admin_config(gw.url, None)
    assert response.status_code == 401
    assert set(response.json()["error"]) >= {"message", "type", "code"}
