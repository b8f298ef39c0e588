"""auth: `Authorization: Bearer <key>` -> user, tier and workspace.

    auth:                       # top-level section of config.yaml
      master_key: os.environ/GATEWAY_MASTER_KEY
      cache_ttl: 300s
    plugins:
      - auth                    # before every plugin that needs ctx.identity

Missing, unknown, revoked or disabled keys get 401 `invalid_api_key`; a key past its
`expires_at` gets 401 `key_expired`. The client's key
never reaches an upstream: dispatch sends only the deployment's configured credentials,
and no client header is forwarded. Keys are looked up by their SHA-256 (the store keeps
only that hash), through the Directory's TTL cache, so an authenticated request does
not touch the database. The master key authenticates /admin only: it has no user to
bill, so it is refused on the model endpoints.

A *service key* acts for the end user each request names by the app's own id (OpenAI's
`user` field, or an `X-End-User-Id` header): that user, found or created on first sight in
the key's workspace, becomes the request's identity (gateway/end_users.py; docs/admin.md
"End users by your app's ids"). Only then is the body read before the later plugins.
"""

from __future__ import annotations

import hmac
import time
from typing import Any

from gateway.end_users import END_USER_HEADER, act_for_end_user
from plugins.base import Identity, Plugin, Reject, RequestContext


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    token = token.strip()
    return token or None


def is_master_key(token: str, master_key: str | None) -> bool:
    if not master_key:
        return False
    return hmac.compare_digest(token.encode("utf-8", "surrogatepass"), master_key.encode())


def unauthorized(message: str) -> Reject:
    return Reject(401, message, type="invalid_request_error", code="invalid_api_key")


async def identify(headers: Any, config: Any, directory: Any) -> Identity:
    """The caller a request's key names (`Authorization: Bearer`, or `x-api-key`), or the
    401 `Reject` that says why not. Shared by this plugin and endpoints that must know
    the caller before the chain runs (the MCP endpoint, gateway/inbound/mcp.py)."""
    token = bearer_token(headers.get("Authorization"))
    if token is None:
        # openai-python sends `Bearer ` + api_key; some clients use x-api-key.
        token = (headers.get("x-api-key") or "").strip() or None
    if token is None:
        raise unauthorized("You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.")
    try:
        token.encode("utf-8")
    except UnicodeEncodeError:  # non-UTF-8 header bytes: no key of ours looks like that
        raise unauthorized("Incorrect API key provided.") from None
    if is_master_key(token, config.auth.master_key):
        raise unauthorized("The master key is for /admin endpoints only; use a user's API key here.")
    if directory is None:  # the store never opened: fail closed
        raise Reject(503, "The gateway's key store is not available.", type="server_error",
                     code="store_unavailable")
    found = await directory.identity(token)
    if found is None:
        raise unauthorized("Incorrect API key provided.")
    if found.revoked:
        raise unauthorized("This API key has been revoked.")
    if found.user_disabled:
        raise unauthorized("This API key's user is disabled.")
    if found.expires_at is not None and time.time() >= found.expires_at:
        raise Reject(401, "This API key has expired.", type="invalid_request_error", code="key_expired")
    return Identity(
        user_id=found.user_id,
        workspace_id=found.workspace_id,
        tier=found.tier,
        key_id=found.key_id,
        key_prefix=found.prefix,
        role="workspace_admin" if found.role == "workspace_admin" else "user",
        key_models=found.models,
        key_rpm=found.rpm,
        key_tpm=found.tpm,
        service=found.service,
    )


class Auth(Plugin):
    name = "auth"
    needs_body = False  # a caller is known (or refused) before its body is read

    async def on_request(self, ctx: RequestContext) -> None:
        identity = await identify(ctx.headers, ctx.config, self.services.directory)
        if identity.service or END_USER_HEADER in ctx.headers:
            identity = await act_for_end_user(ctx, identity, self.services.directory)
        ctx.identity = identity
