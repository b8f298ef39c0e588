"""request_log: one structured JSON log line per request.

    plugins:
      - name: request_log
        settings:
          level: info          # info | debug
          log_models_listing: false

Fields: request_id, endpoint, model_requested, model_served, downgraded_from, status,
error_type/error_code, latency_ms, ttfb_ms, stream, attempts, fallbacks, tokens
(prompt/completion/total, estimated), user_id, workspace_id, key_prefix, action,
client_disconnected. Never a key, a prompt or a completion: only the key's prefix.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from gateway.logs import PerRequestLog
from plugins.base import Plugin, RequestContext

log = PerRequestLog("gateway.request")


class RequestLogSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    level: Literal["info", "debug"] = "info"
    log_models_listing: bool = False


def request_fields(ctx: RequestContext) -> dict:
    latency_ms = ctx.latency_ms
    fields: dict = {
        "request_id": ctx.request_id,
        "endpoint": ctx.endpoint,
        "status": ctx.status,
        "latency_ms": round(latency_ms, 2) if latency_ms is not None else None,
    }
    if ctx.endpoint != "models":
        ttfb_ms = ctx.ttfb_ms
        fields["model_requested"] = ctx.requested_model
        fields["model_served"] = ctx.model if ctx.attempts or ctx.short_circuit is not None else None
        fields["provider"] = ctx.provider
        fields["stream"] = ctx.stream
        fields["ttfb_ms"] = round(ttfb_ms, 2) if ttfb_ms is not None else None
        fields["attempts"] = ctx.attempts
        fields["fallbacks"] = ctx.fallbacks
        fields["action"] = ctx.action
        if ctx.downgraded_from is not None:
            fields["downgraded_from"] = ctx.downgraded_from
            fields["downgrade_reason"] = ctx.downgrade_reason
    usage = ctx.usage
    if usage is not None:
        fields["tokens_prompt"] = usage.prompt_tokens
        fields["tokens_completion"] = usage.completion_tokens
        fields["tokens_total"] = usage.total_tokens
        fields["usage_estimated"] = usage.estimated
    identity = ctx.identity
    if identity is not None:
        fields["user_id"] = identity.user_id
        fields["workspace_id"] = identity.workspace_id
        fields["key_prefix"] = identity.key_prefix
    if ctx.client_disconnected:
        fields["client_disconnected"] = True
    if ctx.error is not None:
        fields["error_type"] = ctx.error.type
        fields["error_code"] = ctx.error.code
    return fields


class RequestLog(Plugin):
    name = "request_log"
    Settings = RequestLogSettings

    def _emit(self, ctx: RequestContext, event: str) -> None:
        if ctx.endpoint == "models" and not self.settings.log_models_listing:
            return
        log.emit(self.settings.level, event, request_fields(ctx))

    async def on_response(self, ctx: RequestContext) -> None:
        self._emit(ctx, "request_completed")

    async def on_error(self, ctx: RequestContext) -> None:
        self._emit(ctx, "request_failed")
