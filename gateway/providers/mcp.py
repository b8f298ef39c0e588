"""Upstream MCP servers (config.yaml `mcp_servers:`): one connection each, the tools they
expose to clients (allow/deny lists, renames, `server__tool` names), calls with timeouts.

The protocol is the official `mcp` SDK's `Client` (streamable HTTP for a `url` server, a
child process over stdio for a `command` one); nothing here speaks JSON-RPC itself.

* **One long-lived session per server.** The SDK's client is an async context manager
  whose task group must be entered and left by one task, so a small owner task holds it
  open (`McpUpstream._hold`) and calls run concurrently over it (JSON-RPC ids). A
  session whose transport broke (the server restarted, the process died) is dropped and
  the next call connects again; an upstream's own JSON-RPC error leaves it as it is.
* **Credentials stay here.** `headers` (HTTP) and `env` (stdio) go to that server only;
  no client header is forwarded. Every text that comes back from an upstream and is
  shown to a client (an error message, a tool's result) has the server's credential
  values replaced by `***` (`McpUpstream.scrub`), and errors name the server, never its
  URL, headers or command line.
* **Every failure is a `ToolCallFailed`** with a message fit for the client: unreachable,
  a timeout (`timeout`, per tool `tools.<name>.timeout`), an error answer, a malformed
  answer (`sdk_says_malformed`: what the SDK could not read). Nothing an upstream does can
  hang a call past its timeout or crash the gateway; an answer the SDK cannot match to its
  request (another request's id) is dropped by it, and that call ends at its timeout.
* **The tool list is cached** for `tools_ttl` seconds per server; a server that cannot be
  reached offers no tools meanwhile (and is asked again on the next listing).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any

import httpx2
import mcp_types as types
import orjson
import structlog
from mcp import Client, MCPError, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from pydantic import ValidationError

from gateway.config import McpServerConfig

log = structlog.get_logger("gateway.mcp")


def sdk_says_malformed(exc: MCPError) -> bool:
    """The SDK's client stands in a JSON-RPC error for an answer it could not read: a
    parse error (no JSON, no JSON-RPC message, an error object of the wrong shape) or a
    content type that is neither JSON nor SSE. Those are malformed answers, not the
    upstream's own error, and their text (a parser's dump of what came back) is not
    shown to a client."""
    return exc.code == types.PARSE_ERROR or (exc.code == types.INVALID_REQUEST
                                             and str(exc.message).startswith("Unexpected content type"))


class ToolCallFailed(Exception):
    """An upstream MCP call failed; `message` is safe to show a client, `code` names why
    (`upstream_unreachable`, `upstream_timeout`, `upstream_error`, `upstream_malformed`)."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.message = message
        self.code = code


@dataclass(frozen=True)
class CatalogTool:
    """A tool as clients see it: its `server__tool` name and the upstream's definition
    under that name; `upstream_name` is what the upstream calls it."""

    name: str
    server: McpServerConfig
    upstream_name: str
    tool: types.Tool

    @property
    def input_schema(self) -> dict[str, Any]:
        return self.tool.input_schema or {"type": "object"}


class McpUpstream:
    """One upstream MCP server: its session, its tools, calls to it."""

    def __init__(self, server: McpServerConfig):
        self.server = server
        self._client: Client | None = None
        self._holder: asyncio.Task | None = None
        self._release: asyncio.Event | None = None
        self._connecting = asyncio.Lock()
        self._tools: tuple[float, list[types.Tool]] | None = None
        # Credential values, longest first, so that a secret containing another is scrubbed whole.
        secrets = [*server.headers.values(), *server.env.values()]
        for value in list(secrets):
            scheme, _, token = value.partition(" ")
            if token and scheme.lower() in ("bearer", "basic", "token"):
                secrets.append(token)
        self._secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)

    @property
    def name(self) -> str:
        return self.server.name

    def scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def scrub_model(self, model: Any) -> Any:
        """A result with every credential value replaced (checked on its JSON, rebuilt only
        when one is found)."""
        if not self._secrets:
            return model
        dumped = model.model_dump_json(by_alias=True, exclude_none=True)
        if not any(secret in dumped for secret in self._secrets):
            return model
        return type(model).model_validate(orjson.loads(self.scrub(dumped)))

    # --- the session ------------------------------------------------------------------

    def _transport(self, stack: contextlib.AsyncExitStack) -> Any:
        server = self.server
        if server.url is not None:
            http = httpx2.AsyncClient(headers=dict(server.headers),
                                      timeout=httpx2.Timeout(server.connect_timeout, read=None))
            stack.push_async_callback(http.aclose)
            return streamable_http_client(server.url, http_client=http)
        assert server.command is not None
        params = StdioServerParameters(command=server.command, args=list(server.args), env=dict(server.env) or None)
        return stdio_client(params)

    async def _hold(self, ready: asyncio.Future, release: asyncio.Event) -> None:
        """Owns the SDK client's context from enter to exit (one task, as anyio requires)."""
        try:
            async with contextlib.AsyncExitStack() as stack:
                transport = self._transport(stack)
                client = await stack.enter_async_context(Client(transport, cache=None))
                ready.set_result(client)
                await release.wait()
        except BaseException as exc:  # noqa: BLE001 — reported to the waiting caller, or logged
            if not ready.done():
                ready.set_exception(exc if isinstance(exc, Exception) else ConnectionError("cancelled"))
            elif not isinstance(exc, asyncio.CancelledError):
                log.warning("mcp_session_ended", server=self.name, error=type(exc).__name__)

    async def client(self) -> Client:
        """The connected session, connecting (within `connect_timeout`) when there is none."""
        if self._client is not None and self._holder is not None and not self._holder.done():
            return self._client
        async with self._connecting:
            if self._client is not None and self._holder is not None and not self._holder.done():
                return self._client
            await self._drop()
            ready: asyncio.Future = asyncio.get_running_loop().create_future()
            self._release = asyncio.Event()
            self._holder = asyncio.ensure_future(self._hold(ready, self._release))
            try:
                async with asyncio.timeout(self.server.connect_timeout):
                    self._client = await asyncio.shield(ready)
            except BaseException as exc:
                await self._drop()
                if isinstance(exc, TimeoutError):
                    raise ToolCallFailed(f"The MCP server '{self.name}' did not connect within "
                                         f"{self.server.connect_timeout:g}s.", "upstream_timeout") from None
                if isinstance(exc, asyncio.CancelledError):
                    raise
                log.warning("mcp_connect_failed", server=self.name, error=type(exc).__name__)
                raise ToolCallFailed(f"The MCP server '{self.name}' is unreachable.", "upstream_unreachable") from None
            return self._client

    async def _drop(self) -> None:
        holder, release = self._holder, self._release
        self._client = self._holder = self._release = None
        if holder is None:
            return
        if release is not None:
            release.set()
        try:
            async with asyncio.timeout(5):
                await asyncio.shield(holder)
        except (TimeoutError, asyncio.CancelledError):
            holder.cancel()
        except Exception:  # noqa: BLE001 — the session is gone either way
            pass

    async def close(self) -> None:
        await self._drop()

    async def _request(self, what: str, timeout: float, call: Any) -> Any:
        """Run `call(client)` within `timeout`, every failure a ToolCallFailed."""
        client = await self.client()
        try:
            async with asyncio.timeout(timeout):
                return await call(client)
        except TimeoutError:
            raise ToolCallFailed(f"The MCP server '{self.name}' did not answer {what} within {timeout:g}s.",
                                 "upstream_timeout") from None
        except MCPError as exc:
            if sdk_says_malformed(exc):
                raise ToolCallFailed(f"The MCP server '{self.name}' answered {what} with something that is not "
                                     f"an MCP message.", "upstream_malformed") from None
            raise ToolCallFailed(f"The MCP server '{self.name}' answered {what} with an error: "
                                 f"{self.scrub(str(exc.message))[:500]}", "upstream_error") from None
        except ValidationError:
            raise ToolCallFailed(f"The MCP server '{self.name}' answered {what} with a malformed result.",
                                 "upstream_malformed") from None
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 — the transport broke: connect again next time
            log.warning("mcp_request_failed", server=self.name, what=what, error=type(exc).__name__)
            await self._drop()
            raise ToolCallFailed(f"The MCP server '{self.name}' failed on {what}.", "upstream_unreachable") from None

    # --- what it offers -----------------------------------------------------------------

    async def tools(self) -> list[types.Tool]:
        """The upstream's tools (every page), cached for `tools_ttl` seconds."""
        cached = self._tools
        if cached is not None and time.monotonic() - cached[0] < self.server.tools_ttl:
            return cached[1]

        async def list_all(client: Client) -> list[types.Tool]:
            tools: list[types.Tool] = []
            cursor = None
            for _ in range(100):  # a paginator that never ends cannot hang the listing
                page = await client.list_tools(cursor=cursor)
                tools.extend(page.tools)
                cursor = page.next_cursor
                if cursor is None:
                    break
            return tools

        tools = await self._request("tools/list", self.server.connect_timeout, list_all)
        self._tools = (time.monotonic(), tools)
        return tools

    async def call_tool(self, upstream_name: str, arguments: dict[str, Any],
                        meta: dict[str, str] | None = None) -> types.CallToolResult:
        """`meta`: the W3C trace context (traceparent, tracestate) for the call's `params._meta`."""
        timeout = self.server.tool_timeout(upstream_name)
        result = await self._request(f"tools/call {upstream_name!r}", timeout,
                                     lambda client: client.call_tool(upstream_name, arguments, meta=meta))
        if not isinstance(result, types.CallToolResult):
            raise ToolCallFailed(f"The MCP server '{self.name}' answered tools/call with a malformed result.",
                                 "upstream_malformed")
        return self.scrub_model(result)

    def offers(self, capability: str) -> bool:
        client = self._client
        if client is None:
            return False
        with contextlib.suppress(Exception):
            return getattr(client.server_capabilities, capability) is not None
        return False

    async def list_resources(self) -> list[types.Resource]:
        result = await self._request("resources/list", self.server.connect_timeout, lambda c: c.list_resources())
        return list(self.scrub_model(result).resources)

    async def read_resource(self, uri: str) -> types.ReadResourceResult:
        result = await self._request("resources/read", self.server.timeout, lambda c: c.read_resource(uri))
        return self.scrub_model(result)

    async def list_prompts(self) -> list[types.Prompt]:
        result = await self._request("prompts/list", self.server.connect_timeout, lambda c: c.list_prompts())
        return list(self.scrub_model(result).prompts)

    async def get_prompt(self, name: str, arguments: dict[str, str] | None) -> types.GetPromptResult:
        result = await self._request("prompts/get", self.server.timeout, lambda c: c.get_prompt(name, arguments))
        return self.scrub_model(result)


class ToolCatalog:
    """The upstream MCP servers of one config, and the tools they expose by client name.
    A reload builds a new catalog that keeps the sessions of unchanged servers
    (`ToolCatalog.carry_over`)."""

    def __init__(self, servers: list[McpServerConfig], reuse: dict[str, McpUpstream] | None = None):
        self.servers = list(servers)
        reuse = reuse or {}
        self.upstreams: dict[str, McpUpstream] = {}
        for server in servers:
            kept = reuse.get(server.name)
            self.upstreams[server.name] = kept if kept is not None and kept.server == server else McpUpstream(server)

    def carry_over(self, servers: list[McpServerConfig]) -> tuple["ToolCatalog", list[McpUpstream]]:
        """The catalog of a reloaded config, and the sessions it no longer uses (to close)."""
        new = ToolCatalog(servers, self.upstreams)
        kept = {id(u) for u in new.upstreams.values()}
        return new, [u for u in self.upstreams.values() if id(u) not in kept]

    def upstream(self, server: str) -> McpUpstream | None:
        return self.upstreams.get(server)

    async def server_tools(self, upstream: McpUpstream) -> list[CatalogTool]:
        server = upstream.server
        out = []
        for tool in await upstream.tools():
            if server.exposes(tool.name):
                name = server.exposed_name(tool.name)
                out.append(CatalogTool(name, server, tool.name, tool.model_copy(update={"name": name})))
        return out

    async def tools(self) -> list[CatalogTool]:
        """Every exposed tool of every server that answers; one that does not is skipped
        (logged) rather than failing the whole listing."""
        found = await asyncio.gather(*(self.server_tools(u) for u in self.upstreams.values()), return_exceptions=True)
        tools: list[CatalogTool] = []
        for upstream, result in zip(self.upstreams.values(), found):
            if isinstance(result, BaseException):
                if isinstance(result, asyncio.CancelledError):
                    raise result
                log.warning("mcp_tools_unavailable", server=upstream.name,
                            error=result.code if isinstance(result, ToolCallFailed) else type(result).__name__)
                continue
            tools.extend(result)
        return tools

    async def find(self, server_name: str, exposed_name: str) -> CatalogTool | None:
        """The tool a client calls `server__tool`, if its server exposes it now."""
        upstream = self.upstreams.get(server_name)
        if upstream is None:
            return None
        for tool in await self.server_tools(upstream):
            if tool.name == upstream.server.exposed_name(upstream.server.upstream_name(exposed_name)):
                return tool
        return None

    async def close(self) -> None:
        await asyncio.gather(*(u.close() for u in self.upstreams.values()), return_exceptions=True)
