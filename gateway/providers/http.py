"""A small HTTP/1.1 client for the native pass-through's upstream leg.

Why not aiohttp's client here: measured on the fast path (bench/cpu_per_request.py, same
session, alternated; README: Performance), the gateway spends ~450 us of CPU per request
with this client, ~550-600 with aiohttp's ClientSession, ~850 with aiohttp and
`trust_env=True` (which proxy support needs); throughput at 32 connections follows. It
passes the conformance suite below, so it stays. This client does only what an
OpenAI-wire upstream needs:

* POST with a body, one write per request; keep-alive connections pooled per
  (scheme, host, port), TLS through the standard `ssl` module (certificates verified);
* responses parsed by httptools (llhttp, the parser Node.js uses): Content-Length,
  chunked and read-until-close bodies, gzip/deflate if an upstream compresses anyway;
* a streamed body is handed over as it arrives, with flow control (reading pauses while
  1 MiB is unread), so a slow client never makes the gateway buffer a whole answer.

A connection is reused only when its previous response was read to the end and the
server allowed keep-alive; anything else (an abandoned stream, a parse error, a timeout)
closes it. Errors are `UpstreamConnectionError` (could not connect, or nothing was sent),
`UpstreamDroppedError` (the request was sent, then the connection closed without a
response byte: the upstream may have processed it) and `UpstreamProtocolError` (the
connection broke mid-response or the response was not HTTP); the native dispatcher maps
them to the router's kinds.

What it does on real networks, each point held by tests/test_upstream_conformance.py
(a misbehaving loopback server per case) and at least as strict as aiohttp's client:

* proxies: `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY` (the standard library's matching, as
  aiohttp's `trust_env`), or one per deployment; https goes through a CONNECT tunnel
  (TLS to the origin inside it), http in absolute form; `user:pass@` becomes
  Proxy-Authorization;
* limits: at most 128 response headers, 8190 bytes per header line, 64 KiB for the whole
  head (aiohttp: 128 / 8190); a decompressed body is bounded like a plain one
  (`MAX_BODY`), decoded in 256 KiB steps, so a gzip bomb costs at most that;
  only gzip and deflate are offered (`Accept-Encoding`), any other encoding is refused;
* 1xx interim responses (100, 103) are skipped, the final response is the one returned;
* retry safety: a pooled connection is checked before reuse (closed or with unexpected
  bytes: discarded); if writing to a reused connection fails (nothing was sent) the
  request goes once more, at once, on a fresh connection. Nothing else is retried here;
* connecting: addresses from a DNS cache (`DNS_TTL`), tried with Happy Eyeballs
  (RFC 8305 via aiohappyeyeballs, the library aiohttp uses: 250 ms stagger, families
  interleaved), so a blackholed IPv6 address costs 250 ms, not the connect timeout;
* every request carries a `User-Agent`.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import select
import socket
import ssl
import time
import zlib
from collections import deque
from typing import AsyncIterator
from urllib.parse import unquote, urlsplit
from urllib.request import getproxies_environment, proxy_bypass_environment

import aiohappyeyeballs
import httptools
from multidict import CIMultiDict

from gateway.providers.base import UPSTREAM_TRACE

MAX_BODY = 64 * 1024 * 1024  # a non-streamed answer larger than this is refused
_PAUSE_AT = 1024 * 1024  # unread streamed bytes at which reading pauses
_MAX_IDLE_PER_HOST = 256
MAX_LINE = 16 * 1024 * 1024  # longest SSE line accepted from an upstream
RELEASE_GRACE = 5.0  # seconds a released, unfinished response may take to end before its connection is closed
IDLE_TIMEOUT = 30.0  # seconds a kept-alive connection may sit unused before it is dropped
MAX_HEADERS = 128  # response header lines (aiohttp's default)
_STALE_EVENTS = select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP | getattr(select, "POLLRDHUP", 0)
MAX_FIELD = 8190  # bytes in one header line (aiohttp's default)
MAX_HEAD = 64 * 1024  # bytes of the status line and every header, 1xx heads included
MAX_INTERIM = 8  # 1xx responses before the final one
_DECODE_STEP = 256 * 1024  # decompressed bytes produced per step
HAPPY_EYEBALLS_DELAY = 0.25  # RFC 8305's recommended connection attempt delay
DNS_TTL = 10.0  # seconds a resolved address list is reused (aiohttp's default ttl_dns_cache)
USER_AGENT = "llm-gateway/1 (native path; httptools)"
ACCEPT_ENCODING = "gzip, deflate"  # exactly what the decoder below handles


class UpstreamConnectionError(OSError):
    """Could not connect, or the connection failed before any response byte arrived."""


class UpstreamDroppedError(OSError):
    """The request was written, then the connection closed before any response byte: the
    upstream may have received and processed it (and billed it), so it is not resent."""


class UpstreamProtocolError(Exception):
    """The response broke off, or was not valid HTTP."""


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def proxy_from_env(scheme: str, host: str) -> str | None:
    """The proxy URL `HTTPS_PROXY`/`HTTP_PROXY` (any case) name for this origin, unless
    `NO_PROXY` matches its host (suffix match, `*` for all): the standard library's rules,
    which aiohttp's `trust_env` also uses."""
    proxies = getproxies_environment()
    url = proxies.get(scheme)
    if not url or proxy_bypass_environment(host, proxies):
        return None
    return url if "://" in url else f"http://{url}"


class Target:
    """A parsed upstream URL: what a request needs, computed once per deployment.

    `proxy`: an http:// proxy URL; None reads the environment (`proxy_from_env`), "" goes
    direct whatever the environment says."""

    __slots__ = ("scheme", "host", "port", "path", "key", "proxy", "proxy_auth", "request_target", "url", "proxy_url")

    def __init__(self, url: str, proxy: str | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.url = url
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        if proxy is None:
            proxy = proxy_from_env(self.scheme, self.host) or ""
        self.proxy_url = proxy
        self.proxy: tuple[str, int] | None = None
        self.proxy_auth = ""
        self.request_target = self.path
        if proxy:
            pp = urlsplit(proxy)
            if pp.scheme != "http" or not pp.hostname:
                raise ValueError(f"a proxy must be an http:// URL: {proxy!r}")
            self.proxy = (pp.hostname, pp.port or 80)
            if pp.username is not None:
                credentials = f"{unquote(pp.username)}:{unquote(pp.password or '')}".encode()
                self.proxy_auth = "Basic " + base64.b64encode(credentials).decode("ascii")
        if self.proxy is None:
            self.key: tuple = (self.scheme, self.host, self.port)
        elif self.scheme == "https":  # one tunnel per origin
            self.key = (self.scheme, self.host, self.port, *self.proxy)
        else:  # plain http: the proxy forwards absolute-form requests to any origin
            self.key = ("http-proxy", *self.proxy, self.proxy_auth)
            self.request_target = f"http://{self.host_header()}{self.path}"

    def same_origin(self, other: "Target") -> bool:
        return (self.scheme, self.host, self.port) == (other.scheme, other.host, other.port)

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
        self._decoded = 0
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
                data, tail = self._decoder.decompress(data, _DECODE_STEP), self._decoder.unconsumed_tail
            except zlib.error as exc:
                raise UpstreamProtocolError(f"bad compressed body: {exc}") from None
            if tail:  # more output pending: decoded on the next call, never all at once
                self._chunks.appendleft(tail)
                self._buffered += len(tail)
            self._decoded += len(data)
            if self._decoded > MAX_BODY:
                self.close()
                raise UpstreamProtocolError(f"the decompressed response is larger than {MAX_BODY} bytes")
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
        # _next() directly, not iter_chunks(): an async generator per response costs its
        # creation and the loop's first-iteration hook (a WeakSet entry): 1.5 -> 0.6 us a read.
        while (data := await self._next()) is not None:
            if not data:
                continue
            size += len(data)
            if size > limit:
                self.close()
                raise UpstreamProtocolError(f"the response body is larger than {limit} bytes")
            parts.append(data)
        return parts[0] if len(parts) == 1 else b"".join(parts)

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
        self.reused = False  # served a response before the current one
        self.received = False  # any byte of the current response
        self._head_bytes = 0
        self._header_count = 0
        self._interim = 0
        self._in_interim = False
        self._ended = False  # the final response's end was parsed: anything after it is garbage
        self._garbage = False
        self._paused = False
        self._eof_body = False
        self._keep_alive = False
        self._poll: "select.poll | None" = None  # stale()'s, built on first use

    # ---- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None:  # bytes nobody asked for: this connection is not usable
            self.transport.close()
            return
        self.received = True
        in_head = not response._headers_done.done()
        if in_head:
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            response._fail(cause if isinstance(cause, UpstreamProtocolError)
                           else UpstreamProtocolError(f"invalid HTTP response: {exc}"))
            self.transport.close()
            return
        if in_head and self._head_bytes > MAX_HEAD and not response._headers_done.done():
            response._fail(UpstreamProtocolError(f"the response head is larger than {MAX_HEAD} bytes"))
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.pool._forget(self)
        response = self.response
        if response is None:
            return
        if self._eof_body and exc is None and response._headers_done.done():
            response._done()  # a body delimited by the end of the connection
        elif not self.received:  # the request was written: it may have been processed
            response._fail(UpstreamDroppedError(
                f"the upstream closed the connection after the request was sent, before answering{_reason(exc)}"))
        else:
            response._fail(UpstreamProtocolError(f"the upstream connection broke off{_reason(exc)}"))

    def pause_writing(self) -> None:  # requests are small; nothing to pause
        pass

    def resume_writing(self) -> None:
        pass

    # ---- httptools callbacks

    def on_message_begin(self) -> None:
        if self._ended:  # a second response nobody asked for: ignore it, never reuse the connection
            self._garbage = True

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._ended:
            return
        self._header_count += 1
        if self._header_count > MAX_HEADERS:
            raise UpstreamProtocolError(f"the response has more than {MAX_HEADERS} headers")
        if len(name) + len(value) + 2 > MAX_FIELD:
            raise UpstreamProtocolError(f"a response header is longer than {MAX_FIELD} bytes")
        self.response.headers.add(name.decode("latin-1"), value.decode("latin-1"))

    def on_headers_complete(self) -> None:
        if self._ended:
            return
        response = self.response
        status = self.parser.get_status_code()
        if 100 <= status < 200:  # interim (100 Continue, 103 Early Hints): the final one follows
            self._interim += 1
            if self._interim > MAX_INTERIM:
                raise UpstreamProtocolError(f"more than {MAX_INTERIM} interim (1xx) responses")
            self._in_interim = True
            self._header_count = 0
            response.headers = CIMultiDict()
            return
        response.status = status
        self._keep_alive = self.parser.should_keep_alive()
        headers = response.headers
        chunked = "chunked" in headers.get("Transfer-Encoding", "").lower()
        self._eof_body = "Content-Length" not in headers and not chunked and response.status not in (204, 304)
        encoding = headers.get("Content-Encoding", "").strip().lower()
        if encoding in ("gzip", "x-gzip"):
            response._decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            response._decoder = zlib.decompressobj()
        elif encoding not in ("", "identity"):
            raise UpstreamProtocolError(f"the response's Content-Encoding {encoding!r} was not offered")
        if not response._headers_done.done():
            response._headers_done.set_result(None)

    def on_body(self, body: bytes) -> None:
        if not self._ended:
            self.response._body(body)

    def on_message_complete(self) -> None:
        if self._in_interim:
            self._in_interim = False
            return
        if self._ended:
            return
        self._ended = True
        self.response._done()

    def eof_received(self) -> bool:
        if self.response is None:  # an idle connection the upstream closed: never reuse it
            self.lost = True
        return False  # close the transport (read-until-close bodies end in connection_lost)

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
        self._head_bytes = self._header_count = self._interim = 0
        self._in_interim = self._ended = False
        self.parser = httptools.HttpResponseParser(self)
        self.transport.write(data)
        return self.response

    def stale(self) -> bool:
        """A pooled connection the upstream closed, or that holds bytes nobody asked for.
        A zero-timeout poll of the socket: the close may have arrived since the loop last
        polled it. Readable means either (EOF, a TLS close_notify, garbage): an idle
        connection has nothing to say. The poll object is kept per connection and never
        owns the fd (a socket object wrapped around it would close it if collected);
        it is asked only while the transport is open, so the fd is still this one."""
        if self.lost or self.transport.is_closing():
            return True
        poller = self._poll
        if poller is None:
            sock = self.transport.get_extra_info("socket")
            if sock is None:
                return False
            try:
                poller = select.poll()
                poller.register(sock.fileno(), _STALE_EVENTS)
            except (OSError, ValueError):
                return True
            self._poll = poller
        try:
            return bool(poller.poll(0))
        except OSError:
            return True

    def finished(self, response: Response, reusable: bool) -> None:
        self.response = None
        self.reused = True
        if reusable and self._keep_alive and not self.lost and not self._eof_body and not self._garbage:
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
        self._dns: dict[tuple[str, int], tuple[float, object]] = {}
        self.closed = False

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    async def _resolve(self, host: str, port: int) -> list:
        """getaddrinfo's answer, cached for DNS_TTL seconds (one lookup in flight per name)."""
        if _is_ip(host):
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            return [(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port))]
        key = (host, port)
        cached = self._dns.get(key)
        if cached is not None:
            expires, infos = cached
            if isinstance(infos, asyncio.Future):
                return await asyncio.shield(infos)
            if expires > time.monotonic():
                return infos
        pending = asyncio.get_running_loop().create_future()
        self._dns[key] = (0.0, pending)
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except BaseException as exc:
            self._dns.pop(key, None)
            if not pending.done():  # the waiters get this lookup's failure (never a cancellation of theirs)
                pending.set_exception(exc if isinstance(exc, Exception)
                                      else UpstreamConnectionError(f"the lookup of {host} was cancelled"))
                pending.exception()  # retrieved: no "never retrieved" warning when nobody waits
            raise
        if len(self._dns) > 1024:
            self._dns.clear()
        self._dns[key] = (time.monotonic() + DNS_TTL, infos)
        pending.set_result(infos)
        return infos

    async def _open(self, target: Target) -> _Connection:
        """A new connection: TCP (Happy Eyeballs over the cached addresses), through the
        proxy's CONNECT tunnel if any, then TLS to the origin for https."""
        loop = asyncio.get_running_loop()
        host, port = target.proxy or (target.host, target.port)
        infos = await self._resolve(host, port)
        sock = await aiohappyeyeballs.start_connection(
            infos, happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY, interleave=1)
        try:
            if target.proxy is not None and target.scheme == "https":
                await self._tunnel(loop, sock, target)
            tls = target.scheme == "https"
            _, conn = await loop.create_connection(
                lambda: _Connection(self, target.key), sock=sock,
                ssl=self._ssl_context() if tls else None, server_hostname=target.host if tls else None)
        except BaseException:
            sock.close()
            raise
        return conn

    @staticmethod
    async def _tunnel(loop: asyncio.AbstractEventLoop, sock: socket.socket, target: Target) -> None:
        """CONNECT host:port through the proxy; returns once it answered 2xx."""
        authority = target.host_header() if target.port != 443 else f"{target.host_header()}:443"
        lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}", f"User-Agent: {USER_AGENT}"]
        if target.proxy_auth:
            lines.append(f"Proxy-Authorization: {target.proxy_auth}")
        await loop.sock_sendall(sock, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        head = b""
        while b"\r\n\r\n" not in head:  # the proxy sends nothing past its head before we speak TLS
            data = await loop.sock_recv(sock, 4096)
            if not data:
                raise UpstreamConnectionError("the proxy closed the connection during CONNECT")
            head += data
            if len(head) > MAX_HEAD:
                raise UpstreamConnectionError("the proxy's answer to CONNECT is too long")
        status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].startswith("2"):
            raise UpstreamConnectionError(f"the proxy refused CONNECT {authority}: {status_line[:200]!r}")
        if not head.endswith(b"\r\n\r\n"):
            raise UpstreamConnectionError("the proxy sent bytes after its answer to CONNECT")

    async def _connection(self, target: Target, connect_timeout: float, fresh: bool = False) -> _Connection:
        idle = self._idle.get(target.key)
        if idle and not fresh:
            now = time.monotonic()
            while idle:
                conn = idle.pop()
                if now - conn.idle_since > IDLE_TIMEOUT or conn.stale():  # closed, or the upstream may be closing it now
                    conn.transport.close()
                    continue
                return conn
        try:
            async with asyncio.timeout(connect_timeout):
                conn = await self._open(target)
        except TimeoutError:
            raise
        except UpstreamConnectionError:
            raise
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamConnectionError(f"could not connect to the upstream: {type(exc).__name__}"
                                          f"{': ' + str(exc)[:200] if isinstance(exc, ssl.SSLError) else ''}") from None
        self._all.add(conn)
        return conn

    async def post(self, target: Target, headers: bytes, body: bytes, *, connect_timeout: float,
                   method: str = "POST") -> Response:
        """Send the request (a POST unless `method` says otherwise: GET and DELETE of a
        stored response); returns once the final response's status and headers arrived.
        `headers` are complete header lines (b"Name: value\\r\\n"...), Host, Content-Length,
        User-Agent and Accept-Encoding excluded.

        If the write to a reused connection fails (it broke while pooled; nothing was sent),
        the request goes once more, at once, on a fresh connection."""
        if self.closed:
            raise UpstreamConnectionError("the upstream client is closed")
        head = (f"{method} {target.request_target} HTTP/1.1\r\nHost: {target.host_header()}\r\n"
                f"Content-Length: {len(body)}\r\nUser-Agent: {USER_AGENT}\r\n"
                f"Accept-Encoding: {ACCEPT_ENCODING}\r\n").encode("latin-1")
        if target.proxy_auth and target.scheme == "http":
            head += f"Proxy-Authorization: {target.proxy_auth}\r\n".encode("latin-1")
        trace = UPSTREAM_TRACE.get()
        if trace is not None:  # tracing is on: this call's own traceparent (gateway/telemetry.py)
            head += "".join(f"{name}: {value}\r\n" for name, value in trace.items()).encode("latin-1")
        request = head + headers + b"\r\n" + body
        conn = await self._connection(target, connect_timeout)
        response = conn.send(request)
        if conn.reused and (conn.lost or conn.transport.is_closing()) and not conn.received:
            response.close()  # the write failed at once: nothing reached the upstream
            conn = await self._connection(target, connect_timeout, fresh=True)
            response = conn.send(request)
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
