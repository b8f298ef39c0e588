"""A bare aiohttp pass-through: the floor any Python gateway on aiohttp starts from.

    python bench/passthrough.py --port 9002 --upstream http://127.0.0.1:9001

Forwards POST /v1/chat/completions bytes to the upstream over one pooled ClientSession and
returns the upstream's bytes; a streamed answer (`text/event-stream`) is forwarded piece by
piece as it arrives. No parsing, no auth, no plugins: issue 5's "bare pass-through", against
which the gateway's fast-path throughput target (>= 45%, issue 16) is read, and the floor of what any
extra hop adds to a stream's first byte on this machine.
"""

from __future__ import annotations

import argparse

import aiohttp
from aiohttp import web


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    session: dict[str, aiohttp.ClientSession] = {}

    async def on_startup(app: web.Application) -> None:
        session["s"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

    async def on_cleanup(app: web.Application) -> None:
        await session["s"].close()

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        async with session["s"].post(args.upstream + "/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"}) as resp:
            if resp.content_type != "text/event-stream":
                data = await resp.read()
                return web.Response(body=data, status=resp.status, content_type="application/json")
            out = web.StreamResponse(status=resp.status, headers={"Content-Type": "text/event-stream"})
            await out.prepare(request)
            async for piece in resp.content.iter_any():
                await out.write(piece)
            await out.write_eof()
            return out

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.router.add_post("/v1/chat/completions", forward)
    app.router.add_get("/health", health)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
