"""Auth: who may call the model endpoints, and how fast key changes take effect.

Real HTTP all the way: the openai SDK talks to the gateway, the gateway (through litellm)
talks to the fake upstream, keys live in a real SQLite store.
"""

from __future__ import annotations

import time

import openai
import pytest

from gateway.admin.operations import MASTER
from tests.conftest import MASTER_KEY

HELLO = [{"role": "user", "content": "hi"}]


def assert_invalid_api_key(exc: openai.APIStatusError) -> None:
    assert exc.status_code == 401
    body = exc.response.json()
    assert set(body) == {"error"}
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["code"] == "invalid_api_key"
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


def test_request_without_api_key_gets_401_invalid_api_key(gateway, upstream):
    import httpx

    response = httpx.post(gateway.base_url + "/chat/completions", json={"model": "gpt-4o-mini", "messages": HELLO})
    assert response.status_code == 401
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_api_key")
    assert upstream.count() == 0


def test_unknown_api_key_gets_401_invalid_api_key(gateway, upstream):
    with pytest.raises(openai.AuthenticationError) as info:
        gateway.client("gw-this-key-does-not-exist-0000000000").chat.completions.create(
            model="gpt-4o-mini", messages=HELLO)
    assert_invalid_api_key(info.value)
    assert upstream.count() == 0


@pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)
def test_revoked_api_key_gets_401_invalid_api_key(gateway, upstream):
    user_id, key = gateway.make_user()
    key_id = gateway.run(gateway.store.list_keys(user_id=user_id))[0].id
    gateway.run(gateway.admin().revoke_key(MASTER, key_id))
    with pytest.raises(openai.AuthenticationError) as info:
        gateway.client(key).chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    assert_invalid_api_key(info.value)
    assert "revoked" in info.value.response.json()["error"]["message"]
    assert upstream.count() == 0


def test_users_key_never_reaches_the_upstream_only_the_provider_key_does(gateway, upstream):
    _, key = gateway.make_user()
    gateway.client(key).chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    recorded = upstream.last
    assert recorded.headers["authorization"] == "Bearer sk-upstream-openai-SECRET"
    everything = repr(recorded.headers) + recorded.raw.decode()
    assert key not in everything
    assert "gw-" not in recorded.headers.get("authorization", "")


def test_master_key_is_refused_on_model_endpoints(gateway, upstream):
    client = gateway.client(MASTER_KEY)
    with pytest.raises(openai.AuthenticationError) as info:
        client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    assert_invalid_api_key(info.value)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    with pytest.raises(openai.AuthenticationError):
        client.embeddings.create(model="embed", input="x")
    assert upstream.count() == 0


@pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)
def test_revocation_through_admin_api_takes_effect_at_once(gateway, upstream):
    import httpx

    user_id, key = gateway.make_user()
    client = gateway.client(key)
    client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)  # now cached
    key_id = gateway.run(gateway.store.list_keys(user_id=user_id))[0].id
    response = httpx.post(f"{gateway.url}/admin/keys/{key_id}/revoke",
                          headers={"Authorization": f"Bearer {MASTER_KEY}"})
    assert response.status_code == 200, response.text
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    assert upstream.count("/chat/completions") == 1


def test_revocation_made_directly_in_the_store_is_seen_only_after_cache_ttl(gateway_factory, upstream):
    """Another process revoking the key (emulated by writing to the store, bypassing this
    process's Directory) is invisible until the cached identity expires."""
    gw = gateway_factory(auth={"master_key": MASTER_KEY, "cache_ttl": "0.5s", "default_tier": "free"})
    user_id, key = gw.make_user()
    client = gw.client(key)
    client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)  # cached now
    revoked_at = time.monotonic()
    gw.run(gw.store.revoke_key(gw.run(gw.store.list_keys(user_id=user_id))[0].id))
    client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)  # still cached
    assert time.monotonic() - revoked_at < 0.5, "too slow to observe the cached window"
    time.sleep(0.6)
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)


def test_disabled_user_gets_401_after_cache_ttl(gateway_factory, upstream):
    gw = gateway_factory(auth={"master_key": MASTER_KEY, "cache_ttl": 0.3, "default_tier": "free"})
    user_id, key = gw.make_user()
    gw.client(key).models.list()
    gw.run(gw.store.set_user_disabled(user_id, True))
    time.sleep(0.4)
    with pytest.raises(openai.AuthenticationError) as info:
        gw.client(key).chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    assert_invalid_api_key(info.value)
    assert upstream.count() == 0


def test_revocation_landing_during_an_in_flight_key_lookup_is_not_undone_by_the_cache(gateway):
    """A lookup that read the key just before an admin revoked it answers its own request
    with what it read, but must not put that stale identity into the cache: the next
    request sees the revocation at once, not a TTL later."""
    import asyncio

    from gateway.admin.operations import Admin
    from gateway.directory import Directory

    user_id, key = gateway.make_user()
    key_id = gateway.run(gateway.store.list_keys(user_id=user_id))[0].id
    store = gateway.store

    class PausedLookups:
        """The real store, pausing between reading a key and handing the answer back."""

        def __init__(self) -> None:
            self.read, self.resume = asyncio.Event(), asyncio.Event()

        async def lookup_key(self, plaintext: str):
            value = await store.lookup_key(plaintext)
            self.read.set()
            await self.resume.wait()
            return value

        def __getattr__(self, name: str):
            return getattr(store, name)

    async def scenario():
        paused = PausedLookups()
        directory = Directory(paused, ttl=300)
        lookup = asyncio.ensure_future(directory.identity(key))
        await paused.read.wait()
        await Admin(store, gateway.config, directory).revoke_key(MASTER, key_id)
        paused.resume.set()
        return await lookup, await directory.identity(key)

    in_flight, next_request = gateway.run(scenario())
    assert not in_flight.revoked  # it read the key before the revocation
    assert next_request.revoked


@pytest.mark.parametrize("model,credential_header,provider_key", [
    ("gpt-4o-mini", "authorization", "Bearer sk-upstream-openai-SECRET"),
    ("claude", "x-api-key", "sk-ant-upstream-SECRET"),
])
def test_no_client_credential_header_is_forwarded_to_the_upstream(gateway, upstream, model, credential_header,
                                                                    provider_key):
    _, key = gateway.make_user()
    gateway.client(key).chat.completions.create(
        model=model, messages=HELLO, max_tokens=20,
        extra_headers={"X-Api-Key": key, "OpenAI-Organization": "org-client", "Cookie": f"session={key}",
                       "Idempotency-Key": "idem-forward-check", "X-Action": "ai_message"})
    recorded = upstream.last
    assert recorded.headers[credential_header] == provider_key
    assert key not in repr(recorded.headers) + recorded.raw.decode()
    assert "org-client" not in repr(recorded.headers)
    assert "cookie" not in recorded.headers
