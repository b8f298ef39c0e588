"""MCP, inbound: `/mcp`, one Model Context Protocol endpoint in front of the upstream MCP
servers of `mcp_servers:` (gateway/providers/mcp.py), behind the gateway's keys, limits
and energy wallet (docs/mcp.md).

How the protocol is served. The official `mcp` SDK does the protocol on both sides: its
low-level `Server` (with our handlers for tools, resources and prompts) behind its
`StreamableHTTPSessionManager`, the current streamable-HTTP transport. That transport is
an ASGI application and the gateway is aiohttp, so the handler hands each `/mcp` request
to it through `gateway/asgi_bridge.py` (a scope, a body stream, a response: about 80
lines), rather than running a second (uvicorn) server on another port or writing the
JSON-RPC framing, version negotiation and SSE ourselves. The manager runs **stateless**
with JSON answers: every POST stands alone, so several worker processes can share the
port (`server.workers`; a session id minted by one would be unknown to the others), and
every request is authenticated on its own.

Who is calling. Each HTTP request's key (`Authorization: Bearer`) is checked first
(`plugins.auth.identify`: the same keys, cache and refusals as the model endpoints; a 401
otherwise); the caller travels to the SDK handlers in the ASGI scope. `tools/list` shows
the tools of every server that answers, namespaced `server__tool`, filtered by the
caller's tier, workspace and key (`plugins.tier_policy.may_use_tool`).

A tool call is a priced request like a model call. It runs through the same plugin chain
(`Chain.run_request`, `Chain.answered`, `Chain.end`: auth, rate limits, tier policy,
energy, accounting, metrics, logs; exactly one ending) as an `mcp.tools/call` request
whose `model` is the tool and whose `provider` is its server. It does not go through
`gateway/lifecycle.run_request`: that one writes the HTTP answer (an OpenAI-shaped error,
a JSON body, a stream) and this answer is an MCP result that the SDK writes. The steps:
the chain's body step finds the tool (404 `tool_not_found`), refuses it when the caller
may not use it (403 `tool_not_allowed`: the lists of `tools/list`, whatever the plugin
chain, and before the arguments, whose errors would show the schema of a tool the caller
cannot see) and validates the arguments against its input schema (400
`invalid_arguments`) before any upstream sees them; energy
reserves the tool's price (an overlapped reservation is waited for before the call: a
tool has effects); the upstream call (its timeout, every failure a `ToolCallFailed`);
success settles, any failure (the tool's own `isError` result included) refunds. The
call runs in its own task: a client cut off mid-call does not cut the call or its
billing short (it ends like any answered request, `client_disconnected`). Every refusal
or failure is an MCP (JSON-RPC) error whose message says why (`Not enough energy: ...`)
and whose `data` carries the gateway's `status`, `type` and `code`.

Traces (docs/telemetry.md): with tracing on, `_run_call` opens and closes the call's SERVER
span itself (`execute_tool server__tool`, continuing a `traceparent` header or the call's
`params._meta`), and a CLIENT span around the upstream call, whose `params._meta` carries it.

Hot reload: the catalog of upstream sessions follows the config snapshot of each request;
a reload keeps the sessions of unchanged servers and closes the others once their calls
had time to end.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

import jsonschema
import mcp_types as types
import structlog
from aiohttp import web
from mcp import MCPError
from mcp.server.lowlevel.server import Server
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager

from gateway.asgi_bridge import serve_asgi
from gateway.config import TOOL_SEPARATOR, Config
from gateway.errors import ApiError, internal_error
from gateway.lifecycle import choose_model, clean_text, error_response, new_context
from gateway.providers.mcp import CatalogTool, ToolCallFailed, ToolCatalog
from gateway.state import GATEWAY, Snapshot
from plugins.auth import identify
from plugins.base import Identity, Reject, RequestContext
from plugins.tier_policy import may_use_tool

log = structlog.get_logger("gateway.mcp")

ENDPOINT = "mcp.tools/call"


@dataclass(frozen=True)
class McpCaller:
    """Who sent one /mcp request, and the config snapshot it runs on."""

    request: web.Request
    snap: Snapshot
    identity: Identity
    ai_settings: dict[str, Any] | None  # the caller's workspace's

    def may_use(self, tool: str) -> bool:
        return may_use_tool(self.snap.config, self.identity, self.ai_settings, tool)


def mcp_error(err: ApiError) -> MCPError:
    """The gateway's refusal or failure as an MCP (JSON-RPC) error: the message says why,
    `data` carries the gateway's status, type and code."""
    if err.status in (400, 404, 422):
        code = types.INVALID_PARAMS
    elif err.status >= 500:
        code = types.INTERNAL_ERROR
    else:  # 401, 403, 429: the request may not run
        code = types.INVALID_REQUEST
    return MCPError(code, err.message, {"status": err.status, "type": err.type, "code": err.code})


def check_arguments(tool: CatalogTool, arguments: dict[str, Any]) -> None:
    """The client's arguments against the tool's input schema, before the upstream sees them."""
    try:
        validator_class = jsonschema.validators.validator_for(tool.input_schema)
        validator_class.check_schema(tool.input_schema)
    except jsonschema.SchemaError:
        raise ApiError(502, f"The tool '{tool.name}' has an invalid input schema upstream.", type="server_error",
                       code="upstream_malformed") from None
    error = jsonschema.exceptions.best_match(validator_class(tool.input_schema).iter_errors(arguments))
    if error is not None:
        where = "arguments" + "".join(f"[{p!r}]" for p in error.absolute_path)
        raise ApiError(400, f"Invalid arguments for the tool '{tool.name}': {where}: {clean_text(error.message)}",
                       code="invalid_arguments", param=where)


class McpEndpoint:
    """The /mcp endpoint of one app: the SDK server and its transport, the tool catalog."""

    def __init__(self) -> None:
        self.server: Server[Any] = Server(
            "ai-gateway",
            on_list_tools=self._list_tools,
            on_call_tool=self._call_tool,
            on_list_resources=self._list_resources,
            on_read_resource=self._read_resource,
            on_list_prompts=self._list_prompts,
            on_get_prompt=self._get_prompt,
        )
        self.manager = StreamableHTTPSessionManager(self.server, json_response=True, stateless=True)
        self._catalog: ToolCatalog | None = None
        self._retiring: set[asyncio.Task] = set()
        self._calls: set[asyncio.Task] = set()

    # --- the catalog of one config -------------------------------------------------------

    def catalog(self, config: Config) -> ToolCatalog:
        current = self._catalog
        if current is None:
            self._catalog = current = ToolCatalog(config.mcp_servers)
        elif current.servers != config.mcp_servers:  # a reload changed mcp_servers
            self._catalog, retired = current.carry_over(config.mcp_servers)
            if retired:
                grace = max(s.connect_timeout + s.timeout + max((t.timeout or 0) for t in s.tools.values())
                            if s.tools else s.connect_timeout + s.timeout for s in (u.server for u in retired))
                task = asyncio.ensure_future(self._retire(retired, grace))
                self._retiring.add(task)
                task.add_done_callback(self._retiring.discard)
            current = self._catalog
        return current

    @staticmethod
    async def _retire(upstreams: list[Any], grace: float) -> None:
        await asyncio.sleep(grace)  # calls that started on the old config end first
        await asyncio.gather(*(u.close() for u in upstreams), return_exceptions=True)

    async def run(self) -> AsyncIterator[None]:
        """The transport's task group, entered and left by one task (anyio's rule), for
        the app's lifetime; at the end, the upstream sessions closed."""
        started: asyncio.Future = asyncio.get_running_loop().create_future()
        stop = asyncio.Event()

        async def hold() -> None:
            try:
                async with self.manager.run():
                    started.set_result(None)
                    await stop.wait()
            except BaseException as exc:
                if not started.done():
                    started.set_exception(exc)
                raise

        holder = asyncio.ensure_future(hold())
        await started
        yield
        for task in list(self._calls):  # tool calls still running end (and bill) first
            await asyncio.wait([task], timeout=30)
        stop.set()
        await asyncio.gather(holder, return_exceptions=True)
        for task in list(self._retiring):
            task.cancel()
        if self._catalog is not None:
            await self._catalog.close()

    # --- HTTP ----------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        gw = request.app[GATEWAY]
        snap = gw.snapshot
        if not snap.config.mcp_servers:
            raise ApiError(404, "No MCP servers are configured on this gateway.", code="not_found")
        try:
            identity = await identify(request.headers, snap.config, gw.directory)
        except Reject as err:
            return error_response(err, {"WWW-Authenticate": "Bearer"} if err.status == 401 else None)
        workspace = await gw.directory.workspace(identity.workspace_id) if gw.directory is not None else None
        caller = McpCaller(request, snap, identity, workspace.ai_settings if workspace is not None else None)
        return await serve_asgi(request, self.manager.handle_request, {"gateway.mcp": caller})

    # --- the SDK's handlers ----------------------------------------------------------------

    @staticmethod
    def _caller(ctx: Any) -> McpCaller:
        request = ctx.request
        caller = request.scope.get("gateway.mcp") if request is not None else None
        if not isinstance(caller, McpCaller):  # only reachable through handle(): fail closed
            raise MCPError(types.INVALID_REQUEST, "Unauthenticated.")
        return caller

    async def _visible_tools(self, caller: McpCaller) -> list[CatalogTool]:
        tools = await self.catalog(caller.snap.config).tools()
        return [tool for tool in tools if caller.may_use(tool.name)]

    async def _list_tools(self, ctx: Any, params: Any) -> types.ListToolsResult:
        caller = self._caller(ctx)
        return types.ListToolsResult(tools=[tool.tool for tool in await self._visible_tools(caller)])

    async def _call_tool(self, ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        caller = self._caller(ctx)
        rctx = new_context(caller.request, caller.snap, ENDPOINT, {})
        meta = params.meta if isinstance(params.meta, dict) else None  # an agent's trace context (W3C, SEP-414)
        task = asyncio.ensure_future(self._run_call(caller, rctx, params.name, dict(params.arguments or {}), meta))
        self._calls.add(task)
        task.add_done_callback(self._call_done)
        try:
            return await asyncio.shield(task)  # a client cut off does not cut the call short
        except asyncio.CancelledError:
            rctx.client_disconnected = True
            raise

    def _call_done(self, task: asyncio.Task) -> None:
        self._calls.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a call whose client left raises to nobody

    async def _run_call(self, caller: McpCaller, ctx: RequestContext, name: str,
                        arguments: dict[str, Any], meta: dict[str, Any] | None = None) -> types.CallToolResult:
        """One tool call through the plugin chain (module docstring): exactly one ending."""
        snap = caller.snap
        catalog = self.catalog(snap.config)
        found: list[CatalogTool] = []

        async def read_body() -> None:
            ctx.body = {"model": name, "arguments": arguments}
            ctx.requested_model = name
            server_name, _, exposed = name.partition(TOOL_SEPARATOR)
            tool = await catalog.find(server_name, exposed) if snap.config.mcp_tool(name) is not None else None
            if tool is None:
                raise ApiError(404, f"Unknown tool '{clean_text(name)}'.", code="tool_not_found", param="name")
            if not caller.may_use(name):  # whatever the chain: and before its schema shows in an error
                raise ApiError(403, f"You may not use the tool '{clean_text(name)}'.", code="tool_not_allowed",
                               param="name")
            check_arguments(tool, arguments)
            ctx.candidates = [name]
            found.append(tool)

        snap.chain.enter(ctx)
        trace = None
        if snap.telemetry is not None:  # a SERVER span, and a CLIENT span for the upstream call
            trace = ctx.trace = snap.telemetry.start(ctx, caller.request, meta)
        try:
            try:
                await snap.chain.run_request(ctx, read_body)
            except ToolCallFailed as exc:  # listing the upstream's tools failed
                raise ApiError(502, exc.message, type="server_error", code=exc.code) from None
            if not found:
                raise ApiError(404, f"Unknown tool '{clean_text(name)}'.", code="tool_not_found", param="name")
            if ctx.gate is not None:  # a tool has effects: the reservation stands before the call
                gate, ctx.gate = ctx.gate, None
                error = await asyncio.shield(gate)
                if error is not None:
                    raise error
            choose_model(ctx)
            tool = found[0]
            upstream = catalog.upstream(tool.server.name)
            assert upstream is not None
            ctx.provider = tool.server.name
            ctx.deployment = f"mcp/{tool.server.name}/{tool.upstream_name}"
            ctx.attempts = 1
            attempt, meta = trace.tool_call(tool.server.name, tool.upstream_name, tool.server.url) \
                if trace is not None else (None, None)
            try:
                result = await upstream.call_tool(tool.upstream_name, arguments, meta=meta)
            except ToolCallFailed as exc:
                if attempt is not None:
                    trace.tool_call_ended(attempt, exc.code)
                status = 504 if exc.code == "upstream_timeout" else 502
                raise ApiError(status, exc.message, type="server_error", code=exc.code) from None
            except BaseException as exc:  # cancelled, or a bug: the span ends all the same
                if attempt is not None:
                    trace.tool_call_ended(attempt, "cancelled" if isinstance(exc, asyncio.CancelledError)
                                          else type(exc).__name__)
                raise
            if attempt is not None:
                trace.tool_call_ended(attempt, "tool_error" if result.is_error else None)
            ctx.first_byte_at = time.monotonic()
            if result.is_error:  # the tool ran and failed: the client gets its answer, unbilled
                await snap.chain.end(ctx, ApiError(502, f"The tool '{name}' reported an error.",
                                                   type="server_error", code="tool_error"))
                return result
            ctx.status = 200
            snap.chain.answered(ctx)
            await snap.chain.end(ctx, wait=False)
            return result
        except ApiError as err:
            await snap.chain.end(ctx, err)
            raise mcp_error(err) from None
        except asyncio.CancelledError:
            await snap.chain.end(ctx, ApiError(499, "the request was cancelled", type="server_error",
                                               code="cancelled"))
            raise
        except Exception:
            log.exception("mcp_tool_call_failed", request_id=ctx.request_id)
            err = internal_error(ctx.request_id)
            await snap.chain.end(ctx, err)
            raise mcp_error(err) from None
        finally:
            if trace is not None:
                trace.finish(ctx)

    # --- resources and prompts: passed through, unpriced ----------------------------------

    async def _servers_for(self, caller: McpCaller) -> list[Any]:
        """The upstreams the caller may use a tool of (their resources and prompts too)."""
        catalog = self.catalog(caller.snap.config)
        names = {tool.server.name for tool in await self._visible_tools(caller)}
        return [catalog.upstreams[name] for name in catalog.upstreams if name in names]

    async def _list_resources(self, ctx: Any, params: Any) -> types.ListResourcesResult:
        caller = self._caller(ctx)
        resources: list[types.Resource] = []
        for upstream in await self._servers_for(caller):
            if upstream.offers("resources"):
                try:
                    resources.extend(await upstream.list_resources())
                except ToolCallFailed as exc:
                    log.warning("mcp_resources_unavailable", server=upstream.name, error=exc.code)
        return types.ListResourcesResult(resources=resources)

    async def _read_resource(self, ctx: Any, params: types.ReadResourceRequestParams) -> types.ReadResourceResult:
        caller = self._caller(ctx)
        for upstream in await self._servers_for(caller):
            if not upstream.offers("resources"):
                continue
            try:
                if any(str(r.uri) == str(params.uri) for r in await upstream.list_resources()):
                    return await upstream.read_resource(str(params.uri))
            except ToolCallFailed as exc:
                raise mcp_error(ApiError(502, exc.message, type="server_error", code=exc.code)) from None
        raise mcp_error(ApiError(404, f"Unknown resource '{clean_text(params.uri)}'.", code="resource_not_found",
                                 param="uri"))

    async def _list_prompts(self, ctx: Any, params: Any) -> types.ListPromptsResult:
        caller = self._caller(ctx)
        prompts: list[types.Prompt] = []
        for upstream in await self._servers_for(caller):
            if upstream.offers("prompts"):
                try:
                    prompts.extend(p.model_copy(update={"name": f"{upstream.name}{TOOL_SEPARATOR}{p.name}"})
                                   for p in await upstream.list_prompts())
                except ToolCallFailed as exc:
                    log.warning("mcp_prompts_unavailable", server=upstream.name, error=exc.code)
        return types.ListPromptsResult(prompts=prompts)

    async def _get_prompt(self, ctx: Any, params: types.GetPromptRequestParams) -> types.GetPromptResult:
        caller = self._caller(ctx)
        server_name, _, prompt = params.name.partition(TOOL_SEPARATOR)
        for upstream in await self._servers_for(caller):
            if upstream.name == server_name and prompt and upstream.offers("prompts"):
                try:
                    return await upstream.get_prompt(prompt, params.arguments)
                except ToolCallFailed as exc:
                    raise mcp_error(ApiError(502, exc.message, type="server_error", code=exc.code)) from None
        raise mcp_error(ApiError(404, f"Unknown prompt '{clean_text(params.name)}'.", code="prompt_not_found",
                                 param="name"))
