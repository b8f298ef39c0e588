"""An ASGI application answered from an aiohttp handler: one request in, its response out.

The `mcp` SDK's streamable-HTTP server transport (`StreamableHTTPSessionManager`) is an
ASGI application; the gateway is aiohttp. Rather than a second server on another port, or
a hand-written MCP transport, `serve_asgi` translates the one request: aiohttp's request
becomes an ASGI `http` scope (with extra keys the caller adds, such as the gateway's
caller identity), the body is streamed through `receive`, and the `http.response.*`
messages become an aiohttp `StreamResponse` (SSE bodies are written as they come).

`receive` after the body waits until the response is complete or the client's connection
closes, then says `http.disconnect` (ASGI servers do the same). Writes to a client that
has gone raise `ConnectionResetError`, the way ASGI servers report it.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

from aiohttp import web
from multidict import CIMultiDict

ASGIApp = Callable[[dict[str, Any], Callable[[], Awaitable[dict[str, Any]]],
                    Callable[[dict[str, Any]], Awaitable[None]]], Awaitable[None]]

BODY_CHUNK = 64 * 1024
DISCONNECT_POLL = 0.2  # seconds between two looks at the connection while the app works


def asgi_scope(request: web.Request, extra: dict[str, Any]) -> dict[str, Any]:
    transport = request.transport
    peer = transport.get_extra_info("peername") if transport is not None else None
    sock = transport.get_extra_info("sockname") if transport is not None else None
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": f"{request.version.major}.{request.version.minor}",
        "method": request.method,
        "scheme": request.scheme,
        "path": request.path,
        "raw_path": request.raw_path.split("?", 1)[0].encode("latin-1", "replace"),
        "root_path": "",
        "query_string": request.query_string.encode("latin-1", "replace"),
        "headers": [(name.lower(), value) for name, value in request.raw_headers],
        "client": tuple(peer[:2]) if isinstance(peer, tuple) else None,
        "server": tuple(sock[:2]) if isinstance(sock, tuple) else None,
        "state": {},
        **extra,
    }


async def serve_asgi(request: web.Request, app: ASGIApp, extra_scope: dict[str, Any]) -> web.StreamResponse:
    """Answer `request` with `app`; the response the app sent (a 500 if it sent none)."""
    response: web.StreamResponse | None = None
    finished = asyncio.Event()
    body_left = True

    def gone() -> bool:
        transport = request.transport
        return transport is None or transport.is_closing()

    async def receive() -> dict[str, Any]:
        nonlocal body_left
        if body_left:
            chunk = await request.content.read(BODY_CHUNK)
            body_left = not request.content.at_eof()
            return {"type": "http.request", "body": chunk, "more_body": body_left}
        while not finished.is_set() and not gone():
            try:
                await asyncio.wait_for(finished.wait(), DISCONNECT_POLL)
            except TimeoutError:
                pass
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal response
        kind = message["type"]
        if kind == "http.response.start":
            headers: CIMultiDict[str] = CIMultiDict()
            for name, value in message.get("headers", []):
                headers.add(name.decode("latin-1"), value.decode("latin-1"))
            response = web.StreamResponse(status=message["status"], headers=headers)
            await response.prepare(request)
        elif kind == "http.response.body":
            if response is None:
                raise RuntimeError("http.response.body before http.response.start")
            body = message.get("body", b"")
            if gone():
                raise ConnectionResetError("the client closed the connection")
            if body:
                await response.write(body)
            if not message.get("more_body", False):
                await response.write_eof()
                finished.set()

    try:
        await app(asgi_scope(request, extra_scope), receive, send)
    except ConnectionError:
        if not gone():
            raise
        # The client left before its answer was written: nothing to send it. (What the
        # app was doing for it, a tool call and its billing, ended on its own.)
        return response if response is not None else web.Response(status=499)
    finally:
        finished.set()
    if response is None:
        return web.json_response({"jsonrpc": "2.0", "id": None,
                                  "error": {"code": -32603, "message": "The MCP endpoint sent no answer."}},
                                 status=500)
    return response
