"""`/mcp` mounted without the MCP SDK until a config has `mcp_servers:`.

The endpoint itself (gateway/inbound/mcp.py) runs on the official `mcp` SDK, whose server,
transport and pydantic types bring starlette, sse-starlette, uvicorn, anyio, httpx and
jsonschema with them: ~300 modules, about 30 MiB of every gateway process's RSS and a
quarter of a second of start-up (docs/performance.md, the all-native gateway's RSS). A
gateway without MCP servers never needs any of it, so this module is what create_app
installs: the route and a lifetime. The endpoint is built, and the SDK imported, at
start-up when the config has MCP servers, else by the first `/mcp` request after a reload
added some (the import runs on the blocking executor, the event loop keeps serving);
until then `/mcp` answers what the endpoint answers without servers: 404.
"""

from __future__ import annotations

import asyncio
import importlib
from typing import TYPE_CHECKING, AsyncIterator

from aiohttp import web

from gateway.errors import ApiError
from gateway.state import GATEWAY

if TYPE_CHECKING:
    from gateway.inbound.mcp import McpEndpoint


class McpMount:
    """/mcp of one app: the endpoint once built, its lifetime (the SDK transport's task
    group, held from the build to the app's cleanup)."""

    def __init__(self) -> None:
        self.endpoint: McpEndpoint | None = None
        self._building: asyncio.Future | None = None
        self._lifetime: AsyncIterator[None] | None = None
        self._closed = False

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if not request.app[GATEWAY].snapshot.config.mcp_servers:
            raise ApiError(404, "No MCP servers are configured on this gateway.", code="not_found")
        endpoint = self.endpoint or await self._endpoint()
        return await endpoint.handle(request)

    async def _endpoint(self) -> McpEndpoint:
        if self._closed:
            raise ApiError(503, "The gateway is shutting down.", type="server_error", code="shutting_down")
        if self._building is None:  # one build, however many requests wait for it
            self._building = asyncio.ensure_future(self._build())
        return await asyncio.shield(self._building)

    async def _build(self) -> McpEndpoint:
        sdk = await asyncio.get_running_loop().run_in_executor(None, importlib.import_module, "gateway.inbound.mcp")
        endpoint = sdk.McpEndpoint()
        lifetime = endpoint.run()
        await lifetime.__anext__()  # the transport's task group is running
        self._lifetime, self.endpoint = lifetime, endpoint
        return endpoint

    async def run(self, app: web.Application) -> AsyncIterator[None]:
        """The app's cleanup_ctx: the endpoint built at start-up when MCP servers are
        configured (an SDK that cannot load fails the start, not a call); at cleanup, its
        tool calls end and its transport and upstream sessions close."""
        if app[GATEWAY].snapshot.config.mcp_servers:
            await self._endpoint()
        yield
        self._closed = True
        if self._building is not None:
            await asyncio.gather(self._building, return_exceptions=True)
        if self._lifetime is not None:
            async for _ in self._lifetime:  # runs run()'s end once
                pass


MCP = web.AppKey("mcp", McpMount)


def install_mcp(app: web.Application) -> None:
    """Mount `/mcp` (POST, GET, DELETE: the SDK's transport answers each) and its lifetime."""
    mount = McpMount()
    app[MCP] = mount

    def mcp_ctx(app: web.Application) -> AsyncIterator[None]:
        return mount.run(app)

    app.cleanup_ctx.append(mcp_ctx)
    app.router.add_route("*", "/mcp", mount.handle)
