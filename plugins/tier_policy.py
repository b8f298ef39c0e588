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
"""

from __future__ import annotations

from plugins.base import Plugin, Reject, RequestContext


class TierPolicy(Plugin):
    name = "tier_policy"

    async def on_request(self, ctx: RequestContext) -> None:
        if ctx.identity is None:
            return  # no caller identity (auth not configured): nothing to enforce
        tier = ctx.config.tiers.get(ctx.identity.tier)
        if tier is None:  # the user's tier was removed from config.yaml: fail closed
            raise Reject(403, f"Your tier '{ctx.identity.tier}' is not configured on this gateway.",
                         type="invalid_request_error", code="tier_not_configured")
        if ctx.endpoint == "models":
            ctx.visible_models = [m for m in ctx.visible_models if tier.allows(m)]
            return
        if not ctx.candidates:
            return  # unknown model: the core answers 404
        requested = ctx.requested_model
        allowed = ctx.config.tier_ladder(ctx.identity.tier, requested)
        if not allowed:
            raise Reject(403, f"Your tier '{ctx.identity.tier}' may not use the model '{requested}'.",
                         type="invalid_request_error", code="model_not_allowed", param="model")
        if allowed[0] != requested:
            ctx.downgrade_reason = f"tier '{ctx.identity.tier}' does not allow {requested}"
        ctx.candidates = list(allowed)
        ctx.fallback_allowed = ctx.config.tier_models(ctx.identity.tier)
