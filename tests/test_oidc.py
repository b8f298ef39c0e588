"""Dashboard sign-in with an OpenID Connect provider (gateway/admin/oidc.py, docs/sso.md).

A fake provider runs on 127.0.0.1 and speaks the real protocol: discovery, a JWKS, an
authorize endpoint that redirects back with a code, a token endpoint that checks the client's
secret and the PKCE verifier and answers an ID token signed with a real RSA key (joserfc).
The gateway is a real one on a real store; the sign-in is driven through raw HTTP (cookies
read from Set-Cookie and sent back by hand, as a browser does) and, once, in Chromium.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from aiohttp import web
from joserfc import jwt
from joserfc.jwk import RSAKey

from gateway.config import ConfigError, load_config_data
from tests.conftest import MASTER_KEY, base_config
from tests.test_dashboard import WAIT, find_chromium

CLIENT_ID = "ai-gateway"
CLIENT_SECRET = "oidc-client-secret-0123456789"
ROLES = {
    "gw-admins": "master",
    "acme-admins": {"role": "workspace_admin", "workspace": "acme"},
    "auditors": "viewer",
    "acme-staff": {"role": "viewer", "workspace": "acme"},
}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class FakeOidcProvider:
    """A provider on 127.0.0.1. `user`: the claims of whoever signs in next; `tamper`: what is
    wrong with the next ID token (wrong_aud, expired, alg_none, wrong_signature, wrong_nonce)."""

    user: dict[str, Any] = field(default_factory=dict)
    tamper: str | None = None
    key: RSAKey = field(default_factory=lambda: RSAKey.generate_key(2048, parameters={"kid": "k1", "use": "sig"}))
    codes: dict[str, dict[str, Any]] = field(default_factory=dict)
    authorize_requests: list[dict[str, str]] = field(default_factory=list)
    token_requests: list[dict[str, str]] = field(default_factory=list)
    jwks_fetches: int = 0
    url: str = ""
    # The host the browser is sent to for the authorize endpoint: "localhost" makes the
    # provider another site than the gateway on 127.0.0.1 (its redirects cross sites, as a
    # real provider's do); the gateway reaches discovery, JWKS and token on 127.0.0.1.
    browser_host: str = "127.0.0.1"
    public_client: bool = False  # the client has no secret: PKCE alone proves it
    _runner: Any = None

    @property
    def issuer(self) -> str:
        return self.url + "/realms/test"

    async def start(self) -> "FakeOidcProvider":
        app = web.Application()
        app.router.add_get("/realms/test/.well-known/openid-configuration", self.discovery)
        app.router.add_get("/realms/test/jwks", self.jwks)
        app.router.add_get("/realms/test/authorize", self.authorize)
        app.router.add_post("/realms/test/token", self.token)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def stop(self) -> None:
        await self._runner.cleanup()

    def rotate_key(self) -> None:
        self.key = RSAKey.generate_key(2048, parameters={"kid": f"k{secrets.token_hex(4)}", "use": "sig"})

    async def discovery(self, request: web.Request) -> web.Response:
        return web.json_response({
            "issuer": self.issuer,
            "authorization_endpoint": self.issuer.replace("127.0.0.1", self.browser_host, 1) + "/authorize",
            "token_endpoint": self.issuer + "/token",
            "jwks_uri": self.issuer + "/jwks",
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "code_challenge_methods_supported": ["S256"],
        })

    async def jwks(self, request: web.Request) -> web.Response:
        self.jwks_fetches += 1
        return web.json_response({"keys": [self.key.as_dict(private=False)]})

    async def authorize(self, request: web.Request) -> web.Response:
        q = dict(request.query)
        self.authorize_requests.append({**q, "host": request.host})
        assert q["response_type"] == "code" and q["client_id"] == CLIENT_ID
        assert q["code_challenge_method"] == "S256" and len(q["code_challenge"]) >= 43
        assert "openid" in q["scope"].split()
        code = secrets.token_urlsafe(16)
        self.codes[code] = {"challenge": q["code_challenge"], "redirect_uri": q["redirect_uri"], "nonce": q["nonce"],
                            "user": dict(self.user), "tamper": self.tamper}
        raise web.HTTPFound(q["redirect_uri"] + "?" + urlencode({"code": code, "state": q["state"]}))

    async def token(self, request: web.Request) -> web.Response:
        form = dict(await request.post())
        self.token_requests.append(form)
        basic = request.headers.get("Authorization", "")
        expected = "Basic " + base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
        if self.public_client:
            if basic or form.get("client_id") != CLIENT_ID or "client_secret" in form:
                return web.json_response({"error": "invalid_client"}, status=401)
        elif basic != expected:
            return web.json_response({"error": "invalid_client"}, status=401)
        grant = self.codes.pop(form.get("code", ""), None)  # a code is good once
        if grant is None or form.get("grant_type") != "authorization_code":
            return web.json_response({"error": "invalid_grant"}, status=400)
        if form.get("redirect_uri") != grant["redirect_uri"]:
            return web.json_response({"error": "invalid_grant", "error_description": "redirect_uri"}, status=400)
        verifier = form.get("code_verifier", "")
        if b64url(hashlib.sha256(verifier.encode()).digest()) != grant["challenge"]:
            return web.json_response({"error": "invalid_grant", "error_description": "PKCE verifier"}, status=400)
        access_token = secrets.token_urlsafe(24)
        return web.json_response({"access_token": access_token, "token_type": "Bearer", "expires_in": 300,
                                  "id_token": self.id_token(grant, access_token)})

    def id_token(self, grant: dict[str, Any], access_token: str) -> str:
        now = int(time.time())
        claims = {"iss": self.issuer, "aud": CLIENT_ID, "azp": CLIENT_ID, "iat": now, "exp": now + 300,
                  "nonce": grant["nonce"], **grant["user"]}
        tamper = grant["tamper"]
        if tamper == "wrong_aud":
            claims["aud"], claims["azp"] = "another-app", "another-app"
        elif tamper == "expired":
            claims["iat"], claims["exp"] = now - 7200, now - 3600
        elif tamper == "wrong_nonce":
            claims["nonce"] = "not-the-nonce-the-gateway-sent"
        elif tamper == "wrong_issuer":
            claims["iss"] = self.url + "/realms/other"
        if tamper == "alg_none":  # unsigned: header {"alg": "none"}, an empty signature
            header = b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
            return f"{header}.{b64url(json.dumps(claims).encode())}."
        key = self.key
        if tamper == "wrong_signature":  # another key that claims the provider's kid
            key = RSAKey.generate_key(2048, parameters={"kid": self.key.kid})
        elif tamper == "stranger_key":  # a key the provider never published (the JWKS is read again, once)
            key = RSAKey.generate_key(2048, parameters={"kid": "stranger"})
        return jwt.encode({"alg": "RS256", "kid": key.kid, "typ": "JWT"}, claims, key)


@pytest.fixture
def provider(server_thread):
    fake = server_thread.run(FakeOidcProvider().start())
    yield fake
    server_thread.run(fake.stop())


def oidc_settings(provider: FakeOidcProvider, **overrides: Any) -> dict[str, Any]:
    return {"oidc": {"issuer": provider.issuer, "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET,
                     "role_claim": "groups", "roles": ROLES, "name": "Fake SSO", **overrides}}


@pytest.fixture
def oidc_gateway(gateway_factory, provider):
    """A gateway with OIDC sign-in, workspaces acme and globex, a user in each."""
    gw = gateway_factory(dashboard=oidc_settings(provider))
    acme_user, _ = gw.make_user(workspace="acme")
    globex_user, _ = gw.make_user(workspace="globex")
    gw.users = {"acme": acme_user, "globex": globex_user}
    return gw


# --------------------------------------------------------------------------- a browser by hand


class Browser:
    """Cookies as a browser keeps them for one origin: set by Set-Cookie, sent back as Cookie."""

    def __init__(self) -> None:
        self.cookies: dict[str, str] = {}
        self.attributes: dict[str, Any] = {}
        self.http = httpx.Client(timeout=20, follow_redirects=False)

    def take(self, response: httpx.Response) -> None:
        for header in response.headers.get_list("set-cookie"):
            jar = SimpleCookie()
            jar.load(header)
            for name, morsel in jar.items():
                self.attributes[name] = morsel
                if morsel["max-age"] == "0" or morsel.value == "":
                    self.cookies.pop(name, None)
                else:
                    self.cookies[name] = morsel.value

    def request(self, method: str, url: str, **kw: Any) -> httpx.Response:
        headers = dict(kw.pop("headers", {}) or {})
        if self.cookies and url.startswith(("http://127.0.0.1", "http://localhost")):
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        response = self.http.request(method, url, headers=headers, **kw)
        self.take(response)
        return response


def sign_in(gw: Any, provider: FakeOidcProvider, groups: list[str], *, tamper: str | None = None,
            sub: str = "user-1", email: str = "ada@example.com", tab: Browser | None = None
            ) -> tuple[Browser, httpx.Response]:
    """The whole code flow: the gateway's login redirect, the provider's authorize redirect,
    the gateway's callback. Returns the browser and the callback's answer."""
    provider.user = {"sub": sub, "email": email, "groups": groups}
    provider.tamper = tamper
    tab = tab or Browser()
    start = tab.request("GET", gw.url + "/dashboard/oidc/login")
    assert start.status_code == 302, start.text
    assert start.headers["location"].startswith(provider.issuer + "/authorize?")
    authorize = tab.request("GET", start.headers["location"])
    assert authorize.status_code == 302
    callback_url = authorize.headers["location"]
    assert callback_url.startswith(gw.url + "/dashboard/oidc/callback?")
    tab.last_callback = callback_url
    tab.login_cookie = tab.cookies["__Host-gw_oidc_login"]
    return tab, tab.request("GET", callback_url)


def signed_in(gw: Any, provider: FakeOidcProvider, groups: list[str], **kw: Any) -> tuple[Browser, str]:
    """A signed-in tab and its session's CSRF token."""
    tab, done = sign_in(gw, provider, groups, **kw)
    assert done.status_code == 303 and done.headers["location"] == "/dashboard", done.text
    assert "__Host-gw_session" in tab.cookies
    me = tab.request("GET", gw.url + "/admin/session")
    assert me.status_code == 200, me.text
    return tab, me.json()["csrfToken"]


def refusal_code(response: httpx.Response) -> str:
    assert "__Host-gw_session" not in response.headers.get("set-cookie", "")
    marker = 'data-code="'
    start = response.text.index(marker) + len(marker)
    return response.text[start:response.text.index('"', start)]


# --------------------------------------------------------------------------- sign-in


@pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)
def test_the_code_flow_with_pkce_makes_a_session_whose_cookie_is_httponly_secure_strict(oidc_gateway, provider):
    gw = oidc_gateway
    tab, done = sign_in(gw, provider, ["gw-admins"])
    assert done.status_code == 303 and done.headers["location"] == "/dashboard"
    cookie = tab.attributes["__Host-gw_session"]
    assert cookie["httponly"] and cookie["secure"] and cookie["samesite"] == "Strict" and cookie["path"] == "/"
    assert int(cookie["max-age"]) == 8 * 3600
    assert "__Host-gw_oidc_login" not in tab.cookies  # the pending login's cookie is cleared
    # The authorization request carried PKCE (S256), a state and a nonce; the token request
    # the verifier (the fake checks it against the challenge) and the client's secret.
    asked = provider.authorize_requests[-1]
    assert asked["code_challenge_method"] == "S256" and asked["state"] and asked["nonce"]
    assert asked["redirect_uri"] == gw.url + "/dashboard/oidc/callback"
    assert provider.token_requests[-1]["code_verifier"]
    # The store keeps the session id's hash only.
    session_id = tab.cookies["__Host-gw_session"]
    assert gw.run(gw.store.dashboard_session(session_id)) is None
    assert gw.run(gw.store.dashboard_session(hashlib.sha256(session_id.encode()).hexdigest()))["role"] == "master"

    me = tab.request("GET", gw.url + "/admin/session").json()
    assert (me["role"], me["workspaceId"], me["subject"], me["email"]) == ("master", None, "user-1", "ada@example.com")
    assert me["expiresAt"] > time.time() + 8 * 3600 - 60
    # The session is the master's: every workspace, and changes with the CSRF token.
    names = {w["name"] for w in tab.request("GET", gw.url + "/admin/workspaces").json()}
    assert names == {"acme", "globex"}
    created = tab.request("POST", gw.url + "/admin/workspaces", json={"name": "initech"},
                              headers={"X-CSRF-Token": me["csrfToken"]})
    assert created.status_code == 201, created.text
    # The audit names the person and the role.
    rows = tab.request("GET", gw.url + "/admin/audit").json()
    made = next(r for r in rows if r["action"] == "workspace.create")
    assert (made["actor"], made["actor_subject"], made["actor_email"]) == ("master", "user-1", "ada@example.com")
    signed = next(r for r in rows if r["action"] == "session.sign_in")
    assert (signed["actor_subject"], signed["after"]["role"]) == ("user-1", "master")


@pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)
def test_pending_logins_are_bounded_past_the_limit_a_login_is_refused_with_429(gateway_factory, provider):
    gw = gateway_factory(dashboard=oidc_settings(provider, max_pending_logins=3))
    gw.make_user(workspace="acme")
    provider.user = {"sub": "user-1", "email": "ada@example.com", "groups": ["gw-admins"]}
    tabs = [Browser() for _ in range(3)]
    starts = [tab.request("GET", gw.url + "/dashboard/oidc/login") for tab in tabs]
    assert [s.status_code for s in starts] == [302, 302, 302]
    anonymous = Browser()
    refused = anonymous.request("GET", gw.url + "/dashboard/oidc/login")
    assert refused.status_code == 429 and refusal_code(refused) == "too_many_logins"
    assert "Too many sign-ins" in refused.text and refused.headers["Retry-After"] == "60"
    assert "location" not in refused.headers and "__Host-gw_oidc_login" not in anonymous.cookies
    # the pending ones still finish; one finished frees its place
    authorize = tabs[0].request("GET", starts[0].headers["location"])
    done = tabs[0].request("GET", authorize.headers["location"])
    assert done.status_code == 303 and "__Host-gw_session" in tabs[0].cookies, done.text
    assert anonymous.request("GET", gw.url + "/dashboard/oidc/login").status_code == 302
    assert Browser().request("GET", gw.url + "/dashboard/oidc/login").status_code == 429


def test_the_pending_logins_bound_is_validated(provider):
    base = {"models": [{"name": "demo", "litellm_params": {"model": "demo/offline"}}]}
    assert load_config_data({**base, "dashboard": oidc_settings(provider)}).dashboard.oidc.max_pending_logins == 10_000
    with pytest.raises(ConfigError) as err:
        load_config_data({**base, "dashboard": oidc_settings(provider, max_pending_logins=0)})
    assert any(line.startswith("dashboard.oidc.max_pending_logins") for line in err.value.errors), err.value.errors


def test_a_public_client_without_a_secret_signs_in_with_pkce_alone(gateway_factory, provider):
    settings = oidc_settings(provider)
    del settings["oidc"]["client_secret"]
    gw = gateway_factory(dashboard=settings)
    provider.public_client = True
    tab, _ = signed_in(gw, provider, ["gw-admins"])
    assert provider.token_requests[-1]["client_id"] == CLIENT_ID and provider.token_requests[-1]["code_verifier"]


def test_the_provider_button_is_offered_only_when_oidc_is_configured(gateway_factory, provider):
    with_oidc = gateway_factory(dashboard=oidc_settings(provider))
    assert httpx.get(with_oidc.url + "/dashboard/oidc/provider").json() == {
        "oidc": {"name": "Fake SSO", "login": "/dashboard/oidc/login"}}
    without = gateway_factory()
    assert httpx.get(without.url + "/dashboard/oidc/provider").json() == {"oidc": None}
    assert httpx.get(without.url + "/dashboard/oidc/login").status_code == 404


# --------------------------------------------------------------------------- roles


def test_a_workspace_admin_session_manages_its_workspace_and_cannot_touch_another(oidc_gateway, provider):
    gw = oidc_gateway
    tab, csrf = signed_in(gw, provider, ["acme-admins"], sub="wa-1", email="wa@example.com")
    me = tab.request("GET", gw.url + "/admin/session").json()
    acme = gw.run(gw.store.get_workspace("acme"))
    assert (me["role"], me["workspaceId"], me["workspaceName"]) == ("workspace_admin", acme.id, "acme")
    assert [w["name"] for w in tab.request("GET", gw.url + "/admin/workspaces").json()] == ["acme"]
    made = tab.request("POST", gw.url + "/admin/users", json={"name": "new hire"}, headers={"X-CSRF-Token": csrf})
    assert made.status_code == 201, made.text
    assert made.json()["workspace_id"] == acme.id
    # Another workspace's objects: refused exactly as for acme's workspace admin key (the
    # same authorization: 404 "not found in your workspace" or 403), reads and changes alike.
    _, acme_admin_key = gw.make_user(workspace="acme", role="workspace_admin")
    globex_user = gw.users["globex"]
    for method, path, body in [("GET", f"/admin/users/{globex_user}", None),
                               ("GET", f"/admin/users/{globex_user}/ledger", None),
                               ("GET", "/admin/usage/daily?workspace=globex", None),
                               ("POST", f"/admin/users/{globex_user}/keys", {}),
                               ("PATCH", f"/admin/users/{globex_user}", {"tier": "free"}),
                               ("PATCH", "/admin/workspaces/globex", {"profile": {"x": 1}}),
                               ("POST", "/admin/users", {"workspace": "globex"})]:
        refused = tab.request(method, gw.url + path, json=body, headers={"X-CSRF-Token": csrf})
        assert refused.status_code in (403, 404), (method, path, refused.text)
        by_key = httpx.request(method, gw.url + path, json=body, headers={"Authorization": f"Bearer {acme_admin_key}"})
        assert (refused.status_code, refused.json()["error"]["code"]) == (
            by_key.status_code, by_key.json()["error"]["code"]), (method, path)
    assert len(gw.run(gw.store.list_keys(user_id=globex_user))) == 1
    # Energy is the master's, as for a workspace admin key.
    grant = tab.request("POST", f"{gw.url}/admin/users/{gw.users['acme']}/energy", json={"amount": 5},
                            headers={"X-CSRF-Token": csrf})
    assert grant.status_code == 403


@pytest.mark.parametrize("groups, workspace", [(["auditors"], None), (["acme-staff"], "acme")])
def test_a_viewer_session_reads_and_cannot_change_anything(oidc_gateway, provider, groups, workspace):
    gw = oidc_gateway
    tab, csrf = signed_in(gw, provider, groups, sub="viewer-1")
    me = tab.request("GET", gw.url + "/admin/session").json()
    assert me["role"] == "viewer"
    listed = tab.request("GET", gw.url + "/admin/workspaces")
    assert listed.status_code == 200
    assert {w["name"] for w in listed.json()} == ({"acme", "globex"} if workspace is None else {"acme"})
    assert tab.request("GET", gw.url + "/admin/metrics").status_code == 200
    assert tab.request("GET", gw.url + "/admin/dashboard/live").status_code == 200
    acme_user = gw.users["acme"]
    before = gw.balance(acme_user)
    for method, path, body in [("POST", "/admin/workspaces", {"name": "sneaky"}),
                               ("POST", "/admin/users", {"workspace": "acme"}),
                               ("PATCH", f"/admin/users/{acme_user}", {"tier": "free"}),
                               ("POST", f"/admin/users/{acme_user}/energy", {"amount": 10}),
                               ("POST", f"/admin/users/{acme_user}/keys", {})]:
        refused = tab.request(method, gw.url + path, json=body, headers={"X-CSRF-Token": csrf})
        assert refused.status_code == 403, (method, path, refused.text)
        assert refused.json()["error"]["code"] == "forbidden"
    assert gw.balance(acme_user) == before
    assert gw.run(gw.store.get_workspace("sneaky")) is None
    assert len(gw.run(gw.store.list_keys(user_id=acme_user))) == 1
    # Its own session it may end.
    copy = Browser()
    copy.cookies = dict(tab.cookies)
    assert tab.request("DELETE", gw.url + "/admin/session", headers={"X-CSRF-Token": csrf}).status_code == 204
    assert copy.request("GET", gw.url + "/admin/workspaces").status_code == 401
    audit = httpx.get(gw.url + "/admin/audit", headers={"Authorization": f"Bearer {MASTER_KEY}"}).json()
    assert [(r["action"], r["actor"], r["actor_subject"]) for r in audit if r["action"].startswith("session.")][:2] == [
        ("session.sign_out", "viewer", "viewer-1"), ("session.sign_in", "viewer", "viewer-1")]


def test_the_first_listed_role_the_user_holds_wins_and_no_role_is_refused(oidc_gateway, provider):
    gw = oidc_gateway
    tab, _ = signed_in(gw, provider, ["auditors", "gw-admins"])  # gw-admins is listed first
    assert tab.request("GET", gw.url + "/admin/session").json()["role"] == "master"
    _, refused = sign_in(gw, provider, ["marketing"])
    assert refused.status_code == 403 and refusal_code(refused) == "no_role"


def test_a_role_claim_at_a_dotted_path_keycloak_realm_roles(gateway_factory, provider):
    gw = gateway_factory(dashboard=oidc_settings(provider, role_claim="realm_access.roles"))
    provider.user = {}
    tab = Browser()
    start = tab.request("GET", gw.url + "/dashboard/oidc/login")
    provider.user = {"sub": "kc-1", "realm_access": {"roles": ["offline_access", "gw-admins"]}}
    authorize = tab.request("GET", start.headers["location"])
    done = tab.request("GET", authorize.headers["location"])
    assert done.status_code == 303, done.text
    assert tab.request("GET", gw.url + "/admin/session").json()["role"] == "master"


def test_roles_by_email_count_a_verified_address_only(gateway_factory, provider):
    gw = gateway_factory(dashboard=oidc_settings(provider, role_claim="email",
                                                 roles={"ada@example.com": "master"}))
    provider.user = {"sub": "g-1", "email": "ada@example.com", "email_verified": False}
    tab = Browser()
    start = tab.request("GET", gw.url + "/dashboard/oidc/login")
    refused = tab.request("GET", tab.request("GET", start.headers["location"]).headers["location"])
    assert refused.status_code == 403 and refusal_code(refused) == "no_role"
    provider.user["email_verified"] = True
    start = tab.request("GET", gw.url + "/dashboard/oidc/login")
    done = tab.request("GET", tab.request("GET", start.headers["location"]).headers["location"])
    assert done.status_code == 303
    assert tab.request("GET", gw.url + "/admin/session").json()["role"] == "master"


@pytest.mark.parametrize("claims, role_claim, expected", [
    ({"groups": ["auditors", "acme-admins"]}, "groups", ("workspace_admin", "acme")),  # listed before auditors
    ({"groups": "gw-admins"}, "groups", ("master", None)),  # one string is one value
    ({"groups": [{"name": "gw-admins"}, 7]}, "groups", None),  # not strings: no value
    ({"realm_access": {"roles": ["acme-staff"]}}, "realm_access.roles", ("viewer", "acme")),
    ({"realm_access": ["acme-staff"]}, "realm_access.roles", None),
    ({}, "groups", None),
])
def test_the_role_is_the_first_listed_value_the_claim_holds(provider, claims, role_claim, expected):
    from gateway.admin.oidc import role_for
    from gateway.config import OidcConfig

    config = OidcConfig.model_validate(oidc_settings(provider, role_claim=role_claim)["oidc"])
    role = role_for(claims, config)
    assert (None if role is None else (role.role, role.workspace)) == expected


def test_a_sign_in_the_person_cancels_at_the_provider_is_refused(oidc_gateway, provider):
    gw = oidc_gateway
    tab = Browser()
    start = tab.request("GET", gw.url + "/dashboard/oidc/login")
    state = dict(httpx.URL(start.headers["location"]).params)["state"]
    refused = tab.request("GET", gw.url + "/dashboard/oidc/callback?" + urlencode(
        {"error": "access_denied", "error_description": "<script>alert(1)</script>", "state": state}))
    assert refused.status_code == 403 and refusal_code(refused) == "provider_error"
    assert "<script>" not in refused.text  # the provider's words are not echoed


def test_a_code_the_provider_does_not_honour_makes_no_session(oidc_gateway, provider):
    gw = oidc_gateway
    provider.user = {"sub": "u", "groups": ["gw-admins"]}
    tab = Browser()
    start = tab.request("GET", gw.url + "/dashboard/oidc/login")
    callback = tab.request("GET", start.headers["location"]).headers["location"]
    provider.codes.clear()  # expired or already used at the provider: invalid_grant
    refused = tab.request("GET", callback)
    assert refused.status_code == 403 and refusal_code(refused) == "code_exchange_failed"


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("tamper, why", [
    ("wrong_aud", "Invalid claim: 'aud'"),
    ("expired", "The token is expired"),
    ("alg_none", "Algorithm of 'none' is not allowed"),
    ("wrong_signature", "BadSignatureError"),
    ("stranger_key", "InvalidKeyIdError"),
    ("wrong_nonce", "Invalid claim: 'nonce'"),
    ("wrong_issuer", "Invalid claim: 'iss'"),
])
def test_an_id_token_that_is_not_valid_makes_no_session(oidc_gateway, provider, tamper, why):
    from structlog.testing import capture_logs

    gw = oidc_gateway
    with capture_logs() as logs:
        tab, refused = sign_in(gw, provider, ["gw-admins"], tamper=tamper)
    assert refused.status_code == 403
    assert refusal_code(refused) == "invalid_id_token"
    refusals = [entry for entry in logs if entry["event"] == "oidc_sign_in_refused"]
    assert len(refusals) == 1 and why in refusals[0]["detail"], refusals
    assert "__Host-gw_session" not in tab.cookies
    assert tab.request("GET", gw.url + "/admin/session").status_code == 401


def test_a_reused_state_is_refused(oidc_gateway, provider):
    gw = oidc_gateway
    tab, done = sign_in(gw, provider, ["gw-admins"])
    assert done.status_code == 303
    # The same callback again: the same state, the same browser's login cookie.
    replay = Browser()
    replay.cookies = {"__Host-gw_oidc_login": tab.login_cookie}
    again = replay.request("GET", tab.last_callback)
    assert again.status_code == 403 and refusal_code(again) == "unknown_state"
    made_up = Browser().request("GET", gw.url + "/dashboard/oidc/callback?code=abc&state=made-up")
    assert made_up.status_code == 403 and refusal_code(made_up) == "unknown_state"


def test_a_callback_in_another_browser_than_the_login_is_refused(oidc_gateway, provider):
    gw = oidc_gateway
    provider.user = {"sub": "u", "groups": ["gw-admins"]}
    attacker = Browser()
    start = attacker.request("GET", gw.url + "/dashboard/oidc/login")
    callback = attacker.request("GET", start.headers["location"]).headers["location"]
    victim = Browser()  # has no login cookie of this login: a forced sign-in into the attacker's account
    refused = victim.request("GET", callback)
    assert refused.status_code == 403 and refusal_code(refused) == "browser_mismatch"


@pytest.mark.parametrize("csrf", [None, "wrong", "other-session"])
def test_a_change_with_the_session_cookie_needs_its_csrf_token(oidc_gateway, provider, csrf):
    gw = oidc_gateway
    tab, own = signed_in(gw, provider, ["gw-admins"])
    _, other = signed_in(gw, provider, ["gw-admins"], sub="user-2")
    assert other != own
    headers = {} if csrf is None else {"X-CSRF-Token": other if csrf == "other-session" else csrf}
    refused = tab.request("POST", gw.url + "/admin/workspaces", json={"name": "forged"}, headers=headers)
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == ("csrf_token_missing" if csrf is None else "csrf_token_invalid")
    assert gw.run(gw.store.get_workspace("forged")) is None
    # Reads need none; the right token passes.
    assert tab.request("GET", gw.url + "/admin/workspaces").status_code == 200
    assert tab.request("POST", gw.url + "/admin/workspaces", json={"name": "forged"},
                           headers={"X-CSRF-Token": own}).status_code == 201


def test_a_key_in_the_authorization_header_needs_no_csrf_and_wins_over_a_cookie(oidc_gateway, provider):
    gw = oidc_gateway
    tab, _ = signed_in(gw, provider, ["auditors"])  # a viewer's cookie in the same tab
    made = tab.request("POST", gw.url + "/admin/workspaces", json={"name": "by-key"},
                           headers={"Authorization": f"Bearer {MASTER_KEY}"})
    assert made.status_code == 201, made.text
    wrong_key = tab.request("GET", gw.url + "/admin/workspaces", headers={"Authorization": "Bearer nope"})
    assert wrong_key.status_code == 401  # the header is the credential; the cookie is not a fallback


def test_sign_out_ends_the_session_for_the_cookie(oidc_gateway, provider):
    gw = oidc_gateway
    tab, csrf = signed_in(gw, provider, ["gw-admins"])
    kept = dict(tab.cookies)
    assert tab.request("DELETE", gw.url + "/admin/session").status_code == 403  # CSRF needed here too
    out = tab.request("DELETE", gw.url + "/admin/session", headers={"X-CSRF-Token": csrf})
    assert out.status_code == 204
    assert "__Host-gw_session" not in tab.cookies  # the browser is told to drop it
    stolen = Browser()
    stolen.cookies = kept  # and a copy of the cookie no longer works
    after = stolen.request("GET", gw.url + "/admin/workspaces")
    assert after.status_code == 401 and after.json()["error"]["code"] == "invalid_session"
    audit = httpx.get(gw.url + "/admin/audit", headers={"Authorization": f"Bearer {MASTER_KEY}"}).json()
    assert any(r["action"] == "session.sign_out" and r["actor_subject"] == "user-1" for r in audit)


def test_an_expired_session_is_refused(oidc_gateway, provider):
    gw = oidc_gateway
    session_id = secrets.token_urlsafe(32)
    now = time.time()
    gw.run(gw.store.create_dashboard_session({
        "id_hash": hashlib.sha256(session_id.encode()).hexdigest(), "subject": "old", "email": None,
        "role": "master", "workspace_id": None, "created_at": now - 9 * 3600, "expires_at": now - 3600}))
    tab = Browser()
    tab.cookies["__Host-gw_session"] = session_id
    refused = tab.request("GET", gw.url + "/admin/workspaces")
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "session_expired"
    # A new sign-in clears expired sessions from the store.
    signed_in(gw, provider, ["gw-admins"])
    assert gw.run(gw.store.dashboard_session(hashlib.sha256(session_id.encode()).hexdigest())) is None


def test_rotated_provider_keys_are_fetched_again_for_an_unknown_kid(oidc_gateway, provider):
    gw = oidc_gateway
    signed_in(gw, provider, ["gw-admins"])
    fetched = provider.jwks_fetches
    signed_in(gw, provider, ["gw-admins"])
    assert provider.jwks_fetches == fetched  # cached
    provider.rotate_key()
    signed_in(gw, provider, ["gw-admins"])
    assert provider.jwks_fetches == fetched + 1


@pytest.mark.parametrize("store_url", ["postgres"], indirect=True)
def test_a_session_works_across_gateway_processes_and_sign_out_ends_it_everywhere(gateway_factory, provider,
                                                                                   store_url):
    first = gateway_factory(dashboard=oidc_settings(provider))
    second = gateway_factory(dashboard=oidc_settings(provider))
    tab, csrf = signed_in(first, provider, ["gw-admins"])
    # The state used at the first is used up for the second too.
    replay = Browser()
    replay.cookies = {"__Host-gw_oidc_login": tab.login_cookie}
    again = replay.request("GET", tab.last_callback.replace(first.url, second.url, 1))
    assert again.status_code == 403 and refusal_code(again) == "unknown_state"
    assert tab.request("GET", second.url + "/admin/workspaces").status_code == 200
    assert tab.request("DELETE", first.url + "/admin/session", headers={"X-CSRF-Token": csrf}).status_code == 204
    tab.cookies = {"__Host-gw_session": tab.attributes["__Host-gw_session"].value}
    assert tab.request("GET", second.url + "/admin/workspaces").status_code == 401


# --------------------------------------------------------------------------- config


def test_the_oidc_config_is_validated_at_load_with_paths(upstream, tmp_path, monkeypatch):
    monkeypatch.delenv("NO_SUCH_OIDC_SECRET", raising=False)
    raw = base_config(upstream, store_url=f"sqlite:///{tmp_path}/g.db", dashboard={"oidc": {
        "issuer": "http://sso.example.com/realms/x", "client_id": "gw", "client_secret": "os.environ/NO_SUCH_OIDC_SECRET",
        "roles": {"a": "workspace_admin", "b": {"role": "owner"}, "c": {"role": "master", "workspace": "acme"}},
        "algorithms": ["RS256", "none"], "scopes": ["email"], "session_ttl": "10s", "extra": 1}})
    with pytest.raises(ConfigError) as caught:
        load_config_data(raw)
    errors = "\n".join(caught.value.errors)
    for expected in ["dashboard.oidc.issuer: must be https://",
                     "dashboard.oidc.client_secret: environment variable NO_SUCH_OIDC_SECRET is not set",
                     "dashboard.oidc.roles.a: workspace_admin needs its workspace",
                     "dashboard.oidc.roles.b.role: Input should be 'master', 'workspace_admin' or 'viewer'",
                     "dashboard.oidc.roles.c: workspace: master is every workspace",
                     "dashboard.oidc.algorithms: 'none' is not allowed",
                     "dashboard.oidc.scopes: must include openid",
                     "dashboard.oidc.session_ttl: Input should be greater than or equal to 60",
                     "dashboard.oidc.extra: unknown key"]:
        assert expected in errors, errors
    monkeypatch.setenv("OIDC_TEST_SECRET", CLIENT_SECRET)
    good = base_config(upstream, store_url=f"sqlite:///{tmp_path}/g.db", dashboard={"oidc": {
        "issuer": "https://sso.example.com/realms/x", "client_id": "gw", "client_secret": "os.environ/OIDC_TEST_SECRET",
        "roles": {"admins": "master"}}})
    config = load_config_data(good)
    assert config.dashboard.oidc.client_secret == CLIENT_SECRET
    assert config.dashboard.oidc.display_name == "sso.example.com"


def test_discovery_with_a_plain_http_endpoint_off_this_machine_is_refused(gateway_factory, provider):
    gw = gateway_factory(dashboard=oidc_settings(provider))
    provider.browser_host = "sso.example.com"  # authorization_endpoint: http://sso.example.com:.../authorize
    refused = Browser().request("GET", gw.url + "/dashboard/oidc/login")
    assert refused.status_code == 502 and refusal_code(refused) == "provider_unreachable"


def test_discovery_naming_another_issuer_is_refused(gateway_factory, provider):
    gw = gateway_factory(dashboard=oidc_settings(provider, issuer=provider.issuer + "/"))  # not what it says
    refused = Browser().request("GET", gw.url + "/dashboard/oidc/login")
    assert refused.status_code == 502 and refusal_code(refused) == "provider_unreachable"


# --------------------------------------------------------------------------- in Chromium


@pytest.fixture
def chromium(tmp_path):
    """Debian's headless Chromium through chromium-driver, as tests/test_dashboard.py drives it."""
    webdriver = pytest.importorskip("selenium.webdriver")
    paths = find_chromium()
    if paths is None:
        pytest.skip("chromium and chromium-driver are not installed and could not be installed (apt-get)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = paths[0]
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--window-size=1280,1000",
                f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=paths[1]))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def test_sign_in_with_the_provider_in_chromium_then_change_and_sign_out(oidc_gateway, provider, chromium):
    """Debian's Chromium, headless: the page's button, the provider's redirects across sites
    (localhost -> 127.0.0.1), the session cookie as the browser keeps it (Secure on
    http://127.0.0.1: a loopback origin is a secure context), a change through the page's api
    helper (its CSRF token), a forged fetch without it refused, and sign-out."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    gw = oidc_gateway
    provider.user = {"sub": "ada-1", "email": "ada@example.com", "groups": ["gw-admins"]}
    provider.browser_host = "localhost"  # another site: the Lax login cookie, the Strict session cookie
    driver = chromium
    driver.get(gw.url + "/dashboard")
    button = WebDriverWait(driver, WAIT).until(lambda d: d.find_element(By.ID, "sso-button")
                                               if d.find_element(By.ID, "sso").is_displayed() else None)
    assert button.text == "Sign in with Fake SSO"
    button.click()
    WebDriverWait(driver, WAIT).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-refreshed-at"))
    assert driver.current_url == gw.url + "/dashboard"
    assert provider.authorize_requests[-1]["redirect_uri"] == gw.url + "/dashboard/oidc/callback"
    assert provider.authorize_requests[-1]["host"].startswith("localhost:")  # the browser went to another site
    assert driver.find_element(By.ID, "whoami").text == "ada@example.com · master: every workspace"
    assert driver.find_element(By.TAG_NAME, "body").get_attribute("data-role") == "master"
    cookies = {c["name"]: c for c in driver.get_cookies()}
    session = cookies["__Host-gw_session"]
    assert session["httpOnly"] and session["secure"] and session["sameSite"] == "Strict"
    assert session["expiry"] > time.time() + 7 * 3600
    assert driver.execute_script("return document.cookie") == ""  # HttpOnly: no script reads it

    made = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "gatewayApi.request('POST', '/admin/workspaces', {name: 'from-the-page'})"
        ".then((w) => done(w.name), (e) => done('failed: ' + e.status + ' ' + e.message));")
    assert made == "from-the-page"
    forged = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch('/admin/workspaces', {method: 'POST', credentials: 'same-origin', body: '{\"name\": \"forged\"}'})"
        ".then((r) => r.json().then((b) => done(r.status + ' ' + b.error.code)));")
    assert forged == "403 csrf_token_missing"
    assert gw.run(gw.store.get_workspace("forged")) is None

    driver.find_element(By.ID, "signout").click()
    WebDriverWait(driver, WAIT).until(lambda d: d.find_element(By.ID, "signin-panel").is_displayed())
    WebDriverWait(driver, WAIT).until(lambda d: "__Host-gw_session" not in {c["name"] for c in d.get_cookies()})
    stolen = Browser()
    stolen.cookies["__Host-gw_session"] = session["value"]
    assert stolen.request("GET", gw.url + "/admin/session").status_code == 401
    audit = httpx.get(gw.url + "/admin/audit", headers={"Authorization": f"Bearer {MASTER_KEY}"}).json()
    made_row = next(r for r in audit if r["action"] == "workspace.create")
    assert (made_row["actor"], made_row["actor_email"]) == ("master", "ada@example.com")
