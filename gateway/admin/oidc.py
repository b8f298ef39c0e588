"""Dashboard sign-in with an OpenID Connect provider (Keycloak, Okta, Entra ID, Google, ...).

    dashboard:
      oidc:
        issuer: https://sso.example.com/realms/acme    # discovery: <issuer>/.well-known/openid-configuration
        client_id: ai-gateway
        client_secret: os.environ/GATEWAY_OIDC_SECRET  # unset: a public client (PKCE alone)
        role_claim: groups                              # dotted path into the ID token: realm_access.roles
        roles:                                          # the first listed value the user has wins
          gateway-admins: master
          acme-admins: {role: workspace_admin, workspace: acme}
          auditors: viewer                              # reads everything, changes nothing
          acme-staff: {role: viewer, workspace: acme}

The flow (docs/sso.md): GET /dashboard/oidc/login redirects to the provider with an
authorization code request (PKCE S256, `state`, `nonce`); GET /dashboard/oidc/callback takes
the pending login by the hash of its `state` (deleted as it is read: a replayed `state` finds
nothing, in any process), checks the browser's login cookie, exchanges the code with the PKCE
verifier, and validates the ID token: signature against the provider's JWKS (cached, fetched
again for an unknown `kid`), only the configured asymmetric algorithms (never `none`, never
HMAC), `iss`, `aud`, `exp`, `iat`, `nonce`, `azp`, `at_hash`. authlib does the OAuth client
(authorization URL, PKCE, code exchange) and its `CodeIDToken` the claim checks; joserfc the
JOSE (the same calls authlib's own OpenID clients make). Nothing here parses a token by hand.

The session: a random id in the `__Host-gw_session` cookie (HttpOnly, Secure, SameSite=Strict,
Path=/, Max-Age = `session_ttl`); the store keeps only its SHA-256 (migration 22) with the
subject, e-mail, role and workspace, so sign-out ends it for every gateway process and a
database read never yields a usable cookie. Its CSRF token is HMAC-SHA256(session id, ...):
bound to the session, derivable only from the cookie's value, never stored. Every /admin call
authenticated by the cookie alone goes through `session_scope`, which turns the session into
the same `Scope` a master key or a workspace admin key gets (the operations' authorization is
the one in gateway/admin/operations.py), refuses a change without the right `X-CSRF-Token`
(403) and any change by a viewer (403). A request with an `Authorization` header is
authenticated by its key as before and never looks at the cookie.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import html
import secrets
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import orjson
import structlog
from aiohttp import web

from gateway.admin.operations import Admin, Scope
from gateway.config import OidcConfig, OidcRole, https_or_loopback
from gateway.errors import ApiError
from gateway.lifecycle import new_request_id
from gateway.state import GATEWAY

if TYPE_CHECKING:
    from authlib.integrations.httpx_client import AsyncOAuth2Client
    from joserfc.jwk import KeySet

log = structlog.get_logger("gateway.admin.oidc")

SESSION_COOKIE = "__Host-gw_session"
LOGIN_COOKIE = "__Host-gw_oidc_login"  # binds a pending login to the browser that started it
CSRF_HEADER = "X-CSRF-Token"
LOGIN_TTL = 600.0  # seconds between the redirect to the provider and its callback
METADATA_TTL = 3600.0  # the discovery document and the JWKS are read again after this long
MAX_DOCUMENT_BYTES = 1 << 20  # a discovery document or a JWKS is a few KB
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
CALLBACK_PATH = "/dashboard/oidc/callback"
_CSRF_CONTEXT = b"gateway dashboard csrf v1"


def _sha256(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def csrf_token(session_id: str) -> str:
    """The CSRF token of a session: only the holder of the cookie's value can compute it."""
    return hmac.new(session_id.encode(), _CSRF_CONTEXT, hashlib.sha256).hexdigest()


class SignInRefused(Exception):
    """A callback that does not make a session. `code` is a fixed word the page shows and the
    tests check; `detail` goes to the log only (it may quote the provider)."""

    def __init__(self, code: str, detail: str, status: int = 403):
        super().__init__(detail)
        self.code, self.detail, self.status = code, detail, status


# Why a sign-in was refused, as the person at the browser reads it.
REFUSALS = {
    "provider_error": "The identity provider did not sign you in.",
    "provider_unreachable": "The identity provider could not be reached or answered unexpectedly.",
    "unknown_state": "This sign-in link was already used or has expired. Start again from the dashboard.",
    "browser_mismatch": "This sign-in was started in another browser. Start again from the dashboard.",
    "code_exchange_failed": "The identity provider refused the authorization code.",
    "invalid_id_token": "The identity provider's ID token was not valid for this gateway.",
    "no_role": "Your account has no role on this gateway (ask an administrator to grant one).",
    "unknown_workspace": "Your role names a workspace this gateway does not have.",
    "not_configured": "Sign-in with an identity provider is not configured on this gateway.",
    "too_many_logins": "Too many sign-ins are in progress on this gateway. Try again in a few minutes.",
}


# --------------------------------------------------------------------------- the provider


class OidcClient:
    """One configured provider: its discovery document and keys (cached), the authorization
    URL, the code exchange and the ID token's validation. Built once per `OidcConfig` (a
    config reload that changes the section builds a new one).

    authlib, joserfc and httpx (with cryptography, ~190 modules, several MiB per process) are
    imported by the methods that use them: a gateway without `dashboard.oidc` never loads
    them (docs/performance.md, the all-native gateway's RSS)."""

    def __init__(self, config: OidcConfig):
        self.config = config
        self._metadata: dict[str, Any] | None = None
        self._metadata_at = 0.0
        self._keys: KeySet | None = None
        self._keys_at = 0.0
        self._lock = asyncio.Lock()

    def _oauth(self, **kw: Any) -> AsyncOAuth2Client:
        from authlib.integrations.httpx_client import AsyncOAuth2Client

        return AsyncOAuth2Client(
            client_id=self.config.client_id, client_secret=self.config.client_secret,
            token_endpoint_auth_method="client_secret_basic" if self.config.client_secret else "none",
            code_challenge_method="S256", scope=" ".join(self.config.scopes), timeout=self.config.timeout,
            trust_env=False, **kw)

    async def _get_json(self, url: str) -> dict[str, Any]:
        """A discovery document or a JWKS: a JSON object of at most MAX_DOCUMENT_BYTES."""
        import httpx

        async with httpx.AsyncClient(timeout=self.config.timeout, trust_env=False, follow_redirects=False) as http:
            async with http.stream("GET", url, headers={"Accept": "application/json"}) as response:
                if response.status_code != 200:
                    raise SignInRefused("provider_unreachable", f"GET {url}: HTTP {response.status_code}", 502)
                raw = bytearray()
                async for chunk in response.aiter_bytes():
                    raw += chunk
                    if len(raw) > MAX_DOCUMENT_BYTES:
                        raise SignInRefused("provider_unreachable", f"GET {url}: over {MAX_DOCUMENT_BYTES} bytes", 502)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise SignInRefused("provider_unreachable", f"GET {url}: not JSON", 502) from None
        if not isinstance(body, dict):
            raise SignInRefused("provider_unreachable", f"GET {url}: not a JSON object", 502)
        return body

    async def metadata(self) -> dict[str, Any]:
        """The discovery document (OpenID Connect Discovery 1.0), checked: its `issuer` is the
        configured one exactly, its endpoints are https (http on loopback only)."""
        import httpx

        if self._metadata is not None and time.monotonic() - self._metadata_at < METADATA_TTL:
            return self._metadata
        url = self.config.issuer.rstrip("/") + "/.well-known/openid-configuration"
        try:
            found = await self._get_json(url)
        except httpx.HTTPError as exc:
            raise SignInRefused("provider_unreachable", f"GET {url}: {type(exc).__name__}", 502) from None
        if found.get("issuer") != self.config.issuer:
            raise SignInRefused("provider_unreachable",
                                f"discovery names issuer {str(found.get('issuer'))[:200]!r}, configured {self.config.issuer!r}",
                                502)
        for name in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
            try:
                https_or_loopback(str(found.get(name) or ""))
            except ValueError as exc:
                raise SignInRefused("provider_unreachable", f"discovery's {name}: {exc}", 502) from None
        self._metadata, self._metadata_at = found, time.monotonic()
        return found

    async def keys(self, *, refresh: bool = False) -> KeySet:
        """The provider's signing keys; `refresh`: read again now (a token names a `kid` we do
        not have: the provider rotated its keys). One read at a time."""
        import httpx
        from joserfc.errors import JoseError
        from joserfc.jwk import KeySet

        async with self._lock:
            fresh = self._keys is not None and time.monotonic() - self._keys_at < METADATA_TTL
            if fresh and not refresh:
                return self._keys
            url = (await self.metadata())["jwks_uri"]
            try:
                document = await self._get_json(url)
                key_set = KeySet.import_key_set(document)
            except httpx.HTTPError as exc:
                raise SignInRefused("provider_unreachable", f"GET {url}: {type(exc).__name__}", 502) from None
            except (JoseError, ValueError, TypeError, KeyError) as exc:
                raise SignInRefused("provider_unreachable", f"JWKS at {url}: {exc}", 502) from None
            self._keys, self._keys_at = key_set, time.monotonic()
            return key_set

    async def authorization_url(self, redirect_uri: str) -> tuple[str, str, str, str]:
        """(url, state, nonce, code_verifier) of a new authorization code request with PKCE."""
        metadata = await self.metadata()
        state, nonce, verifier = secrets.token_urlsafe(32), secrets.token_urlsafe(32), secrets.token_urlsafe(48)
        async with self._oauth(redirect_uri=redirect_uri) as client:
            url, _ = client.create_authorization_url(metadata["authorization_endpoint"], state=state, nonce=nonce,
                                                     code_verifier=verifier)
        return url, state, nonce, verifier

    async def exchange(self, code: str, verifier: str, redirect_uri: str) -> dict[str, Any]:
        """The token endpoint's answer to the code and its PKCE verifier."""
        import httpx

        metadata = await self.metadata()
        try:
            async with self._oauth(redirect_uri=redirect_uri) as client:
                token = await client.fetch_token(metadata["token_endpoint"], grant_type="authorization_code",
                                                 code=code, code_verifier=verifier)
        except httpx.HTTPError as exc:
            raise SignInRefused("provider_unreachable", f"token endpoint: {type(exc).__name__}", 502) from None
        except Exception as exc:  # authlib's OAuthError and friends: the provider said no
            raise SignInRefused("code_exchange_failed", f"token endpoint: {type(exc).__name__}: {exc}") from None
        if not isinstance(token, dict) or not isinstance(token.get("id_token"), str):
            raise SignInRefused("code_exchange_failed", "the token endpoint's answer has no id_token")
        return dict(token)

    async def validate_id_token(self, id_token: str, nonce: str, access_token: str | None) -> dict[str, Any]:
        """The ID token's claims, after its signature, algorithm and claims are checked."""
        from authlib.oidc.core import CodeIDToken
        from joserfc import jwt
        from joserfc.errors import InvalidKeyIdError, JoseError
        from joserfc.jws import JWSRegistry

        registry = JWSRegistry(algorithms=list(self.config.algorithms), strict_check_header=False)
        try:
            try:
                token = jwt.decode(id_token, await self.keys(), registry=registry)
            except InvalidKeyIdError:
                token = jwt.decode(id_token, await self.keys(refresh=True), registry=registry)
            claims = CodeIDToken(
                token.claims, token.header,
                options={"iss": {"essential": True, "value": self.config.issuer},
                         "aud": {"essential": True, "value": self.config.client_id},
                         "sub": {"essential": True}, "exp": {"essential": True}, "iat": {"essential": True},
                         "nonce": {"essential": True, "value": nonce}},
                params={"nonce": nonce, "client_id": self.config.client_id, "access_token": access_token})
            claims.validate(leeway=int(self.config.leeway))
        except (JoseError, ValueError, TypeError, KeyError) as exc:
            raise SignInRefused("invalid_id_token", f"{type(exc).__name__}: {exc}") from None
        if not isinstance(claims.get("sub"), str) or not claims["sub"]:
            raise SignInRefused("invalid_id_token", "sub is not a non-empty string")
        return dict(claims)


def claim_values(claims: dict[str, Any], path: str) -> list[str]:
    """The role claim's values: `path` is dotted (Keycloak's realm_access.roles); a string or a
    list of strings (anything else counts as none)."""
    node: Any = claims
    for part in path.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, str):
        return [node]
    if isinstance(node, list):
        return [v for v in node if isinstance(v, str)]
    return []


def role_for(claims: dict[str, Any], config: OidcConfig) -> OidcRole | None:
    """The first entry of `roles`, in the config's order, whose value the user's claim holds.
    Roles by e-mail address count only a verified address (`email_verified: true`): where
    people may type their own address at the provider, an unverified one proves nothing."""
    if config.role_claim == "email" and claims.get("email_verified") is not True:
        return None
    held = set(claim_values(claims, config.role_claim))
    for value, role in config.roles.items():
        if value in held:
            return role
    return None


# --------------------------------------------------------------------------- the session


@dataclass(frozen=True)
class Session:
    subject: str
    email: str | None
    role: str  # master | workspace_admin | viewer
    workspace_id: str | None
    expires_at: float

    def scope(self) -> Scope:
        """The authorization a master key or a workspace admin key has: a viewer reads as the
        master (no workspace) or as that workspace's admin, and changes nothing."""
        admin_role = "master" if self.workspace_id is None else "workspace_admin"
        return Scope(admin_role, self.workspace_id, subject=self.subject, email=self.email,
                     read_only=self.role == "viewer")

    def actor(self) -> Scope:
        """The audit's actor of a sign-in or sign-out: the session's own role (`viewer` too)."""
        return replace(self.scope(), role=self.role)


async def current_session(request: web.Request) -> tuple[str, Session] | None:
    """(the session id, its session) of the request's cookie, or None when there is no cookie.
    A cookie naming no live session (signed out, expired, OIDC switched off) is a 401."""
    session_id = request.cookies.get(SESSION_COOKIE)
    if not session_id:
        return None
    gw = request.app[GATEWAY]
    if gw.config.dashboard.oidc is None:
        raise ApiError(401, "dashboard sign-in is not configured on this gateway", code="invalid_session")
    row = await gw.store.dashboard_session(_sha256(session_id)) if len(session_id) <= 100 else None
    if row is None:
        raise ApiError(401, "this dashboard session has ended; sign in again", code="invalid_session")
    if row["expires_at"] <= time.time():
        raise ApiError(401, "this dashboard session has expired; sign in again", code="session_expired")
    return session_id, Session(row["subject"], row["email"], row["role"], row["workspace_id"], row["expires_at"])


async def session_scope(request: web.Request) -> Scope | None:
    """The `Scope` of a request authenticated by its session cookie (None: no cookie). A change
    (POST, PUT, PATCH, DELETE) needs the session's CSRF token in X-CSRF-Token, and is refused to
    a viewer, before any operation runs."""
    found = await current_session(request)
    if found is None:
        return None
    session_id, session = found
    if request.method in UNSAFE_METHODS:
        check_csrf(request, session_id)
        if session.role == "viewer":
            raise ApiError(403, "a viewer session can only read", code="forbidden")
    return session.scope()


def check_csrf(request: web.Request, session_id: str) -> None:
    """A change made with the session cookie carries the session's CSRF token, or is a 403."""
    sent = request.headers.get(CSRF_HEADER)
    if not sent:
        raise ApiError(403, f"a change made with the dashboard session needs its {CSRF_HEADER} header",
                       code="csrf_token_missing")
    if not hmac.compare_digest(sent.encode(), csrf_token(session_id).encode()):
        raise ApiError(403, f"the {CSRF_HEADER} header is not this session's", code="csrf_token_invalid")


# --------------------------------------------------------------------------- the routes

OIDC_CLIENTS = web.AppKey("oidc_clients", dict)


def oidc_client(request: web.Request) -> OidcClient:
    """The client of the config this request runs on (one per config section: cached keys)."""
    config = request.app[GATEWAY].config.dashboard.oidc
    if config is None:
        raise SignInRefused("not_configured", "dashboard.oidc is not set", 404)
    clients = request.app[OIDC_CLIENTS]
    key = config.model_dump_json()
    client = clients.get(key)
    if client is None:
        clients.clear()  # a reload replaced the section: the old provider's keys go with it
        client = clients[key] = OidcClient(config)
    return client


def _redirect_uri(request: web.Request, config: OidcConfig) -> str:
    return config.redirect_uri or f"{request.scheme}://{request.host}{CALLBACK_PATH}"


def _refusal_page(refused: SignInRefused) -> web.Response:
    message = REFUSALS.get(refused.code, "Sign-in failed.")
    body = ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Sign-in refused</title>"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            "<link rel=\"stylesheet\" href=\"/dashboard/static/dashboard.css\"></head>"
            "<body><header><h1>AI gateway</h1></header><main><section><h2>Sign-in refused</h2>"
            f"<p id=\"signin-refused\" class=\"error\" role=\"alert\" data-code=\"{html.escape(refused.code)}\">"
            f"{html.escape(message)}</p><p><a href=\"/dashboard\">Back to the dashboard</a></p></section></main>"
            "</body></html>")
    response = web.Response(status=refused.status, text=body, content_type="text/html")
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Frame-Options"] = "DENY"
    response.del_cookie(LOGIN_COOKIE, path="/", secure=True, httponly=True, samesite="Lax")
    return response


def _set_cookie(response: web.StreamResponse, name: str, value: str, max_age: int, same_site: str) -> None:
    # Secure also on http://127.0.0.1 and http://localhost: browsers count loopback as a
    # secure context and keep such a cookie (docs/sso.md); anywhere else the gateway is
    # served over https, or behind a proxy that is.
    response.set_cookie(name, value, max_age=max_age, path="/", secure=True, httponly=True, samesite=same_site)


def oidc_routes() -> list[web.AbstractRouteDef]:
    async def provider(request: web.Request) -> web.Response:
        """Whether the page offers a provider button, and its name (public: no secret in it)."""
        config = request.app[GATEWAY].config.dashboard.oidc
        payload = {"oidc": None if config is None else {"name": config.display_name,
                                                       "login": "/dashboard/oidc/login"}}
        return web.Response(body=orjson.dumps(payload), content_type="application/json",
                            headers={"Cache-Control": "no-store"})

    async def login(request: web.Request) -> web.StreamResponse:
        try:
            client = oidc_client(request)
            redirect_uri = _redirect_uri(request, client.config)
            url, state, nonce, verifier = await client.authorization_url(redirect_uri)
        except SignInRefused as refused:
            log.warning("oidc_login_failed", code=refused.code, detail=refused.detail)
            return _refusal_page(refused)
        browser = secrets.token_urlsafe(32)
        now = time.time()
        # bounded: an anonymous client cannot fill the table with pending logins
        created = await request.app[GATEWAY].store.create_oidc_login({
            "state_hash": _sha256(state), "browser_hash": _sha256(browser), "nonce": nonce,
            "code_verifier": verifier, "redirect_uri": redirect_uri, "created_at": now, "expires_at": now + LOGIN_TTL},
            limit=client.config.max_pending_logins)
        if not created:
            log.warning("oidc_login_refused", code="too_many_logins", limit=client.config.max_pending_logins)
            refused = _refusal_page(SignInRefused("too_many_logins", "pending logins at the limit", status=429))
            refused.headers["Retry-After"] = "60"
            return refused
        response = web.HTTPFound(url)
        response.headers["Cache-Control"] = "no-store"
        # Lax, not Strict: the provider's redirect back is a cross-site navigation, on which a
        # Strict cookie would not be sent.
        _set_cookie(response, LOGIN_COOKIE, browser, int(LOGIN_TTL), "Lax")
        return response

    async def callback(request: web.Request) -> web.StreamResponse:
        gw = request.app[GATEWAY]
        try:
            session_id, session = await _finish_sign_in(request)
        except SignInRefused as refused:
            log.warning("oidc_sign_in_refused", code=refused.code, detail=refused.detail,
                        request_id=new_request_id(request))
            return _refusal_page(refused)
        admin = Admin(gw.store, gw.config, gw.directory, via="api", request_id=new_request_id(request))
        await admin.session_event(session.actor(), "session.sign_in", {"role": session.role,
                                                                      "expires_at": session.expires_at})
        response = web.HTTPSeeOther("/dashboard")
        response.headers["Cache-Control"] = "no-store"
        _set_cookie(response, SESSION_COOKIE, session_id, int(gw.config.dashboard.oidc.session_ttl), "Strict")
        response.del_cookie(LOGIN_COOKIE, path="/", secure=True, httponly=True, samesite="Lax")
        return response

    async def whoami(request: web.Request) -> web.Response:
        """The signed-in session: who, which role, until when, and its CSRF token (readable by
        this origin's pages only: the cookie is SameSite=Strict and no CORS header is sent)."""
        found = await current_session(request)
        if found is None:
            raise ApiError(401, "no dashboard session (sign in at /dashboard)", code="invalid_session")
        session_id, session = found
        workspace = (await request.app[GATEWAY].store.get_workspace(session.workspace_id)
                     if session.workspace_id is not None else None)
        payload = {"subject": session.subject, "email": session.email, "role": session.role,
                   "workspaceId": session.workspace_id, "workspaceName": workspace.name if workspace else None,
                   "expiresAt": session.expires_at,
                   "csrfToken": csrf_token(session_id), "csrfHeader": CSRF_HEADER}
        return web.Response(body=orjson.dumps(payload), content_type="application/json",
                            headers={"Cache-Control": "no-store"})

    async def sign_out(request: web.Request) -> web.Response:
        """Any role may end its own session (a viewer too); the CSRF token is needed all the same."""
        gw = request.app[GATEWAY]
        found = await current_session(request)
        if found is None:
            raise ApiError(401, "no dashboard session to sign out of", code="invalid_session")
        session_id, session = found
        check_csrf(request, session_id)
        await gw.store.delete_dashboard_session(_sha256(session_id))
        admin = Admin(gw.store, gw.config, gw.directory, via="api", request_id=new_request_id(request))
        await admin.session_event(session.actor(), "session.sign_out", None)
        response = web.Response(status=204, headers={"Cache-Control": "no-store"})
        response.del_cookie(SESSION_COOKIE, path="/", secure=True, httponly=True, samesite="Strict")
        return response

    return [
        web.get("/dashboard/oidc/provider", provider),
        web.get("/dashboard/oidc/login", login),
        web.get(CALLBACK_PATH, callback),
        web.get("/admin/session", whoami),
        web.delete("/admin/session", sign_out),
    ]


async def _finish_sign_in(request: web.Request) -> tuple[str, Session]:
    """The callback's work: the pending login, the code exchange, the ID token, the role."""
    gw = request.app[GATEWAY]
    client = oidc_client(request)
    config = client.config
    state = request.query.get("state") or ""
    pending = await gw.store.take_oidc_login(_sha256(state)) if 0 < len(state) <= 200 else None
    if pending is None or pending["expires_at"] <= time.time():
        raise SignInRefused("unknown_state", "no pending login has this state (used, expired or made up)")
    browser = request.cookies.get(LOGIN_COOKIE) or ""
    if not hmac.compare_digest(_sha256(browser), pending["browser_hash"]):
        raise SignInRefused("browser_mismatch", "the login cookie is missing or is not this login's")
    if request.query.get("error"):
        raise SignInRefused("provider_error", f"the provider answered error={request.query['error'][:100]!r}")
    code = request.query.get("code")
    if not code or len(code) > 4096:
        raise SignInRefused("provider_error", "the callback has no code")
    token = await client.exchange(code, pending["code_verifier"], pending["redirect_uri"])
    claims = await client.validate_id_token(token["id_token"], pending["nonce"], token.get("access_token"))
    role = role_for(claims, config)
    if role is None:
        raise SignInRefused("no_role", f"sub {claims['sub'][:100]!r}: no value of {config.role_claim!r} is in roles")
    workspace_id = None
    if role.workspace is not None:
        workspace = await gw.store.get_workspace(role.workspace)
        if workspace is None:
            raise SignInRefused("unknown_workspace", f"role names workspace {role.workspace!r}, which does not exist")
        workspace_id = workspace.id
    email = claims.get("email") if isinstance(claims.get("email"), str) else None
    session_id = secrets.token_urlsafe(32)
    now = time.time()
    session = Session(claims["sub"][:255], email[:320] if email else None, role.role, workspace_id,
                      now + config.session_ttl)
    await gw.store.create_dashboard_session({
        "id_hash": _sha256(session_id), "subject": session.subject, "email": session.email, "role": session.role,
        "workspace_id": session.workspace_id, "created_at": now, "expires_at": session.expires_at})
    return session_id, session


def install_oidc(app: web.Application) -> None:
    """The routes and the per-app client cache (create_app)."""
    app[OIDC_CLIENTS] = {}
    app.router.add_routes(oidc_routes())
