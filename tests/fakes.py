"""Fake LLM provider servers for the gateway test suite.

``FakeUpstream`` is a *real* aiohttp HTTP server bound to 127.0.0.1 on an
ephemeral port.  It speaks the OpenAI (chat completions, embeddings, models)
and Anthropic (Messages API) wire formats closely enough that the official
``openai`` SDK and litellm's provider parsers accept its answers unchanged, so
gateway tests exercise the same code paths as production traffic - the only
thing faked is the model.

Fault injection: ``up.push(Fault.status(429, headers={"Retry-After": "1"}))``
queues a fault; every incoming request (whatever the endpoint) pops the next
queued fault, and requests arriving with an empty queue get a normal answer.

Typical use::

    async with FakeUpstream(reply="hi there") as up:
        up.push(Fault.status(500))
        ...  # point litellm at up.openai_base (openai/...) or up.url (anthropic/...)
        assert up.count("/chat/completions") == 2

For synchronous tests (sync SDK clients) run the server on a background loop::

    st = ServerThread().start()
    up = st.run(FakeUpstream().start())
    ...
    st.run(up.stop()); st.stop()

Wire-format notes (deliberate choices, keep them in mind when asserting):

* OpenAI streams put ``role: "assistant"`` on the *first content chunk*
  instead of emitting a separate empty role-only chunk, so
  ``Fault.truncate(after_chunks=N)`` means exactly N content pieces.
* When the request sets ``stream_options.include_usage`` every chunk carries
  ``"usage": null`` and a final ``choices: []`` chunk carries the usage, exactly
  like api.openai.com.  Without it, chunks have no ``usage`` key at all.
* Anthropic: missing ``x-api-key`` -> 401 ``authentication_error`` (what the
  real API does); missing ``anthropic-version`` or ``max_tokens`` -> 400
  ``invalid_request_error``.
* OpenAI endpoints require an ``Authorization`` header (401
  ``invalid_api_key`` otherwise) unless ``require_auth=False``.
* Token classes (``cached_tokens``, ``cache_write_tokens``, ``reasoning_tokens``,
  ``audio_in_tokens``, ``audio_out_tokens``; all 0 by default) are reported the way each
  provider does.  OpenAI: ``prompt_tokens_details`` / ``completion_tokens_details``
  (sent only when one of them is non-zero), and ``prompt_tokens`` /
  ``completion_tokens`` are the totals that *include* them.  Anthropic:
  ``cache_read_input_tokens`` / ``cache_creation_input_tokens`` beside ``input_tokens``,
  which *excludes* them (``input_tokens = prompt_tokens``); when there are cache writes,
  ``cache_creation`` splits them by lifetime (``ephemeral_1h_input_tokens`` =
  ``cache_write_1h_tokens``, the rest ``ephemeral_5m_input_tokens``), as the real API does.  Gemini: ``usageMetadata``
  with ``cachedContentTokenCount`` (part of ``promptTokenCount``) and
  ``thoughtsTokenCount`` (beside ``candidatesTokenCount``, both in ``totalTokenCount``).
* Azure OpenAI (``/openai/deployments/{name}/...``): ``api-key`` header (401 otherwise)
  and ``?api-version=`` (404 otherwise); answers carry ``prompt_filter_results`` and
  per-choice ``content_filter_results`` and name the deployment's underlying model
  (``azure_model``); a stream opens with Azure's ``choices: []`` prompt-filter chunk.
* Price dimensions: a request with ``service_tier`` gets the tier that served it back
  (``service_tier_served``, default: the one asked for; ``auto`` -> ``default``) in the
  answer and in every stream chunk, as api.openai.com does (not sent when none was asked,
  so token-only tests see the payloads they always did).  Hosted tools run as the real
  APIs report them: a Responses request with a ``web_search``/``file_search``/
  ``code_interpreter``/``image_generation`` tool gets ``hosted_tool_calls`` (default 1)
  output items of the matching ``*_call`` type (code interpreter: each in its own
  container) before its message; Anthropic's ``web_search_*`` server tool gets
  ``usage.server_tool_use.web_search_requests``; a chat request with
  ``web_search_options`` gets ``url_citation`` annotations and no count (as OpenAI's
  search models).
* Gemini (``/models/{model}:generateContent``, ``:streamGenerateContent?alt=sse``):
  ``x-goog-api-key`` header or ``?key=`` (403 ``PERMISSION_DENIED`` otherwise), errors as
  ``{"error": {"code", "message", "status"}}``; ``tool_call`` answers with a
  ``functionCall`` part; ``gemini_finish_reason`` (default ``STOP``) ends the candidate.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import re
import socket
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Awaitable, Coroutine, TypeVar

from aiohttp import web

__all__ = [
    "EMBEDDING_DIM",
    "FakeUpstream",
    "Fault",
    "RecordedRequest",
    "ServerThread",
    "anthropic_error_body",
    "gemini_error_body",
    "fake_embedding",
    "free_port",
    "openai_error_body",
    "split_reply",
]

T = TypeVar("T")

EMBEDDING_DIM = 8

# Faults that fire *inside* a stream, after Fault.after_chunks content chunks.
_MIDSTREAM_FAULTS = ("truncate", "hang", "stream_error")


def free_port() -> int:
    """Return a TCP port that was free a moment ago on 127.0.0.1.

    Inherently racy (someone may grab it before you bind); prefer letting the
    server bind port 0 as ``FakeUpstream.start()`` does.  Useful for "nothing
    is listening here" connection-refused tests.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------
# Faults
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    """One injected misbehaviour, consumed by exactly one request.

    Build with the classmethods; the fields are an implementation detail but
    are public so tests can introspect what they queued.
    """

    kind: str
    status_code: int = 200
    message: str | None = None
    headers: dict[str, str] | None = None
    error_type: str | None = None
    code: str | None = None
    body: Any = None
    seconds: float = 0.0
    after_chunks: int = 0

    @classmethod
    def status(
        cls,
        code: int,
        message: str | None = None,
        headers: dict[str, str] | None = None,
        *,
        error_type: str | None = None,
        error_code: str | None = None,
        body: Any = None,
    ) -> "Fault":
        """HTTP error with a provider-shaped JSON error body.

        ``error_type``/``error_code`` override the defaults derived from the
        status; ``body`` (dict or str) replaces the body entirely.  Applies to
        streaming requests too: real providers reject before the stream starts.
        """
        return cls(
            "status",
            status_code=code,
            message=message,
            headers=headers,
            error_type=error_type,
            code=error_code,
            body=body,
        )

    @classmethod
    def slow(cls, seconds: float) -> "Fault":
        """Delay the first byte by ``seconds``, then answer normally."""
        return cls("slow", seconds=seconds)

    @classmethod
    def truncate(cls, after_chunks: int = 2) -> "Fault":
        """Cut the TCP connection mid-body.

        Streaming: after ``after_chunks`` content chunks, with no finish chunk
        and no ``[DONE]``/``message_stop``.  Non-stream: headers announce the
        full Content-Length but only half the body is sent.
        """
        return cls("truncate", after_chunks=after_chunks)

    @classmethod
    def hang(cls, after_chunks: int = 1) -> "Fault":
        """Stop sending (forever, until the server stops or the client leaves).

        Streaming: after ``after_chunks`` content chunks.  Non-stream: no
        response at all.  For idle/first-byte timeout tests.
        """
        return cls("hang", after_chunks=after_chunks)

    @classmethod
    def garbage(cls) -> "Fault":
        """200 ``application/json`` with an HTML body; streaming: a
        ``data: not-json`` SSE event."""
        return cls("garbage")

    @classmethod
    def no_choices(cls) -> "Fault":
        """200 with well-formed JSON lacking the payload field (``choices`` for
        chat, ``data`` for embeddings/models, ``content`` for Anthropic)."""
        return cls("no_choices")

    @classmethod
    def no_done(cls, cut: bool = False) -> "Fault":
        """Streaming only: the whole answer (finish chunk and usage; Anthropic:
        ``message_delta``), then the end of the body without ``[DONE]`` (Anthropic:
        without ``message_stop``). ``cut``: the TCP connection is killed instead."""
        return cls("no_done", seconds=1.0 if cut else 0.0)

    @classmethod
    def drop(cls) -> "Fault":
        """Close the connection without sending a single byte of response."""
        return cls("drop")

    @classmethod
    def stream_error(
        cls,
        after_chunks: int = 1,
        message: str = "Overloaded",
        error_type: str | None = None,
    ) -> "Fault":
        """Streaming only: after ``after_chunks`` chunks, emit an in-band error
        event (OpenAI: ``data: {"error": {...}}``; Anthropic:
        ``event: error``) and end the stream cleanly.  Non-stream requests get
        a 500 error instead."""
        return cls(
            "stream_error",
            after_chunks=after_chunks,
            message=message,
            error_type=error_type,
        )


# --------------------------------------------------------------------------
# Recording
# --------------------------------------------------------------------------


@dataclass
class RecordedRequest:
    path: str
    method: str
    headers: dict[str, str]  # lower-cased keys
    raw: bytes
    json: Any  # parsed body, or None if absent/invalid
    received_at: float  # time.monotonic()
    query: dict[str, str] = field(default_factory=dict)
    fault: Fault | None = None  # the fault applied to this request, if any

    @property
    def stream(self) -> bool:
        return isinstance(self.json, dict) and bool(self.json.get("stream"))


# --------------------------------------------------------------------------
# Error bodies
# --------------------------------------------------------------------------

_OPENAI_DEFAULTS: dict[int, tuple[str, str | None, str]] = {
    # status: (type, code, message)
    400: ("invalid_request_error", None, "Invalid request (fake upstream)"),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided"),
    403: ("permission_error", None, "Permission denied (fake upstream)"),
    404: ("invalid_request_error", "model_not_found", "Not found (fake upstream)"),
    408: ("timeout", None, "Request timed out (fake upstream)"),
    413: ("invalid_request_error", None, "Request too large (fake upstream)"),
    422: ("invalid_request_error", None, "Unprocessable (fake upstream)"),
    429: ("rate_limit_exceeded", "rate_limit_exceeded", "Rate limit reached (fake upstream)"),
}

_ANTHROPIC_DEFAULTS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "Invalid request (fake upstream)"),
    401: ("authentication_error", "invalid x-api-key"),
    403: ("permission_error", "Permission denied (fake upstream)"),
    404: ("not_found_error", "Not found (fake upstream)"),
    413: ("request_too_large", "Request too large (fake upstream)"),
    429: ("rate_limit_error", "Rate limited (fake upstream)"),
    529: ("overloaded_error", "Overloaded"),
}


def openai_error_body(
    status: int,
    message: str | None = None,
    error_type: str | None = None,
    code: str | None = None,
    param: str | None = None,
) -> dict[str, Any]:
    if status in _OPENAI_DEFAULTS:
        d_type, d_code, d_msg = _OPENAI_DEFAULTS[status]
    elif status >= 500:
        d_type, d_code, d_msg = "server_error", None, "The server had an error (fake upstream)"
    else:
        d_type, d_code, d_msg = "invalid_request_error", None, f"HTTP {status} (fake upstream)"
    return {
        "error": {
            "message": message or d_msg,
            "type": error_type or d_type,
            "param": param,
            "code": code if code is not None else d_code,
        }
    }


def anthropic_error_body(
    status: int, message: str | None = None, error_type: str | None = None
) -> dict[str, Any]:
    if status in _ANTHROPIC_DEFAULTS:
        d_type, d_msg = _ANTHROPIC_DEFAULTS[status]
    elif status >= 500:
        d_type, d_msg = "api_error", "Internal server error (fake upstream)"
    else:
        d_type, d_msg = "invalid_request_error", f"HTTP {status} (fake upstream)"
    return {"type": "error", "error": {"type": error_type or d_type, "message": message or d_msg}}


_GEMINI_STATUS: dict[int, str] = {
    400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED",
}


def gemini_error_body(status: int, message: str | None = None, error_type: str | None = None) -> dict[str, Any]:
    """Google's error shape: {"error": {"code": 400, "message": ..., "status": "INVALID_ARGUMENT"}}."""
    return {"error": {"code": status, "message": message or f"HTTP {status} (fake upstream)",
                      "status": error_type or _GEMINI_STATUS.get(status, "UNKNOWN" if status >= 500 else "FAILED_PRECONDITION")}}


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def split_reply(reply: str, chunks: int | None) -> list[str]:
    """Split ``reply`` into stream pieces that concatenate back to it exactly.

    Default: one piece per word with the *leading* space attached, the way
    OpenAI tokens look ("Hello", " from", ...).  With ``chunks=n``: n pieces of
    near-equal length (fewer if the reply is shorter than n characters).
    """
    if not reply:
        return [""]
    if chunks is None:
        pieces = re.findall(r"\s*\S+", reply)
        tail = reply[len("".join(pieces)) :]  # trailing whitespace
        if not pieces:
            return [reply]
        pieces[-1] += tail
        return pieces
    n = max(1, min(chunks, len(reply)))
    size, extra = divmod(len(reply), n)
    out, pos = [], 0
    for i in range(n):
        step = size + (1 if i < extra else 0)
        out.append(reply[pos : pos + step])
        pos += step
    return out


def fake_embedding(text: Any) -> list[float]:
    """Deterministic, input-dependent unit-ish vector (same input -> same
    vector, across processes) so cache tests can compare embeddings."""
    digest = hashlib.sha256(json.dumps(text, sort_keys=True).encode()).digest()
    return [round(b / 255.0 * 2 - 1, 6) for b in digest[:EMBEDDING_DIM]]


def _embedding_inputs(inp: Any) -> list[Any]:
    # OpenAI accepts: str | list[str] | list[int] (one token array) | list[list[int]]
    if isinstance(inp, list):
        if inp and all(isinstance(x, int) for x in inp):
            return [inp]
        return list(inp)
    return [inp]


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _sse_event(event: str, obj: Any) -> bytes:
    return (
        b"event: "
        + event.encode()
        + b"\ndata: "
        + json.dumps(obj, separators=(",", ":")).encode()
        + b"\n\n"
    )


class _Cut(Exception):
    """Internal: the handler deliberately killed the connection."""


class _Done(Exception):
    """Internal: a stream fault finished the response early but cleanly."""

    def __init__(self, resp: web.StreamResponse) -> None:
        self.resp = resp


# --------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------


class FakeUpstream:
    """Fake OpenAI + Anthropic provider on one real HTTP server."""

    def __init__(
        self,
        *,
        reply: str = "Hello from fake upstream",
        chunks: int | None = None,
        chunk_delay: float = 0.0,
        prompt_tokens: int = 11,
        completion_tokens: int = 7,
        report_usage: bool = True,
        cached_tokens: int = 0,
        cache_write_tokens: int = 0,
        cache_write_1h_tokens: int = 0,
        reasoning_tokens: int = 0,
        audio_in_tokens: int = 0,
        audio_out_tokens: int = 0,
        model_echo: str | None = None,
        require_auth: bool = True,
        shutdown_timeout: float = 0.5,
    ) -> None:
        # All knobs are plain attributes: tests may change them between
        # requests (e.g. ``up.reply = "other"``).
        self.reply = reply
        self.chunks = chunks
        self.chunk_delay = chunk_delay
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens
        self.report_usage = report_usage
        self.cached_tokens = cached_tokens
        self.cache_write_tokens = cache_write_tokens
        self.cache_write_1h_tokens = cache_write_1h_tokens  # of cache_write_tokens: 1-hour lifetime
        self.reasoning_tokens = reasoning_tokens
        self.audio_in_tokens = audio_in_tokens
        self.audio_out_tokens = audio_out_tokens
        self.model_echo = model_echo
        # {"name": ..., "arguments": {...}}: OpenAI chat answers (non-stream) with that call.
        self.tool_call: dict[str, Any] | None = None
        # OpenAI chat honours `n` (choice i > 0 answers `reply (choice i)`) and `logprobs` /
        # `top_logprobs` (made up, the same streamed or not); False: streams carry none (an
        # upstream whose streams cannot).
        self.stream_logprobs = True
        # Azure answers name the model behind the deployment, not the deployment.
        self.azure_model = "gpt-4o-2024-11-20"
        # How a Gemini candidate ends: STOP, MAX_TOKENS, SAFETY, RECITATION, ...
        self.gemini_finish_reason = "STOP"
        # Gemini 3 signs its thinking: the signature rides on the answer's first part.
        self.gemini_thought_signature: str | None = None
        self.service_tier_served: str | None = None  # None: the tier asked for
        self.hosted_tool_calls = 1  # uses of each hosted tool a request names
        self.require_auth = require_auth
        self.shutdown_timeout = shutdown_timeout

        self.requests: list[RecordedRequest] = []
        # Responses API: what the upstream stored (response id -> (response, input items)).
        self.stored_responses: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = {}
        self._faults: deque[Fault] = deque()
        self._seq = 0
        self._runner: web.AppRunner | None = None
        self._stopping: asyncio.Event | None = None
        self._inflight: set[asyncio.Task[Any]] = set()
        self.port: int | None = None

    # ---- lifecycle -------------------------------------------------------

    async def start(self) -> "FakeUpstream":
        if self._runner is not None:
            return self
        self._stopping = asyncio.Event()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # handler_cancellation: a client that gives up (timeout) cancels the
        # handler, so hanging faults don't pile up.  shutdown_timeout keeps
        # stop() fast even when a stream is still open.
        self._runner = web.AppRunner(
            app,
            handle_signals=False,
            access_log=None,
            handler_cancellation=True,
            shutdown_timeout=self.shutdown_timeout,
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server  # aiohttp exposes no public accessor for the bound port
        assert server is not None and server.sockets
        self.port = server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._runner is None:
            return
        assert self._stopping is not None
        # Wake hang/slow handlers first so they abort their own connections;
        # then cancel anything still running so cleanup() never waits on us.
        self._stopping.set()
        await asyncio.sleep(0)
        for task in list(self._inflight):
            task.cancel()
        runner, self._runner = self._runner, None
        await runner.cleanup()

    async def __aenter__(self) -> "FakeUpstream":
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("FakeUpstream not started")
        return f"http://127.0.0.1:{self.port}"

    @property
    def openai_base(self) -> str:
        return self.url + "/v1"

    # ---- test-facing helpers ---------------------------------------------

    def push(self, *faults: Fault) -> None:
        self._faults.extend(faults)

    def reset(self) -> None:
        self.requests.clear()
        self._faults.clear()

    @property
    def pending_faults(self) -> int:
        return len(self._faults)

    def count(self, path_suffix: str | None = None) -> int:
        if path_suffix is None:
            return len(self.requests)
        return sum(1 for r in self.requests if r.path.endswith(path_suffix))

    @property
    def last(self) -> RecordedRequest:
        return self.requests[-1]

    async def wait_for_requests(self, n: int, timeout: float = 5.0) -> None:
        """Wait until at least ``n`` requests were received (for fire-and-forget
        paths such as background health checks)."""
        deadline = time.monotonic() + timeout
        while len(self.requests) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"expected {n} requests, got {len(self.requests)}")
            await asyncio.sleep(0.01)

    # ---- dispatch --------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        task = asyncio.current_task()
        assert task is not None
        self._inflight.add(task)
        try:
            raw = await request.read()
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = None
            fault = self._faults.popleft() if self._faults else None
            self.requests.append(
                RecordedRequest(
                    path=request.path,
                    method=request.method,
                    headers={k.lower(): v for k, v in request.headers.items()},
                    raw=raw,
                    json=body,
                    received_at=time.monotonic(),
                    query=dict(request.query),
                    fault=fault,
                )
            )
            # Response ids are derived from the arrival number, captured now:
            # a concurrent request may bump the counter while this one sleeps.
            self._seq += 1
            request["fake_seq"] = self._seq
            try:
                return await self._route(request, body, raw, fault)
            except _Done as done:
                return done.resp
            except _Cut:
                # Connection already killed on purpose; the response object is
                # never written (aiohttp swallows the ConnectionError).
                return web.Response(status=599)
        finally:
            self._inflight.discard(task)

    async def _route(
        self, request: web.Request, parsed: Any, raw: bytes, fault: Fault | None
    ) -> web.StreamResponse:
        body: dict[str, Any] = parsed if isinstance(parsed, dict) else {}
        path = request.path.rstrip("/")
        request["azure"] = path.startswith("/openai/deployments/")
        if re.search(r"/models/[^/:]+:(stream)?[gG]enerateContent$", path) and request.method == "POST":
            flavour, handler = "gemini", self._gemini_generate
        elif path.endswith("/messages") and request.method == "POST":
            flavour, handler = "anthropic", self._anthropic_messages
        elif path.endswith("/messages/count_tokens") and request.method == "POST":
            flavour, handler = "anthropic", self._anthropic_count_tokens
        elif path.endswith("/chat/completions") and request.method == "POST":
            flavour, handler = "openai", self._openai_chat
        elif path.endswith("/embeddings") and request.method == "POST":
            flavour, handler = "openai", self._openai_embeddings
        elif path.endswith("/responses") and request.method == "POST":
            flavour, handler = "openai", self._openai_responses
        elif re.search(r"/responses/[^/]+(/input_items)?$", path) and request.method in ("GET", "DELETE"):
            flavour, handler = "openai", self._openai_stored_response
        elif path.endswith("/models") and request.method == "GET":
            flavour, handler = "openai", self._openai_models
        else:
            flavour, handler = "openai", None

        stream = bool(body.get("stream"))

        # Faults that don't depend on the endpoint.
        if fault is not None:
            if fault.kind == "status":
                return self._error(flavour, fault.status_code, fault.message, fault.error_type,
                                   fault.code, fault.headers, fault.body)
            if fault.kind == "slow":
                await self._sleep(fault.seconds)
            elif fault.kind == "drop":
                self._kill(request)
            elif fault.kind == "hang" and not stream:
                await self._hang(request)
            elif fault.kind == "garbage" and not stream:
                return web.Response(status=200, body=b"<html>oops", content_type="application/json")
            elif fault.kind == "truncate" and not stream:
                return await self._truncated_body(request, flavour, body)
            elif fault.kind == "stream_error" and not stream:
                return self._error(flavour, 500, fault.message, fault.error_type)

        if handler is None:
            return self._error("openai", 404, f"Unknown path {request.method} {request.path}",
                               code="unknown_url")
        if raw and not isinstance(parsed, dict):
            return self._error(flavour, 400, "Request body is not a JSON object")
        return await handler(request, body, fault)

    # ---- primitives ------------------------------------------------------

    def _error(
        self,
        flavour: str,
        status: int,
        message: str | None = None,
        error_type: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        body: Any = None,
    ) -> web.Response:
        if body is None and flavour == "gemini":
            body = gemini_error_body(status, message, error_type)
        if body is None:
            body = (
                anthropic_error_body(status, message, error_type)
                if flavour == "anthropic"
                else openai_error_body(status, message, error_type, code)
            )
        text = body if isinstance(body, str) else json.dumps(body)
        return web.Response(status=status, text=text, content_type="application/json",
                            headers=headers)

    async def _sleep(self, seconds: float) -> None:
        # Interruptible by stop() so slow faults never delay teardown.
        assert self._stopping is not None
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)

    def _kill(self, request: web.Request) -> None:
        # close() (not abort()) flushes what was already written, so the client
        # receives the chunks sent so far and *then* sees EOF mid-message.
        if request.transport is not None:
            request.transport.close()
        raise _Cut()

    async def _hang(self, request: web.Request) -> None:
        assert self._stopping is not None
        await self._stopping.wait()
        self._kill(request)

    async def _truncated_body(self, request: web.Request, flavour: str,
                              body: dict[str, Any]) -> web.StreamResponse:
        full = json.dumps(
            self._anthropic_message(body, request["fake_seq"])
            if flavour == "anthropic"
            else self._gemini_response(body, request.path) if flavour == "gemini"
            else self._chat_completion(body, request["fake_seq"])
        ).encode()
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        resp.content_length = len(full)
        await resp.prepare(request)
        await resp.write(full[: len(full) // 2])
        self._kill(request)
        return resp  # unreachable

    async def _start_sse(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
            },
        )
        await resp.prepare(request)
        return resp

    def _model(self, body: dict[str, Any], default: str) -> str:
        return self.model_echo or body.get("model") or default

    # ---- OpenAI ----------------------------------------------------------

    def _openai_auth_error(self, request: web.Request) -> web.Response | None:
        if request.get("azure"):
            return self._azure_request_error(request)
        if self.require_auth and not request.headers.get("Authorization"):
            return self._error("openai", 401, "You didn't provide an API key.",
                               code="invalid_api_key")
        return None

    async def _openai_responses(self, request: web.Request, body: dict[str, Any],
                                fault: Fault | None) -> web.StreamResponse:
        """OpenAI's Responses API: a `response` object, or its SSE events
        (response.created, output_text deltas, response.completed with usage)."""
        if err := self._openai_auth_error(request):
            return err
        if not body.get("model") or body.get("input") is None:
            return self._error("openai", 400, "Missing required parameter: 'input'.")
        previous = body.get("previous_response_id")
        if previous is not None and previous not in self.stored_responses:
            return self._error("openai", 400, f"Previous response with id '{previous}' not found.",
                               code="previous_response_not_found")
        rid = f"resp_fake_{request['fake_seq']}"
        usage = {"input_tokens": self.prompt_tokens, "output_tokens": self.completion_tokens,
                 "total_tokens": self.prompt_tokens + self.completion_tokens,
                 "input_tokens_details": {"cached_tokens": self.cached_tokens},
                 "output_tokens_details": {"reasoning_tokens": self.reasoning_tokens}}
        message = {"id": f"msg_fake_{request['fake_seq']}", "type": "message", "role": "assistant",
                   "status": "completed", "content": [{"type": "output_text", "text": self.reply, "annotations": []}]}
        response = {"id": rid, "object": "response", "created_at": int(time.time()), "status": "completed",
                    "model": self._model(body, "gpt-fake"), "output": [*self._hosted_calls(body), message],
                    "usage": usage, "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
                    "store": body.get("store", True), "previous_response_id": previous}
        response.update(self._served_tier(body))
        if response["store"]:
            given = body["input"]
            items = [{"id": f"msg_in_{request['fake_seq']}", "type": "message", "role": "user",
                      "content": [{"type": "input_text", "text": given}]}] if isinstance(given, str) else given
            self.stored_responses[rid] = (response, items)
        if not body.get("stream"):
            return web.json_response(response)
        resp = await self._start_sse(request)
        pending = {**response, "status": "in_progress", "output": [], "usage": None}
        seq = 0

        async def event(name: str, data: dict[str, Any]) -> None:
            nonlocal seq
            await resp.write(_sse_event(name, {"type": name, "sequence_number": seq, **data}))
            seq += 1

        await event("response.created", {"response": pending})
        await event("response.output_item.added", {"output_index": 0, "item": {**message, "status": "in_progress",
                                                                                 "content": []}})
        for piece in split_reply(self.reply, self.chunks):
            if fault is not None and fault.kind == "truncate":
                self._kill(request)
            await event("response.output_text.delta", {"item_id": message["id"], "output_index": 0,
                                                        "content_index": 0, "delta": piece})
        await event("response.output_item.done", {"output_index": 0, "item": message})
        await event("response.completed", {"response": response})
        return resp

    def _served_tier(self, body: dict[str, Any]) -> dict[str, Any]:
        asked = body.get("service_tier")
        if asked is None:
            return {}
        return {"service_tier": self.service_tier_served or ("default" if asked == "auto" else asked)}

    def _hosted_calls(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        """The Responses output items of the hosted tools the request names, as OpenAI reports them."""
        items: list[dict[str, Any]] = []
        for tool in body.get("tools") or ():
            kind = str(tool.get("type", "")) if isinstance(tool, dict) else ""
            for n in range(self.hosted_tool_calls):
                ident = f"{len(items)}_{n}"
                if kind.startswith("web_search"):
                    items.append({"id": f"ws_{ident}", "type": "web_search_call", "status": "completed",
                                  "action": {"type": "search", "query": "fake"}})
                elif kind == "file_search":
                    items.append({"id": f"fs_{ident}", "type": "file_search_call", "status": "completed",
                                  "queries": ["fake"], "results": None})
                elif kind == "code_interpreter":
                    items.append({"id": f"ci_{ident}", "type": "code_interpreter_call", "status": "completed",
                                  "code": "1+1", "container_id": f"cntr_{ident}", "outputs": None})
                elif kind == "image_generation":
                    items.append({"id": f"ig_{ident}", "type": "image_generation_call", "status": "completed",
                                  "result": base64.b64encode(b"fake-png").decode()})
        return items

    async def _openai_stored_response(self, request: web.Request, body: dict[str, Any],
                                      fault: Fault | None) -> web.StreamResponse:
        """GET/DELETE /responses/{id}, GET /responses/{id}/input_items (OpenAI's shapes)."""
        if err := self._openai_auth_error(request):
            return err
        match = re.search(r"/responses/([^/]+)(/input_items)?$", request.path)
        assert match is not None
        rid = match.group(1)
        if rid not in self.stored_responses:
            return self._error("openai", 404, f"Response with id '{rid}' not found.")
        response, items = self.stored_responses[rid]
        if request.method == "DELETE":
            del self.stored_responses[rid]
            return web.json_response({"id": rid, "object": "response", "deleted": True})
        if match.group(2):
            return web.json_response({"object": "list", "data": items, "first_id": items[0].get("id"),
                                      "last_id": items[-1].get("id"), "has_more": False})
        return web.json_response(response)

    def _azure_request_error(self, request: web.Request) -> web.Response | None:
        """Azure OpenAI's own checks: an `api-key` header and an `api-version` query."""
        if self.require_auth and not request.headers.get("api-key"):
            return self._error("openai", 401, body={"error": {"code": "401", "message": "Access denied due to "
                               "invalid subscription key or wrong API endpoint. Make sure to provide a valid key "
                               "for an active subscription and use a correct regional API endpoint for your resource."}})
        if not request.query.get("api-version"):
            return self._error("openai", 404, body={"error": {"code": "404", "message": "Resource not found"}})
        return None

    @staticmethod
    def _azure_filtered(out: dict[str, Any]) -> dict[str, Any]:
        """An OpenAI answer or chunk as Azure sends it: content filter verdicts on each choice."""
        verdict = {"filtered": False, "severity": "safe"}
        for choice in out.get("choices") or ():
            choice["content_filter_results"] = {k: dict(verdict) for k in ("hate", "self_harm", "sexual", "violence")}
        return out

    def _openai_usage(self) -> dict[str, Any]:
        usage: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }
        if self.cached_tokens or self.audio_in_tokens or self.reasoning_tokens or self.audio_out_tokens:
            usage["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens,
                                              "audio_tokens": self.audio_in_tokens}
            usage["completion_tokens_details"] = {"reasoning_tokens": self.reasoning_tokens,
                                                  "audio_tokens": self.audio_out_tokens,
                                                  "accepted_prediction_tokens": 0,
                                                  "rejected_prediction_tokens": 0}
        return usage

    @staticmethod
    def _n(body: dict[str, Any]) -> int:
        n = body.get("n")
        return n if isinstance(n, int) and n > 1 else 1

    def _choice_reply(self, index: int) -> str:
        return self.reply if index == 0 else f"{self.reply} (choice {index})"

    @staticmethod
    def _logprobs(body: dict[str, Any], index: int, pieces: list[str]) -> dict[str, Any] | None:
        """OpenAI's `logprobs` of a choice whose tokens are `pieces` (None if not asked)."""
        if not body.get("logprobs"):
            return None
        top = body.get("top_logprobs") or 0

        def token(text: str, logprob: float) -> dict[str, Any]:
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        content = []
        for k, piece in enumerate(pieces):
            logprob = -round(0.01 * (k + 1) + 0.1 * index, 4)
            alternatives = [token(piece, logprob)] + [token(f"{piece}~{j}", logprob - j) for j in range(1, top)]
            content.append({**token(piece, logprob), "top_logprobs": alternatives[:top]})
        return {"content": content, "refusal": None}

    def _chat_completion(self, body: dict[str, Any], seq: int) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": f"chatcmpl-fake-{seq}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self._model(body, "gpt-fake"),
            "system_fingerprint": "fp_fake",
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": self._choice_reply(i), "refusal": None},
                    "logprobs": self._logprobs(body, i, split_reply(self._choice_reply(i), self.chunks)),
                    "finish_reason": "stop",
                }
                for i in range(self._n(body))
            ],
        }
        out.update(self._served_tier(body))
        if body.get("web_search_options") is not None:  # OpenAI's search models: citations, no count
            out["choices"][0]["message"]["annotations"] = [{"type": "url_citation", "url_citation": {
                "url": "https://example.com/", "title": "Example", "start_index": 0, "end_index": 5}}]
        if self.tool_call is not None:  # answer with one function call instead of text
            message = out["choices"][0]["message"]
            message["content"] = None
            message["tool_calls"] = [{"id": "call_fake_1", "type": "function", "function": {
                "name": self.tool_call["name"], "arguments": json.dumps(self.tool_call["arguments"])}}]
            out["choices"][0]["finish_reason"] = "tool_calls"
        if self.report_usage:
            out["usage"] = self._openai_usage()
        return out

    async def _openai_chat(self, request: web.Request, body: dict[str, Any],
                           fault: Fault | None) -> web.StreamResponse:
        if err := self._openai_auth_error(request):
            return err
        if not body.get("model"):
            return self._error("openai", 400, "you must provide a model parameter")
        if not isinstance(body.get("messages"), list):
            return self._error("openai", 400, "Missing required parameter: 'messages'.")
        kind = fault.kind if fault else None
        midstream = fault if kind in _MIDSTREAM_FAULTS else None

        if not body.get("stream"):
            completion = self._chat_completion(body, request["fake_seq"])
            if kind == "no_choices":
                completion.pop("choices")
            if request["azure"]:
                completion["model"] = self.azure_model
                completion["prompt_filter_results"] = [{"prompt_index": 0, "content_filter_results": {}}]
                self._azure_filtered(completion)
            return web.json_response(completion)

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        cid = f"chatcmpl-fake-{request['fake_seq']}"
        created = int(time.time())
        model = self.azure_model if request["azure"] else self._model(body, "gpt-fake")

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
            c: dict[str, Any] = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": "fp_fake",
                "choices": choices,
            }
            c.update(self._served_tier(body))
            if include_usage:
                c["usage"] = None
            c.update(extra)
            return self._azure_filtered(c) if request["azure"] else c

        resp = await self._start_sse(request)
        if request["azure"]:  # Azure opens every stream with the prompt's filter verdict
            await resp.write(_sse({"choices": [], "created": 0, "id": "", "model": "", "object": "",
                                   "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {}}]}))
        if kind == "garbage":
            await resp.write(b"data: not-json\n\n")
            await resp.write(b"data: [DONE]\n\n")
            return resp
        if kind == "no_choices":
            bad = chunk([])
            del bad["choices"]
            await resp.write(_sse(bad))
            await resp.write(b"data: [DONE]\n\n")
            return resp

        # n > 1: the choices' chunks interleave, as OpenAI's do.
        answers = [split_reply(self._choice_reply(c), self.chunks) for c in range(self._n(body))]
        for i in range(max(len(pieces) for pieces in answers)):
            if midstream is not None and i == midstream.after_chunks:
                await self._stream_fault(request, resp, midstream, "openai")
            if i and self.chunk_delay:
                await self._sleep(self.chunk_delay)
            for c, pieces in enumerate(answers):
                if i >= len(pieces):
                    continue
                piece = pieces[i]
                delta: dict[str, Any] = {"content": piece}
                if i == 0:
                    delta = {"role": "assistant", "content": piece, "refusal": None}
                logprobs = self._logprobs(body, c, pieces) if self.stream_logprobs else None
                if logprobs is not None:
                    logprobs["content"] = logprobs["content"][i:i + 1]
                await resp.write(_sse(chunk([{"index": c, "delta": delta, "logprobs": logprobs,
                                              "finish_reason": None}])))
        if midstream is not None:
            # after_chunks >= number of pieces: misbehave before the finish chunk.
            await self._stream_fault(request, resp, midstream, "openai")
        for c in range(len(answers)):
            await resp.write(_sse(chunk([{"index": c, "delta": {}, "logprobs": None,
                                          "finish_reason": "stop"}])))
        if include_usage and self.report_usage:
            await resp.write(_sse(chunk([], usage=self._openai_usage())))
        if kind == "no_done":
            await self._end_without_done(request, resp, fault)
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def _end_without_done(self, request: web.Request, resp: web.StreamResponse, fault: Fault) -> None:
        """The answer is complete; its end-of-stream marker never comes. Never returns."""
        if fault.seconds:
            self._kill(request)  # close() flushes the chunks written, then EOF mid-body
        raise _Done(resp)

    async def _stream_fault(self, request: web.Request, resp: web.StreamResponse,
                            fault: Fault, flavour: str) -> None:
        """Apply a mid-stream fault.  Never returns: it cuts the connection
        (_Cut) or ends the response early (_Done)."""
        if fault.kind == "truncate":
            self._kill(request)
        elif fault.kind == "hang":
            await self._hang(request)
        elif fault.kind == "stream_error":
            if flavour == "anthropic":
                err = anthropic_error_body(529, fault.message, fault.error_type or "overloaded_error")
                await resp.write(_sse_event("error", err))
            elif flavour == "gemini":
                await resp.write(_sse(gemini_error_body(500, fault.message, fault.error_type)))
            else:
                await resp.write(_sse(openai_error_body(500, fault.message, fault.error_type)))
                await resp.write(b"data: [DONE]\n\n")
            raise _Done(resp)

    async def _openai_embeddings(self, request: web.Request, body: dict[str, Any],
                                 fault: Fault | None) -> web.StreamResponse:
        if err := self._openai_auth_error(request):
            return err
        if "input" not in body:
            return self._error("openai", 400, "Missing required parameter: 'input'.")
        as_base64 = body.get("encoding_format") == "base64"
        data = []
        for i, item in enumerate(_embedding_inputs(body["input"])):
            vec: Any = fake_embedding(item)
            if as_base64:
                # What the SDK asks for by default: little-endian float32 array.
                vec = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
            data.append({"object": "embedding", "index": i, "embedding": vec})
        out: dict[str, Any] = {
            "object": "list",
            "data": data,
            "model": self._model(body, "text-embedding-fake"),
        }
        if self.report_usage:
            out["usage"] = {"prompt_tokens": self.prompt_tokens, "total_tokens": self.prompt_tokens}
        if fault is not None and fault.kind == "no_choices":
            out.pop("data")
        return web.json_response(out)

    async def _openai_models(self, request: web.Request, body: dict[str, Any],
                             fault: Fault | None) -> web.StreamResponse:
        if err := self._openai_auth_error(request):
            return err
        ids = [self.model_echo] if self.model_echo else ["gpt-fake", "text-embedding-fake"]
        out: dict[str, Any] = {
            "object": "list",
            "data": [{"id": m, "object": "model", "created": 1700000000, "owned_by": "fake"}
                     for m in ids],
        }
        if fault is not None and fault.kind == "no_choices":
            out.pop("data")
        return web.json_response(out)

    # ---- Anthropic -------------------------------------------------------

    def _anthropic_usage(self) -> dict[str, Any]:
        return {
            "input_tokens": self.prompt_tokens,
            "cache_creation_input_tokens": self.cache_write_tokens,
            "cache_read_input_tokens": self.cached_tokens,
            **self._anthropic_cache_creation(),
            "output_tokens": self.completion_tokens,
            # Anthropic's usage names the tier that served (standard, priority, batch)
            **({"service_tier": self.service_tier_served} if self.service_tier_served else {}),
        }

    def _anthropic_cache_creation(self) -> dict[str, Any]:
        """Anthropic's split of the cache writes by lifetime (parts of cache_creation_input_tokens)."""
        if not self.cache_write_tokens:
            return {}
        return {"cache_creation": {"ephemeral_5m_input_tokens": self.cache_write_tokens - self.cache_write_1h_tokens,
                                   "ephemeral_1h_input_tokens": self.cache_write_1h_tokens}}

    def _anthropic_server_tool_use(self, body: dict[str, Any]) -> dict[str, Any]:
        """Anthropic's count of the web searches a web_search_* server tool made."""
        searches = any(isinstance(t, dict) and str(t.get("type", "")).startswith("web_search_")
                       for t in body.get("tools") or ())
        return {"server_tool_use": {"web_search_requests": self.hosted_tool_calls}} if searches else {}

    def _anthropic_message(self, body: dict[str, Any], seq: int) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": f"msg_fake_{seq}",
            "type": "message",
            "role": "assistant",
            "model": self._model(body, "claude-fake"),
            "content": [{"type": "text", "text": self.reply}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
        }
        if self.report_usage:
            out["usage"] = {**self._anthropic_usage(), **self._anthropic_server_tool_use(body)}
        return out

    async def _anthropic_count_tokens(self, request: web.Request, body: dict[str, Any],
                                      fault: Fault | None) -> web.StreamResponse:
        """Anthropic's POST /v1/messages/count_tokens: {"input_tokens": N} (N = prompt_tokens)."""
        if not request.headers.get("x-api-key"):
            return self._error("anthropic", 401, "x-api-key header is required")
        if not isinstance(body.get("messages"), list) or not body.get("model"):
            return self._error("anthropic", 400, "messages: Field required")
        return web.json_response({"input_tokens": self.prompt_tokens})

    async def _anthropic_messages(self, request: web.Request, body: dict[str, Any],
                                  fault: Fault | None) -> web.StreamResponse:
        if not request.headers.get("x-api-key") and not request.headers.get("Authorization"):
            return self._error("anthropic", 401, "x-api-key header is required")
        if not request.headers.get("anthropic-version"):
            return self._error("anthropic", 400, "anthropic-version: header is required")
        if "max_tokens" not in body:
            return self._error("anthropic", 400, "max_tokens: Field required")
        if not isinstance(body.get("messages"), list):
            return self._error("anthropic", 400, "messages: Field required")
        kind = fault.kind if fault else None
        midstream = fault if kind in _MIDSTREAM_FAULTS else None

        if not body.get("stream"):
            msg = self._anthropic_message(body, request["fake_seq"])
            if kind == "no_choices":
                msg.pop("content")
            return web.json_response(msg)

        resp = await self._start_sse(request)
        if kind == "garbage":
            await resp.write(b"event: message_start\ndata: not-json\n\n")
            return resp
        start_usage = {"input_tokens": self.prompt_tokens, "cache_creation_input_tokens": self.cache_write_tokens,
                       "cache_read_input_tokens": self.cached_tokens, **self._anthropic_cache_creation(),
                       "output_tokens": 1,
                       **({"service_tier": self.service_tier_served} if self.service_tier_served else {})}
        message = {
            "id": f"msg_fake_{request['fake_seq']}",
            "type": "message",
            "role": "assistant",
            "model": self._model(body, "claude-fake"),
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
        }
        if self.report_usage:
            message["usage"] = start_usage
        if kind == "no_choices":
            message.pop("content")
        await resp.write(_sse_event("message_start", {"type": "message_start", "message": message}))
        await resp.write(_sse_event("content_block_start", {
            "type": "content_block_start", "index": 0,
            "content_block": {"type": "text", "text": ""}}))
        await resp.write(_sse_event("ping", {"type": "ping"}))
        for i, piece in enumerate(split_reply(self.reply, self.chunks)):
            if midstream is not None and i == midstream.after_chunks:
                await self._stream_fault(request, resp, midstream, "anthropic")
            if i and self.chunk_delay:
                await self._sleep(self.chunk_delay)
            await resp.write(_sse_event("content_block_delta", {
                "type": "content_block_delta", "index": 0,
                "delta": {"type": "text_delta", "text": piece}}))
        if midstream is not None:
            await self._stream_fault(request, resp, midstream, "anthropic")
        await resp.write(_sse_event("content_block_stop", {"type": "content_block_stop", "index": 0}))
        delta_evt: dict[str, Any] = {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        }
        if self.report_usage:
            delta_evt["usage"] = {"output_tokens": self.completion_tokens, **self._anthropic_server_tool_use(body)}
        await resp.write(_sse_event("message_delta", delta_evt))
        if kind == "no_done":
            await self._end_without_done(request, resp, fault)
        await resp.write(_sse_event("message_stop", {"type": "message_stop"}))
        return resp


    # ---- Gemini ----------------------------------------------------------

    def _gemini_usage(self, final: bool = True) -> dict[str, Any]:
        usage: dict[str, Any] = {"promptTokenCount": self.prompt_tokens,
                                 "totalTokenCount": self.prompt_tokens,
                                 "promptTokensDetails": [{"modality": "TEXT", "tokenCount": self.prompt_tokens}]}
        if not final:  # a stream's chunks before the last count the prompt only
            return usage
        usage["candidatesTokenCount"] = self.completion_tokens
        usage["totalTokenCount"] = self.prompt_tokens + self.completion_tokens + self.reasoning_tokens
        if self.cached_tokens:
            usage["cachedContentTokenCount"] = self.cached_tokens
            usage["cacheTokensDetails"] = [{"modality": "TEXT", "tokenCount": self.cached_tokens}]
        if self.reasoning_tokens:
            usage["thoughtsTokenCount"] = self.reasoning_tokens
        return {**usage, "promptTokensDetails": usage.pop("promptTokensDetails")}

    def _gemini_response(self, body: dict[str, Any], path: str, parts: list[dict[str, Any]] | None = None,
                         final: bool = True) -> dict[str, Any]:
        model = self.model_echo or path.rsplit("/models/", 1)[-1].split(":", 1)[0]
        if parts is None:
            parts = [{"text": self.reply}]
            if self.tool_call is not None:
                parts = [{"functionCall": {"name": self.tool_call["name"], "args": self.tool_call["arguments"]}}]
        if self.gemini_thought_signature and parts and (final or "functionCall" in parts[0]):
            parts = [{**parts[0], "thoughtSignature": self.gemini_thought_signature}, *parts[1:]]
        candidate: dict[str, Any] = {"content": {"parts": parts, "role": "model"}, "index": 0}
        if final:
            candidate["finishReason"] = self.gemini_finish_reason
        out: dict[str, Any] = {"candidates": [candidate]}
        if self.report_usage:
            out["usageMetadata"] = self._gemini_usage(final)
        out["modelVersion"] = model
        out["responseId"] = "fake-gemini-response"
        return out

    async def _gemini_generate(self, request: web.Request, body: dict[str, Any],
                               fault: Fault | None) -> web.StreamResponse:
        """generateContent, and streamGenerateContent (SSE with ?alt=sse; a JSON array of
        responses without it), in the Gemini API's shapes."""
        if self.require_auth and not (request.headers.get("x-goog-api-key") or request.query.get("key")):
            return self._error("gemini", 403, "Method doesn't allow unregistered callers (callers without "
                                              "established identity). Please use API Key or other form of API "
                                              "consumer identity to call this API.")
        if not isinstance(body.get("contents"), list) or not body["contents"]:
            return self._error("gemini", 400, "* GenerateContentRequest.contents: contents is not specified")
        kind = fault.kind if fault else None
        midstream = fault if kind in _MIDSTREAM_FAULTS else None
        if not request.path.endswith(":streamGenerateContent"):
            answer = self._gemini_response(body, request.path)
            if kind == "no_choices":
                answer.pop("candidates")
            return web.json_response(answer)
        if request.query.get("alt") != "sse":
            return web.json_response([self._gemini_response(body, request.path)])
        resp = await self._start_sse(request)
        if kind == "garbage":
            await resp.write(b"data: not-json\r\n\r\n")
            return resp
        pieces = split_reply(self.reply, self.chunks)
        if self.tool_call is not None:
            pieces = [""]
        for i, piece in enumerate(pieces):
            if midstream is not None and i == midstream.after_chunks:
                await self._stream_fault(request, resp, midstream, "gemini")
            if i and self.chunk_delay:
                await self._sleep(self.chunk_delay)
            last = i == len(pieces) - 1 and midstream is None
            parts = None if self.tool_call is not None else [{"text": piece}]
            await resp.write(b"data: " + json.dumps(self._gemini_response(body, request.path, parts, final=last),
                                                    separators=(",", ":")).encode() + b"\r\n\r\n")
        if midstream is not None:
            await self._stream_fault(request, resp, midstream, "gemini")
        return resp


# --------------------------------------------------------------------------
# Background-loop runner for synchronous tests
# --------------------------------------------------------------------------


class ServerThread:
    """An asyncio loop in a daemon thread, so sync tests can host servers.

    ``run(coro)`` executes a coroutine on that loop and blocks for its result.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name="fake-upstream-loop", daemon=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()
        # Drain whatever is left so the loop closes without warnings.
        pending = asyncio.all_tasks(self.loop)
        for t in pending:
            t.cancel()
        if pending:
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self.loop.close()

    def start(self) -> "ServerThread":
        self._thread.start()
        return self

    def run(self, coro: Coroutine[Any, Any, T] | Awaitable[T], timeout: float | None = 10.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    def stop(self) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


async def eventually(predicate, timeout: float = 1.0) -> None:
    """Wait (polling) until predicate() holds; the assertion after it says what failed."""
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
