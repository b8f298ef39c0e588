"""tier_policy: which models a tier may use, and the downgrade ladder.

    models:
      - name: gpt-4o
        downgrade_to: gpt-4o-mini     # the ladder: gpt-4o -> gpt-4o-mini -> ...
        litellm_params: {...}
    tiers:
      free: {models: [gpt-4o-mini, demo]}
      pro:  {models: ["*"]}
    plugins:
      - auth
      - tier_policy                   # after auth, before energy

A model the caller's tier does not allow is served by the first model down its ladder
that the tier allows (`X-Model-Downgraded-From`, `X-Model-Downgrade-Reason`). With no such
model: 403 `model_not_allowed`. This plugin leaves the whole allowed ladder in
`ctx.candidates`; the energy plugin then picks the first one the balance affords.
`GET /v1/models` lists only the models the tier allows.

MCP tools (`server__tool`, docs/mcp.md) are allowed by three lists, all of which must
allow a tool: the tier's `mcp_tools` (patterns; absent: none), the workspace's
`ai_settings.mcp_tools` and, for one key, the workspace's `ai_settings.mcp_key_tools.<key
id>` (each absent: no restriction). `tools/list` shows only the tools they allow; a call
of another one is refused with 403 `tool_not_allowed`.

A key may carry its own list of models (`keys create --models a,b`, docs/admin.md "Per-key
controls"): then only the models both the tier and the key allow are served or listed, and
a model outside the key's list is a 403 `model_not_allowed` that says it is the key's
restriction (no downgrade to a model the key was not given).

    tiers:
      free: {models: [gpt-4o-mini], mcp_tools: ["search__*"]}
"""

from __future__ import annotations

import fnmatch
from typing import Any

from plugins.base import TOOL_ENDPOINTS, Identity, Plugin, Reject, RequestContext


def _patterns_allow(patterns: Any, name: str) -> bool:
    """A list of shell-style patterns set in a workspace's ai_settings allows `name`;
    anything but a list of strings allows nothing (fails closed)."""
    if not isinstance(patterns, list):
        return False
    return any(isinstance(p, str) and fnmatch.fnmatchcase(name, p) for p in patterns)


def may_use_tool(config: Any, identity: Identity, ai_settings: dict[str, Any] | None, tool: str) -> bool:
    """The caller may see and call the MCP tool `tool` (`server__tool`): its tier's
    `mcp_tools`, its workspace's `ai_settings.mcp_tools` and that workspace's
    `ai_settings.mcp_key_tools.<key id>` all allow it (the tier's absent list allows no
    tool; an absent workspace or key list restricts nothing)."""
    tier = config.tiers.get(identity.tier)
    if tier is None or not tier.allows_tool(tool):
        return False
    settings = ai_settings or {}
    if "mcp_tools" in settings and not _patterns_allow(settings["mcp_tools"], tool):
        return False
    per_key = settings.get("mcp_key_tools")
    if per_key is not None:
        if not isinstance(per_key, dict):
            return False
        if identity.key_id in per_key and not _patterns_allow(per_key[identity.key_id], tool):
            return False
    return True


class TierPolicy(Plugin):
    name = "tier_policy"

    async def on_request(self, ctx: RequestContext) -> None:
        if ctx.identity is None:
            return  # no caller identity (auth not configured): nothing to enforce
        tier = ctx.config.tiers.get(ctx.identity.tier)
        if tier is None:  # the user's tier was removed from config.yaml: fail closed
            raise Reject(403, f"Your tier '{ctx.identity.tier}' is not configured on this gateway.",
                         type="invalid_request_error", code="tier_not_configured")
        key_models = ctx.identity.key_models
        if ctx.endpoint == "models":
            ctx.visible_models = [m for m in ctx.visible_models
                                  if tier.allows(m) and (key_models is None or m in key_models)]
            return
        if ctx.endpoint in TOOL_ENDPOINTS:
            await self._check_tool(ctx)
            return
        if not ctx.candidates:
            return  # unknown model: the core answers 404
        requested = ctx.requested_model
        if key_models is not None and requested not in key_models:
            raise Reject(403, f"This API key may only use the models {', '.join(key_models) or '(none)'}; "
                              f"'{requested}' is not one of them.",
                         type="invalid_request_error", code="model_not_allowed", param="model")
        allowed = ctx.config.tier_ladder(ctx.identity.tier, requested)
        if key_models is not None:
            allowed = tuple(m for m in allowed if m in key_models)
        if not allowed:
            raise Reject(403, f"Your tier '{ctx.identity.tier}' may not use the model '{requested}'.",
                         type="invalid_request_error", code="model_not_allowed", param="model")
        if allowed[0] != requested:
            ctx.downgrade_reason = f"tier '{ctx.identity.tier}' does not allow {requested}"
        ctx.candidates = list(allowed)
        fallbacks = ctx.config.tier_models(ctx.identity.tier)
        ctx.fallback_allowed = fallbacks if key_models is None else fallbacks & frozenset(key_models)

    async def _check_tool(self, ctx: RequestContext) -> None:
        if not ctx.candidates:
            return  # unknown tool: the endpoint answers it
        workspace = None
        if self.services.directory is not None:
            workspace = await self.services.directory.workspace(ctx.identity.workspace_id)
        if not may_use_tool(ctx.config, ctx.identity, workspace.ai_settings if workspace else None,
                            ctx.requested_model):
            raise Reject(403, f"You may not use the tool '{ctx.requested_model}'.",
                         type="invalid_request_error", code="tool_not_allowed", param="name")
