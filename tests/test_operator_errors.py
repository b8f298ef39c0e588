"""What an operator sees when the config is wrong or a provider key is missing."""

from __future__ import annotations

import subprocess
import sys

import openai
import yaml

from tests.test_shutdown import ROOT

MSGS = [{"role": "user", "content": "hi"}]


def test_check_config_reports_every_error_in_one_run(tmp_path):
    config = {
        "server": {"port": "eighty"},                                           # schema
        "store": {"url": "sqlite:///x.db", "colour": "blue"},                   # unknown key
        "auth": {"master_key": "os.environ/SURELY_UNSET_MASTER_FOR_TEST"},      # allowed: no master key
        "models": [{"name": "m", "litellm_params": {"model": "openai/x", "api_base": "os.environ/SURELY_UNSET_BASE"}},
                   {"name": "n", "timeouts": {"connect": -1}, "litellm_params": {"model": "openai/y"}}],
        "plugins": ["auth", {"name": "energy", "settings": {"stale_aftr": "1h"}}, "no_such_plugin"],
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    out = subprocess.run([sys.executable, "proxy.py", "check-config", str(path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 1
    for expected in ("server.port", "store.colour: unknown key", "models[0].litellm_params.api_base: environment "
                     "variable SURELY_UNSET_BASE is not set", "models[1].timeouts.connect",
                     "settings.stale_aftr: unknown key", "no_such_plugin"):
        assert expected in out.stderr, (expected, out.stderr)


def test_a_missing_provider_key_is_named_per_request_and_never_trips_the_breaker(gateway_factory, upstream,
                                                                                 monkeypatch):
    monkeypatch.delenv("SURELY_UNSET_OPENAI_KEY", raising=False)
    models = [{"name": "keyless", "litellm_params": {"model": "openai/gpt-4o-mini", "api_base": upstream.openai_base,
                                                    "api_key": "os.environ/SURELY_UNSET_OPENAI_KEY"}},
              {"name": "keyed", "litellm_params": {"model": "openai/gpt-4o-mini", "api_base": upstream.openai_base,
                                                  "api_key": "sk-upstream"}}]
    gw = gateway_factory(plugins=["auth", "tier_policy", "energy"], models=models, tiers={"pro": {"models": ["*"]}},
                         auth={"master_key": "gw-master-x-0123456789", "default_tier": "pro"},
                         energy={"actions": {"ai_message": {"default": 1}}})
    user_id, key = gw.make_user(energy=10)
    for _ in range(8):  # more than retries.breaker_failures: still the same clear answer
        try:
            gw.client(key).chat.completions.create(model="keyless", messages=MSGS)
            raise AssertionError("a keyless deployment answered")
        except openai.APIStatusError as exc:
            assert exc.status_code == 502 and exc.body["code"] == "upstream_auth_error"
            assert "SURELY_UNSET_OPENAI_KEY" in exc.body["message"]
    assert upstream.count() == 0  # never dialled
    assert gw.client(key).chat.completions.create(model="keyed", messages=MSGS).choices
    gw.settle()
    assert gw.balance(user_id) == 9  # the refused ones were refunded
