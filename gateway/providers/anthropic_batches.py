"""Anthropic's Message Batches API (`/v1/messages/batches`) at one deployment's account.

The requests travel inline in the create call (no file); the results are a JSONL stream at
`/v1/messages/batches/{id}/results`, read from the deployment's own base URL (the batch's
`results_url` is not followed: the gateway's key goes only where the config points). Over
the aiohttp session of gateway/providers/openai_files.py (streamed results).
"""

from __future__ import annotations

from typing import Any, AsyncIterator

from gateway.config import ModelEntry
from gateway.providers.anthropic import ANTHROPIC_DEFAULT_BASE, ANTHROPIC_VERSION
from gateway.providers.openai_files import FilesUpstream
from gateway.usage import usage_from_payload


def holds_message_batches(deployment: ModelEntry) -> bool:
    return deployment.litellm_params.model.startswith("anthropic/")


def message_batches_account(deployment: ModelEntry) -> str:
    """The account a deployment's batches run at: its base URL (as for OpenAI files)."""
    return (deployment.litellm_params.api_base or ANTHROPIC_DEFAULT_BASE).rstrip("/")


def upstream_model_name(deployment: ModelEntry) -> str:
    return deployment.litellm_params.model.split("/", 1)[1]


def _where(deployment: ModelEntry, path: str) -> tuple[str, dict[str, str]]:
    base = message_batches_account(deployment)
    messages = base if base.endswith("/messages") else base + ("/messages" if base.endswith("/v1") else "/v1/messages")
    headers = {"anthropic-version": ANTHROPIC_VERSION}
    if deployment.litellm_params.api_key:
        headers["x-api-key"] = deployment.litellm_params.api_key
    return messages + "/batches" + path, headers


class MessageBatchesUpstream:
    def __init__(self, http: FilesUpstream) -> None:
        self.http = http

    async def call(self, deployment: ModelEntry, method: str, path: str = "",
                   body: dict[str, Any] | None = None) -> dict[str, Any]:
        """POST (create), GET /{id}, POST /{id}/cancel: the batch object, or UpstreamError."""
        url, headers = _where(deployment, path)
        return await self.http.request_json(method, url, headers, body, deployment.timeouts.total)

    def results(self, deployment: ModelEntry, batch_id: str) -> AsyncIterator[bytes]:
        url, headers = _where(deployment, f"/{batch_id}/results")
        return self.http.lines(url, headers)


def message_outcome(line: dict[str, Any]) -> tuple[Any, Any, str | None]:
    """What settles one result line: (200 for a succeeded request, its Usage, the error
    kind otherwise: the error's type, `batch_cancelled`, `batch_expired`)."""
    result = line.get("result") if isinstance(line.get("result"), dict) else {}
    kind = result.get("type")
    if kind == "succeeded" and isinstance(result.get("message"), dict):
        return 200, usage_from_payload(result["message"]), None
    if kind == "canceled":
        return None, None, "batch_cancelled"
    if kind == "expired":
        return None, None, "batch_expired"
    error = result.get("error") if isinstance(result.get("error"), dict) else {}
    inner = error.get("error") if isinstance(error.get("error"), dict) else error
    return None, None, str(inner.get("type") or "errored")[:64]
