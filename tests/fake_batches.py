"""A fake OpenAI account that holds files and runs batches, in OpenAI's wire format.

A real aiohttp server on 127.0.0.1 (`FakeBatchProvider().start()`, base URL `.base`):
`POST/GET /v1/files`, `GET/DELETE /v1/files/{id}`, `GET /v1/files/{id}/content`,
`POST/GET /v1/batches`, `GET /v1/batches/{id}`, `POST /v1/batches/{id}/cancel`, and a
plain `POST /v1/chat/completions` and `POST /v1/responses` (a request naming a file), each
requiring `Authorization: Bearer ...` (401 otherwise); and Anthropic's Message Batches
(`/v1/messages/batches[/{id}[/cancel|/results]]`, `x-api-key` and `anthropic-version`
required), ended by `finish_message_batch` (`errored` ids fail, requests past `run` are
`expired` or `canceled`; usage `20 + index` input tokens, 4 output tokens). Every request is recorded
(`requests`: (method, path)).

A batch is `in_progress` once created; the test decides how it ends with `finish(batch_id,
outcome=..., fail=..., run=...)`: `completed` (the lines in `fail` answer 400, in the error
file), `expired` or `cancelled` (only the first `run` lines ran; the rest are in the error
file with `batch_expired` / `batch_cancelled`), or `failed` (nothing ran, no files).

Answers name the upstream's dated model (`gpt-4o-mini-2024-07-18`: `dated`), as the real
API does; usage per line is `10 + index` prompt tokens and 5 completion tokens (chat), or
`7 + index` prompt tokens (embeddings), index counting the input's lines from 0.
"""

from __future__ import annotations

import itertools
import json
import time
from typing import Any

from aiohttp import web

_ids = itertools.count(1)


def dated(model: str) -> str:
    return model + "-2024-07-18"


def usage_of(index: int, url: str) -> dict[str, int]:
    if url == "/v1/embeddings":
        return {"prompt_tokens": 7 + index, "completion_tokens": 0, "total_tokens": 7 + index}
    return {"prompt_tokens": 10 + index, "completion_tokens": 5, "total_tokens": 15 + index}


class FakeBatchProvider:
    def __init__(self) -> None:
        self.files: dict[str, dict[str, Any]] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str]] = []
        self.bodies: list[dict[str, Any]] = []  # chat and responses bodies, as received
        self.message_batches: dict[str, dict[str, Any]] = {}
        self.on_cancel: Any = None  # async (batch id) -> None, awaited before a cancel is answered
        self.refuse_batches = 0  # the next N batch creations answer 500  # Anthropic's: the batch, its requests, its results
        self._runner: web.AppRunner | None = None
        self.url = ""

    @property
    def base(self) -> str:
        return self.url + "/v1"

    async def start(self) -> "FakeBatchProvider":
        app = web.Application(client_max_size=1024 ** 3)
        app.router.add_post("/v1/files", self._upload)
        app.router.add_get("/v1/files/{id}", self._file)
        app.router.add_delete("/v1/files/{id}", self._delete)
        app.router.add_get("/v1/files/{id}/content", self._content)
        app.router.add_post("/v1/batches", self._create)
        app.router.add_get("/v1/batches/{id}", self._batch)
        app.router.add_post("/v1/batches/{id}/cancel", self._cancel)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/messages/batches", self._message_batch_create)
        app.router.add_get("/v1/messages/batches/{id}", self._message_batch)
        app.router.add_post("/v1/messages/batches/{id}/cancel", self._message_batch_cancel)
        app.router.add_get("/v1/messages/batches/{id}/results", self._message_batch_results)
        app.router.add_post("/v1/responses", self._responses)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # --- helpers for tests -----------------------------------------------------------

    def count(self, method: str | None = None, prefix: str = "") -> int:
        return sum(1 for m, p in self.requests if (method is None or m == method) and p.startswith(prefix))

    def lines_of(self, file_id: str) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.files[file_id]["content"].splitlines() if line.strip()]

    def _new_file(self, content: bytes, purpose: str, filename: str) -> dict[str, Any]:
        file_id = f"file-fake{next(_ids):06d}"
        self.files[file_id] = {"id": file_id, "object": "file", "bytes": len(content), "created_at": int(time.time()),
                               "filename": filename, "purpose": purpose, "status": "processed", "content": content}
        return self.files[file_id]

    def finish(self, batch_id: str, outcome: str = "completed", fail: set[str] | frozenset[str] = frozenset(),
               run: int | None = None) -> None:
        """End a batch as the real API would (see the module)."""
        batch = self.batches[batch_id]
        lines = self.lines_of(batch["input_file_id"])
        now = int(time.time())
        if outcome == "failed":
            batch.update(status="failed", failed_at=now, errors={"object": "list", "data": [
                {"code": "invalid_request", "message": "the fake failed the batch", "param": None, "line": None}]})
            return
        ran = len(lines) if run is None else run
        output, errors = [], []
        for index, line in enumerate(lines):
            request_id = f"req_fake_{batch_id}_{index}"
            if index >= ran:
                code = "batch_expired" if outcome == "expired" else "batch_cancelled"
                errors.append({"id": f"batch_req_{index}", "custom_id": line["custom_id"], "response": None,
                               "error": {"code": code, "message": f"This line was not executed ({code})."}})
            elif line["custom_id"] in fail:
                errors.append({"id": f"batch_req_{index}", "custom_id": line["custom_id"], "response": {
                    "status_code": 400, "request_id": request_id, "body": {"error": {
                        "message": "the fake refused this line", "type": "invalid_request_error", "param": None,
                        "code": "invalid_value"}}}, "error": None})
            else:
                output.append({"id": f"batch_req_{index}", "custom_id": line["custom_id"], "response": {
                    "status_code": 200, "request_id": request_id, "body": self._answer(index, line)}, "error": None})
        counts = {"total": len(lines), "completed": len(output), "failed": len(errors)}
        batch.update(status=outcome, request_counts=counts, finalizing_at=now, **{
            {"completed": "completed_at", "expired": "expired_at", "cancelled": "cancelled_at"}[outcome]: now})
        if output:
            batch["output_file_id"] = self._new_file(b"".join(json.dumps(o).encode() + b"\n" for o in output),
                                                     "batch_output", "batch_output.jsonl")["id"]
        if errors:
            batch["error_file_id"] = self._new_file(b"".join(json.dumps(e).encode() + b"\n" for e in errors),
                                                    "batch_output", "batch_error.jsonl")["id"]

    @staticmethod
    def _answer(index: int, line: dict[str, Any]) -> dict[str, Any]:
        model = dated(line["body"]["model"])
        usage = usage_of(index, line["url"])
        if line["url"] == "/v1/embeddings":
            return {"object": "list", "model": model, "usage": usage,
                    "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}]}
        return {"id": f"chatcmpl-fake{index}", "object": "chat.completion", "created": int(time.time()),
                "model": model, "usage": usage, "choices": [{"index": 0, "finish_reason": "stop", "message": {
                    "role": "assistant", "content": f"answer {index}"}}]}

    # --- the wire ---------------------------------------------------------------------

    def _check(self, request: web.Request) -> None:
        self.requests.append((request.method, request.path))
        if not request.headers.get("Authorization", "").startswith("Bearer "):
            raise web.HTTPUnauthorized(text=json.dumps({"error": {"message": "no key", "type": "invalid_request_error",
                                                                  "code": "invalid_api_key"}}),
                                       content_type="application/json")

    @staticmethod
    def _not_found(what: str) -> web.Response:
        return web.json_response({"error": {"message": f"No such {what}", "type": "invalid_request_error",
                                            "param": None, "code": None}}, status=404)

    @staticmethod
    def _public(file: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in file.items() if k != "content"}

    async def _upload(self, request: web.Request) -> web.Response:
        self._check(request)
        form = await request.post()
        upload = form["file"]
        content = upload.file.read()
        return web.json_response(self._public(self._new_file(content, str(form["purpose"]), upload.filename)))

    async def _file(self, request: web.Request) -> web.Response:
        self._check(request)
        file = self.files.get(request.match_info["id"])
        return self._not_found("file") if file is None else web.json_response(self._public(file))

    async def _delete(self, request: web.Request) -> web.Response:
        self._check(request)
        if self.files.pop(request.match_info["id"], None) is None:
            return self._not_found("file")
        return web.json_response({"id": request.match_info["id"], "object": "file", "deleted": True})

    async def _content(self, request: web.Request) -> web.Response:
        self._check(request)
        file = self.files.get(request.match_info["id"])
        if file is None:
            return self._not_found("file")
        return web.Response(body=file["content"], content_type="application/octet-stream")

    async def _create(self, request: web.Request) -> web.Response:
        self._check(request)
        body = await request.json()
        if self.refuse_batches:
            self.refuse_batches -= 1
            return web.json_response({"error": {"message": "the fake is down", "type": "server_error",
                                                "param": None, "code": None}}, status=500)
        if body.get("input_file_id") not in self.files:
            return self._not_found("file")
        batch_id = f"batch_fake{next(_ids):06d}"
        lines = self.lines_of(body["input_file_id"])
        self.batches[batch_id] = {
            "id": batch_id, "object": "batch", "endpoint": body["endpoint"], "errors": None,
            "input_file_id": body["input_file_id"], "completion_window": body["completion_window"],
            "status": "in_progress", "output_file_id": None, "error_file_id": None, "created_at": int(time.time()),
            "in_progress_at": int(time.time()), "expires_at": int(time.time()) + 86400, "finalizing_at": None,
            "completed_at": None, "failed_at": None, "expired_at": None, "cancelling_at": None, "cancelled_at": None,
            "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
            "metadata": body.get("metadata"), "model": dated(lines[0]["body"]["model"]) if lines else None}
        return web.json_response(self.batches[batch_id])

    async def _batch(self, request: web.Request) -> web.Response:
        self._check(request)
        batch = self.batches.get(request.match_info["id"])
        return self._not_found("batch") if batch is None else web.json_response(batch)

    async def _cancel(self, request: web.Request) -> web.Response:
        self._check(request)
        batch = self.batches.get(request.match_info["id"])
        if batch is None:
            return self._not_found("batch")
        batch.update(status="cancelling", cancelling_at=int(time.time()))
        answer = dict(batch)  # what the API answered when it received the cancel
        if self.on_cancel is not None:  # a test's race: the batch ends before the answer arrives
            await self.on_cancel(batch["id"])
        return web.json_response(answer)

    async def _chat(self, request: web.Request) -> web.Response:
        self._check(request)
        body = await request.json()
        self.bodies.append(body)
        return web.json_response(self._answer(0, {"url": "/v1/chat/completions", "body": body}))

    async def _responses(self, request: web.Request) -> web.Response:
        self._check(request)
        body = await request.json()
        self.bodies.append(body)
        return web.json_response({
            "id": f"resp_fake{next(_ids):06d}", "object": "response", "created_at": int(time.time()),
            "status": "completed", "model": dated(body["model"]), "store": False,
            "output": [{"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
                        "content": [{"type": "output_text", "text": "read it", "annotations": []}]}],
            "usage": {"input_tokens": 12, "output_tokens": 3, "total_tokens": 15}})

    # --- Anthropic's Message Batches ----------------------------------------------------

    def _check_anthropic(self, request: web.Request) -> web.Response | None:
        self.requests.append((request.method, request.path))
        if not request.headers.get("x-api-key") or not request.headers.get("anthropic-version"):
            return web.json_response({"type": "error", "error": {"type": "authentication_error",
                                                                  "message": "x-api-key and anthropic-version"}},
                                     status=401)
        return None

    def finish_message_batch(self, batch_id: str, errored: set[str] | frozenset[str] = frozenset(),
                             run: int | None = None, reason: str = "expired") -> None:
        entry = self.message_batches[batch_id]
        counts = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        results = []
        for index, item in enumerate(entry["requests"]):
            custom_id = item["custom_id"]
            if run is not None and index >= run:
                result: dict[str, Any] = {"type": reason}
                counts[reason] += 1
            elif custom_id in errored:
                result = {"type": "errored", "error": {"type": "error", "error": {
                    "type": "invalid_request_error", "message": "the fake refused this request"}}}
                counts["errored"] += 1
            else:
                result = {"type": "succeeded", "message": {
                    "id": f"msg_fake{index}", "type": "message", "role": "assistant",
                    "model": item["params"]["model"] + "-20251001", "stop_reason": "end_turn", "stop_sequence": None,
                    "content": [{"type": "text", "text": f"answer {index}"}],
                    "usage": {"input_tokens": 20 + index, "output_tokens": 4}}}
                counts["succeeded"] += 1
            results.append({"custom_id": custom_id, "result": result})
        entry["batch"].update(processing_status="ended", request_counts=counts, ended_at="2026-12-07T00:00:00Z",
                              results_url=f"{self.url}/v1/messages/batches/{batch_id}/results")
        entry["results"] = results

    async def _message_batch_create(self, request: web.Request) -> web.Response:
        refused = self._check_anthropic(request)
        if refused is not None:
            return refused
        body = await request.json()
        batch_id = f"msgbatch_fake{next(_ids):06d}"
        batch = {"id": batch_id, "type": "message_batch", "processing_status": "in_progress",
                 "request_counts": {"processing": len(body["requests"]), "succeeded": 0, "errored": 0,
                                    "canceled": 0, "expired": 0},
                 "ended_at": None, "created_at": "2026-12-07T00:00:00Z", "expires_at": "2026-12-08T00:00:00Z",
                 "archived_at": None, "cancel_initiated_at": None, "results_url": None}
        self.message_batches[batch_id] = {"batch": batch, "requests": body["requests"], "results": None}
        return web.json_response(batch)

    async def _message_batch(self, request: web.Request) -> web.Response:
        refused = self._check_anthropic(request)
        if refused is not None:
            return refused
        entry = self.message_batches.get(request.match_info["id"])
        if entry is None:
            return web.json_response({"type": "error", "error": {"type": "not_found_error", "message": "no"}},
                                     status=404)
        return web.json_response(entry["batch"])

    async def _message_batch_cancel(self, request: web.Request) -> web.Response:
        refused = self._check_anthropic(request)
        if refused is not None:
            return refused
        entry = self.message_batches[request.match_info["id"]]
        entry["batch"].update(processing_status="canceling", cancel_initiated_at="2026-12-07T00:00:01Z")
        return web.json_response(entry["batch"])

    async def _message_batch_results(self, request: web.Request) -> web.Response:
        refused = self._check_anthropic(request)
        if refused is not None:
            return refused
        entry = self.message_batches[request.match_info["id"]]
        return web.Response(body=b"".join(json.dumps(r).encode() + b"\n" for r in entry["results"]),
                            content_type="application/binary")
