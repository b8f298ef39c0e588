"""The MCP gateway (/mcp): the `mcp` SDK's own client against the gateway, two fake MCP
servers (the SDK's MCPServer over streamable HTTP, served by uvicorn on 127.0.0.1) behind
it. Tools are namespaced `server__tool`, filtered per tier, workspace and key, priced in
energy (reserved, settled, refunded), rate limited, and each call is a usage row.

Prices in the test config: search 2 per call (web), its `whoami` 3; crm 1 per call.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

import orjson
import pytest
import uvicorn
from mcp import Client, MCPError
from mcp.client.streamable_http import streamable_http_client
from mcp.server.mcpserver import Context, MCPServer

from gateway.admin.operations import MASTER
from tests.conftest import base_config

UPSTREAM_SECRET = "up-secret-7f3a9c2e"  # the search server's credential (os.environ/)
CRM_SECRET = "crm-secret-b81d44e0"

# The money-critical tests hold on both store backends.
BOTH_STORES = pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)


# --------------------------------------------------------------------------- fake MCP servers


def search_server() -> MCPServer:
    mcp = MCPServer("search")

    @mcp.tool()
    def web(query: str, limit: int = 3) -> str:
        """Search the web."""
        return f"results for {query} (limit {limit})"

    @mcp.tool()
    def whoami(ctx: Context) -> str:
        """Echoes the credential it was called with (a careless upstream)."""
        return f"called with {(ctx.headers or {}).get('authorization')}"

    @mcp.tool()
    def fail() -> str:
        """Always fails."""
        raise ValueError(f"boom, and my key is {UPSTREAM_SECRET}")

    @mcp.tool()
    async def hang() -> str:
        """Never answers in time."""
        await asyncio.sleep(30)
        return "late"

    @mcp.tool()
    async def slow(seconds: float) -> str:
        """Answers after `seconds`."""
        await asyncio.sleep(seconds)
        return "done"

    @mcp.resource("docs://search/readme")
    def readme() -> str:
        return "how to search"

    @mcp.prompt()
    def ask(topic: str) -> str:
        return f"Search for {topic}"

    return mcp


def crm_server() -> MCPServer:
    mcp = MCPServer("crm")

    @mcp.tool()
    def lookup(customer_id: int) -> str:
        """A customer."""
        return f"customer {customer_id}: ACME"

    @mcp.tool()
    def note(text: str) -> str:
        """Adds a note."""
        return f"noted: {text}"

    @mcp.tool()
    def delete_all() -> str:
        """Never exposed."""
        return "deleted"

    return mcp


class FakeMcp:
    """An MCPServer's streamable-HTTP app on 127.0.0.1, in its own thread; `seen_auth`
    records the Authorization header of every request (the gateway's credential)."""

    def __init__(self, mcp: MCPServer | Any, required_auth: str | None = None):
        self.seen_auth: list[str | None] = []
        app = mcp.streamable_http_app() if isinstance(mcp, MCPServer) else mcp  # else an ASGI app
        required = f"Bearer {required_auth}" if required_auth else None

        async def guarded(scope: dict, receive: Any, send: Any) -> None:
            if scope["type"] == "http":
                auth = dict(scope["headers"]).get(b"authorization")
                self.seen_auth.append(auth.decode() if auth else None)
                if required is not None and (auth is None or auth.decode() != required):
                    await send({"type": "http.response.start", "status": 401, "headers": []})
                    await send({"type": "http.response.body", "body": b"unauthorized"})
                    return
            await app(scope, receive, send)

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/mcp"
        self.server = uvicorn.Server(uvicorn.Config(guarded, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "fake MCP server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def fake_servers():
    search = FakeMcp(search_server(), required_auth=UPSTREAM_SECRET)
    crm = FakeMcp(crm_server(), required_auth=CRM_SECRET)
    yield search, crm
    search.stop()
    crm.stop()


def mcp_config(search: FakeMcp, crm: FakeMcp, **server_overrides: Any) -> list[dict[str, Any]]:
    return [
        {"name": "search", "url": search.url, "headers": {"Authorization": "os.environ/SEARCH_MCP_TOKEN"},
         "energy": 2, "cost_usd": 0.005, "timeout": "1s", "connect_timeout": "5s",
         "tools": {"whoami": {"energy": 3}, "slow": {"timeout": "5s"}},
         **server_overrides.get("search", {})},
        {"name": "crm", "url": crm.url, "headers": {"Authorization": "os.environ/CRM_MCP_TOKEN"},
         "energy": 1, "deny": ["delete_*"], "rename": {"note": "add_note"},
         **server_overrides.get("crm", {})},
    ]


@pytest.fixture
def mcp_gateway(gateway_factory, upstream, store_url, fake_servers, monkeypatch):
    monkeypatch.setenv("SEARCH_MCP_TOKEN", f"Bearer {UPSTREAM_SECRET}")
    monkeypatch.setenv("CRM_MCP_TOKEN", f"Bearer {CRM_SECRET}")
    search, crm = fake_servers

    def make(**kw: Any):
        tiers = kw.pop("tiers", {
            "free": {"models": ["demo"], "mcp_tools": ["search__web"], "refill": {"amount": 10, "period": "1d"}},
            "pro": {"models": ["*"], "mcp_tools": ["*"]},
        })
        plugins = kw.pop("plugins", ["request_log", "auth", "rate_limit", "idempotency", "tier_policy", "energy",
                                     "accounting", "metrics"])
        raw = base_config(upstream, store_url=store_url, plugins=plugins, tiers=tiers,
                          mcp_servers=mcp_config(search, crm, **kw.pop("servers", {})), **kw)
        return gateway_factory(raw=raw)

    return make


def call(gw, key: str, work) -> Any:
    """Run `work(client)` with the SDK's client connected to the gateway's /mcp as `key`."""
    async def go():
        import httpx2

        async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"},
                                      timeout=httpx2.Timeout(20, read=20)) as http:
            async with Client(streamable_http_client(gw.url + "/mcp", http_client=http), cache=None) as client:
                return await work(client)

    return asyncio.run(go())


def tool_names(gw, key: str) -> list[str]:
    async def work(client):
        return sorted(t.name for t in (await client.list_tools()).tools)
    return call(gw, key, work)


def text_of(result) -> str:
    return "".join(getattr(block, "text", "") for block in result.content)


# --------------------------------------------------------------------------- listing and calling


def test_tools_of_two_servers_are_listed_namespaced_with_allow_deny_and_renames(mcp_gateway):
    gw = mcp_gateway()
    _, key = gw.make_user(tier="pro", energy=100)
    names = tool_names(gw, key)
    assert names == ["crm__add_note", "crm__lookup", "search__fail", "search__hang", "search__slow",
                     "search__web", "search__whoami"]


def test_a_call_reaches_the_right_server_with_its_credentials_and_is_billed(mcp_gateway, fake_servers):
    gw = mcp_gateway()
    user_id, key = gw.make_user(tier="pro", energy=100)

    async def work(client):
        web = await client.call_tool("search__web", {"query": "mcp"})
        crm = await client.call_tool("crm__lookup", {"customer_id": 7})
        note = await client.call_tool("crm__add_note", {"text": "hi"})
        return web, crm, note

    web, crm, note = call(gw, key, work)
    assert not web.is_error and text_of(web) == "results for mcp (limit 3)"
    assert text_of(crm) == "customer 7: ACME"
    assert text_of(note) == "noted: hi"
    gw.settle()
    assert gw.balance(user_id) == 100 - 2 - 1 - 1
    search, crm_fake = fake_servers
    assert f"Bearer {UPSTREAM_SECRET}" in search.seen_auth and key not in str(search.seen_auth)
    assert f"Bearer {CRM_SECRET}" in crm_fake.seen_auth


@BOTH_STORES
def test_each_call_writes_a_usage_row_with_tool_server_status_energy_and_cost(mcp_gateway):
    gw = mcp_gateway()
    user_id, key = gw.make_user(tier="pro", energy=100)

    async def work(client):
        await client.call_tool("search__web", {"query": "x"})
        await client.call_tool("crm__lookup", {"customer_id": 1})

    call(gw, key, work)
    gw.settle()
    rows = [r for r in gw.run(gw.store.usage_rows()) if r["user_id"] == user_id]
    assert len(rows) == 2
    by_model = {r["model"]: r for r in rows}
    assert by_model["search__web"]["provider"] == "search"
    assert by_model["search__web"]["status"] == 200
    assert by_model["search__web"]["energy_cost"] == 2
    assert str(by_model["search__web"]["cost_usd"]).startswith("0.005")
    assert by_model["crm__lookup"]["energy_cost"] == 1 and by_model["crm__lookup"]["cost_usd"] is None
    assert by_model["search__web"]["latency_ms"] is not None


def test_metrics_count_tool_calls_by_tool_and_server(mcp_gateway):
    gw = mcp_gateway()
    _, key = gw.make_user(tier="pro", energy=100)
    call(gw, key, lambda client: client.call_tool("search__web", {"query": "x"}))
    gw.settle()
    import urllib.request

    text = urllib.request.urlopen(gw.url + "/metrics").read().decode()
    line = next(line for line in text.splitlines()
                if line.startswith("gateway_requests_total{") and 'endpoint="mcp.tools/call"' in line)
    assert 'model="search__web"' in line and 'provider="search"' in line and 'status="200"' in line
    assert line.endswith(" 1.0")


# --------------------------------------------------------------------------- who may use what


def test_tools_are_filtered_per_tier(mcp_gateway):
    gw = mcp_gateway()
    _, free_key = gw.make_user(tier="free", energy=100)
    assert tool_names(gw, free_key) == ["search__web"]

    async def work(client):
        with pytest.raises(MCPError) as refused:
            await client.call_tool("crm__lookup", {"customer_id": 1})
        return refused.value

    refused = call(gw, free_key, work)
    assert "may not use the tool 'crm__lookup'" in refused.message
    assert refused.error.data["code"] == "tool_not_allowed"


def test_a_tier_without_mcp_tools_may_use_no_tool(mcp_gateway):
    """Fails closed: a tier that lists no `mcp_tools` (here `team`, with every model) sees no
    tool and calling one is refused before anything is reserved or called."""
    gw = mcp_gateway(tiers={"free": {"models": ["demo"]}, "team": {"models": ["*"]},
                            "pro": {"models": ["*"], "mcp_tools": ["*"]}})
    assert gw.config.tiers["team"].mcp_tools == []
    user_id, team_key = gw.make_user(tier="team", energy=100)
    _, free_key = gw.make_user(tier="free", energy=100)
    _, pro_key = gw.make_user(tier="pro", energy=100)
    assert tool_names(gw, team_key) == [] and tool_names(gw, free_key) == []
    assert "search__web" in tool_names(gw, pro_key)

    async def work(client):
        with pytest.raises(MCPError) as refused:
            await client.call_tool("search__web", {"query": "x"})
        return refused.value

    refused = call(gw, team_key, work)
    assert refused.error.data == {"status": 403, "type": "invalid_request_error", "code": "tool_not_allowed"}
    gw.settle()
    assert gw.balance(user_id) == 100 and "reserve" not in [e.kind for e in gw.ledger(user_id)]


@pytest.mark.parametrize("plugins", [["auth", "tier_policy", "energy", "accounting"], ["auth", "energy", "accounting"]],
                         ids=["with-tier_policy", "without-tier_policy"])
def test_a_tool_not_allowed_is_refused_before_its_arguments_are_checked_with_or_without_tier_policy(
        mcp_gateway, plugins):
    """The endpoint itself refuses a tool the caller may not use (the same lists that filter
    tools/list), whether or not `tier_policy` is in the chain, and before validating the
    arguments: a refusal must not tell the caller the schema of a tool it cannot see."""
    gw = mcp_gateway(plugins=plugins)
    user_id, free_key = gw.make_user(tier="free", energy=100)

    async def work(client):
        refusals = []
        for arguments in ({"customer_id": 1}, {}):
            with pytest.raises(MCPError) as refused:
                await client.call_tool("crm__lookup", arguments)
            refusals.append(refused.value)
        return refusals

    for refused in call(gw, free_key, work):
        assert refused.error.data == {"status": 403, "type": "invalid_request_error", "code": "tool_not_allowed"}
        assert "customer_id" not in refused.message
    gw.settle()
    assert gw.balance(user_id) == 100 and "reserve" not in [e.kind for e in gw.ledger(user_id)]


def test_tools_are_filtered_per_workspace_and_per_key(mcp_gateway):
    gw = mcp_gateway()
    _, key_a = gw.make_user(workspace="acme", tier="pro", energy=100)
    _, key_b = gw.make_user(workspace="acme", tier="pro", energy=100)

    async def restrict():
        identity = await gw.state.directory.identity(key_b)
        workspace = await gw.store.get_workspace("acme")
        await gw.admin().update_workspace(MASTER, workspace.id, ai_settings={
            "mcp_tools": ["search__*", "crm__lookup"], "mcp_key_tools": {identity.key_id: ["crm__*"]}})
        gw.state.directory.clear()

    gw.run(restrict())
    assert tool_names(gw, key_a) == ["crm__lookup", "search__fail", "search__hang", "search__slow",
                                     "search__web", "search__whoami"]
    assert tool_names(gw, key_b) == ["crm__lookup"]

    async def work(client):
        with pytest.raises(MCPError) as refused:
            await client.call_tool("search__web", {"query": "x"})
        return refused.value

    assert call(gw, key_b, work).error.data["code"] == "tool_not_allowed"


def test_without_a_valid_key_the_endpoint_answers_401(mcp_gateway):
    gw = mcp_gateway()
    import urllib.error
    import urllib.request

    request = urllib.request.Request(gw.url + "/mcp", data=b"{}", headers={"Authorization": "Bearer nope",
                                                                          "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request)
    assert refused.value.code == 401
    with pytest.raises(Exception):
        tool_names(gw, "sk-not-a-key")


# --------------------------------------------------------------------------- energy


@BOTH_STORES
def test_energy_is_exact_for_2n_concurrent_calls_when_n_are_affordable(mcp_gateway):
    gw = mcp_gateway()
    n = 6
    user_id, key = gw.make_user(tier="pro", energy=2 * n)  # search__web costs 2

    async def work(client):
        return await asyncio.gather(*(client.call_tool("search__web", {"query": str(i)}) for i in range(2 * n)),
                                    return_exceptions=True)

    results = call(gw, key, work)
    ok = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, MCPError)]
    assert len(ok) == n and len(refused) == n
    assert all("Not enough energy" in r.message and r.error.data["code"] == "insufficient_energy" for r in refused)
    gw.settle()
    assert gw.balance(user_id) == 0
    kinds = [e.kind for e in gw.ledger(user_id)]
    assert kinds.count("reserve") == n and kinds.count("settle") == n and "refund" not in kinds


@BOTH_STORES
def test_a_failing_tool_is_refunded_and_its_credential_scrubbed(mcp_gateway):
    gw = mcp_gateway()
    user_id, key = gw.make_user(tier="pro", energy=10)
    result = call(gw, key, lambda client: client.call_tool("search__fail", {}))
    assert result.is_error
    assert UPSTREAM_SECRET not in text_of(result)
    gw.settle()
    assert gw.balance(user_id) == 10
    assert [e.kind for e in gw.ledger(user_id)][-2:] == ["reserve", "refund"]


@BOTH_STORES
def test_a_hanging_tool_times_out_as_an_mcp_error_and_is_refunded(mcp_gateway):
    gw = mcp_gateway()
    user_id, key = gw.make_user(tier="pro", energy=10)

    async def work(client):
        started = time.monotonic()
        with pytest.raises(MCPError) as failed:
            await client.call_tool("search__hang", {})
        return failed.value, time.monotonic() - started

    failed, took = call(gw, key, work)
    assert took < 5
    assert "did not answer" in failed.message and failed.error.data["code"] == "upstream_timeout"
    gw.settle()
    assert gw.balance(user_id) == 10


def test_a_client_cut_off_mid_call_is_billed_once_when_the_call_ends(mcp_gateway, capfd):
    gw = mcp_gateway()
    user_id, key = gw.make_user(tier="pro", energy=10)

    async def cut_off():
        import httpx2

        async def session():
            async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}) as http:
                async with Client(streamable_http_client(gw.url + "/mcp", http_client=http), cache=None) as client:
                    await client.call_tool("search__slow", {"seconds": 1.0})

        task = asyncio.create_task(session())
        await asyncio.sleep(0.5)  # the call is on its way upstream: the client goes, connections closed
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cut_off())
    time.sleep(1.5)
    gw.settle()
    ledger = [e.kind for e in gw.ledger(user_id)]
    assert ledger.count("reserve") == 1 and ledger.count("settle") + ledger.count("refund") == 1
    assert gw.balance(user_id) == 8, ledger  # the call ran to its end upstream: billed
    assert gw.state.chain.inflight.count == 0
    out, err = capfd.readouterr()
    assert "unhandled_error" not in out + err and "Traceback" not in out + err  # a client gone is no error


# --------------------------------------------------------------------------- arguments and errors


def test_bad_arguments_are_refused_before_the_upstream_sees_them(mcp_gateway, fake_servers):
    gw = mcp_gateway()
    user_id, key = gw.make_user(tier="pro", energy=10)
    search, _ = fake_servers
    seen_before = len(search.seen_auth)

    async def work(client):
        await client.list_tools()
        errors = []
        for arguments in ({}, {"query": 5}, {"query": "x", "limit": "many"}):
            with pytest.raises(MCPError) as refused:
                await client.call_tool("search__web", arguments)
            errors.append(refused.value)
        return errors

    errors = call(gw, key, work)
    assert all(e.error.data["code"] == "invalid_arguments" for e in errors)
    assert "query" in errors[0].message
    gw.settle()
    assert gw.balance(user_id) == 10
    assert len(search.seen_auth) == seen_before + 1 or len(search.seen_auth) >= seen_before  # listing only
    assert "reserve" not in [e.kind for e in gw.ledger(user_id)]


def test_an_unknown_or_denied_tool_is_an_mcp_error(mcp_gateway):
    gw = mcp_gateway()
    _, key = gw.make_user(tier="pro", energy=10)

    async def work(client):
        codes = []
        for name in ("crm__delete_all", "crm__note", "nope__x", "search__nothing"):
            with pytest.raises(MCPError) as refused:
                await client.call_tool(name, {})
            codes.append(refused.value.error.data["code"])
        return codes

    assert call(gw, key, work) == ["tool_not_found"] * 4


def test_credentials_never_reach_a_response_or_a_log_line(mcp_gateway, capfd, caplog):
    gw = mcp_gateway()
    _, key = gw.make_user(tier="pro", energy=100)

    async def work(client):
        answers = [await client.call_tool("search__whoami", {}), await client.call_tool("search__fail", {})]
        answers.append(await client.list_tools())
        return answers

    answers = call(gw, key, work)
    gw.settle()
    assert text_of(answers[0]) == "called with ***"  # the upstream echoed its credential: scrubbed
    dumped = "".join(a.model_dump_json() for a in answers)
    config_dump = gw.run(_admin_config(gw))
    out, err = capfd.readouterr()  # the gateway's structured logs
    # the fake upstream's own log (same process, stdlib logging) is not the gateway's
    gateway_records = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith("mcp.server"))
    for secret in (UPSTREAM_SECRET, CRM_SECRET):
        assert secret not in dumped
        assert secret not in out and secret not in err and secret not in gateway_records
        assert secret not in config_dump


async def _admin_config(gw) -> str:
    from gateway.config import redacted_config
    import orjson

    return orjson.dumps(redacted_config(gw.config)).decode()


# --------------------------------------------------------------------------- resources, prompts, limits


def test_resources_and_prompts_are_passed_through(mcp_gateway):
    gw = mcp_gateway()
    _, key = gw.make_user(tier="pro", energy=10)

    async def work(client):
        resources = await client.list_resources()
        content = await client.read_resource("docs://search/readme")
        prompts = await client.list_prompts()
        prompt = await client.get_prompt("search__ask", {"topic": "mcp"})
        return resources, content, prompts, prompt

    resources, content, prompts, prompt = call(gw, key, work)
    assert [str(r.uri) for r in resources.resources] == ["docs://search/readme"]
    assert content.contents[0].text == "how to search"
    assert [p.name for p in prompts.prompts] == ["search__ask"]
    assert "Search for mcp" in str(prompt.messages[0].content)


def test_rate_limits_apply_to_tool_calls(mcp_gateway):
    gw = mcp_gateway(tiers={"pro": {"models": ["*"], "mcp_tools": ["*"], "limits": {"rpm": 2}},
                            "free": {"models": ["demo"]}})
    _, key = gw.make_user(tier="pro", energy=100)

    async def work(client):
        await client.call_tool("search__web", {"query": "1"})
        await client.call_tool("search__web", {"query": "2"})
        with pytest.raises(MCPError) as limited:
            await client.call_tool("search__web", {"query": "3"})
        return limited.value

    assert call(gw, key, work).error.data["status"] == 429


# --------------------------------------------------------------------------- hot reload


async def start_watching(config: Any, path: str) -> tuple[Any, Any, str]:
    import proxy
    from aiohttp import web

    app = proxy.create_app(config, config_path=path)
    runner = web.AppRunner(app, shutdown_timeout=2)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, app, f"http://127.0.0.1:{runner.addresses[0][1]}"


def test_mcp_servers_are_hot_reloaded_with_the_config(fake_servers, store_url, upstream, tmp_path, server_thread,
                                                     monkeypatch):
    """A reload that drops the crm server and renames a search tool changes what clients see
    and call at once; the search session is kept (same server settings) or rebuilt."""
    import proxy
    from tests.conftest import RunningGateway
    from tests.test_reload import write_config

    monkeypatch.setenv("SEARCH_MCP_TOKEN", f"Bearer {UPSTREAM_SECRET}")
    monkeypatch.setenv("CRM_MCP_TOKEN", f"Bearer {CRM_SECRET}")
    search, crm = fake_servers
    tiers = {"free": {"models": ["demo"]}, "pro": {"models": ["*"], "mcp_tools": ["*"]}}
    data = base_config(upstream, store_url=store_url, tiers=tiers, mcp_servers=mcp_config(search, crm),
                       plugins=["auth", "tier_policy", "energy", "accounting"])
    path = tmp_path / "config.yaml"
    write_config(path, data)
    config = proxy.check_config(path)
    runner, app, url = server_thread.run(start_watching(config, str(path)))
    try:
        gw = RunningGateway(server_thread, runner, app, url, config)
        user_id, key = gw.make_user(tier="pro", energy=100)
        assert "crm__lookup" in tool_names(gw, key)
        data["mcp_servers"] = [dict(data["mcp_servers"][0], rename={"web": "find"}, energy=5)]
        write_config(path, data)
        assert gw.run(proxy.reload_config(app, reason="test")) is True
        assert tool_names(gw, key) == ["search__fail", "search__find", "search__hang", "search__slow",
                                       "search__whoami"]
        result = call(gw, key, lambda client: client.call_tool("search__find", {"query": "q"}))
        assert text_of(result) == "results for q (limit 3)"
        gw.settle()
        assert gw.balance(user_id) == 95
    finally:
        server_thread.run(runner.cleanup(), timeout=30)


def test_a_gateway_started_without_mcp_servers_builds_the_endpoint_when_a_reload_adds_them(
        fake_servers, store_url, upstream, tmp_path, server_thread, monkeypatch):
    """Without `mcp_servers:` the SDK's endpoint is not built (gateway/inbound/mcp_mount.py:
    /mcp answers 404 as the endpoint does); a reload that adds servers makes /mcp list and
    call their tools without a restart, and the stop closes it."""
    import httpx

    import proxy
    from gateway.inbound.mcp_mount import MCP
    from tests.conftest import RunningGateway
    from tests.test_reload import write_config

    monkeypatch.setenv("SEARCH_MCP_TOKEN", f"Bearer {UPSTREAM_SECRET}")
    monkeypatch.setenv("CRM_MCP_TOKEN", f"Bearer {CRM_SECRET}")
    search, crm = fake_servers
    tiers = {"free": {"models": ["demo"]}, "pro": {"models": ["*"], "mcp_tools": ["*"]}}
    data = base_config(upstream, store_url=store_url, tiers=tiers, plugins=["auth", "tier_policy", "energy",
                                                                            "accounting"])
    path = tmp_path / "config.yaml"
    write_config(path, data)
    config = proxy.check_config(path)
    runner, app, url = server_thread.run(start_watching(config, str(path)))
    try:
        gw = RunningGateway(server_thread, runner, app, url, config)
        user_id, key = gw.make_user(tier="pro", energy=100)
        answer = httpx.post(url + "/mcp", headers={"Authorization": f"Bearer {key}"}, timeout=10,
                            json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
        assert answer.status_code == 404 and answer.json()["error"]["code"] == "not_found"
        assert app[MCP].endpoint is None
        data["mcp_servers"] = mcp_config(search, crm)
        write_config(path, data)
        assert gw.run(proxy.reload_config(app, reason="test")) is True
        assert "crm__lookup" in tool_names(gw, key)
        result = call(gw, key, lambda client: client.call_tool("search__web", {"query": "q"}))
        assert text_of(result) == "results for q (limit 3)"
        gw.settle()
        assert gw.balance(user_id) == 98
        assert app[MCP].endpoint is not None
    finally:
        server_thread.run(runner.cleanup(), timeout=30)


# --------------------------------------------------------------------------- reports and the dashboard


def admin_get(gw, path: str) -> Any:
    import httpx

    from tests.conftest import MASTER_KEY

    response = httpx.get(gw.url + path, headers={"Authorization": f"Bearer {MASTER_KEY}"}, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


@BOTH_STORES
def test_tool_calls_appear_in_the_usage_reports_and_the_dashboard_metrics(mcp_gateway):
    """Two search__web calls (2 energy, $0.005 each), one crm__lookup (1 energy, no USD) and
    one failing search tool (refunded, an error, but called upstream: its $0.005 is spent):
    the reports and /admin/metrics count them."""
    gw = mcp_gateway()
    user_id, key = gw.make_user(tier="pro", energy=100)

    async def work(client):
        await client.call_tool("search__web", {"query": "a"})
        await client.call_tool("search__web", {"query": "b"})
        await client.call_tool("crm__lookup", {"customer_id": 1})
        await client.call_tool("search__fail", {})

    call(gw, key, work)
    gw.settle()
    metrics = admin_get(gw, "/admin/metrics?window=1h")
    assert metrics["totalRequests"] == 4 and metrics["errors"] == 1
    assert metrics["modelDistribution"] == {"search__web": 2, "crm__lookup": 1, "search__fail": 1}
    assert metrics["providerDistribution"] == {"search": 3, "crm": 1}
    assert metrics["totalCost"] == pytest.approx(0.015)
    assert metrics["energySpent"] == 2 + 2 + 1 and metrics["energyRefunded"] == 2
    assert metrics["topUsers"][0]["user_id"] == user_id and metrics["topUsers"][0]["energy"] == 5
    (today,) = admin_get(gw, "/admin/usage/daily?days=1")["rows"]
    assert (today["requests"], today["errors"]) == (4, 1)
    assert today["cost_usd"] == pytest.approx(0.015)
    (top,) = admin_get(gw, "/admin/usage/top-users?days=1")["rows"]
    assert (top["user_id"], top["requests"], top["energy"]) == (user_id, 4, 5)
    assert top["cost_usd"] == pytest.approx(0.015)
    actions = admin_get(gw, "/admin/usage/actions?days=1")["rows"]
    assert sum(a["count"] for a in actions) == 4


# --------------------------------------------------------------------------- a malformed upstream

# What the malformed server answers to tools/call of each of its tools (`id` is the request's),
# and what the client gets: the gateway's error code. An answer for another request's id is
# dropped by the SDK (it cannot route it): that call ends at its timeout (1s here), no later.
MALFORMED_ANSWERS: dict[str, tuple[str, Any]] = {
    "garbage": ("application/json", lambda id_: b"this is not json {{{"),
    "empty": ("application/json", lambda id_: b""),
    "not_jsonrpc": ("application/json", lambda id_: b'{"hello": "world"}'),
    "array": ("application/json", lambda id_: b"[1, 2, 3]"),
    "wrong_shape": ("application/json",
                    lambda id_: orjson.dumps({"jsonrpc": "2.0", "id": id_, "result": {"content": "not a list"}})),
    "bad_error": ("application/json", lambda id_: orjson.dumps({"jsonrpc": "2.0", "id": id_, "error": {"oops": 1}})),
    "html": ("text/html", lambda id_: b"<html>502 Bad Gateway</html>"),
    "wrong_id": ("application/json",
                 lambda id_: orjson.dumps({"jsonrpc": "2.0", "id": 987654, "result": {"content": []}})),
    "sse_garbage": ("text/event-stream", lambda id_: b"event: message\ndata: {{{ not json\n\n"),
    "ok": ("application/json", lambda id_: orjson.dumps({"jsonrpc": "2.0", "id": id_,
                                                        "result": {"content": [{"type": "text", "text": "fine"}]}})),
}
MALFORMED_EXPECTED = {"garbage": "upstream_malformed", "empty": "upstream_malformed",
                      "not_jsonrpc": "upstream_malformed", "array": "upstream_malformed",
                      "wrong_shape": "upstream_malformed", "bad_error": "upstream_malformed",
                      "html": "upstream_malformed", "wrong_id": "upstream_timeout",
                      "sse_garbage": "upstream_malformed"}


async def malformed_mcp(scope: dict, receive: Any, send: Any) -> None:
    """A hand-written MCP server (on purpose: the SDK's would not misbehave) that initializes
    and lists its tools correctly, then answers tools/call with MALFORMED_ANSWERS."""
    if scope["type"] == "lifespan":
        while (message := await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break

    async def answer(status: int, payload: bytes = b"", content_type: str = "application/json") -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", content_type.encode())]})
        await send({"type": "http.response.body", "body": payload})

    if scope["method"] != "POST":
        return await answer(405)
    request = orjson.loads(body)
    method, id_ = request.get("method"), request.get("id")
    if id_ is None:  # a notification
        return await answer(202)
    if method == "initialize":
        result = {"protocolVersion": request["params"]["protocolVersion"], "capabilities": {"tools": {}},
                  "serverInfo": {"name": "malformed", "version": "1"}}
    elif method == "tools/list":
        result = {"tools": [{"name": name, "inputSchema": {"type": "object"}} for name in MALFORMED_ANSWERS]}
    elif method == "tools/call":
        content_type, make = MALFORMED_ANSWERS[request["params"]["name"]]
        return await answer(200, make(id_), content_type)
    else:
        return await answer(200, orjson.dumps({"jsonrpc": "2.0", "id": id_,
                                               "error": {"code": -32601, "message": "no such method"}}))
    await answer(200, orjson.dumps({"jsonrpc": "2.0", "id": id_, "result": result}))


@pytest.fixture(scope="module")
def malformed_server():
    server = FakeMcp(malformed_mcp)
    yield server
    server.stop()


@BOTH_STORES
@pytest.mark.parametrize("tool", sorted(MALFORMED_EXPECTED))
def test_a_malformed_upstream_answer_is_an_mcp_error_and_refunded(gateway_factory, upstream, store_url,
                                                                 malformed_server, tool):
    tiers = {"free": {"models": ["demo"]}, "pro": {"models": ["*"], "mcp_tools": ["*"]}}
    raw = base_config(upstream, store_url=store_url, plugins=["auth", "tier_policy", "energy", "accounting"],
                      tiers=tiers, mcp_servers=[{"name": "bad", "url": malformed_server.url, "energy": 3,
                                                 "timeout": "1s"}])
    gw = gateway_factory(raw=raw)
    user_id, key = gw.make_user(tier="pro", energy=10)

    async def work(client):
        started = time.monotonic()
        with pytest.raises(MCPError) as failed:
            await client.call_tool(f"bad__{tool}", {})
        took = time.monotonic() - started
        fine = await client.call_tool("bad__ok", {})  # the gateway (and its session upstream) still serve
        return failed.value, took, fine

    failed, took, fine = call(gw, key, work)
    expected = MALFORMED_EXPECTED[tool]
    assert failed.error.data == {"status": 504 if expected == "upstream_timeout" else 502, "type": "server_error",
                                 "code": expected}, failed
    assert failed.message.startswith("The MCP server 'bad' ") and malformed_server.url not in failed.message
    assert "validation error" not in failed.message and "{{{" not in failed.message  # no parser dump
    assert took < (2.5 if expected == "upstream_timeout" else 0.9), f"{tool}: {took:.1f}s"  # never a hang
    assert text_of(fine) == "fine"
    gw.settle()
    assert gw.balance(user_id) == 10 - 3  # the malformed call refunded, the good one paid
    kinds = [e.kind for e in gw.ledger(user_id)]
    assert kinds.count("refund") == 1 and kinds.count("settle") == 1
    row = next(r for r in gw.run(gw.store.usage_rows()) if r["model"] == f"bad__{tool}")
    assert (row["status"], row["error_type"], row["energy_cost"]) == (failed.error.data["status"], expected, 0)


# --------------------------------------------------------------------------- a stdio upstream

STDIO_SERVER = '''
import os
from mcp.server.mcpserver import MCPServer

mcp = MCPServer("files")


@mcp.tool()
def read(path: str) -> str:
    """Reads a file (pretends to)."""
    return f"contents of {path} (pid {os.getpid()})"


@mcp.tool()
def token() -> str:
    """Echoes its credential (a careless server)."""
    return "token is " + os.environ.get("FILES_TOKEN", "missing")


mcp.run("stdio")
'''


def test_a_stdio_server_is_listed_and_called_through_the_gateway(gateway_factory, upstream, store_url, tmp_path,
                                                                monkeypatch):
    """A `command:` server: the gateway starts it (one child process, kept for the calls,
    ended with the gateway), gives it its `env` credential, lists and calls its tools, and
    bills them."""
    import sys

    script = tmp_path / "files_mcp.py"
    script.write_text(STDIO_SERVER)
    monkeypatch.setenv("FILES_MCP_TOKEN", "files-secret-51c0ffee")
    tiers = {"free": {"models": ["demo"]}, "pro": {"models": ["*"], "mcp_tools": ["files__*"]}}
    raw = base_config(upstream, store_url=store_url, plugins=["auth", "tier_policy", "energy", "accounting"],
                      tiers=tiers, mcp_servers=[{"name": "files", "command": sys.executable, "args": [str(script)],
                                                 "env": {"FILES_TOKEN": "os.environ/FILES_MCP_TOKEN"},
                                                 "energy": 2, "connect_timeout": "20s", "timeout": "10s"}])
    gw = gateway_factory(raw=raw)
    user_id, key = gw.make_user(tier="pro", energy=10)

    async def work(client):
        names = sorted(t.name for t in (await client.list_tools()).tools)
        first = await client.call_tool("files__read", {"path": "/srv/a.txt"})
        second = await client.call_tool("files__read", {"path": "/srv/b.txt"})
        echoed = await client.call_tool("files__token", {})
        return names, first, second, echoed

    names, first, second, echoed = call(gw, key, work)
    assert names == ["files__read", "files__token"]
    assert text_of(first).startswith("contents of /srv/a.txt (pid ")
    assert text_of(second).startswith("contents of /srv/b.txt (pid ")
    assert text_of(first).split("pid ")[1] == text_of(second).split("pid ")[1]  # one process for both calls
    assert text_of(echoed) == "token is ***"  # the server got its env credential; the client does not see it
    gw.settle()
    assert gw.balance(user_id) == 10 - 3 * 2
    rows = [r for r in gw.run(gw.store.usage_rows()) if r["user_id"] == user_id]
    assert sorted((r["model"], r["provider"], r["status"]) for r in rows) == [
        ("files__read", "files", 200), ("files__read", "files", 200), ("files__token", "files", 200)]
    import os

    pid = int(text_of(first).split("pid ")[1].rstrip(")"))
    os.kill(pid, 0)  # running between calls
    gw.run(gw.runner.cleanup(), timeout=30)  # the gateway stops: its child process with it
    deadline = time.monotonic() + 10
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, "the stdio server outlived the gateway"
        time.sleep(0.05)
