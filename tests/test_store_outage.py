"""PostgreSQL going away and coming back, under load.

A small TCP proxy on 127.0.0.1 stands between the store and PostgreSQL; stopping it cuts
every connection and refuses new ones (the real server keeps running). While it is down a
reservation fails closed within `store.timeout` (StoreUnavailable; through the gateway a
503 `store_unavailable`), and once it is back the store answers again, the write-behind
catches up, and every unit of energy is accounted for.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import asyncpg
import httpx
import pytest
import pytest_asyncio

from gateway.store import StoreUnavailable, open_store
from tests.conftest import PG_URL


class TcpProxy:
    """Forwards 127.0.0.1:<port> to PostgreSQL; stop() drops every connection and stops
    listening, start() listens on the same port again."""

    def __init__(self, target: tuple[str, int] = ("127.0.0.1", 5432)) -> None:
        self.target = target
        self.port = 0
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        with self._lock:
            conns, self._conns = self._conns, set()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:  # stopped meanwhile
                    client.close()
                    server.close()
                    return
                self._conns |= {client, server}
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for s in (source, sink):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@pytest.fixture
def tcp_proxy():
    proxy = TcpProxy()
    proxy.start()
    yield proxy
    proxy.stop()


@pytest_asyncio.fixture
async def schema():
    try:
        conn = await asyncpg.connect(PG_URL, timeout=5)
    except (OSError, asyncpg.PostgresError, asyncio.TimeoutError) as exc:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL unreachable at {PG_URL}: {exc}")
        pytest.skip(f"PostgreSQL unreachable at {PG_URL}: {exc}")
    await conn.close()
    name = f"test_outage_{secrets.token_hex(6)}"
    yield name
    conn = await asyncpg.connect(PG_URL)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
    finally:
        await conn.close()


def _proxied(proxy: TcpProxy, schema: str) -> str:
    return f"postgresql://postgres@127.0.0.1:{proxy.port}/test?schema={schema}"


@pytest.mark.asyncio
async def test_reservations_fail_closed_in_bounded_time_and_recover(tcp_proxy, schema):
    store = open_store(_proxied(tcp_proxy, schema), timeout=1.0, connect_timeout=1.0)
    await store.open()
    try:
        ws = await store.create_workspace("acme")
        user = await store.create_user(ws.id, "free", energy=10**9)
        outcomes: dict[str, str] = {}
        latencies: list[float] = []
        stop = asyncio.Event()

        async def client(n: int) -> None:
            i = 0
            while not stop.is_set():
                request_id = f"c{n}-{i}"
                i += 1
                started = time.monotonic()
                try:
                    r = await store.reserve_energy(user.id, 1, request_id)
                    outcomes[request_id] = "ok" if r.ok else "short"
                except StoreUnavailable:
                    outcomes[request_id] = "unavailable"
                    latencies.append(time.monotonic() - started)
                    await asyncio.sleep(0.01)

        clients = [asyncio.ensure_future(client(n)) for n in range(16)]
        await asyncio.sleep(0.3)
        tcp_proxy.stop()
        await asyncio.sleep(1.5)
        tcp_proxy.start()
        await asyncio.sleep(1.5)  # the pool reconnects
        stop.set()
        await asyncio.gather(*clients)
    finally:
        await store.close()

    assert "unavailable" in outcomes.values()
    assert max(latencies) < 2.5  # store.timeout (1 s) bounds every failure
    tail = [outcomes[k] for k in sorted(outcomes, key=lambda k: (k.split("-")[0], int(k.split("-")[1])))
            if k.startswith("c0-")][-5:]
    assert tail == ["ok"] * 5  # served again once the database is back

    async with open_store(f"{PG_URL}?schema={schema}") as direct:
        # Energy exact: every reservation in the database is one that was reserved
        # (a failed one may still have committed: it stays open for the stale sweeper).
        reserved = {e.request_id for e in await direct.ledger(user.id) if e.kind == "reserve"}
        ok = {k for k, v in outcomes.items() if v == "ok"}
        assert ok <= reserved
        assert reserved - ok <= {k for k, v in outcomes.items() if v == "unavailable"}
        assert await direct.balance(user.id) == 10**9 - len(reserved)


@pytest.mark.parametrize("store_url", ["postgres"], indirect=True)
def test_the_gateway_answers_503_while_the_database_is_away_and_catches_up(
        gateway_factory, tcp_proxy, schema):
    gw = gateway_factory(store={"url": _proxied(tcp_proxy, schema), "timeout": 1.0, "connect_timeout": 1.0})
    user_id, key = gw.make_user(tier="pro", energy=1000)
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}

    def call(_: int) -> tuple[int, str | None, float]:
        started = time.monotonic()
        r = httpx.post(f"{gw.base_url}/chat/completions", json=body,
                       headers={"Authorization": f"Bearer {key}"}, timeout=30)
        code = r.json().get("error", {}).get("code") if r.status_code != 200 else None
        return r.status_code, code, time.monotonic() - started

    with ThreadPoolExecutor(8) as pool:
        before = list(pool.map(call, range(16)))
        tcp_proxy.stop()
        during = list(pool.map(call, range(16)))
        tcp_proxy.start()
        time.sleep(0.5)
        after = list(pool.map(call, range(16)))

    assert [s for s, _, _ in before] == [200] * 16
    assert {(s, c) for s, c, _ in during} <= {(503, "store_unavailable"), (200, None)}
    assert (503, "store_unavailable") in {(s, c) for s, c, _ in during}
    assert max(t for s, _, t in during if s == 503) < 3.0
    assert [s for s, _, _ in after][-8:] == [200] * 8

    gw.settle()  # the write-behind (settles, usage rows) has caught up
    served = sum(s == 200 for s, _, _ in before + during + after)
    ledger = gw.ledger(user_id)
    reserves = [e for e in ledger if e.kind == "reserve"]
    settles = [e for e in ledger if e.kind == "settle"]
    assert len(settles) == served  # every answered request is settled, once
    assert len(reserves) - served <= 16  # at most the 503s' reservations remain open
    assert gw.balance(user_id) == 1000 + sum(e.amount for e in reserves)  # settled as reserved


def test_whose_a_stored_response_is_cannot_be_told_while_the_database_is_away(gateway_factory, tcp_proxy, schema):
    """GET /v1/responses/{id} and previous_response_id need the owner's record: with the
    database away they fail closed with 503 store_unavailable (Retry-After), not a 500,
    and the upstream is not asked; they work again once it is back."""
    import openai

    gw = gateway_factory(plugins=["auth"],
                         store={"url": _proxied(tcp_proxy, schema), "timeout": 1.0, "connect_timeout": 1.0})
    _, key = gw.make_user(tier="pro", energy=1000)
    client = gw.client(key)
    created = client.responses.create(model="gpt-4o-mini", input="hi")
    tcp_proxy.stop()
    for call in (lambda: client.responses.retrieve(created.id),
                 lambda: client.responses.create(model="gpt-4o-mini", input="again", previous_response_id=created.id)):
        with pytest.raises(openai.APIStatusError) as excinfo:
            call()
        assert (excinfo.value.status_code, excinfo.value.code) == (503, "store_unavailable")
        assert excinfo.value.response.headers["Retry-After"] == "1"
    tcp_proxy.start()
    deadline = time.monotonic() + 10
    while True:
        try:
            assert client.responses.retrieve(created.id).id == created.id
            break
        except openai.APIStatusError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_a_key_not_yet_cached_and_an_admin_read_fail_closed_with_503_while_the_database_is_away(
        gateway_factory, tcp_proxy, schema):
    """With the database away, a key the gateway has not cached cannot be checked: 503
    store_unavailable (Retry-After), never a 500 or a pass; an admin read says the same."""
    import httpx

    from tests.conftest import MASTER_KEY

    gw = gateway_factory(plugins=["auth"],
                         store={"url": _proxied(tcp_proxy, schema), "timeout": 1.0, "connect_timeout": 1.0})
    _, key = gw.make_user(tier="pro", energy=1000)
    tcp_proxy.stop()
    chat = httpx.post(gw.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                      json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}, timeout=30)
    assert (chat.status_code, chat.json()["error"]["code"]) == (503, "store_unavailable")
    assert chat.headers["Retry-After"] == "1"
    admin = httpx.get(gw.url + "/admin/users", headers={"Authorization": f"Bearer {MASTER_KEY}"}, timeout=30)
    assert (admin.status_code, admin.json()["error"]["code"]) == (503, "store_unavailable")
    tcp_proxy.start()
