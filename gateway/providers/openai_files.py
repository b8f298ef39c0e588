"""OpenAI's Files and Batch APIs at one deployment's upstream account.

Why aiohttp's client here and not the gateway's own (gateway/providers/http.py): that one
sends a request body it holds whole and reads small answers, which is right for model
calls; a file is up to `batches.max_file_bytes` (200 MB by default) each way. aiohttp's
client streams a multipart upload from a file on disk and a download chunk by chunk, so
neither direction holds a whole file in memory. One session per gateway process.

Only plain OpenAI-wire deployments (`openai/...` models) hold files here (Azure's Files
API lives at other URLs with other rules; not served yet: docs/batches.md).
"""

from __future__ import annotations

import asyncio
import mimetypes
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import orjson

from gateway.config import ModelEntry
from gateway.providers.base import UpstreamError, error_from_status
from gateway.providers.openai import OPENAI_DEFAULT_BASE, endpoint_url

MAX_LINE = 32 * 1024 * 1024  # one JSONL line of a batch's input or output file
ERROR_BODY = 64 * 1024
JSON_BODY = 16 * 1024 * 1024  # a listing or a batch object


def holds_files(deployment: ModelEntry) -> bool:
    """Whether the deployment's upstream speaks OpenAI's Files and Batch APIs (as far as
    the gateway serves them)."""
    return deployment.litellm_params.model.startswith("openai/")


def account_of(deployment: ModelEntry) -> str:
    """Which upstream account holds a deployment's files: its base URL (not its key, so that
    a rotated provider key still reaches them; as for stored responses)."""
    return (deployment.litellm_params.api_base or OPENAI_DEFAULT_BASE).rstrip("/")


class FilesUpstream:
    """Files and batches at the upstream account of a deployment (its base URL and key)."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, connect=30,
                                                                                sock_read=300))
        return self._session

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()

    @staticmethod
    def _where(deployment: ModelEntry, path: str) -> tuple[str, dict[str, str]]:
        url, credential = endpoint_url(deployment, path)
        headers = {}
        if credential:
            name, _, value = credential.partition(": ")
            headers[name] = value
        organization = (deployment.litellm_params.model_extra or {}).get("organization")
        if organization:
            headers["OpenAI-Organization"] = organization
        return url, headers

    async def _json(self, response: aiohttp.ClientResponse) -> dict[str, Any]:
        if response.status >= 400:
            raw = await response.content.read(ERROR_BODY)
            raise error_from_status(response.status, response.headers, raw)
        raw = await response.content.read(JSON_BODY)
        try:
            payload = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise UpstreamError("bad_response", "the upstream answer was not JSON") from None
        if not isinstance(payload, dict):
            raise UpstreamError("bad_response", "the upstream answer was not a JSON object")
        return payload

    async def call(self, deployment: ModelEntry, method: str, path: str,
                   body: dict[str, Any] | None = None) -> dict[str, Any]:
        """One JSON call (GET /files/{id}, POST /batches, ...): its object, or UpstreamError."""
        url, headers = self._where(deployment, path)
        return await self.request_json(method, url, headers, body, deployment.timeouts.total)

    async def request_json(self, method: str, url: str, headers: dict[str, str], body: dict[str, Any] | None,
                           timeout: float) -> dict[str, Any]:
        """One JSON call to `url` with `headers` (the Anthropic batches client uses it too)."""
        try:
            async with self.session().request(method, url, headers=headers, json=body,
                                              timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                return await self._json(r)
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamError("connection", f"could not reach the upstream: {type(exc).__name__}") from None
        except asyncio.TimeoutError:
            raise UpstreamError("timeout", "the upstream did not answer in time", status=504) from None

    async def upload(self, deployment: ModelEntry, path: Path, filename: str, purpose: str) -> dict[str, Any]:
        """POST /files, multipart, streamed from `path` (never read whole)."""
        url, headers = self._where(deployment, "/files")
        try:
            with path.open("rb") as handle:
                form = aiohttp.FormData()
                form.add_field("purpose", purpose)
                kind = "application/jsonl" if filename.endswith(".jsonl") else (
                    mimetypes.guess_type(filename)[0] or "application/octet-stream")
                form.add_field("file", handle, filename=filename, content_type=kind)
                async with self.session().post(url, headers=headers, data=form) as r:
                    return await self._json(r)
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamError("connection", f"could not reach the upstream: {type(exc).__name__}") from None
        except asyncio.TimeoutError:
            raise UpstreamError("timeout", "the upstream did not answer in time", status=504) from None

    async def content(self, deployment: ModelEntry, file_id: str) -> AsyncIterator[bytes]:
        """GET /files/{id}/content, line by line (each with its newline, if it had one)."""
        url, headers = self._where(deployment, f"/files/{file_id}/content")
        async for line in self.lines(url, headers):
            yield line

    async def lines(self, url: str, headers: dict[str, str]) -> AsyncIterator[bytes]:
        """GET `url`, its body line by line, streamed (at most MAX_LINE bytes a line)."""
        try:
            async with self.session().get(url, headers=headers) as r:
                if r.status >= 400:
                    raise error_from_status(r.status, r.headers, await r.content.read(ERROR_BODY))
                pending = bytearray()
                async for chunk in r.content.iter_chunked(256 * 1024):
                    pending += chunk
                    start = 0
                    while True:
                        end = pending.find(b"\n", start)
                        if end < 0:
                            break
                        yield bytes(pending[start:end + 1])
                        start = end + 1
                    del pending[:start]
                    if len(pending) > MAX_LINE:
                        raise UpstreamError("bad_response", f"a line of the file is longer than {MAX_LINE} bytes")
                if pending:
                    yield bytes(pending)
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamError("connection", f"could not reach the upstream: {type(exc).__name__}") from None
