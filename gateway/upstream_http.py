"""A small HTTP/1.1 client for the native pass-through's upstream leg.

Why not aiohttp's client here: measured on the fast path (bench/), aiohttp's
ClientSession costs about 0.4 ms of latency and 50 us of CPU per request on top of the
upstream's own time, which is most of what the gateway is allowed to add. This client does
only what an OpenAI-wire upstream needs:

* POST with a body, one write per request; keep-alive connections pooled per
  (scheme, host, port), TLS through the standard `ssl` module (certificates verified);
* responses parsed by httptools (llhttp, the parser Node.js uses): Content-Length,
  chunked and read-until-close bodies, gzip/deflate if an upstream compresses anyway;
* a streamed body is handed over as it arrives, with flow control (reading pauses while
  1 MiB is unread), so a slow client never makes the gateway buffer a whole answer.

A connection is reused only when its previous response was read to the end and the
server allowed keep-alive; anything else (an abandoned stream, a parse error, a timeout)
closes it. Errors are `UpstreamConnectionError` (could not connect or send; nothing was
received) and `UpstreamProtocolError` (the connection broke or the response was not
HTTP); the native dispatcher maps them to the router's kinds.
"""

from __future__ import annotations

import asyncio
import ssl
import time
import zlib
from collections import deque
from typing import AsyncIterator
from urllib.parse import urlsplit

import httptools
from multidict import CIMultiDict

MAX_BODY = 64 * 1024 * 1024  # a non-streamed answer larger than this is refused
_PAUSE_AT = 1024 * 1024  # unread streamed bytes at which reading pauses
_MAX_IDLE_PER_HOST = 256
MAX_LINE = 16 * 1024 * 1024  # longest SSE line accepted from an upstream
RELEASE_GRACE = 5.0  # seconds a released, unfinished response may take to end before its connection is closed
IDLE_TIMEOUT = 30.0  # seconds a kept-alive connection may sit unused before it is dropped


class UpstreamConnectionError(OSError):
    """Could not connect, or the connection failed before any response byte arrived."""


class UpstreamProtocolError(Exception):
    """The response broke off, or was not valid HTTP."""


class Target:
    """A parsed upstream URL: what a request needs, computed once per deployment."""

    __slots__ = ("scheme", "host", "port", "path", "key")

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.key = (self.scheme, self.host, self.port)

    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"


class Response:
    """One response on one connection. Read it whole (`read`) or as it comes (`iter_lines`,
    `iter_chunks`); then `release()` (back to the pool if complete) or `close()`."""

    def __init__(self, conn: "_Connection") -> None:
        self._conn = conn
        self.status = 0
        self.headers: CIMultiDict[str] = CIMultiDict()
        self._headers_done = asyncio.get_running_loop().create_future()
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._data = asyncio.Event()
        self._complete = False
        self._error: BaseException | None = None
        self._decoder = None
        self._finished = False

    # ---- fed by the connection

    def _fail(self, exc: BaseException) -> None:
        if self._complete or self._error is not None:
            return
        self._error = exc
        if not self._headers_done.done():
            self._headers_done.set_exception(exc)
        self._data.set()

    def _body(self, data: bytes) -> None:
        if self._finished:  # released early: the rest of the body is not wanted
            return
        self._chunks.append(data)
        self._buffered += len(data)
        self._data.set()
        if self._buffered >= _PAUSE_AT:
            self._conn.pause()

    def _done(self) -> None:
        self._complete = True
        self._data.set()
        if self._finished and self._conn.response is self:  # released early; now complete
            self._conn.finished(self, reusable=self._error is None)

    # ---- for the caller

    async def _next(self) -> bytes | None:
        """The next piece of the body as received (decoded), or None at its end."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._complete:
                return None
            self._data.clear()
            await self._data.wait()
        data = self._chunks.popleft()
        self._buffered -= len(data)
        if self._buffered < _PAUSE_AT:
            self._conn.resume()
        if self._decoder is not None:
            try:
                data = self._decoder.decompress(data)
            except zlib.error as exc:
                raise UpstreamProtocolError(f"bad compressed body: {exc}") from None
        return data

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        while (data := await self._next()) is not None:
            if data:
                yield data

    async def iter_lines(self, max_line: int = MAX_LINE) -> AsyncIterator[bytes]:
        """The body split after each b"\\n" (the line keeps it), as the pieces arrive."""
        pending = bytearray()
        async for data in self.iter_chunks():
            pending += data
            start = 0
            while (end := pending.find(b"\n", start)) >= 0:
                yield bytes(pending[start:end + 1])
                start = end + 1
            del pending[:start]
            if len(pending) > max_line:
                self.close()
                raise UpstreamProtocolError(f"a line of the response is longer than {max_line} bytes")
        if pending:
            yield bytes(pending)

    async def read(self, limit: int = MAX_BODY) -> bytes:
        parts, size = [], 0
        async for data in self.iter_chunks():
            size += len(data)
            if size > limit:
                self.close()
                raise UpstreamProtocolError(f"the response body is larger than {limit} bytes")
            parts.append(data)
        return b"".join(parts)

    def release(self) -> None:
        """Done with the response: the connection goes back to the pool when the response
        was read to its end and keep-alive allows, else it is closed. Released before its
        end arrived (a stream after [DONE]): the rest is discarded as it comes and the
        connection is pooled then, or closed if the end does not come within a few seconds."""
        if self._finished:
            return
        self._finished = True
        self._chunks.clear()
        if self._complete or self._error is not None:
            self._conn.finished(self, reusable=self._complete and self._error is None)
            return
        self._conn.resume()
        asyncio.get_running_loop().call_later(RELEASE_GRACE, self._give_up)

    def _give_up(self) -> None:
        if not self._complete and self._conn.response is self:
            self._conn.finished(self, reusable=False)

    def close(self) -> None:
        if self._finished:
            return
        self._finished = True
        self._conn.finished(self, reusable=False)


class _Connection(asyncio.Protocol):
    def __init__(self, pool: "UpstreamHTTP", key: tuple) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.response: Response | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.lost = False
        self.idle_since = 0.0
        self.received = False  # any byte of the current response
        self._paused = False
        self._eof_body = False
        self._keep_alive = False

    # ---- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None:  # bytes nobody asked for: this connection is not usable
            self.transport.close()
            return
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            response._fail(UpstreamProtocolError(f"invalid HTTP response: {exc}"))
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.pool._forget(self)
        response = self.response
        if response is None:
            return
        if self._eof_body and exc is None and response._headers_done.done():
            response._done()  # a body delimited by the end of the connection
        elif not self.received:
            response._fail(UpstreamConnectionError(f"the upstream closed the connection{_reason(exc)}"))
        else:
            response._fail(UpstreamProtocolError(f"the upstream connection broke off{_reason(exc)}"))

    def pause_writing(self) -> None:  # requests are small; nothing to pause
        pass

    def resume_writing(self) -> None:
        pass

    # ---- httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        self.response.headers.add(name.decode("latin-1"), value.decode("latin-1"))

    def on_headers_complete(self) -> None:
        response = self.response
        response.status = self.parser.get_status_code()
        self._keep_alive = self.parser.should_keep_alive()
        headers = response.headers
        chunked = "chunked" in headers.get("Transfer-Encoding", "").lower()
        self._eof_body = "Content-Length" not in headers and not chunked and response.status not in (204, 304)
        encoding = headers.get("Content-Encoding", "").strip().lower()
        if encoding in ("gzip", "x-gzip"):
            response._decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            response._decoder = zlib.decompressobj()
        if not response._headers_done.done():
            response._headers_done.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.response._body(body)

    def on_message_complete(self) -> None:
        self.response._done()

    # ---- for the pool and the response

    def pause(self) -> None:
        if not self._paused and self.transport is not None and not self.lost:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.transport is not None and not self.lost:
            self._paused = False
            self.transport.resume_reading()

    def send(self, data: bytes) -> Response:
        self.response = Response(self)
        self.received = False
        self.parser = httptools.HttpResponseParser(self)
        self.transport.write(data)
        return self.response

    def finished(self, response: Response, reusable: bool) -> None:
        self.response = None
        if reusable and self._keep_alive and not self.lost and not self._eof_body:
            self.pool._put_back(self)
        elif self.transport is not None:
            self.transport.close()


def _reason(exc: BaseException | None) -> str:
    return f" ({type(exc).__name__})" if exc is not None else ""


class UpstreamHTTP:
    """The connection pool (one per dispatcher; every deployment shares it)."""

    def __init__(self) -> None:
        self._idle: dict[tuple, list[_Connection]] = {}
        self._all: set[_Connection] = set()
        self._ssl: ssl.SSLContext | None = None
        self.closed = False

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    async def _connection(self, target: Target, connect_timeout: float) -> _Connection:
        idle = self._idle.get(target.key)
        if idle:
            now = time.monotonic()
            while idle:
                conn = idle.pop()
                if conn.lost or conn.transport.is_closing():
                    continue
                if now - conn.idle_since > IDLE_TIMEOUT:  # the upstream may be closing it now
                    conn.transport.close()
                    continue
                return conn
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self, target.key), target.host, target.port,
                    ssl=self._ssl_context() if target.scheme == "https" else None,
                    server_hostname=target.host if target.scheme == "https" else None)
        except TimeoutError:
            raise
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamConnectionError(f"could not connect to the upstream: {type(exc).__name__}") from None
        self._all.add(conn)
        return conn

    async def post(self, target: Target, headers: bytes, body: bytes, *, connect_timeout: float) -> Response:
        """Send the request; returns once the response's status and headers arrived.
        `headers` are complete header lines (b"Name: value\\r\\n"...), Host and
        Content-Length excluded."""
        if self.closed:
            raise UpstreamConnectionError("the upstream client is closed")
        conn = await self._connection(target, connect_timeout)
        head = (f"POST {target.path} HTTP/1.1\r\nHost: {target.host_header()}\r\n"
                f"Content-Length: {len(body)}\r\n").encode("latin-1") + headers + b"\r\n"
        response = conn.send(head + body)
        try:
            await response._headers_done
        except BaseException:
            response.close()
            raise
        return response

    def _put_back(self, conn: _Connection) -> None:
        idle = self._idle.setdefault(conn.key, [])
        if self.closed or len(idle) >= _MAX_IDLE_PER_HOST:
            conn.transport.close()
        else:
            conn.idle_since = time.monotonic()
            idle.append(conn)

    def _forget(self, conn: _Connection) -> None:
        self._all.discard(conn)
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)

    async def close(self) -> None:
        self.closed = True
        for conn in list(self._all):
            if conn.transport is not None:
                conn.transport.close()
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports run connection_lost
