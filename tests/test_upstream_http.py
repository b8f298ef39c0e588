"""The native path's HTTP/1.1 client (gateway/providers/http.py), on the wire.

Each test runs a raw TCP server on 127.0.0.1 that answers with exact bytes, so framing
(Content-Length, chunked, read-until-close), compression, keep-alive reuse and broken
connections are checked against what real servers send, byte for byte.
"""

from __future__ import annotations

import asyncio
import gzip

import pytest

from gateway.providers.http import (
    Target,
    UpstreamConnectionError,
    UpstreamDroppedError,
    UpstreamHTTP,
    UpstreamProtocolError,
)
from tests.fakes import eventually

HEADERS = b"Content-Type: application/json\r\nAuthorization: Bearer sk-test\r\n"


class RawServer:
    """Reads one request at a time (head + Content-Length body), then calls `answer`,
    which writes raw bytes (and may close). Records requests and connections."""

    def __init__(self, answer):
        self.answer = answer
        self.requests: list[bytes] = []
        self.connections = 0

    async def __aenter__(self):
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc):
        self.server.close()
        await self.server.wait_closed()

    def target(self, path="/v1/chat/completions") -> Target:
        return Target(f"http://127.0.0.1:{self.port}{path}")

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length)
                self.requests.append(head + body)
                if await self.answer(writer, len(self.requests)) == "close":
                    writer.close()
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


def fixed(raw: bytes, close: bool = False):
    async def answer(writer, n):
        writer.write(raw)
        await writer.drain()
        return "close" if close else None
    return answer


async def post(http: UpstreamHTTP, server: RawServer, body: bytes = b'{"x":1}'):
    return await http.post(server.target(), HEADERS, body, connect_timeout=5)


async def test_content_length_body_and_keep_alive_reuse():
    payload = b'{"ok":true}'
    raw = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(payload), payload)
    http = UpstreamHTTP()
    async with RawServer(fixed(raw)) as server:
        for _ in range(3):
            response = await post(http, server)
            assert response.status == 200 and response.headers["content-type"] == "application/json"
            assert await response.read() == payload
            response.release()
        assert server.connections == 1  # one kept-alive connection served all three
        request = server.requests[0]
        assert request.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
        assert b"\r\nHost: 127.0.0.1:%d\r\n" % server.port in request
        assert b"\r\nContent-Length: 7\r\n" in request and request.endswith(b'\r\n\r\n{"x":1}')
        assert b"Authorization: Bearer sk-test\r\n" in request
    await http.close()


async def test_chunked_stream_lines_arrive_as_sent():
    sent = asyncio.Event()

    async def answer(writer, n):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        for event in (b"data: {\"a\":1}\n\n", b"data: [DONE]\n\n"):
            writer.write(b"%x\r\n%s\r\n" % (len(event), event))
            await writer.drain()
            await sent.wait()  # the next event only after the client saw this one
            sent.clear()
        writer.write(b"0\r\n\r\n")

    http = UpstreamHTTP()
    async with RawServer(answer) as server:
        response = await post(http, server)
        lines = []
        async for line in response.iter_lines():
            lines.append(line)
            if line.startswith(b"data:"):
                sent.set()
        assert lines == [b'data: {"a":1}\n', b"\n", b"data: [DONE]\n", b"\n"]
        response.release()
        again = await post(http, server)  # fully read chunked body: the connection is reused
        again.close()
        assert server.connections == 1
    await http.close()


async def test_a_body_delimited_by_the_connection_end_and_a_closed_connection_is_not_reused():
    raw = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n{\"eof\":1}"
    http = UpstreamHTTP()
    async with RawServer(fixed(raw, close=True)) as server:
        for _ in range(2):
            response = await post(http, server)
            assert await response.read() == b'{"eof":1}'
            response.release()
        assert server.connections == 2
    await http.close()


async def test_gzip_body_is_decoded():
    payload = gzip.compress(b'{"zipped":true}')
    raw = b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s" % (len(payload), payload)
    http = UpstreamHTTP()
    async with RawServer(fixed(raw)) as server:
        response = await post(http, server)
        assert await response.read() == b'{"zipped":true}'
        response.release()
    await http.close()


async def test_error_status_headers_are_readable():
    raw = (b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 7\r\nContent-Length: 2\r\n\r\n{}")
    http = UpstreamHTTP()
    async with RawServer(fixed(raw)) as server:
        response = await post(http, server)
        assert response.status == 429 and response.headers["retry-after"] == "7"
        assert await response.read() == b"{}"
        response.release()
    await http.close()


async def test_a_connection_closed_after_the_request_before_any_answer_may_have_been_delivered():
    """The server read the whole request, then closed: it may have processed it, so this is
    not "could not connect" (which is retried) but UpstreamDroppedError."""
    async def answer(writer, n):
        return "close"

    http = UpstreamHTTP()
    async with RawServer(answer) as server:
        with pytest.raises(UpstreamDroppedError):
            await post(http, server)
        assert len(server.requests) == 1
    await http.close()


async def test_a_body_cut_short_is_a_protocol_error_and_the_connection_is_dropped():
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"partial\":"
    http = UpstreamHTTP()
    async with RawServer(fixed(raw, close=True)) as server:
        response = await post(http, server)
        with pytest.raises(UpstreamProtocolError):
            await response.read()
        response.release()
        assert not http._idle.get(server.target().key)
    await http.close()


async def test_garbage_instead_of_http_is_a_protocol_error():
    http = UpstreamHTTP()
    async with RawServer(fixed(b"SSH-2.0-OpenSSH_9.6\r\n\r\n", close=True)) as server:
        with pytest.raises(UpstreamProtocolError):
            await post(http, server)
    await http.close()


async def test_nothing_listening_is_a_connection_error():
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    http = UpstreamHTTP()
    with pytest.raises(UpstreamConnectionError):
        await http.post(Target(f"http://127.0.0.1:{port}/v1/x"), HEADERS, b"{}", connect_timeout=5)
    await http.close()


async def test_an_abandoned_stream_closes_its_connection():
    async def answer(writer, n):
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()

    http = UpstreamHTTP()
    async with RawServer(answer) as server:
        response = await post(http, server)
        async for _ in response.iter_chunks():
            break
        response.release()  # not read to its end: must not go back to the pool
        second = await post(http, server)
        second.close()
        assert server.connections == 2
    await http.close()


async def test_reading_pauses_while_a_slow_reader_leaves_a_megabyte_unread():
    block = b"x" * 65536

    async def answer(writer, n):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (64 * len(block)))
        for _ in range(64):
            writer.write(block)
            await writer.drain()

    http = UpstreamHTTP()
    async with RawServer(answer) as server:
        response = await post(http, server)
        await asyncio.sleep(0.3)  # the server sends 4 MiB; the client must not buffer it all
        assert response._buffered <= 2 * 1024 * 1024
        assert len(await response.read()) == 64 * len(block)
        response.release()
    await http.close()


def test_targets():
    t = Target("https://api.openai.com/v1/chat/completions")
    assert (t.scheme, t.host, t.port, t.path, t.host_header()) == (
        "https", "api.openai.com", 443, "/v1/chat/completions", "api.openai.com")
    t = Target("http://[::1]:8000/v1/embeddings?api-version=2")
    assert (t.host, t.port, t.path, t.host_header()) == ("::1", 8000, "/v1/embeddings?api-version=2", "[::1]:8000")
    with pytest.raises(ValueError):
        Target("ftp://example.com/x")


async def test_a_stream_released_after_its_last_event_does_not_wait_for_the_body_end(monkeypatch):
    """[DONE] is final: releasing must not wait for the end chunk; the connection is pooled
    once the end arrives, or closed if it never does."""
    import gateway.providers.http as uh

    end_now = asyncio.Event()

    async def answer(writer, n):
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(b"e\r\ndata: [DONE]\n\n\r\n")
        await writer.drain()
        if n == 1:
            await end_now.wait()
            writer.write(b"0\r\n\r\n")
            await writer.drain()

    http = UpstreamHTTP()
    async with RawServer(answer) as server:
        response = await post(http, server)
        async for line in response.iter_lines():
            if line.startswith(b"data: [DONE]"):
                break
        response.release()  # returns at once; the end chunk is still to come
        end_now.set()
        await eventually(lambda: http._idle.get(server.target().key))
        assert http._idle.get(server.target().key)  # pooled once the end arrived
        monkeypatch.setattr(uh, "RELEASE_GRACE", 0.1)
        second = await post(http, server)  # reuses it; this time the end never comes
        assert server.connections == 1
        async for line in second.iter_lines():
            break
        second.release()
        await asyncio.sleep(0.3)
        assert not http._idle.get(server.target().key) and http._all == set()  # given up: closed
    await http.close()


async def test_an_endless_line_is_refused():
    async def answer(writer, n):
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(40):
            writer.write(b"10000\r\n" + b"x" * 0x10000 + b"\r\n")
            await writer.drain()

    http = UpstreamHTTP()
    async with RawServer(answer) as server:
        response = await post(http, server)
        with pytest.raises(UpstreamProtocolError):
            async for _ in response.iter_lines(max_line=1024 * 1024):
                pass
    await http.close()
