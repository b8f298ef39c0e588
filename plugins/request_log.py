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

import structlog
from pydantic import BaseModel, ConfigDict

from plugins.base import Plugin, RequestContext

log = structlog.get_logger("gateway.request")


class RequestLogSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    level: Literal["info", "debug"] = "info"
    log_models_listing: bool = False


def request_fields(ctx: RequestContext) -> dict:
    fields: dict = {
        "request_id": ctx.request_id,
        "endpoint": ctx.endpoint,
        "status": ctx.status,
        "latency_ms": round(ctx.latency_ms, 2) if ctx.latency_ms is not None else None,
    }
    if ctx.endpoint != "models":
        fields.update(
            model_requested=ctx.requested_model,
            model_served=ctx.model if ctx.attempts or ctx.short_circuit is not None else None,
            provider=ctx.provider,
            stream=ctx.stream,
            ttfb_ms=round(ctx.ttfb_ms, 2) if ctx.ttfb_ms is not None else None,
            attempts=ctx.attempts,
            fallbacks=ctx.fallbacks,
            action=ctx.action,
        )
        if ctx.downgraded_from is not None:
            fields["downgraded_from"] = ctx.downgraded_from
            fields["downgrade_reason"] = ctx.downgrade_reason
    if ctx.usage is not None:
        fields.update(tokens_prompt=ctx.usage.prompt_tokens, tokens_completion=ctx.usage.completion_tokens,
                      tokens_total=ctx.usage.total_tokens, usage_estimated=ctx.usage.estimated)
    if ctx.identity is not None:
        fields.update(user_id=ctx.identity.user_id, workspace_id=ctx.identity.workspace_id,
                      key_prefix=ctx.identity.key_prefix)
    if ctx.client_disconnected:
        fields["client_disconnected"] = True
    if ctx.error is not None:
        fields.update(error_type=ctx.error.type, error_code=ctx.error.code)
    return fields


class RequestLog(Plugin):
    name = "request_log"
    Settings = RequestLogSettings

    def _emit(self, ctx: RequestContext, event: str) -> None:
        if ctx.endpoint == "models" and not self.settings.log_models_listing:
            return
        fields = request_fields(ctx)
        if self.settings.level == "debug":
            log.debug(event, **fields)
        else:
            log.info(event, **fields)

    async def on_response(self, ctx: RequestContext) -> None:
        self._emit(ctx, "request_completed")

    async def on_error(self, ctx: RequestContext) -> None:
        self._emit(ctx, "request_failed")
