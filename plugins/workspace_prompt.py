"""workspace_prompt: the workspace's system prompt and AI defaults, applied by the gateway.

    plugins:
      - auth
      - workspace_prompt            # after auth, before tier_policy

A workspace carries a profile and AI settings (set with `python proxy.py workspaces
update acme --profile '{...}' --ai-settings '{...}'` or PATCH /admin/workspaces/acme):

    profile:     {"company_name": "Acme", "industry": "Logistics",
                  "brand_voice": "friendly, concise", "products": ["Tracker", "Fleet"]}
    ai_settings: {"inject_system_prompt": true,
                  "system_prompt_template": "You write for {company_name} ({industry}). Voice: {brand_voice}. Products: {products}.",
                  "default_model": "gpt-4o-mini", "temperature": 0.4}

When `inject_system_prompt` is on, the template is rendered from the profile
(`{name}` placeholders; unknown ones render empty; lists are joined with ", ") and
prepended as the first system message. `temperature` applies when the client sent none.
`model: "default"` selects the workspace's `default_model`. The workspace comes from the
Directory's TTL cache, so this costs no database query per request.
"""

from __future__ import annotations

import re
from typing import Any

from plugins.base import Plugin, RequestContext

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def render_template(template: str, profile: dict[str, Any]) -> str:
    def value(match: re.Match) -> str:
        v = profile.get(match.group(1))
        if v is None:
            return ""
        if isinstance(v, (list, tuple)):
            return ", ".join(str(x) for x in v)
        return str(v)

    return _PLACEHOLDER.sub(value, template)


class WorkspacePrompt(Plugin):
    name = "workspace_prompt"

    async def on_request(self, ctx: RequestContext) -> None:
        if ctx.identity is None or not ctx.conversation or self.services.directory is None:
            return
        workspace = await self.services.directory.workspace(ctx.identity.workspace_id)
        if workspace is None:
            return
        settings = workspace.ai_settings or {}
        # What the client sent, before this plugin rewrites it: idempotency fingerprints
        # this, so editing the workspace prompt does not turn a client's retry into a 422.
        ctx.scratch(self.name)["client_body"] = dict(ctx.body)
        default_model = settings.get("default_model")
        if ctx.requested_model == "default" and isinstance(default_model, str) and ctx.config.deployments(default_model):
            ctx.requested_model = ctx.model = default_model
            ctx.candidates = [default_model]
        if "temperature" not in ctx.body and isinstance(settings.get("temperature"), (int, float)):
            ctx.body["temperature"] = settings["temperature"]
        template = settings.get("system_prompt_template")
        if settings.get("inject_system_prompt") and isinstance(template, str) and template.strip():
            prompt = render_template(template, workspace.profile or {})
            ctx.body["messages"] = [{"role": "system", "content": prompt}, *ctx.body["messages"]]
            ctx.scratch(self.name)["injected"] = True
