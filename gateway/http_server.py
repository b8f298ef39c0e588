"""The gateway's HTTP/1.1 server protocol: aiohttp's, with two holes closed.

1. **Framing errors are OpenAI-shaped.** A request aiohttp's parser rejects before any
   handler runs (bad Content-Length, bad chunk size, Content-Length *and*
   Transfer-Encoding, a bad request line, an oversized or NUL-carrying header, TLS sent
   to the plain-HTTP port...) is answered by ``RequestHandler.handle_error``, which
   aiohttp writes as ``400 text/plain`` quoting the offending bytes. Here it is
   ``{"error": {"message", "type": "invalid_request_error", "param": null, "code"}}``
   with ``Content-Type: application/json`` and ``Connection: close``: code
   ``request_header_too_large`` (431) for a line over ``max_field_size``/``max_line_size``
   or more than ``max_headers`` headers, ``bad_http_framing`` (400) for the rest. The
   message names the parser's reason ("Invalid character in chunk size"), never the
   client's bytes or a traceback.

   A framing error in a body whose head already reached a handler (a chunked upload
   whose later chunk size is garbage) is not a parse error aiohttp answers: llhttp drops
   the request's payload without telling it, and the handler would wait for the rest of
   the body until the client gave up. `RequestHandler.data_received` fails that payload
   with `BodyFramingError` (a `RequestPayloadError`, and a `ValueError` so
   `gateway.client_body.read_json` answers it as a 400 `invalid_body`) and closes the
   connection after that response.

2. **A header-read timeout** (``server.header_timeout``, slowloris). aiohttp's only
   timer on a connection that has not finished a request head is the keep-alive one,
   armed after each response (75 s under ``web.run_app``, an hour by default); a client
   sending a header byte at a time holds its connection that long. Here a read that
   starts a head (no body in flight) and leaves it incomplete arms one ``call_later``;
   the head's completion cancels it; if it fires while the connection waits for that
   head, the client gets a 408 and the connection is closed (while a handler still
   answers an earlier request, it looks again a timeout later). A head arriving in one
   read (every ordinary request) arms nothing: the hot path pays a few attribute checks
   per read (20,000 keep-alive POSTs on 8 connections, uvloop: 22-23k req/s with and
   without this class, within the run-to-run noise). Idle keep-alive connections (no
   byte of a new request yet) stay the keep-alive timer's, and a slow *body* is not
   timed here: the timer only ends a connection that waits for a head.

Why subclasses of aiohttp's `Application` and `Server`: ``web.Server.__call__`` builds
``web_protocol.RequestHandler`` by name, and ``Application._make_handler`` builds
``web.Server`` by name; neither takes a class. ``handler_args`` can pass extra keyword
arguments (``header_timeout`` travels that way) but not a class. Overriding
``_make_handler`` in the application is the one place every runner goes through
(``web.run_app``, ``web.AppRunner`` in the tests), so ``create_app`` alone wires it in.
aiohttp discourages subclassing ``web.Application`` (it warns at class creation, silenced
below) because it wants the application's public API stable; the override touches only
the server it hands to the runner.

Written against aiohttp 3.14 (pinned in requirements.txt): it reads
``RequestHandler``'s ``_messages``, ``_request_count``, ``_waiter`` and ``_loop``.
tests/test_http_framing.py exercises each of them through a real socket.
"""

from __future__ import annotations

import asyncio
import warnings
from typing import Any

import orjson
import structlog
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestPayloadError

log = structlog.get_logger("gateway.http_server")

TOO_MANY_HEADERS = "Too many headers received"  # both of aiohttp's parsers say exactly this


class BodyFramingError(RequestPayloadError, ValueError):
    """The request body's framing broke after its head reached a handler."""


def _error_body(message: str, code: str, type: str = "invalid_request_error") -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type, "param": None, "code": code}})


def _reason(exc: HttpProcessingError) -> str:
    """The parser's reason without the client's bytes. llhttp's messages read
    "<reason>:\\n\\n  <the offending bytes, repr'd>\\n  ^"; aiohttp's own either carry no
    client data (the few listed) or quote it, and are then summarised by their class."""
    text = exc.message or ""
    if ":\n" in text:
        return text.split(":\n", 1)[0]
    if text.startswith(("Missing 'Host' header", "Received HTTPS traffic", "Data after `Connection: close`")):
        return text.rstrip(".")
    if isinstance(exc, BadHttpMethod):
        return "Invalid method"
    return {"InvalidHeader": "Invalid header", "InvalidURLError": "Invalid URL",
            "BadStatusLine": "Invalid request line"}.get(type(exc).__name__, "Malformed request")


class RequestHandler(web.RequestHandler):
    """One client connection. `header_timeout` seconds (0: off) for each request head."""

    __slots__ = ("_header_timeout", "_head_timer", "_body_in_flight", "_linger")

    LINGER = 2.0  # seconds a connection answered with a 408 waits for its client to close

    def __init__(self, manager: web.Server, *, header_timeout: float = 0, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._header_timeout = header_timeout
        self._head_timer: asyncio.TimerHandle | None = None
        # The payload of the last head parsed, while its body is still arriving.
        self._body_in_flight: Any = None
        self._linger: asyncio.TimerHandle | None = None  # set: answered and half-closed, discarding

    def data_received(self, data: bytes) -> None:
        if self._linger is not None:
            return  # answered and half-closed: what the client still sends is discarded
        heads = self._request_count
        body = self._body_in_flight
        if body is not None and body.is_eof():
            body = self._body_in_flight = None
        super().data_received(data)
        if self._request_count != heads:
            # A head was parsed, or a framing error queued in place of one.
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            if body is not None and not body.is_eof():
                # The parser cannot start a new head before the body ends: this is an error
                # in that body, which aiohttp never reports to the handler reading it.
                self._fail_body(body)
                return
            payload = self._messages[-1][1]
            self._body_in_flight = None if payload.is_eof() else payload
        elif data and body is None and self._head_timer is None and self._header_timeout:
            # No body was in flight, so these bytes began a head that is still incomplete.
            self._head_timer = self._loop.call_later(self._header_timeout, self._head_timed_out)

    def _fail_body(self, body: Any) -> None:
        self._body_in_flight = None
        body.set_exception(BodyFramingError("the request body's framing is invalid"))
        body.feed_eof()  # so aiohttp does not linger reading it after the response
        self.close()  # answer the handler's response, then close; never the queued 400
        log.info("http_framing_error", status=400, code="invalid_body", peer=self._peer())

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport is None:
            return
        if self._waiter is None or self._waiter.done():
            # A handler is still answering the previous request (this head is pipelined
            # behind it): look again once more time has passed.
            self._head_timer = self._loop.call_later(self._header_timeout, self._head_timed_out)
            return
        body = _error_body(f"The request headers did not arrive within {self._header_timeout:g} seconds.",
                           "request_header_timeout")
        self.transport.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        log.info("http_header_timeout", status=408, peer=self._peer())
        self._linger_close()

    def _linger_close(self) -> None:
        """Half-close after the answer, discard what the client still sends, and close on
        its EOF or after LINGER seconds (nginx's lingering close): closing at once, with the
        client's bytes still arriving, makes the kernel answer them with a reset, which can
        destroy the answer in the client's buffers before it reads it."""
        try:
            self.transport.write_eof()
        except (OSError, RuntimeError, NotImplementedError):
            self.force_close()
            return
        self._linger = self._loop.call_later(self.LINGER, self.force_close)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._linger is not None:
            self._linger.cancel()
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._body_in_flight = None
        super().connection_lost(exc)

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """aiohttp's last-resort answer, OpenAI-shaped. Parse errors arrive with status 400;
        500/504 only when a handler escapes the `openai_errors` middleware."""
        if request.writer.output_size > 0:
            # What aiohttp does too: a response already started cannot become an error.
            raise ConnectionError("Response is sent already, cannot send another response with the error message")
        if isinstance(exc, HttpProcessingError):
            if isinstance(exc, LineTooLong) or exc.message == TOO_MANY_HEADERS:
                status, code = 431, "request_header_too_large"
                text = (f"Request header fields too large: the request line and each header must fit in "
                        f"{self.max_field_size} bytes, and there may be at most {self.max_headers} headers.")
            else:
                status, code = 400, "bad_http_framing"
                text = f"Malformed HTTP request: {_reason(exc)}."
            log.info("http_framing_error", status=status, code=code, reason=_reason(exc), peer=self._peer())
            body = _error_body(text, code)
        else:
            if status >= 500:
                log.error("http_server_error", status=status, exc_info=exc)
            code = {504: "timeout"}.get(status, "internal_error")
            body = _error_body("The gateway failed to process this request.", code, type="server_error")
        response = web.Response(status=status, body=body, content_type="application/json",
                                headers={"Connection": "close"})
        response.force_close()
        return response

    def _peer(self) -> str | None:
        peer = self.peername
        return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else None


class Server(web.Server):
    """aiohttp's Server, making this module's `RequestHandler` for each connection."""

    def __call__(self) -> RequestHandler:
        return RequestHandler(self, loop=self._loop, **self._kwargs)


with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # "Inheritance ... is discouraged": see the docstring

    class Application(web.Application):
        """`web.Application` whose server speaks through this module's `RequestHandler`.
        Pass ``handler_args={"header_timeout": seconds}``."""

        def _make_handler(self, **kwargs: Any) -> web.Server:
            server = super()._make_handler(**kwargs)
            # Same object, our class: `Server` adds only `__call__`, no state, so the
            # runner gets everything aiohttp configured (loop, request factory, kwargs).
            server.__class__ = Server
            return server
