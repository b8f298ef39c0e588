"""The native path's HTTP client against misbehaving servers (issue 15): one loopback server
per case, each asserting what the gateway's client sees, what the upstream received and,
where a server can make the client hoard memory, a bound on it.

The bar is aiohttp's client (the library this one replaces on the fast path): whatever it
gets right on real networks — proxies, header limits, 1xx, bounded decompression, retry
safety, redirects, Happy Eyeballs, a DNS cache, a User-Agent — this client must get right.

The servers are threads with blocking sockets (`RawUpstream`), so the same server serves
a test that drives the client directly and one that goes through a real gateway with the
openai SDK.
"""

from __future__ import annotations

import asyncio
import gzip
import socket
import socketserver
import ssl
import subprocess
import threading
import time
import tracemalloc
import zlib
from typing import Callable

import openai
import pytest

from gateway.config import ConfigError, load_config_data
from gateway.providers.http import (
    MAX_BODY,
    Target,
    UpstreamConnectionError,
    UpstreamDroppedError,
    UpstreamHTTP,
    UpstreamProtocolError,
)
from tests.test_chat import CORE, MSGS, only_models

COMPLETION = (b'{"id":"c1","object":"chat.completion","created":1,"model":"gpt-4o","choices":[{"index":0,'
              b'"message":{"role":"assistant","content":"hi there"},"finish_reason":"stop"}],'
              b'"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}')


def ok(body: bytes = COMPLETION, extra: bytes = b"") -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
            % (len(body), extra, body))


def read_request(rfile) -> bytes | None:
    """One request (head + Content-Length body) from a socket file, or None at EOF."""
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        line = rfile.readline(65536)
        if not line:
            return None
        head += line
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head + rfile.read(length)


class RawUpstream:
    """A TCP (or TLS) server in a thread. For each request it calls
    `answer(sock, request, n)` (n counts requests from 1), which writes raw bytes and
    returns "close" to end the connection. Records requests and connections."""

    def __init__(self, answer: Callable, tls: ssl.SSLContext | None = None, host: str = "127.0.0.1") -> None:
        self.answer = answer
        self.requests: list[bytes] = []
        self.connections = 0
        outer = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                outer.connections += 1
                sock = self.connection
                while True:
                    try:
                        request = read_request(self.rfile)
                    except (OSError, ssl.SSLError):
                        return
                    if request is None:
                        return
                    outer.requests.append(request)
                    try:
                        if outer.answer(sock, request, len(outer.requests)) == "close":
                            return
                    except OSError:
                        return

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

            def get_request(self):
                sock, addr = super().get_request()
                if tls is not None:
                    sock = tls.wrap_socket(sock, server_side=True)
                return sock, addr

        self.server = Server((host, 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str = "/v1/chat/completions", scheme: str = "http", host: str = "127.0.0.1") -> str:
        return f"{scheme}://{host}:{self.port}{path}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def raw():
    servers: list[RawUpstream] = []

    def make(answer: Callable, **kw) -> RawUpstream:
        servers.append(RawUpstream(answer, **kw))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


def fixed(data: bytes, close: bool = False) -> Callable:
    def answer(sock, request, n):
        sock.sendall(data)
        return "close" if close else None
    return answer


async def call(http: UpstreamHTTP, url: str, body: bytes = b'{"x":1}', **target_kw) -> tuple[int, bytes]:
    response = await http.post(Target(url, **target_kw), b"Content-Type: application/json\r\n", body,
                               connect_timeout=5)
    data = await response.read()
    response.release()
    return response.status, data


def native_model(url_base: str, **extra) -> dict:
    return {"name": "m", "dispatch": "native", **extra.pop("entry", {}),
            "litellm_params": {"model": "openai/gpt-4o", "api_base": url_base, "api_key": "sk-up-SECRET", **extra}}


def gateway_for(gateway_factory, model: dict, attempts: int = 3):
    return gateway_factory(plugins=CORE, **only_models(
        [model], retries={"max_attempts": attempts, "backoff_base": 0.01, "backoff_max": 0.05}))


# ---------------------------------------------------------------- framing


@pytest.mark.parametrize("name, response, body", [
    ("content-length", ok(b'{"a":1}'), b'{"a":1}'),
    ("chunked with extensions and trailers",
     b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n"
     b"4;name=value\r\n{\"a\"\r\n3;ext\r\n:1}\r\n0\r\nX-Checksum: abc\r\n\r\n", b'{"a":1}'),
    ("close-delimited", b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{\"a\":1}", b'{"a":1}'),
    ("connection: close", b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 7\r\n\r\n{\"a\":1}", b'{"a":1}'),
])
async def test_framing_bodies_read_whole(raw, name, response, body):
    close = name in ("close-delimited", "connection: close")
    server = raw(fixed(response, close=close))
    http = UpstreamHTTP()
    for _ in range(2):
        assert await call(http, server.url()) == (200, body)
    # keep-alive only where the framing allows it
    assert server.connections == (2 if close else 1)
    await http.close()


async def test_pipelined_garbage_after_a_response_is_not_taken_for_the_next_one(raw):
    """Bytes after a complete response (nobody asked for them) make the connection unusable:
    the next request goes on a fresh connection and gets its own answer."""
    def answer(sock, request, n):
        sock.sendall(ok(b'{"n":%d}' % n) + b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n{\"evil\":1")
    server = raw(answer)
    http = UpstreamHTTP()
    assert await call(http, server.url()) == (200, b'{"n":1}')
    await asyncio.sleep(0.1)
    assert await call(http, server.url()) == (200, b'{"n":2}')
    assert server.connections == 2
    await http.close()


async def test_a_truncated_chunk_is_a_protocol_error(raw):
    server = raw(fixed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n{\"a\":", close=True))
    http = UpstreamHTTP()
    with pytest.raises(UpstreamProtocolError):
        await call(http, server.url())
    assert not any(http._idle.values())
    await http.close()


def test_a_truncated_chunk_through_the_gateway_is_a_502(gateway_factory, raw):
    server = raw(fixed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n{\"a\":", close=True))
    gw = gateway_for(gateway_factory, native_model(server.url("/v1")))
    with pytest.raises(openai.InternalServerError) as excinfo:
        gw.client().chat.completions.create(model="m", messages=MSGS)
    assert excinfo.value.status_code == 502


# ---------------------------------------------------------------- 3: header limits


def test_an_endless_header_flood_is_refused_with_bounded_memory(gateway_factory, raw):
    def answer(sock, request, n):
        sock.sendall(b"HTTP/1.1 200 OK\r\n")
        line = b"X-Flood: " + b"a" * 100 + b"\r\n"
        try:
            for _ in range(200_000):  # 22 MB of headers unless the client stops reading
                sock.sendall(line * 100)
        except OSError:
            pass
        return "close"
    server = raw(answer)
    gw = gateway_for(gateway_factory, native_model(server.url("/v1")), attempts=1)
    tracemalloc.start()
    try:
        with pytest.raises(openai.InternalServerError) as excinfo:
            gw.client().chat.completions.create(model="m", messages=MSGS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert excinfo.value.status_code == 502
    assert "more than 128 headers" in str(excinfo.value) or "head is larger than" in str(excinfo.value)
    assert peak < 20 * 1024 * 1024, peak


@pytest.mark.parametrize("head, words", [
    (b"".join(b"X-H%d: v\r\n" % i for i in range(200)), "more than 128 headers"),
    (b"X-Long: " + b"a" * 9000 + b"\r\n", "longer than 8190"),
])
async def test_too_many_or_too_long_headers_are_refused(raw, head, words):
    server = raw(fixed(b"HTTP/1.1 200 OK\r\n" + head + b"Content-Length: 2\r\n\r\n{}"))
    http = UpstreamHTTP()
    with pytest.raises(UpstreamProtocolError, match=words):
        await call(http, server.url())
    await http.close()


# ---------------------------------------------------------------- 4: 1xx


async def test_interim_responses_are_skipped_and_the_connection_stays_usable(raw):
    def answer(sock, request, n):
        sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        time.sleep(0.05)  # in their own segments, as a real server sends them
        sock.sendall(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n")
        time.sleep(0.05)
        sock.sendall(ok(b'{"n":%d}' % n, extra=b"X-Final: yes\r\n"))
    server = raw(answer)
    http = UpstreamHTTP()
    for n in (1, 2, 3):
        response = await http.post(Target(server.url()), b"", b"{}", connect_timeout=5)
        assert response.status == 200 and response.headers["X-Final"] == "yes" and "Link" not in response.headers
        assert await response.read() == b'{"n":%d}' % n
        response.release()
    assert server.connections == 1
    await http.close()


# ---------------------------------------------------------------- 5: retry safety


def test_a_request_delivered_then_dropped_is_reported_once_not_retried_nor_counted(gateway_factory, raw):
    """The upstream read the whole POST, then closed: it may have generated (and billed) the
    answer. The client gets a 502 saying so, after one attempt; the breaker does not count it."""
    server = raw(lambda sock, request, n: "close")
    gw = gateway_for(gateway_factory, native_model(server.url("/v1")), attempts=3)
    with pytest.raises(openai.InternalServerError) as excinfo:
        gw.client().chat.completions.create(model="m", messages=MSGS)
    assert excinfo.value.status_code == 502
    assert "may have been processed" in str(excinfo.value) and "after 1 attempt" in str(excinfo.value)
    assert len(server.requests) == 1 and b'"messages"' in server.requests[0]
    assert not gw.state.router.breaker._failures


def test_a_stale_pooled_connection_is_not_used_and_costs_no_attempt(gateway_factory, raw):
    """The upstream closes a kept-alive connection while it idles in the pool (as uvicorn
    does after 5 s): the next request goes on a fresh connection, first time."""
    def answer(sock, request, n):
        sock.sendall(ok())
        time.sleep(0.05)
        return "close"  # closes without Connection: close, after answering
    server = raw(answer)
    gw = gateway_for(gateway_factory, native_model(server.url("/v1")), attempts=1)
    client = gw.client()
    for _ in range(3):
        client.chat.completions.create(model="m", messages=MSGS)
        time.sleep(0.2)
    assert len(server.requests) == 3 and server.connections == 3


async def test_a_reused_connection_whose_write_fails_is_retried_once_on_a_fresh_one(raw):
    server = raw(fixed(ok(b'{"a":1}')))
    http = UpstreamHTTP()
    assert await call(http, server.url()) == (200, b'{"a":1}')
    (conn,) = http._idle[Target(server.url()).key]
    conn.stale = lambda: False  # the close arrives between the check and the write
    conn.transport.abort()  # the write will fail at once: nothing is sent
    assert await call(http, server.url()) == (200, b'{"a":1}')
    assert len(server.requests) == 2 and server.connections == 2
    await http.close()


async def test_a_fresh_connection_closed_after_the_request_is_dropped_not_unreachable(raw):
    server = raw(lambda sock, request, n: "close")
    http = UpstreamHTTP()
    with pytest.raises(UpstreamDroppedError):
        await call(http, server.url())
    assert len(server.requests) == 1  # sent once, not again
    await http.close()


# ---------------------------------------------------------------- 6: compression


def test_a_gzip_bomb_is_refused_with_bounded_memory(gateway_factory, raw):
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = b"\0" * (1024 * 1024)
    bomb = b"".join(packer.compress(zeros) for _ in range(1024)) + packer.flush()  # 1 GiB decoded, ~1 MiB sent
    server = raw(fixed(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s"
                       % (len(bomb), bomb)))
    gw = gateway_for(gateway_factory, native_model(server.url("/v1")), attempts=1)
    tracemalloc.start()
    try:
        with pytest.raises(openai.InternalServerError) as excinfo:
            gw.client().chat.completions.create(model="m", messages=MSGS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert excinfo.value.status_code == 502 and "larger than" in str(excinfo.value)
    assert peak < 2 * MAX_BODY + 16 * 1024 * 1024, peak  # the plain body limit, not the bomb's 1 GiB
    assert b"\r\nAccept-Encoding: gzip, deflate\r\n" in server.requests[0]


@pytest.mark.parametrize("encoding, encode", [
    (b"gzip", gzip.compress),
    (b"deflate", zlib.compress),
])
async def test_offered_encodings_are_decoded(raw, encoding, encode):
    payload = encode(b'{"a":1}')
    server = raw(fixed(b"HTTP/1.1 200 OK\r\nContent-Encoding: %s\r\nContent-Length: %d\r\n\r\n%s"
                       % (encoding, len(payload), payload)))
    http = UpstreamHTTP()
    assert await call(http, server.url()) == (200, b'{"a":1}')
    await http.close()


async def test_an_encoding_not_offered_is_refused(raw):
    server = raw(fixed(b"HTTP/1.1 200 OK\r\nContent-Encoding: br\r\nContent-Length: 3\r\n\r\nxyz"))
    http = UpstreamHTTP()
    with pytest.raises(UpstreamProtocolError, match="not offered"):
        await call(http, server.url())
    await http.close()


# ---------------------------------------------------------------- 7: error streams keep the connection


def test_error_answers_to_stream_requests_are_drained_back_to_the_pool(gateway_factory, raw):
    error = b'{"error":{"message":"slow down","type":"rate_limit"}}'
    server = raw(fixed(b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(error), error)))
    gw = gateway_for(gateway_factory, native_model(server.url("/v1")), attempts=1)
    client = gw.client()
    for _ in range(5):
        with pytest.raises(openai.APIStatusError):
            for _chunk in client.chat.completions.create(model="m", messages=MSGS, stream=True):
                pass
    assert len(server.requests) == 5 and server.connections == 1


# ---------------------------------------------------------------- 8: redirects, UA, DNS, Happy Eyeballs


def test_a_same_origin_307_is_followed_with_the_body(gateway_factory, raw):
    def answer(sock, request, n):
        if request.startswith(b"POST /v1/"):
            sock.sendall(b"HTTP/1.1 307 Temporary Redirect\r\nLocation: /v2/chat/completions\r\n"
                         b"Content-Length: 0\r\n\r\n")
        else:
            sock.sendall(ok())
    server = raw(answer)
    gw = gateway_for(gateway_factory, native_model(server.url("/v1")))
    answer_ = gw.client().chat.completions.create(model="m", messages=MSGS)
    assert answer_.choices[0].message.content == "hi there"
    first, second = server.requests
    assert first.startswith(b"POST /v1/chat/completions ") and second.startswith(b"POST /v2/chat/completions ")
    assert first.split(b"\r\n\r\n", 1)[1] == second.split(b"\r\n\r\n", 1)[1]
    assert server.connections == 1  # the redirect's body was drained, the connection reused
    assert b"\r\nUser-Agent: llm-gateway/" in first


def test_a_redirect_to_another_origin_is_not_followed(gateway_factory, raw):
    elsewhere = raw(fixed(ok()))
    server = raw(fixed(b"HTTP/1.1 308 Permanent Redirect\r\nLocation: %s\r\nContent-Length: 0\r\n\r\n"
                       % elsewhere.url().encode()))
    gw = gateway_for(gateway_factory, native_model(server.url("/v1")))
    with pytest.raises(openai.InternalServerError) as excinfo:
        gw.client().chat.completions.create(model="m", messages=MSGS)
    assert excinfo.value.status_code == 502 and "same origin" in str(excinfo.value)
    assert elsewhere.requests == []  # the API key never went there
    assert len(server.requests) == 1  # not retried


async def test_names_are_resolved_once_per_ttl(raw, monkeypatch):
    server = raw(fixed(ok(b"{}", extra=b"Connection: close\r\n"), close=True))
    loop = asyncio.get_running_loop()
    lookups = []
    real = loop.getaddrinfo

    async def counting(host, *args, **kw):
        lookups.append(host)
        return await real(host, *args, **kw)
    monkeypatch.setattr(loop, "getaddrinfo", counting)
    http = UpstreamHTTP()
    for _ in range(3):  # three connections (Connection: close), one lookup
        assert (await call(http, server.url(host="localhost"), proxy=""))[0] == 200
    assert lookups == ["localhost"] and server.connections == 3
    await http.close()


async def test_happy_eyeballs_moves_past_a_blackholed_address(raw):
    """The first address never answers (a blackholed IPv6 route, here a TEST-NET address);
    the next one is tried 250 ms later, well within the connect timeout."""
    server = raw(fixed(ok(b"{}")))
    http = UpstreamHTTP()
    http._dns[("api.example.test", server.port)] = (time.monotonic() + 60, [
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.1", server.port)),
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", server.port)),
    ])
    started = time.monotonic()
    response = await http.post(Target(server.url(host="api.example.test"), proxy=""), b"", b"{}", connect_timeout=5)
    assert response.status == 200 and await response.read() == b"{}"
    assert time.monotonic() - started < 2
    assert b"\r\nHost: api.example.test:%d\r\n" % server.port in server.requests[0]
    response.release()
    await http.close()


# ---------------------------------------------------------------- TLS with a custom CA, proxies


def make_ca_and_cert(tmp_path):
    """A CA and a server certificate for localhost / 127.0.0.1 (openssl CLI), as PEM files;
    returns the CA file and a server-side SSL context."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=tmp_path, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=test CA",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", "key.pem", "-out", "server.csr", "-subj", "/CN=localhost")
    (tmp_path / "ext.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                                      "extendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "cert.pem", "-days", "2", "-extfile", "ext.cnf")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    return str(tmp_path / "ca.pem"), server_ctx


class ConnectProxy:
    """A small HTTP proxy in a thread: CONNECT tunnels bytes both ways; an absolute-form
    request is answered by the proxy itself. Records what it was asked."""

    def __init__(self) -> None:
        self.asked: list[bytes] = []
        outer = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                head = b""
                while not head.endswith(b"\r\n\r\n"):
                    line = self.rfile.readline(65536)
                    if not line:
                        return
                    head += line
                outer.asked.append(head)
                method, target, _ = head.split(b"\r\n", 1)[0].split(b" ", 2)
                if method != b"CONNECT":
                    read_rest = [h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:")]
                    if read_rest:
                        self.rfile.read(int(read_rest[0].split(b":")[1]))
                    self.connection.sendall(ok(b'{"via":"proxy"}'))
                    return
                host, port = target.decode().rsplit(":", 1)
                upstream = socket.create_connection((host, int(port)))
                self.connection.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")

                def pump(src, dst):
                    try:
                        while data := src.recv(65536):
                            dst.sendall(data)
                    except OSError:
                        pass
                    finally:
                        for s in (src, dst):
                            try:
                                s.shutdown(socket.SHUT_RDWR)
                            except OSError:
                                pass
                threading.Thread(target=pump, args=(upstream, self.connection), daemon=True).start()
                pump(self.connection, upstream)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy():
    p = ConnectProxy()
    yield p
    p.close()


@pytest.fixture
def tls_upstream(raw, tmp_path, monkeypatch):
    ca_file, server_ctx = make_ca_and_cert(tmp_path)
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy",
                 "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    server = raw(fixed(ok()), tls=server_ctx)
    return server, ca_file


async def test_tls_is_verified_against_the_configured_ca(tls_upstream, monkeypatch):
    server, ca_file = tls_upstream
    http = UpstreamHTTP()
    with pytest.raises(UpstreamConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
        await call(http, server.url(scheme="https", host="localhost"))
    await http.close()
    monkeypatch.setenv("SSL_CERT_FILE", ca_file)
    http = UpstreamHTTP()
    for _ in range(2):
        assert await call(http, server.url(scheme="https", host="localhost")) == (200, COMPLETION)
    assert server.connections == 1 and len(server.requests) == 2  # the refused handshake never got a request
    await http.close()


def test_https_goes_through_the_environments_proxy_by_connect(gateway_factory, tls_upstream, proxy, monkeypatch):
    server, ca_file = tls_upstream
    monkeypatch.setenv("SSL_CERT_FILE", ca_file)
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    gw = gateway_for(gateway_factory, native_model(server.url("/v1", scheme="https", host="localhost"),
                                                   organization="org-42", max_tokens=77,
                                                   extra_headers={"X-Title": "gateway"}))
    client = gw.client()
    assert client.chat.completions.create(model="m", messages=MSGS).choices[0].message.content == "hi there"
    client.chat.completions.create(model="m", messages=MSGS, max_tokens=5)
    assert proxy.asked and proxy.asked[0].startswith(b"CONNECT localhost:%d HTTP/1.1\r\n" % server.port)
    assert len(proxy.asked) == 1  # the tunnel is kept alive and reused
    first, second = server.requests
    # what the upstream received, through the tunnel: the deployment's litellm_params
    assert first.startswith(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost:%d\r\n" % server.port)
    assert b"\r\nOpenAI-Organization: org-42\r\n" in first and b"\r\nX-Title: gateway\r\n" in first
    assert b'"max_tokens":77' in first and b'"max_tokens":5' in second  # a default, the client's value wins
    assert b"sk-up-SECRET" in first and b"SECRET" not in proxy.asked[0]


def test_no_proxy_goes_direct(gateway_factory, tls_upstream, proxy, monkeypatch):
    server, ca_file = tls_upstream
    monkeypatch.setenv("SSL_CERT_FILE", ca_file)
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    monkeypatch.setenv("NO_PROXY", "example.com,localhost")
    gw = gateway_for(gateway_factory, native_model(server.url("/v1", scheme="https", host="localhost")))
    gw.client().chat.completions.create(model="m", messages=MSGS)
    assert proxy.asked == [] and len(server.requests) == 1


def test_plain_http_goes_through_a_per_deployment_proxy_in_absolute_form(gateway_factory, raw, proxy, monkeypatch):
    monkeypatch.delenv("HTTP_PROXY", raising=False)
    monkeypatch.delenv("http_proxy", raising=False)
    server = raw(fixed(ok()))
    user_proxy = proxy.url.replace("http://", "http://user:p%40ss@")
    gw = gateway_for(gateway_factory, native_model("http://upstream.internal:8000/v1",
                                                   entry={"proxy": user_proxy}))
    with pytest.raises(openai.InternalServerError, match="no choices"):  # the proxy's own answer
        gw.client().chat.completions.create(model="m", messages=MSGS)
    asked = proxy.asked[0]
    assert asked.startswith(b"POST http://upstream.internal:8000/v1/chat/completions HTTP/1.1\r\n")
    assert b"\r\nProxy-Authorization: Basic dXNlcjpwQHNz\r\n" in asked  # user:p@ss
    assert server.requests == []


# ---------------------------------------------------------------- 2: litellm_params on the native path


def test_a_litellm_param_the_native_path_cannot_forward_is_refused_at_load():
    config = {"models": [{"name": "m", "litellm_params": {"model": "openai/gpt-4o", "api_version": "2024-01"}}],
              "tiers": {"free": {"models": ["*"]}}, "energy": {"actions": {"ai_message": {"default": 1}}}}
    with pytest.raises(ConfigError) as excinfo:
        load_config_data(config)
    assert any(line.startswith("models[0]") and "litellm_params.api_version" in line
               for line in excinfo.value.errors), excinfo.value.errors
    config["models"][0]["dispatch"] = "litellm"  # litellm takes it
    load_config_data(config)
    config["models"][0]["proxy"] = "http://proxy:3128"  # but not a per-deployment proxy
    with pytest.raises(ConfigError, match="proxy"):
        load_config_data(config)


def test_the_pool_and_its_stale_check_work_on_uvloop(raw):
    """`proxy.py serve` runs on uvloop, whose transports hand out a pseudo-socket."""
    uvloop = pytest.importorskip("uvloop")
    server = raw(fixed(ok(b"{}")))

    async def go():
        http = UpstreamHTTP()
        for _ in range(3):
            assert await call(http, server.url()) == (200, b"{}")
        (conn,) = http._idle[Target(server.url()).key]
        assert not conn.stale()
        await http.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(go())
    assert server.connections == 1 and len(server.requests) == 3
