"""Per-key controls (docs/admin.md "Per-key controls"): an expiry (401 `key_expired` after it),
the models a key may use (a subset of its tier's: 403 `model_not_allowed` naming the key's
restriction, `GET /v1/models` filtered), the key's own requests and tokens per minute (in
process and in Redis), a label. Set by the CLI and the admin API, kept by a rotation, on
SQLite and PostgreSQL.

Real HTTP: openai SDK -> gateway -> fake upstream; the admin API over httpx.
"""

from __future__ import annotations

import time
import uuid

import httpx
import openai
import pytest

from tests.conftest import MASTER_KEY

MSGS = [{"role": "user", "content": "hi"}]
BOTH = pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)
CHAIN = ["auth", "rate_limit", "tier_policy", "energy"]
HEADERS = {"Authorization": f"Bearer {MASTER_KEY}"}


def new_key(gw, user: str, **body) -> httpx.Response:
    return httpx.post(gw.url + f"/admin/users/{user}/keys", json=body, headers=HEADERS)


def fresh_window(margin: float = 6.0) -> None:
    left = 60 - time.time() % 60
    if left < margin:
        time.sleep(left + 0.05)


@BOTH
def test_a_key_past_its_expiry_is_refused_with_key_expired(gateway_factory, store_url):
    gw = gateway_factory(plugins=CHAIN)
    user, _ = gw.make_user(tier="pro")
    created = new_key(gw, user, expires="2s", label="ci runner")
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["label"] == "ci runner" and body["expires_at"] == pytest.approx(time.time() + 2, abs=1.5)
    key = body["api_key"]
    assert gw.client(key).chat.completions.create(model="gpt-4o-mini", messages=MSGS).choices
    time.sleep(max(0.0, body["expires_at"] - time.time()) + 0.1)
    with pytest.raises(openai.AuthenticationError) as refused:
        gw.client(key).chat.completions.create(model="gpt-4o-mini", messages=MSGS)
    assert refused.value.status_code == 401 and refused.value.body["code"] == "key_expired"


@BOTH
def test_a_key_limited_to_some_models_is_refused_the_others_and_lists_only_its_own(gateway_factory, store_url):
    gw = gateway_factory(plugins=CHAIN)
    user, _ = gw.make_user(tier="pro")
    key = new_key(gw, user, models=["gpt-4o-mini", "demo"]).json()["api_key"]
    client = gw.client(key)
    assert client.chat.completions.create(model="gpt-4o-mini", messages=MSGS).model
    with pytest.raises(openai.PermissionDeniedError) as refused:
        client.chat.completions.create(model="gpt-4o", messages=MSGS)
    error = refused.value.body
    assert error["code"] == "model_not_allowed" and "API key" in error["message"] and error["param"] == "model"
    assert sorted(m.id for m in client.models.list()) == ["demo", "gpt-4o-mini"]
    # The tier's other models stay visible to the same user's unrestricted key.
    _, other = gw.make_user(tier="pro")
    assert "gpt-4o" in {m.id for m in gw.client(other).models.list()}


def test_a_key_cannot_be_given_models_its_tier_does_not_allow(gateway_factory):
    gw = gateway_factory(plugins=CHAIN)
    user, _ = gw.make_user(tier="free")
    answer = new_key(gw, user, models=["gpt-4o"])  # free: gpt-4o-mini, demo, claude, embed
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "models", answer.text
    for body in ({"models": []}, {"models": "gpt-4o-mini"}, {"rpm": 0}, {"rpm": 1.5}, {"tpm": -1},
                 {"expires": "0s"}, {"expires": "3661d"}, {"expires": "soon"}, {"label": "x" * 201},
                 {"label": "a\x00b"}):
        answer = new_key(gw, user, **body)
        assert answer.status_code == 400 and answer.json()["error"]["param"] == next(iter(body)), (body, answer.text)
    assert len(gw.run(gw.store.list_keys(user_id=user))) == 1  # nothing was made


@pytest.mark.parametrize("redis_url", [None, "redis://127.0.0.1:6379/0"])
def test_a_key_is_held_to_its_own_requests_per_minute(gateway_factory, redis_url):
    fresh_window()
    limits = {"redis_url": redis_url, "key_prefix": f"gw:test:key:{uuid.uuid4().hex[:8]}"} if redis_url else {}
    gw = gateway_factory(plugins=CHAIN, rate_limits=limits, tiers={"free": {"models": ["*"]}, "pro": {"models": ["*"], "limits": {"rpm": 100}}})
    user, _ = gw.make_user(tier="pro", energy=1000)
    limited = new_key(gw, user, rpm=3).json()["api_key"]
    unlimited = new_key(gw, user).json()["api_key"]
    for _ in range(3):
        gw.client(limited).chat.completions.create(model="demo", messages=MSGS)
    with pytest.raises(openai.RateLimitError) as refused:
        gw.client(limited).chat.completions.create(model="demo", messages=MSGS)
    assert refused.value.body["code"] == "rate_limit_exceeded" and "API key" in refused.value.body["message"]
    # The same user's other key is not held to it (the user's own 100 rpm still counts both).
    raw = gw.client(unlimited).chat.completions.with_raw_response.create(model="demo", messages=MSGS)
    assert raw.headers["x-ratelimit-remaining-requests"] == str(100 - 4)


def test_a_key_is_held_to_its_own_tokens_per_minute(gateway_factory):
    fresh_window()
    gw = gateway_factory(plugins=CHAIN)
    user, _ = gw.make_user(tier="pro", energy=1000)
    key = new_key(gw, user, tpm=1).json()["api_key"]
    gw.client(key).chat.completions.create(model="gpt-4o-mini", messages=MSGS)  # its tokens end the window
    gw.settle()
    with pytest.raises(openai.RateLimitError) as refused:
        gw.client(key).chat.completions.create(model="gpt-4o-mini", messages=MSGS)
    assert "tokens per minute" in refused.value.body["message"]


@BOTH
def test_controls_are_changed_by_the_admin_api_at_once_and_kept_by_a_rotation(gateway_factory, store_url):
    gw = gateway_factory(plugins=CHAIN)
    user, _ = gw.make_user(tier="pro")
    created = new_key(gw, user, label="app").json()
    key = created["api_key"]
    assert gw.client(key).chat.completions.create(model="gpt-4o", messages=MSGS).choices
    patched = httpx.patch(gw.url + f"/admin/keys/{created['id']}", json={"models": ["demo"], "rpm": 50},
                          headers=HEADERS)
    assert patched.status_code == 200, patched.text
    assert patched.json()["models"] == ["demo"] and patched.json()["label"] == "app"
    with pytest.raises(openai.PermissionDeniedError):
        gw.client(key).chat.completions.create(model="gpt-4o", messages=MSGS)
    rotated = httpx.post(gw.url + f"/admin/keys/{created['id']}/rotate", headers=HEADERS).json()
    assert (rotated["label"], rotated["models"], rotated["rpm"]) == ("app", ["demo"], 50)
    with pytest.raises(openai.PermissionDeniedError):
        gw.client(rotated["api_key"]).chat.completions.create(model="gpt-4o", messages=MSGS)
    cleared = httpx.patch(gw.url + f"/admin/keys/{rotated['id']}", json={"models": None}, headers=HEADERS)
    assert cleared.json()["models"] is None
    assert gw.client(rotated["api_key"]).chat.completions.create(model="gpt-4o", messages=MSGS).choices


def test_the_cli_creates_a_key_that_expires_and_updates_its_controls(gateway_factory, tmp_path, capsys):
    import json

    import proxy
    import yaml

    gw = gateway_factory(plugins=CHAIN)
    user, _ = gw.make_user(tier="pro")
    config = tmp_path / "cli.yaml"
    config.write_text(yaml.safe_dump({"store": {"url": gw.config.store.url}, "tiers": {"pro": {"models": ["*"]}},
                                      "auth": {"default_tier": "pro"},
                                      "models": [{"name": "demo", "litellm_params": {"model": "demo/offline"}}]}))
    capsys.readouterr()
    assert proxy.main(["keys", "create", user, "--expires", "30d", "--label", "nightly", "--models", "demo",
                       "--rpm", "7", "--json", "--config", str(config)]) == 0
    created = json.loads(capsys.readouterr().out)
    assert created["label"] == "nightly" and created["models"] == ["demo"] and created["rpm"] == 7
    assert created["expires_at"].startswith(time.strftime("%Y-", time.gmtime(time.time() + 30 * 86400)))
    assert proxy.main(["keys", "update", created["id"], "--clear", "rpm", "--tpm", "900", "--json",
                       "--config", str(config)]) == 0
    updated = json.loads(capsys.readouterr().out)
    assert updated["rpm"] is None and updated["tpm"] == 900 and updated["models"] == ["demo"]
    assert proxy.main(["keys", "create", user, "--models", "gpt-4o", "--config", str(config)]) == 2
    assert "not a model" in capsys.readouterr().err
