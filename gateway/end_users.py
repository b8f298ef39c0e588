"""End users by the app's own ids: a service key acts for the end user a request names.

An app that bills its own users through the gateway need not provision and store one
gateway key per user: one *service key* (`./gw keys create USER --service`, scoped to that
user's workspace) names the end user on each request, by OpenAI's own `user` field (chat
completions, embeddings, responses; `metadata.user_id` on /v1/messages) or an
`X-End-User-Id` header. The gateway finds that user in the key's workspace, or creates it
on first sight with the workspace's starting tier and energy (`end_users:` in config.yaml),
and the request runs as that user: energy, rate limits, budgets, usage rows and logs are
theirs. The key's own controls (models, rpm, tpm, expiry) still apply, to the key as a whole.

Rules (docs/admin.md "End users by your app's ids"):

* ids are scoped to the key's workspace: the same id in two workspaces is two users, and a
  service key can name no user of another workspace;
* an id is 1 to 128 characters of `A-Z a-z 0-9 _ . : @ + = / | -`; anything else is a 400
  (`invalid_end_user`), as are a header and a body naming two different users;
* a service key without an end user is refused on the billed endpoints (400
  `end_user_required`): a forgotten field must not bill one shared account; elsewhere
  (`GET /v1/models`, stored responses) it acts as its own user;
* an ordinary key acts only for itself: its `user` field is forwarded as today, and an
  `X-End-User-Id` header from it is a 403 (`end_user_not_allowed`);
* the `user` field is forwarded upstream unchanged (it is OpenAI's abuse-monitoring id,
  and the app's own id is what the app expects there); the header is not added to the body.

Provisioning is exactly once per (workspace, id), whatever the concurrency and the number
of processes: a unique index decides (Store.end_user). Each provisioning is one audit row
(`user.provision`, actor `service_key`).
"""

from __future__ import annotations

import re
from typing import Any

from plugins.base import Identity, Reject, RequestContext

END_USER_HEADER = "X-End-User-Id"
MAX_END_USER_CHARS = 128
_END_USER_ID = re.compile(r"[A-Za-z0-9_.:@+=/|-]{1,%d}" % MAX_END_USER_CHARS)
# Endpoints whose body carries OpenAI's `user` field (the /v1/messages body is translated to
# an OpenAI one: its metadata.user_id became `user`).
USER_FIELD_ENDPOINTS = frozenset({"chat.completions", "embeddings", "messages", "responses"})


def _invalid(param: str) -> Reject:
    return Reject(400, f"'{param}' must name an end user: 1 to {MAX_END_USER_CHARS} characters of letters, "
                       "digits and _ . : @ + = / | -", type="invalid_request_error", code="invalid_end_user",
                  param=param)


def checked_id(value: Any, param: str) -> str:
    if not isinstance(value, str) or _END_USER_ID.fullmatch(value) is None:
        raise _invalid(param)
    return value


async def named_end_user(ctx: RequestContext) -> str | None:
    """The end user a service key's request names (header or `user` field), checked."""
    header = ctx.headers.get(END_USER_HEADER)
    named = None if header is None else checked_id(header, END_USER_HEADER)
    if ctx.endpoint in USER_FIELD_ENDPOINTS:
        await ctx.need_body()
        field = ctx.body.get("user")
        if field is not None:
            field = checked_id(field, "user")
            if named is not None and field != named:
                raise Reject(400, f"The '{END_USER_HEADER}' header and the 'user' field name different end users.",
                             type="invalid_request_error", code="invalid_end_user", param="user")
            named = field
    return named


async def act_for_end_user(ctx: RequestContext, key: Identity, directory: Any) -> Identity:
    """The identity a request made with `key` runs as: the end user it names (found or
    provisioned) for a service key, the key's own user otherwise."""
    if not key.service:
        if ctx.headers.get(END_USER_HEADER) is not None:
            raise Reject(403, f"Only a service key can act for an end user ('{END_USER_HEADER}'); this key acts "
                              "for its own user.", type="invalid_request_error", code="end_user_not_allowed",
                         param=END_USER_HEADER)
        return key
    external_id = await named_end_user(ctx)
    if external_id is None:
        if ctx.billed:
            raise Reject(400, "A service key must name the end user it acts for: OpenAI's 'user' field "
                              f"(metadata.user_id on /v1/messages) or an '{END_USER_HEADER}' header.",
                         type="invalid_request_error", code="end_user_required", param="user")
        return key

    async def start() -> dict[str, Any]:
        workspace = await directory.workspace(key.workspace_id)
        config = ctx.config
        chosen = config.end_users.start(key.workspace_id, getattr(workspace, "name", None), config.auth.default_tier)
        refill = config.tiers[chosen.tier].refill
        energy = chosen.energy if chosen.energy is not None else (refill.amount if refill is not None else 0)
        return {"tier": chosen.tier, "energy": energy, "start_refill_period": refill is not None}

    user, created = await directory.end_user(key.workspace_id, external_id, start)
    if created:
        await directory.store.append_audit({
            "actor": "service_key", "actor_key_id": key.key_id, "actor_key_prefix": key.key_prefix,
            "via": "gateway", "action": "user.provision", "target": user.id, "workspace_id": user.workspace_id,
            "before": None, "after": {"external_id": external_id, "tier": user.tier, "energy": user.energy},
            "request_id": ctx.request_id,
        })
    if user.disabled:
        raise Reject(403, "This end user is disabled.", type="invalid_request_error", code="end_user_disabled")
    return Identity(
        user_id=user.id, workspace_id=user.workspace_id, tier=user.tier, key_id=key.key_id,
        key_prefix=key.key_prefix, role="user", key_models=key.key_models, key_rpm=key.key_rpm,
        key_tpm=key.key_tpm, service=True, end_user=external_id,
    )
