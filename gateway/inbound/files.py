"""`/v1/files`: OpenAI's Files API, owned per user (upload, list, retrieve, content, delete).

An upload is a multipart form (`purpose`, `file`, and optionally `model`: which model's
upstream account the file is for; gateway/batches.py `BatchService.file_deployment` says
how it is chosen without one). The file part is streamed to a temporary file on disk and
counted as it arrives: past `batches.max_file_bytes` the upload is refused with a 413 at
once, and nothing of it is held in memory. The temporary file is then streamed to the
upstream (gateway/providers/openai_files.py) and deleted.

A file is recorded with its owner (`gw_files`); listing and retrieval read the store;
content and delete go to the upstream account that holds it, only for the user who owns
it. Any other id is a 404, the provider never asked. A batch's output and error files are
the batch owner's, their content served with the public model name (docs/batches.md).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from gateway.batches import BATCHES, FILE_PURPOSES, holder, public_file
from gateway.errors import ApiError, bad_request
from gateway.lifecycle import OPENAI, Inbound, json_response, new_context, run_request, send_now
from gateway.providers.base import UpstreamError
from gateway.providers.openai_files import account_of
from gateway.router import upstream_to_api_error
from gateway.state import GATEWAY, Gateway
from plugins.base import RequestContext

CHUNK = 256 * 1024
FIELD_LIMIT = 1024  # a form field besides the file (purpose, model)

Work = Callable[[Gateway, RequestContext], Awaitable[Any]]


def _caller(ctx: RequestContext) -> None:
    if ctx.identity is None:
        raise ApiError(401, "Files and batches belong to a user: this gateway's chain has no auth plugin to say "
                            "whose they are", code="invalid_api_key")


async def serve(request: web.Request, endpoint: str, work: Work, inbound: Inbound = OPENAI) -> web.StreamResponse:
    """The chain around a files or batches request (auth, rate limits, logs; not billed as
    a request): `work` answers a JSON object, or sends its own response."""
    gw = request.app[GATEWAY]
    snap = gw.snapshot
    ctx = new_context(request, snap, endpoint, {})  # type: ignore[arg-type]

    async def answer() -> web.StreamResponse:
        _caller(ctx)
        payload = await work(gw, ctx)
        if isinstance(payload, web.StreamResponse):  # sent by `work` itself (a file's content)
            await snap.chain.end(ctx, wait=False)
            return payload
        ctx.status = 200
        response = await send_now(request, json_response(200, payload, ctx.response_headers))
        await snap.chain.end(ctx, wait=False)
        return response

    return await run_request(request, snap, ctx, answer, inbound=inbound)


async def _field(part: BodyPartReader, name: str) -> str:
    value = b""
    while True:
        chunk = await part.read_chunk(FIELD_LIMIT)
        if not chunk:
            break
        value += chunk
        if len(value) > FIELD_LIMIT:
            raise bad_request(f"the form field '{name}' is too long", param=name)
    try:
        return value.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise bad_request(f"the form field '{name}' is not UTF-8", param=name) from None


async def _receive(request: web.Request, limit: int, folder: Path) -> tuple[dict[str, str], str, int]:
    """The form's fields, the file's name and size; its bytes written to folder/upload as
    they arrive (413 past `limit`, while streaming). A body aiohttp cannot read as
    multipart (no boundary, cut short, broken part headers) is a 400."""
    try:
        return await _read_form(request, limit, folder)
    except (ValueError, AssertionError, RequestPayloadError, HttpProcessingError):
        raise bad_request("the body is not a well-formed multipart/form-data upload", code="invalid_body") from None


async def _read_form(request: web.Request, limit: int, folder: Path) -> tuple[dict[str, str], str, int]:
    if request.content_type != "multipart/form-data":
        raise bad_request("an upload is a multipart/form-data body with 'purpose' and 'file'", code="invalid_body")
    if request.content_length is not None and request.content_length > limit + 64 * 1024:
        raise _too_large(limit)
    reader = await request.multipart()
    fields: dict[str, str] = {}
    filename, size = None, 0
    while True:
        part = await reader.next()
        if part is None:
            break
        if not isinstance(part, BodyPartReader):
            raise bad_request("a nested multipart body is not accepted", code="invalid_body")
        if part.name == "file":
            if filename is not None:
                raise bad_request("one file per upload", param="file")
            filename = (part.filename or "upload.jsonl")[:255]
            if any(ord(c) < 32 or ord(c) == 127 for c in filename):  # bound for the provider's multipart headers
                raise bad_request("the file's name has control characters", param="file", code="invalid_filename")
            with (folder / "upload").open("wb") as sink:
                while True:
                    chunk = await part.read_chunk(CHUNK)
                    if not chunk:
                        break
                    size += len(chunk)
                    if size > limit:
                        raise _too_large(limit)
                    sink.write(chunk)
        elif part.name in ("purpose", "model"):
            fields[part.name] = await _field(part, part.name)
        else:
            raise bad_request(f"unknown form field '{str(part.name)[:64]}' (accepted: purpose, file, model)",
                              param=str(part.name)[:64], code="unknown_parameter")
    if filename is None:
        raise bad_request("the form has no 'file'", param="file")
    return fields, filename, size


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"The file is larger than the {limit} byte limit of this gateway (batches.max_file_bytes)",
                    param="file", code="file_too_large")


async def _upload(gw: Gateway, ctx: RequestContext, request: web.Request) -> dict[str, Any]:
    service = request.app[BATCHES]
    limit = ctx.config.batches.max_file_bytes
    with tempfile.TemporaryDirectory(prefix="gw-upload-") as folder:
        fields, filename, size = await _receive(request, limit, Path(folder))
        purpose = fields.get("purpose")
        if purpose not in FILE_PURPOSES:
            raise bad_request(f"'purpose' must be one of {sorted(FILE_PURPOSES)}", param="purpose")
        model, deployment = service.file_deployment(ctx, fields.get("model") or None)
        held = await _held_bytes(gw, ctx.identity.user_id)
        if held + size > ctx.config.batches.max_user_bytes:
            raise ApiError(413, f"Your files would hold {held + size} bytes, above the "
                                f"{ctx.config.batches.max_user_bytes} bytes one user may keep on this gateway "
                                f"(batches.max_user_bytes); delete some first", param="file", code="file_quota_exceeded")
        try:
            uploaded = await service.upstream.upload(deployment, Path(folder) / "upload", filename, purpose)
        except UpstreamError as err:
            raise upstream_to_api_error(err, 1) from None
    if not isinstance(uploaded.get("id"), str):
        raise ApiError(502, "the upstream's file had no id", type="server_error", code="upstream_error")
    created = uploaded.get("created_at")
    record = {"file_id": uploaded["id"], "user_id": ctx.identity.user_id, "workspace_id": ctx.identity.workspace_id,
              "purpose": purpose, "filename": filename, "bytes": size, "upstream": account_of(deployment),
              "model": model, "batch_id": None,
              "created_at": float(created) if isinstance(created, (int, float)) else time.time()}
    await gw.store.remember_file(record)
    return public_file(record)


async def _held_bytes(gw: Gateway, user_id: str) -> int:
    """The bytes of the files a user uploaded and has not deleted (the provider account's
    storage is shared by every user: one user must not fill it)."""
    total, after = 0, None
    while True:
        rows = await gw.store.list_files(user_id, limit=1000, after=after)
        total += sum(r["bytes"] or 0 for r in rows if r.get("batch_id") is None)
        if len(rows) < 1000:
            return total
        after = rows[-1]["file_id"]


async def files_upload(request: web.Request) -> web.StreamResponse:
    """POST /v1/files (gateway/inbound/files.py)."""
    return await serve(request, "files", lambda gw, ctx: _upload(gw, ctx, request))


def _limit(request: web.Request, default: int, most: int) -> int:
    raw = request.query.get("limit")
    if raw is None:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= most:
        raise bad_request(f"'limit' must be an integer from 1 to {most}", param="limit")
    return int(raw)


async def files_list(request: web.Request) -> web.StreamResponse:
    """GET /v1/files: the caller's own files, newest first."""

    async def work(gw: Gateway, ctx: RequestContext) -> dict[str, Any]:
        limit = _limit(request, 100, 10_000)
        rows = await gw.store.list_files(ctx.identity.user_id, purpose=request.query.get("purpose"),
                                         limit=limit + 1, after=request.query.get("after"))
        data = [public_file(r) for r in rows[:limit]]
        return {"object": "list", "data": data, "has_more": len(rows) > limit,
                "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}

    return await serve(request, "files", work)


async def file_retrieve(request: web.Request) -> web.StreamResponse:
    """GET /v1/files/{file_id}: from the store (the owner's only)."""

    async def work(gw: Gateway, ctx: RequestContext) -> dict[str, Any]:
        return public_file(await request.app[BATCHES].owned_file(ctx, request.match_info["file_id"]))

    return await serve(request, "files", work)


async def file_delete(request: web.Request) -> web.StreamResponse:
    """DELETE /v1/files/{file_id}: at the upstream, then forgotten."""

    async def work(gw: Gateway, ctx: RequestContext) -> dict[str, Any]:
        service = request.app[BATCHES]
        record = await service.owned_file(ctx, request.match_info["file_id"])
        deployment = holder(ctx.config, record["model"], record["upstream"])
        if deployment is not None:
            try:
                await service.upstream.call(deployment, "DELETE", f"/files/{record['file_id']}")
            except UpstreamError as err:
                if err.status != 404:  # already gone there: forget it here too
                    raise upstream_to_api_error(err, 1) from None
        await gw.store.forget_file(record["file_id"])
        return {"id": record["file_id"], "object": "file", "deleted": True}

    return await serve(request, "files", work)


async def file_content(request: web.Request) -> web.StreamResponse:
    """GET /v1/files/{file_id}/content: streamed from the upstream, line by line."""

    async def work(gw: Gateway, ctx: RequestContext) -> web.StreamResponse:
        service = request.app[BATCHES]
        record = await service.owned_file(ctx, request.match_info["file_id"])
        return await relay_lines(request, ctx, await service.content(ctx, record), "application/octet-stream")

    return await serve(request, "files", work)


async def relay_lines(request: web.Request, ctx: RequestContext, lines: AsyncIterator[bytes],
                      content_type: str, rewrite: Callable[[bytes], bytes] | None = None) -> web.StreamResponse:
    """Stream an upstream's lines (a file's content, a batch's results) to the client, each
    through `rewrite` when given. An upstream error before the first line is an error answer;
    after it, the body is cut short (the status is sent)."""
    try:
        first = await lines.__anext__()
    except StopAsyncIteration:
        first = b""
    except UpstreamError as err:
        raise upstream_to_api_error(err, 1) from None
    response = web.StreamResponse(status=200, headers={**ctx.response_headers, "Content-Type": content_type})
    ctx.status = 200
    try:
        await response.prepare(request)
        if first:
            await response.write(rewrite(first) if rewrite else first)
            async for line in lines:
                await response.write(rewrite(line) if rewrite else line)
        await response.write_eof()
    except (ConnectionError, UpstreamError):
        ctx.client_disconnected = True  # the answer is cut: the client sees a short body
    return response


def files_routes() -> list[web.RouteDef]:
    return [web.post("/v1/files", files_upload), web.get("/v1/files", files_list, allow_head=False),
            web.get("/v1/files/{file_id}", file_retrieve, allow_head=False),
            web.delete("/v1/files/{file_id}", file_delete),
            web.get("/v1/files/{file_id}/content", file_content, allow_head=False)]
