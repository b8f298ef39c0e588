"""The HTTP/1.1 layer (gateway/http_server.py), spoken to over raw sockets: requests
aiohttp's parser rejects get an OpenAI-shaped JSON error and a closed connection, and a
client trickling its request headers is cut off after `server.header_timeout`, while
ordinary keep-alive clients and heads arriving in a few quick pieces are unaffected.
"""

from __future__ import annotations

import json
import socket
import time

import pytest

CHAT = b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n"
BODY = b'{"model": "demo", "messages": [{"role": "user", "content": "hi"}]}'


def connect(url: str, timeout: float = 5.0) -> socket.socket:
    host, port = url.rsplit("/", 1)[1].split(":")
    return socket.create_connection((host, int(port)), timeout=timeout)


def read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One Content-Length-framed response; the connection stays usable."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed mid-response: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    status, headers = parse_head(head)
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-body"
        body += chunk
    return status, headers, body


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, value in (line.split(":", 1) for line in lines[1:])}
    return int(lines[0].split()[1]), headers


def post(body: bytes = BODY) -> bytes:
    return CHAT + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


FRAMING_CASES = {
    "content_length_not_a_number": (CHAT + b"Content-Length: abc\r\n\r\n{}", 400, "bad_http_framing"),
    "content_length_negative": (CHAT + b"Content-Length: -1\r\n\r\n{}", 400, "bad_http_framing"),
    "content_length_twice": (CHAT + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}", 400, "bad_http_framing"),
    "content_length_and_transfer_encoding": (
        CHAT + b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", 400, "bad_http_framing"),
    "unknown_transfer_encoding": (CHAT + b"Transfer-Encoding: gzip\r\n\r\n{}", 400, "bad_http_framing"),
    "bad_chunk_size": (CHAT + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n", 400, "bad_http_framing"),
    "header_of_64_kb": (b"GET /health HTTP/1.1\r\nHost: gw\r\nX-Big: " + b"a" * 65536 + b"\r\n\r\n",
                        431, "request_header_too_large"),
    "request_line_of_64_kb": (b"GET /" + b"a" * 65536 + b" HTTP/1.1\r\nHost: gw\r\n\r\n",
                              431, "request_header_too_large"),
    "too_many_headers": (b"GET /health HTTP/1.1\r\nHost: gw\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(300))
                         + b"\r\n", 431, "request_header_too_large"),
    "garbage_request_line": (b"GARBAGE\r\n\r\n", 400, "bad_http_framing"),
    "unknown_http_version": (b"GET /health HTTP/9.9\r\nHost: gw\r\n\r\n", 400, "bad_http_framing"),
    "invalid_method": (b"G@T /health HTTP/1.1\r\nHost: gw\r\n\r\n", 400, "bad_http_framing"),
    "tls_on_the_http_port": (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\x00" * 40, 400, "bad_http_framing"),
    "missing_host": (b"GET /health HTTP/1.1\r\n\r\n", 400, "bad_http_framing"),
    "space_in_header_name": (b"GET /health HTTP/1.1\r\nHost: gw\r\nBad Header: v\r\n\r\n", 400, "bad_http_framing"),
    "nul_in_header_value": (b"GET /health HTTP/1.1\r\nHost: gw\r\nX-A: a\x00b\r\n\r\n", 400, "bad_http_framing"),
    "bare_lf_line_endings": (b"GET /health HTTP/1.1\nHost: gw\n\n", 400, "bad_http_framing"),
    "obsolete_line_folding": (b"GET /health HTTP/1.1\r\nHost: gw\r\nX-A: a\r\n b\r\n\r\n", 400, "bad_http_framing"),
}


@pytest.mark.parametrize("raw,status,code", FRAMING_CASES.values(), ids=FRAMING_CASES.keys())
def test_a_request_the_parser_rejects_gets_an_openai_error_and_a_closed_connection(gateway_factory, raw, status,
                                                                                    code):
    gw = gateway_factory(plugins=[])
    with connect(gw.url) as sock:
        sock.sendall(raw)
        response = read_until_closed(sock)  # a socket timeout here means the server kept it open
    head, body = response.split(b"\r\n\r\n", 1)
    got_status, headers = parse_head(head)
    assert got_status == status, response[:300]
    assert headers["content-type"].startswith("application/json")
    assert headers["connection"].lower() == "close"
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request_error" and error["param"] is None and error["code"] == code
    assert "Traceback" not in error["message"] and "aaaa" not in error["message"] and "\\x" not in error["message"]


def test_a_bad_chunk_after_the_handler_started_reading_is_a_400_not_a_hang(gateway_factory):
    """llhttp drops the in-flight body on a bad chunk size; the handler must hear of it."""
    gw = gateway_factory(plugins=[])
    with connect(gw.url) as sock:
        sock.sendall(CHAT + b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"mod\r\n")
        time.sleep(0.3)  # the head reaches the handler, which waits for the rest of the body
        sock.sendall(b"zz\r\nel\"}\r\n0\r\n\r\n")
        response = read_until_closed(sock)
    head, body = response.split(b"\r\n\r\n", 1)
    assert parse_head(head)[0] == 400, response[:300]
    assert json.loads(body)["error"]["code"] == "invalid_body"


def test_a_client_trickling_its_headers_is_cut_off_after_header_timeout(gateway_factory):
    gw = gateway_factory(plugins=[], server={"max_body_bytes": 65536, "header_timeout": 1})
    head = post()[: post().index(b"\r\n\r\n")]
    with connect(gw.url, timeout=10) as sock:
        started = time.monotonic()
        closed_after = None
        for byte in head:
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed_after = time.monotonic() - started
                break
            sock.settimeout(0.2)
            try:
                sock.recv(1, socket.MSG_PEEK)  # returns only once the server answered or closed
                closed_after = time.monotonic() - started
                break
            except socket.timeout:
                pass
            assert time.monotonic() - started < 5, "still open 5 s into a 1 s header timeout"
        assert closed_after is not None and 0.8 < closed_after < 2.5, closed_after
        sock.settimeout(5)
        response = read_until_closed(sock)
    assert response.startswith(b"HTTP/1.1 408 "), response[:200]
    assert json.loads(response.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_header_timeout"


def test_a_keep_alive_client_sends_many_requests_on_one_connection(gateway_factory):
    gw = gateway_factory(plugins=[], server={"max_body_bytes": 65536, "header_timeout": 1})
    with connect(gw.url) as sock:
        for _ in range(5):
            sock.sendall(post())
            status, headers, body = read_response(sock)
            assert status == 200, body
            assert json.loads(body)["choices"][0]["message"]["content"]
            time.sleep(0.3)  # idle between requests: 1.5 s in all, past the header timeout
        sock.sendall(post())
        assert read_response(sock)[0] == 200


def test_a_head_arriving_in_a_few_quick_pieces_is_answered(gateway_factory):
    gw = gateway_factory(plugins=[], server={"max_body_bytes": 65536, "header_timeout": 1})
    raw = post()
    cut = raw.index(b"\r\n\r\n")
    with connect(gw.url) as sock:
        for piece in (raw[:10], raw[10:40], raw[40:cut], raw[cut:]):
            sock.sendall(piece)
            time.sleep(0.1)
        status, _, body = read_response(sock)
    assert status == 200, body


def test_a_slow_body_is_not_cut_off_by_the_header_timeout(gateway_factory):
    """The header timer runs only while a head is incomplete: not during a body upload,
    nor afterwards while the connection idles between requests."""
    gw = gateway_factory(plugins=[], server={"max_body_bytes": 65536, "header_timeout": 0.5})
    raw = post()
    cut = raw.index(b"\r\n\r\n") + 4
    with connect(gw.url) as sock:
        sock.sendall(raw[:cut])
        for start in range(cut, len(raw), 10):
            time.sleep(0.1)  # 0.7 s in all
            sock.sendall(raw[start:start + 10])
        assert read_response(sock)[0] == 200
        time.sleep(0.8)  # idle past the header timeout: keep-alive's business, not the header timer's
        sock.sendall(raw)
        assert read_response(sock)[0] == 200


def test_a_client_still_sending_after_its_408_reads_the_whole_answer(gateway_factory):
    """After the header timeout's 408 the gateway half-closes and discards what the client
    still sends (a lingering close): closing at once would make the kernel reset the
    connection on those bytes, and a reset can destroy the 408 before the client reads it."""
    gw = gateway_factory(plugins=[], server={"max_body_bytes": 65536, "header_timeout": 1})
    with connect(gw.url, timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        time.sleep(1.5)  # the 408 is written and the write side half-closed
        for _ in range(20):  # the client, unaware, keeps sending its head
            sock.sendall(b"X-Padding: " + b"a" * 512 + b"\r\n")
            time.sleep(0.01)
        time.sleep(0.2)
        sock.settimeout(5)
        response = read_until_closed(sock)
    assert response.startswith(b"HTTP/1.1 408 "), response[:200]
    assert json.loads(response.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_header_timeout"
