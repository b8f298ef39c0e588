"""Test harness: a real gateway on 127.0.0.1 in front of fake upstreams on 127.0.0.1.

The gateway and the fake providers run on one background event loop (`ServerThread`),
so tests can use the *sync* openai SDK as well as the async one. Nothing is mocked: the
OpenAI SDK speaks HTTP to the gateway, the gateway speaks HTTP (through litellm) to the
fakes, and the store is a real SQLite file or a real PostgreSQL schema.

    def test_something(gateway_factory, upstream):
        gw = gateway_factory(plugins=["request_log"])
        client = gw.client()
        client.chat.completions.create(model="gpt-4o-mini", messages=[...])
"""

from __future__ import annotations

import asyncio
import copy
import os
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import openai  # noqa: E402
import pytest  # noqa: E402
from aiohttp import web  # noqa: E402

from gateway.admin.operations import MASTER, Admin  # noqa: E402
from gateway.config import Config, load_config_data  # noqa: E402
from proxy import GATEWAY, create_app  # noqa: E402
from tests.fakes import FakeUpstream, ServerThread  # noqa: E402

MASTER_KEY = "gw-master-test-0123456789abcdef"
PG_URL = os.environ.get("TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")

FULL_CHAIN = ["request_log", "auth", "workspace_prompt", "idempotency", "tier_policy", "energy"]


def base_config(upstream: FakeUpstream, *, plugins: list[Any] | None = None, store_url: str,
                **overrides: Any) -> dict[str, Any]:
    """A config whose models all point at `upstream`. Retries back off in milliseconds."""
    config: dict[str, Any] = {
        "server": {"max_body_bytes": 64 * 1024},
        "store": {"url": store_url},
        "auth": {"master_key": MASTER_KEY, "cache_ttl": 300, "default_tier": "free"},
        "retries": {"max_attempts": 3, "backoff_base": 0.01, "backoff_max": 0.05, "retry_after_max": 2},
        "models": [
            {"name": "gpt-4o", "litellm_params": {"model": "openai/gpt-4o", "api_base": upstream.openai_base,
                                                  "api_key": "sk-upstream-openai-SECRET"},
             "downgrade_to": "gpt-4o-mini"},
            {"name": "gpt-4o-mini", "litellm_params": {"model": "openai/gpt-4o-mini", "api_base": upstream.openai_base,
                                                       "api_key": "sk-upstream-openai-SECRET"},
             "downgrade_to": "demo"},
            {"name": "claude", "litellm_params": {"model": "anthropic/claude-haiku-4-5",
                                                 "api_base": upstream.url, "api_key": "sk-ant-upstream-SECRET"}},
            {"name": "embed", "litellm_params": {"model": "openai/text-embedding-3-small",
                                                 "api_base": upstream.openai_base, "api_key": "sk-upstream-openai-SECRET"}},
            {"name": "demo", "litellm_params": {"model": "demo/offline"}},
        ],
        "tiers": {
            "free": {"models": ["gpt-4o-mini", "demo", "claude", "embed"], "refill": {"amount": 10, "period": "1d"}},
            "pro": {"models": ["*"]},
        },
        "energy": {
            "default_action": "ai_message",
            "actions": {
                "ai_message": {"default": 1, "models": {"gpt-4o": 5, "gpt-4o-mini": 2, "demo": 1}},
                "email_draft": {"default": 3},
            },
        },
        "plugins": FULL_CHAIN if plugins is None else plugins,
    }
    for key, value in overrides.items():
        config[key] = value
    # Test chains are partial on purpose (a test of one plugin lists only it) and the harness
    # binds 127.0.0.1: it states so (docs/operations.md "Secure by default"), unless the test
    # says otherwise; tests/test_secure_default.py checks the refusal.
    config["server"] = {"allow_unauthenticated": True, **config.get("server", {})}
    return config


@dataclass
class RunningGateway:
    """A started gateway: its URL, app, store and helpers to talk to it."""

    thread: ServerThread
    runner: web.AppRunner
    app: web.Application
    url: str
    config: Config
    _closers: list[Callable[[], Any]] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    @property
    def store(self) -> Any:
        return self.app[GATEWAY].store

    @property
    def state(self) -> Any:
        return self.app[GATEWAY]

    def run(self, coro: Any, timeout: float = 30.0) -> Any:
        """Run a coroutine on the gateway's loop (e.g. a store query)."""
        return self.thread.run(coro, timeout=timeout)

    def client(self, api_key: str = "no-key", **kw: Any) -> openai.OpenAI:
        kw.setdefault("max_retries", 0)
        kw.setdefault("timeout", 20)
        return openai.OpenAI(base_url=self.base_url, api_key=api_key, **kw)

    def aclient(self, api_key: str = "no-key", **kw: Any) -> openai.AsyncOpenAI:
        kw.setdefault("max_retries", 0)
        kw.setdefault("timeout", 20)
        return openai.AsyncOpenAI(base_url=self.base_url, api_key=api_key, **kw)

    def admin(self) -> Admin:
        return Admin(self.store, self.config, self.state.directory)

    def make_user(self, *, workspace: str = "acme", tier: str = "pro", energy: int = 100,
                  role: str = "user") -> tuple[str, str]:
        """Create (workspace if needed and) a user; returns (user_id, api_key)."""
        admin = self.admin()

        async def go() -> tuple[str, str]:
            if await self.store.get_workspace(workspace) is None:
                await admin.create_workspace(MASTER, workspace)
            created = await admin.create_user(MASTER, workspace, tier, energy, role=role)
            return created["id"], created["api_key"]

        return self.run(go())

    def balance(self, user_id: str) -> int:
        return self.run(self.store.balance(user_id))

    def ledger(self, user_id: str) -> list[Any]:
        return self.run(self.store.ledger(user_id))

    def settle(self) -> None:
        """Wait until every request ending (settle/refund/log) has run and is written."""
        self.run(self.state.chain.drain(timeout=15))
        self.run(asyncio.wait_for(self.state.chain.flush(), 15))


@pytest.fixture(scope="session")
def server_thread():
    thread = ServerThread().start()
    yield thread
    thread.stop()


@pytest.fixture
def upstream(server_thread):
    up = server_thread.run(FakeUpstream().start())
    yield up
    server_thread.run(up.stop())


@pytest.fixture
def second_upstream(server_thread):
    up = server_thread.run(FakeUpstream(reply="Hello from the second upstream").start())
    yield up
    server_thread.run(up.stop())


@pytest.fixture(params=["sqlite"])
def store_url(request, tmp_path):
    """SQLite by default; tests that must hold for both backends parametrize with
    `@pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)`
    ("pgbouncer": PostgreSQL through a PgBouncer in transaction pooling mode)."""
    if request.param in ("postgres", "pgbouncer"):
        schema = "t_" + uuid.uuid4().hex[:12]
        if request.param == "pgbouncer":
            from tests.pgbouncer import pgbouncer_url

            with pgbouncer_url(schema, PG_URL) as url:
                yield url
        else:
            yield f"{PG_URL}?schema={schema}"
        import asyncio

        import asyncpg

        async def drop() -> None:
            conn = await asyncpg.connect(PG_URL)
            try:
                await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
            finally:
                await conn.close()

        asyncio.run(drop())
    else:
        yield f"sqlite:///{tmp_path}/gateway.db"


async def _start(config: Config, router: Any = None) -> tuple[web.AppRunner, web.Application, str]:
    app = create_app(config, router=router)
    runner = web.AppRunner(app, shutdown_timeout=2)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, app, f"http://127.0.0.1:{port}"


@pytest.fixture
def gateway_factory(server_thread, upstream, store_url):
    """gateway_factory(plugins=[...], **config_overrides) -> RunningGateway."""
    started: list[RunningGateway] = []

    def factory(*, raw: dict[str, Any] | None = None, router: Any = None, **kw: Any) -> RunningGateway:
        data = copy.deepcopy(raw) if raw is not None else base_config(upstream, store_url=store_url, **kw)
        config = load_config_data(data)
        runner, app, url = server_thread.run(_start(config, router))
        gw = RunningGateway(server_thread, runner, app, url, config)
        started.append(gw)
        return gw

    yield factory
    for gw in started:
        server_thread.run(gw.runner.cleanup(), timeout=30)


@pytest.fixture
def gateway(gateway_factory) -> RunningGateway:
    """The default gateway: full plugin chain, SQLite store, models on the fake upstream."""
    return gateway_factory()
