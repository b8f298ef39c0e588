"""Alerts, pushed (docs/admin.md "Alerts", gateway/alerts.py): each event type triggered for real
through the gateway, posted to a fake receiver on 127.0.0.1 that fails (500) and then
recovers: every event delivered, each attempt signed (checked with the documented snippet),
every attempt of one event carrying the same id; a gateway killed (SIGKILL) with deliveries
pending leaves them to the next process; the outbox claim leases rows once across processes
(SQLite and PostgreSQL); GET /admin/alerts lists deliveries and failures by scope, without a
secret or the endpoint's URL.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from typing import Any, Callable

import httpx
import pytest
import yaml
from aiohttp import web

from gateway.alerts import EVENT_ID_HEADER, SIGNATURE_HEADER
from tests.conftest import MASTER_KEY
from tests.fakes import Fault
from tests.test_docs import section

BOTH = pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)
SECRET = "whsec-test-0123456789abcdef-SECRET"
CHAIN = ["auth", "tier_policy", "energy"]
MSGS = [{"role": "user", "content": "hi"}]
FAST_RETRIES = {"retry_base": 0.05, "retry_max": 0.2}


def documented_verify() -> Callable[..., bool]:
    """The verification snippet of docs/admin.md "Alerts", as a receiver would paste it."""
    code = re.search(r"```python\n(.*?)```", section("admin", "Alerts"), re.S).group(1)
    namespace: dict[str, Any] = {}
    exec(compile(code, "docs/admin.md", "exec"), namespace)  # noqa: S102 — our own documentation
    return namespace["verify"]


class Receiver:
    """A webhook receiver on 127.0.0.1: answers 500 to the first `fail_first` attempts of each
    event (and to everything while `down`), 200 after; records every attempt."""

    def __init__(self, fail_first: int = 0) -> None:
        self.fail_first = fail_first
        self.down = False
        self.posts: list[dict[str, Any]] = []
        self._runner: web.AppRunner | None = None

    async def start(self) -> "Receiver":
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/hook"
        return self

    async def stop(self) -> None:
        await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        event_id = request.headers.get(EVENT_ID_HEADER)
        earlier = sum(1 for p in self.posts if p["event_id"] == event_id)
        status = 500 if self.down or earlier < self.fail_first else 200
        self.posts.append({"event_id": event_id, "signature": request.headers.get(SIGNATURE_HEADER),
                           "body": body, "json": json.loads(body), "status": status})
        return web.Response(status=status, text="ok" if status == 200 else "boom")

    def of_type(self, event_type: str) -> list[dict[str, Any]]:
        return [p for p in self.posts if p["json"].get("type") == event_type]


@pytest.fixture
def receiver(server_thread):
    recv = server_thread.run(Receiver(fail_first=2).start())
    yield recv
    server_thread.run(recv.stop())


def wait_for(condition: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def endpoint(recv: Receiver, **kw: Any) -> dict[str, Any]:
    return {"name": "ops", "url": recv.url, "secret": SECRET, **kw}


def admin_alerts(gw, key: str = MASTER_KEY, **params) -> httpx.Response:
    return httpx.get(gw.url + "/admin/alerts", params=params, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def assert_delivered_once_per_event(recv: Receiver, event_type: str) -> dict[str, Any]:
    """The event's attempts: failed twice (the receiver's 500s), then acknowledged; each signed
    and verified by the documented snippet, all with the body's one id."""
    verify = documented_verify()
    posts = wait_for(lambda: [p for p in recv.of_type(event_type) if p["status"] == 200] and recv.of_type(event_type),
                     what=f"{event_type} acknowledged")
    ids = {p["event_id"] for p in posts}
    assert len(ids) == 1, posts
    assert [p["status"] for p in posts] == [500, 500, 200]
    for post in posts:
        assert post["json"]["id"] == post["event_id"]
        assert verify(SECRET, post["signature"], post["body"])
        assert not verify("another-secret-0123456789", post["signature"], post["body"])
        assert not verify(SECRET, post["signature"], post["body"] + b" ")
        assert SECRET not in post["body"].decode()
    return posts[-1]["json"]


# ------------------------------------------------------------------------------ events


@BOTH
def test_energy_low_is_delivered_signed_retried_with_one_id_and_listed(gateway_factory, receiver, store_url):
    gw = gateway_factory(plugins=CHAIN, alerts={"endpoints": [endpoint(receiver)], "energy_low_below": 5,
                                                **FAST_RETRIES})
    user, key = gw.make_user(workspace="acme", energy=10)
    _, acme_admin = gw.make_user(workspace="acme", role="workspace_admin")
    _, globex_admin = gw.make_user(workspace="globex", role="workspace_admin")
    client = gw.client(key)
    for _ in range(4):  # gpt-4o-mini costs 2: 8, 6, 4 (below 5: the crossing), 2 (no second event)
        client.chat.completions.create(model="gpt-4o-mini", messages=MSGS)
    event = assert_delivered_once_per_event(receiver, "energy.low")
    assert event["data"]["user_id"] == user and event["data"]["balance"] == 4 and event["data"]["threshold"] == 5
    assert event["workspace_id"] == gw.run(gw.store.get_workspace("acme")).id
    time.sleep(0.5)
    assert len(receiver.of_type("energy.low")) == 3  # nothing more: delivered once, one crossing

    listed = admin_alerts(gw)
    assert listed.status_code == 200, listed.text
    [row] = listed.json()
    assert (row["event_id"], row["event_type"], row["endpoint"], row["status"], row["attempts"], row["last_status"]) == (
        event["id"], "energy.low", "ops", "delivered", 3, 200)
    assert row["data"] == event["data"] and row["delivered_at"] >= row["created_at"]
    assert SECRET not in listed.text and receiver.url not in listed.text and "127.0.0.1" not in listed.text
    assert [r["event_id"] for r in admin_alerts(gw, acme_admin).json()] == [event["id"]]
    assert admin_alerts(gw, globex_admin).json() == []
    assert admin_alerts(gw, globex_admin, workspace="acme").status_code == 404
    config = httpx.get(gw.url + "/admin/config", headers={"Authorization": f"Bearer {MASTER_KEY}"}).text
    assert SECRET not in config and receiver.url not in config


def test_a_circuit_breaker_opening_and_closing_is_pushed(gateway_factory, receiver, upstream):
    gw = gateway_factory(plugins=CHAIN, retries={"max_attempts": 1, "backoff_base": 0.01, "backoff_max": 0.05,
                                                 "breaker_failures": 2, "breaker_cooldown": 0.5},
                         alerts={"endpoints": [endpoint(receiver)], **FAST_RETRIES})
    _, key = gw.make_user(energy=100)
    client = gw.client(key)
    upstream.push(Fault.status(500), Fault.status(500))
    for _ in range(2):
        with pytest.raises(Exception):
            client.chat.completions.create(model="gpt-4o-mini", messages=MSGS)
    opened = assert_delivered_once_per_event(receiver, "provider.circuit_opened")
    assert opened["data"]["model"] == "gpt-4o-mini" and opened["data"]["consecutive_failures"] == 2
    assert "upstream" not in json.dumps(opened) and "SECRET" not in json.dumps(opened)  # no api_base, no key
    time.sleep(0.6)  # the cool-down: the next request is the half-open try, and it succeeds
    client.chat.completions.create(model="gpt-4o-mini", messages=MSGS)
    closed = assert_delivered_once_per_event(receiver, "provider.circuit_closed")
    assert closed["data"]["model"] == "gpt-4o-mini"


def test_the_weekly_cost_over_its_threshold_is_pushed_once(gateway_factory, receiver):
    gw = gateway_factory(plugins=[*CHAIN, {"name": "accounting", "settings": {"flush_interval": 0.05}}],
                         reports={"weekly_cost_threshold_usd": 0.000001},
                         alerts={"endpoints": [endpoint(receiver)], **FAST_RETRIES})
    _, key = gw.make_user(energy=100)
    client = gw.client(key)
    for _ in range(3):
        client.chat.completions.create(model="gpt-4o-mini", messages=MSGS)
    event = assert_delivered_once_per_event(receiver, "cost.weekly_over_threshold")
    assert re.match(r"^\d{4}-W\d{2}$", event["data"]["week"]) and float(event["data"]["week_cost_usd"]) > 0.000001
    time.sleep(0.5)
    assert len(receiver.of_type("cost.weekly_over_threshold")) == 3


def test_an_error_rate_over_its_threshold_is_pushed_to_the_endpoints_that_take_it(gateway_factory, receiver,
                                                                                   upstream):
    gw = gateway_factory(plugins=["metrics", *CHAIN],
                         retries={"max_attempts": 1, "backoff_base": 0.01, "backoff_max": 0.05, "breaker_failures": 100},
                         alerts={"endpoints": [endpoint(receiver, events=["errors.rate_over_threshold"])],
                                 "energy_low_below": 1000,  # crossed at once, but this endpoint does not take it
                                 "error_rate": {"threshold": 0.5, "window": "1m", "min_requests": 4}, **FAST_RETRIES})
    _, key = gw.make_user(energy=100)
    client = gw.client(key)
    client.chat.completions.create(model="gpt-4o-mini", messages=MSGS)
    upstream.push(*[Fault.status(500)] * 4)
    for _ in range(4):
        with pytest.raises(Exception):
            client.chat.completions.create(model="gpt-4o-mini", messages=MSGS)
    event = assert_delivered_once_per_event(receiver, "errors.rate_over_threshold")
    data = event["data"]  # (the success's ending may run after the failures': endings are batched)
    assert data["requests"] >= 4 and data["errors"] >= 3 and data["error_rate"] > 0.5 and data["window_s"] == 60
    time.sleep(0.3)
    assert {p["json"]["type"] for p in receiver.posts} == {"errors.rate_over_threshold"}


# ----------------------------------------------------------------------- the CLI, slack


def test_the_cli_sends_a_test_event_in_slack_format_and_audits_it(gateway_factory, receiver, tmp_path, capsys):
    import proxy

    receiver.fail_first = 0
    gw = gateway_factory(plugins=CHAIN)
    config = tmp_path / "cli.yaml"
    config.write_text(yaml.safe_dump({
        "store": {"url": gw.config.store.url}, "tiers": {"free": {"models": ["*"]}},
        "models": [{"name": "demo", "litellm_params": {"model": "demo/offline"}}],
        "alerts": {"endpoints": [{"name": "chat", "url": receiver.url, "format": "slack"},
                                 endpoint(receiver, events=["energy.low"])]}}))
    capsys.readouterr()
    assert proxy.main(["alerts", "test", "--json", "--config", str(config)]) == 0
    sent = json.loads(capsys.readouterr().out)
    [post] = receiver.posts  # only the endpoint that takes `test`
    assert post["json"] == {"text": post["json"]["text"]} and sent["event_id"] in post["json"]["text"]
    assert post["event_id"] == sent["event_id"] and post["signature"] is None  # a slack endpoint without a secret
    assert [(d["endpoint"], d["status"], d["attempts"]) for d in sent["deliveries"]] == [("chat", "delivered", 1)]
    assert proxy.main(["audit", "--limit", "1", "--json", "--config", str(config)]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert (row["action"], row["target"], row["via"]) == ("alerts.test", sent["event_id"], "cli")
    assert proxy.main(["alerts", "list", "--status", "delivered", "--json", "--config", str(config)]) == 0
    assert [r["event_id"] for r in json.loads(capsys.readouterr().out)] == [sent["event_id"]]
    assert proxy.main(["alerts", "test", "--endpoint", "nope", "--config", str(config)]) != 0


def test_alerts_parameters_are_range_checked(gateway_factory):
    gw = gateway_factory(plugins=CHAIN)
    for params in ({"limit": "0"}, {"limit": "1001"}, {"limit": "1.5"}, {"since": "0s"}, {"since": "3661d"},
                   {"since": "9" * 400 + "h"}, {"status": "lost"}):
        answer = admin_alerts(gw, **params)
        assert answer.status_code == 400 and answer.json()["error"]["param"] == next(iter(params)), answer.text
    assert admin_alerts(gw, limit="1000", since="3660d", status="failed").status_code == 200


def test_the_alerts_config_is_validated_with_paths():
    from gateway.config import ConfigError, load_config_data

    base = {"models": [{"name": "demo", "litellm_params": {"model": "demo/offline"}}]}
    for alerts, path in (({"endpoints": [{"name": "ops", "url": "http://x"}]}, "alerts.endpoints[0]"),
                         ({"endpoints": [{"name": "ops", "url": "ftp://x", "secret": SECRET}]}, "alerts.endpoints[0].url"),
                         ({"endpoints": [{"name": "ops", "url": "http://x", "secret": SECRET, "events": ["nope"]}]},
                          "alerts.endpoints[0].events"),
                         ({"error_rate": {"threshold": 2}}, "alerts.error_rate.threshold"),
                         ({"energy_low_below": 0}, "alerts.energy_low_below")):
        with pytest.raises(ConfigError) as err:
            load_config_data({**base, "alerts": alerts})
        assert any(line.startswith(path) for line in err.value.errors), err.value.errors


# --------------------------------------------------------------------- the outbox claim


@BOTH
def test_the_outbox_claim_hands_each_row_to_one_process_and_a_lapsed_lease_to_another(store_url, tmp_path):
    """Two stores on one database (two processes): concurrent claims never share a row; a
    row whose holder died is claimed again after its lease; a duplicate event makes no row."""
    from gateway.store import open_store

    async def go() -> None:
        async with open_store(store_url) as one, open_store(store_url) as two:
            rows = [{"event_id": f"evt_{i}", "endpoint": "ops", "event_type": "test", "payload": "{}"} for i in range(60)]
            assert await one.enqueue_alerts(rows) == 60
            assert await two.enqueue_alerts(rows[:5]) == 0  # the same event, the same endpoint: skipped

            async def claim_all(store, owner):
                got = []
                for _ in range(10):
                    got += await store.claim_alerts(owner, lease=30, limit=7)
                return got

            a, b = await asyncio.gather(claim_all(one, "a"), claim_all(two, "b"))
            ids_a, ids_b = {r["id"] for r in a}, {r["id"] for r in b}
            assert not ids_a & ids_b and len(ids_a | ids_b) == 60 and len(a) + len(b) == 60

            await one.enqueue_alerts([{"event_id": "evt_lost", "endpoint": "ops", "event_type": "test",
                                       "payload": "{}"}])
            [held] = await one.claim_alerts("dead", lease=0.3, limit=10)
            assert await two.claim_alerts("alive", lease=30, limit=10) == []
            await asyncio.sleep(0.4)
            [again] = await two.claim_alerts("alive", lease=30, limit=10)
            assert again["event_id"] == held["event_id"] == "evt_lost"
            assert not await one.finish_alert(held["id"], "dead", status="delivered", attempts=1,
                                              next_attempt_at=time.time())
            assert await two.finish_alert(again["id"], "alive", status="delivered", attempts=1,
                                          next_attempt_at=time.time())
            [row] = await two.alert_deliveries(event_id="evt_lost")
            assert row["status"] == "delivered" and row["attempts"] == 1

    asyncio.run(go())


@BOTH
def test_finished_rows_older_than_the_retention_are_pruned_in_batches_and_pending_ones_stay(gateway_factory,
                                                                                           store_url):
    """Delivered and failed rows older than alerts.retention go (a bounded batch per pass);
    recent ones and pending ones (however old) stay; GET /admin/alerts lists what remains."""
    from gateway import alerts as alerts_module
    from gateway.alerts import Alerts

    gw = gateway_factory(plugins=CHAIN, alerts={"retention": "30d"})
    store, day = gw.store, 86400.0
    now = time.time()

    async def seed(event_id: str, age_days: float, outcome: str | None) -> None:
        at = now - age_days * day
        await store.enqueue_alerts([{"event_id": event_id, "endpoint": "ops", "event_type": "test",
                                     "payload": json.dumps({"id": event_id, "summary": "t", "data": {}})}], now=at)
        # claimed at once (this gateway's own deliverer, with no endpoint, would fail a due row);
        # the pending one keeps its lease: in flight, as long as the test runs
        [row] = await store.claim_alerts("seed", lease=100 * day, limit=1, now=at)
        assert row["event_id"] == event_id
        if outcome is not None:
            assert await store.finish_alert(row["id"], "seed", status=outcome, attempts=1, next_attempt_at=at,
                                            last_status=200 if outcome == "delivered" else 500, now=at)

    async def go() -> None:
        for i in range(5):
            await seed(f"evt_old_delivered_{i}", 40, "delivered")
        await seed("evt_old_failed", 31, "failed")
        await seed("evt_recent_delivered", 29, "delivered")
        await seed("evt_recent_failed", 1, "failed")
        await seed("evt_old_pending", 60, None)  # pending, however old

    gw.run(go())
    before = {r["event_id"] for r in admin_alerts(gw, limit="1000").json()}
    assert len(before) == 9
    alerts = Alerts(store, lambda: gw.config.alerts)
    alerts_module_batch = alerts_module.PRUNE_BATCH
    alerts_module.PRUNE_BATCH = 4  # a bounded batch per pass
    try:
        assert gw.run(alerts.prune(now=now)) == 4
        assert gw.run(alerts.prune(now=now)) == 2
        assert gw.run(alerts.prune(now=now)) == 0
    finally:
        alerts_module.PRUNE_BATCH = alerts_module_batch
    listed = admin_alerts(gw, limit="1000")
    assert listed.status_code == 200, listed.text
    assert {r["event_id"]: r["status"] for r in listed.json()} == {
        "evt_recent_delivered": "delivered", "evt_recent_failed": "failed", "evt_old_pending": "pending"}
    # a later `now`: the recent ones age out too; the pending one never does
    assert gw.run(store.prune_alerts(older_than=30 * day, limit=1000, now=now + 31 * day)) == 2
    assert [r["event_id"] for r in admin_alerts(gw).json()] == ["evt_old_pending"]

    async def the_delivery_loop_prunes() -> None:
        await seed("evt_loop_old", 40, "delivered")
        deliverer = Alerts(store, lambda: gw.config.alerts).start()  # prunes on its first pass
        try:
            for _ in range(200):
                if not await store.alert_deliveries(event_id="evt_loop_old"):
                    return
                await asyncio.sleep(0.05)
            raise AssertionError("the delivery loop did not prune")
        finally:
            await deliverer.stop()

    gw.run(the_delivery_loop_prunes())
    assert [r["event_id"] for r in admin_alerts(gw).json()] == ["evt_old_pending"]


def test_the_alerts_retention_is_a_positive_duration():
    from gateway.config import ConfigError, load_config_data

    base = {"models": [{"name": "demo", "litellm_params": {"model": "demo/offline"}}]}
    assert load_config_data(base).alerts.retention == 30 * 86400
    assert load_config_data({**base, "alerts": {"retention": "7d"}}).alerts.retention == 7 * 86400
    for bad in (0, -1, "soon"):
        with pytest.raises(ConfigError) as err:
            load_config_data({**base, "alerts": {"retention": bad}})
        assert any(line.startswith("alerts.retention") for line in err.value.errors), err.value.errors


# ------------------------------------------------------------------------------ restart


@BOTH
def test_deliveries_pending_when_the_gateway_is_killed_are_made_by_the_next_one(tmp_path, upstream, receiver,
                                                                                 store_url):
    from tests.test_multiprocess import (cli_json, create_user, finished_json, start_servers, stop_servers,
                                         wait_ready, write_config)

    receiver.down = True
    config, store_url = write_config(tmp_path, upstream, store_url if store_url.startswith("postgres") else None,
                                     alerts={"endpoints": [endpoint(receiver)], "energy_low_below": 100,
                                             "retry_base": 1.0, "retry_max": 1.0})
    ports, servers = start_servers(config, tmp_path, 1)
    try:
        wait_ready(ports[0], servers[0])
        finished_json(cli_json(config, "workspaces", "create", "acme"))
        user = create_user(config, 101)  # one request (3 energy) takes it below 100
        answer = httpx.post(f"http://127.0.0.1:{ports[0]}/v1/chat/completions", timeout=30,
                            json={"model": "gpt-4o-mini", "messages": MSGS},
                            headers={"Authorization": f"Bearer {user['api_key']}"})
        assert answer.status_code == 200, answer.text
        wait_for(lambda: receiver.of_type("energy.low"), what="a first (refused) attempt")
        time.sleep(0.2)  # between two attempts (retry_base 1 s): no lease held
        servers[0].send_signal(signal.SIGKILL)
        servers[0].wait(timeout=10)
    finally:
        for server in servers:
            if server.poll() is None:
                server.kill()
    [first_id] = {p["event_id"] for p in receiver.of_type("energy.low")}
    assert all(p["status"] == 500 for p in receiver.posts)

    receiver.down = False
    ports, servers = start_servers(config, tmp_path, 1)
    try:
        wait_ready(ports[0], servers[0])
        delivered = wait_for(lambda: [p for p in receiver.of_type("energy.low") if p["status"] == 200],
                             timeout=15, what="the pending event delivered by the new process")
        assert delivered[0]["event_id"] == first_id and delivered[0]["json"]["data"]["user_id"] == user["id"]
        assert documented_verify()(SECRET, delivered[0]["signature"], delivered[0]["body"])
    finally:
        stop_servers(servers, ports, tmp_path)
