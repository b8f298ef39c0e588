"""config.yaml is validated once, at load: every error is a line naming its path."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import ConfigError, load_config, load_config_data

ROOT = Path(__file__).resolve().parent.parent

MINIMAL: dict[str, Any] = {
    "models": [
        {"name": "demo", "litellm_params": {"model": "demo/offline"}},
        {"name": "gpt-4o", "litellm_params": {"model": "openai/gpt-4o", "api_key": "sk-x"},
         "downgrade_to": "demo"},
    ],
    "tiers": {"free": {"models": ["demo", "gpt-4o"]}},
    # Tests here list partial chains to check other rules (test_secure_default.py: the refusal).
    "server": {"allow_unauthenticated": True},
}


def config_with(**changes: Any) -> dict[str, Any]:
    data = copy.deepcopy(MINIMAL)
    data.update(changes)
    return data


def errors_of(data: Any) -> list[str]:
    with pytest.raises(ConfigError) as excinfo:
        load_config_data(data)
    return excinfo.value.errors


def test_a_minimal_config_loads_with_defaults():
    config = load_config_data(config_with())
    assert config.model_names() == ["demo", "gpt-4o"]
    assert config.retries.max_attempts == 3
    assert config.ladder("gpt-4o") == ["gpt-4o", "demo"]


def test_request_time_lookups_follow_the_tier_and_the_price_book():
    data = config_with(
        models=MINIMAL["models"] + [{"name": "gpt-4o-mini", "litellm_params": {"model": "openai/gpt-4o-mini"}}],
        tiers={"free": {"models": ["demo", "gpt-4o-mini"]}, "pro": {"models": ["*"]}},
        energy={"default_action": "chat", "actions": {"chat": {"default": 1, "models": {"gpt-4o": 5, "demo": 0}}}})
    config = load_config_data(data)
    assert config.tier_models("free") == {"demo", "gpt-4o-mini"}
    assert config.tier_models("pro") == {"demo", "gpt-4o", "gpt-4o-mini"}
    assert config.tier_ladder("free", "gpt-4o") == ("demo",)  # gpt-4o itself is not the free tier's
    assert config.tier_ladder("pro", "gpt-4o") == ("gpt-4o", "demo")
    assert config.models_within("chat", 0) == {"demo"}
    assert config.models_within("chat", 1) == {"demo", "gpt-4o-mini"}
    assert config.models_within("chat", 5) == {"demo", "gpt-4o", "gpt-4o-mini"}
    assert config.tier_models("free") is config.tier_models("free")  # computed once per config
    # A reload is a new Config: its answers follow the new file, nothing carries over.
    data["tiers"]["free"]["models"] = ["demo"]
    assert load_config_data(data).tier_models("free") == {"demo"}
    assert config.tier_models("free") == {"demo", "gpt-4o-mini"}


def test_a_missing_required_field_names_its_path():
    data = config_with()
    data["models"][1]["litellm_params"] = {"api_key": "sk-x"}
    assert errors_of(data) == ["models[1].litellm_params.model: Field required"]


def test_a_wrong_type_names_its_path():
    errors = errors_of(config_with(retries={"max_attempts": "many"}))
    assert len(errors) == 1 and errors[0].startswith("retries.max_attempts: ")


def test_an_out_of_range_value_names_its_path():
    errors = errors_of(config_with(server={"port": 70000}))
    assert len(errors) == 1 and errors[0].startswith("server.port: ")


@pytest.mark.parametrize("data,path", [
    ({"modles": []}, "modles"),
    ({"retries": {"max_atempts": 2}}, "retries.max_atempts"),
    ({"server": {"hots": "0.0.0.0"}}, "server.hots"),
    ({"tiers": {"free": {"models": ["demo"], "refil": {"amount": 1, "period": "1d"}}}}, "tiers.free.refil"),
])
def test_an_unknown_key_is_an_error_naming_its_path(data, path):
    assert f"{path}: unknown key (typo?)" in errors_of(config_with(**data))


def test_an_unknown_key_on_a_model_entry_is_an_error():
    data = config_with()
    data["models"][0]["fallback"] = ["gpt-4o"]
    assert errors_of(data) == ["models[0].fallback: unknown key (typo?)"]


def test_litellm_params_accept_provider_specific_keys():
    data = config_with()
    data["models"][1]["dispatch"] = "litellm"  # on the native path it would be refused (test_upstream_conformance)
    data["models"][1]["litellm_params"]["api_version"] = "2024-06-01"
    assert load_config_data(data).models[1].litellm_params.model_dump()["api_version"] == "2024-06-01"


def test_every_error_is_reported_at_once():
    errors = errors_of(config_with(retries={"max_atempts": 2}, server={"hots": "x"}))
    assert sorted(errors) == ["retries.max_atempts: unknown key (typo?)", "server.hots: unknown key (typo?)"]


def test_an_unknown_fallback_model_is_an_error():
    data = config_with()
    data["models"][1]["fallbacks"] = ["gpt-5"]
    assert "models[1].fallbacks[0]: unknown model 'gpt-5'" in errors_of(data)


def test_a_model_falling_back_to_itself_is_an_error():
    data = config_with()
    data["models"][1]["fallbacks"] = ["gpt-4o"]
    assert "models[1].fallbacks[0]: a model cannot fall back to itself" in errors_of(data)


def test_an_unknown_downgrade_model_is_an_error():
    data = config_with()
    data["models"][1]["downgrade_to"] = "gpt-4o-nano"
    assert "models[1].downgrade_to: unknown model 'gpt-4o-nano'" in errors_of(data)


def test_a_looping_downgrade_ladder_is_an_error():
    data = config_with()
    data["models"][0]["downgrade_to"] = "gpt-4o"
    errors = errors_of(data)
    assert any(e.startswith("models: downgrade ladder from") and "loops" in e for e in errors)


def test_an_unknown_tier_model_is_an_error():
    errors = errors_of(config_with(tiers={"free": {"models": ["demo", "gpt-4"]}}))
    assert errors == ["tiers.free.models[1]: unknown model 'gpt-4'"]


def test_an_unknown_default_tier_is_an_error():
    assert "auth.default_tier: unknown tier 'free'" in errors_of(config_with(tiers={"pro": {"models": ["*"]}}))


def test_an_unknown_model_in_the_energy_price_book_is_an_error():
    errors = errors_of(config_with(energy={"actions": {"ai_message": {"default": 1, "models": {"gpt-5": 3}}}}))
    assert errors == ["energy.actions.ai_message.models.gpt-5: unknown model"]


def test_deployments_of_one_model_must_agree_on_model_level_keys():
    data = config_with()
    data["models"].append({"name": "gpt-4o", "litellm_params": {"model": "openai/gpt-4o"}, "downgrade_to": "gpt-4o"})
    assert "models[2].downgrade_to: disagrees with the first 'gpt-4o' entry" in errors_of(data)


def test_a_missing_environment_variable_is_an_error_naming_its_path(monkeypatch):
    monkeypatch.delenv("GW_TEST_UNSET_URL", raising=False)
    errors = errors_of(config_with(store={"url": "os.environ/GW_TEST_UNSET_URL"}))
    assert errors == ["store.url: environment variable GW_TEST_UNSET_URL is not set"]


def test_secrets_are_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("GW_TEST_KEY", "sk-from-env")
    data = config_with()
    data["models"][1]["litellm_params"]["api_key"] = "os.environ/GW_TEST_KEY"
    assert load_config_data(data).models[1].litellm_params.api_key == "sk-from-env"


def test_a_document_that_is_not_a_mapping_is_an_error():
    assert errors_of(["models"]) == ["(top level): expected a mapping"]


def test_durations_accept_units():
    config = load_config_data(config_with(auth={"cache_ttl": "5m"},
                                          tiers={"free": {"models": ["*"], "refill": {"amount": 1, "period": "12h"}}}))
    assert config.auth.cache_ttl == 300
    assert config.tiers["free"].refill.period == 12 * 3600


def test_load_config_reports_invalid_yaml_with_the_file_path(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("models: [\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    assert str(path) in excinfo.value.errors[0]


# --------------------------------------------------------------------------------------
# python proxy.py check-config
# --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def check_config_runs(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """`python proxy.py check-config` on the repo's config.yaml and on a broken copy, run
    side by side (each process spends seconds importing litellm)."""
    data = yaml.safe_load((ROOT / "config.yaml").read_text())
    del data["models"][1]["litellm_params"]["model"]
    data["retries"]["max_atempts"] = 2
    broken = tmp_path_factory.mktemp("check-config") / "broken.yaml"
    broken.write_text(yaml.safe_dump(data))
    procs = {name: subprocess.Popen([sys.executable, "proxy.py", "check-config", path], cwd=ROOT, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, path in (("repo", "config.yaml"), ("broken", str(broken)))}
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=60)
        results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return results


def test_check_config_accepts_the_repos_config_yaml(check_config_runs):
    result = check_config_runs["repo"]
    assert result.returncode == 0, result.stderr
    assert "config.yaml: OK" in result.stdout


def test_check_config_rejects_a_broken_file_naming_the_path(check_config_runs):
    result = check_config_runs["broken"]
    assert result.returncode != 0
    assert "models[1].litellm_params.model: Field required" in result.stderr
    assert "retries.max_atempts: unknown key (typo?)" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_plugin_settings_are_an_error_naming_the_path(tmp_path):
    from proxy import check_config as load_and_check

    data = yaml.safe_load((ROOT / "config.yaml").read_text())
    data["plugins"] = ["request_log", {"name": "request_log", "settings": {"levle": "debug"}}, "no_such_plugin"]
    path = tmp_path / "bad-plugin.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as excinfo:
        load_and_check(path)
    errors = excinfo.value.errors
    assert "plugins[1].name: 'request_log' is listed twice" in errors
    assert "plugins[1].settings.levle: unknown key (typo?)" in errors
    assert any(e.startswith("plugins[2].name: unknown plugin 'no_such_plugin'") for e in errors)


def test_load_config_on_a_missing_file_fails_naming_it(tmp_path):
    with pytest.raises(ConfigError) as excinfo:
        load_config(tmp_path / "nope.yaml")
    assert "nope.yaml: cannot read" in excinfo.value.errors[0]


# ------------------------------------------------ time constants against the longest request
# Default timeouts: first_byte 120 s, total 600 s; retries: 3 attempts, waits of at most
# retry_after_max 30 s (the backoff's ceiling, 8 s, is lower).


def test_the_longest_request_follows_the_routers_attempts_waits_and_fallbacks():
    """A stream: every failed call ends by first_byte, the last one streams for up to total
    after its first chunk; embeddings: every call ends by total. Fallbacks add their own."""
    alone = load_config_data(config_with(models=[{"name": "m", "litellm_params": {"model": "openai/m"},
                                                  "timeouts": {"first_byte": 100, "total": 200}}],
                                         tiers={"free": {"models": ["*"]}}))
    assert alone.longest_request.seconds == 3 * 200 + 2 * 30  # embeddings 660 > stream 3 × 100 + 60 + 200
    assert alone.longest_request.why == ("660s: embeddings on 'm': 'm' 3 × models[0].timeouts.total 200s"
                                         " + 2 waits 60s (retries)")

    streams = config_with(retries={"max_attempts": 2, "retry_after_max": 5, "backoff_max": 1},
                          models=[{"name": "a", "litellm_params": {"model": "openai/a"}, "fallbacks": ["b"],
                                   "timeouts": {"first_byte": 300, "total": 100}},
                                  {"name": "b", "litellm_params": {"model": "openai/b"},
                                   "timeouts": {"first_byte": 200, "total": 50}}],
                          tiers={"free": {"models": ["*"]}})
    bound = load_config_data(streams).longest_request
    assert bound.seconds == (2 * 300 + 5) + (2 * 200 + 5) + 50  # stream: 1060 > embeddings 2 × 100 + 5 + 2 × 50 + 5
    assert bound.why.startswith("1060s: a stream on 'a': 'a' 2 × models[0].timeouts.first_byte 300s")
    assert bound.why.endswith("then streaming models[1].timeouts.total 50s")


def test_a_stale_after_shorter_than_the_longest_request_is_an_error_naming_both_paths():
    errors = errors_of(config_with(plugins=["auth", {"name": "energy", "settings": {"stale_after": "5m"}}]))
    assert errors == ["plugins[1].settings.stale_after: 300s is shorter than the longest request (1860s: embeddings"
                      " on 'demo': 'demo' 3 × models[0].timeouts.total 600s + 2 waits 60s (retries))"]


def test_an_idempotency_window_shorter_than_the_longest_request_is_an_error():
    data = config_with(plugins=["auth", "idempotency", "energy"], energy={"idempotency_window": "10m"})
    errors = errors_of(data)
    assert len(errors) == 1 and errors[0].startswith(
        "energy.idempotency_window: 600s is shorter than the longest request (1860s: ")
    del data["plugins"][1]
    load_config_data(data)  # without the idempotency plugin the window is not used


def test_a_disabled_plugin_or_bad_settings_are_left_to_the_plugin_checks():
    load_config_data(config_with(plugins=[{"name": "energy", "enabled": False, "settings": {"stale_after": "1s"}}]))
    load_config_data(config_with(plugins=[{"name": "energy", "settings": {"stale_aftr": "1s"}}]))


def test_the_idempotency_lease_and_stale_after_default_to_outlast_the_longest_request():
    """The lease (how long a crashed process's claim blocks its key) and the sweeper's
    stale_after are derived: at least 15 min / 1 h, longer when the timeouts allow longer
    requests (the default timeouts: 3 × (120 s + 30 s) + 600 s for one stream already
    exceed the old fixed 15-minute lease)."""
    from gateway.store import IN_FLIGHT_LEASE, idempotency_decision
    from plugins.energy import STALE_AFTER

    quick = load_config_data(config_with(models=[{"name": "demo", "litellm_params": {"model": "demo/offline"},
                                                  "timeouts": {"first_byte": 5, "total": 10}}],
                                         tiers={"free": {"models": ["*"]}}))
    assert quick.outlasting_requests(IN_FLIGHT_LEASE) == IN_FLIGHT_LEASE
    default = load_config_data(config_with())
    lease = default.outlasting_requests(IN_FLIGHT_LEASE)
    assert lease == 1860 + 60 and default.outlasting_requests(STALE_AFTER) == STALE_AFTER
    common = dict(stored_status="in_flight", stored_fingerprint="f", fingerprint="f", window=86400.0,
                  stored_created_at=0.0, lease=lease)
    assert idempotency_decision(now=default.longest_request.seconds, **common) == "in_flight"
    assert idempotency_decision(now=lease, **common) == "reclaim"


def test_the_repos_config_yaml_and_the_test_config_pass_the_time_checks(upstream):
    from tests.conftest import base_config

    assert load_config(ROOT / "config.yaml").longest_request.seconds > 0
    load_config_data(base_config(upstream, store_url="sqlite:///:memory:"))


def test_the_ready_line_names_address_config_store_and_models_without_keys(monkeypatch):
    """`serve` prints one human line once it listens (stderr; stdout is JSON logs)."""
    from proxy import ready_line

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-set")
    config = load_config_data({
        "store": {"url": "postgresql://gw:s3cret@db:5432/gateway?schema=x"},
        "models": [{"name": "demo", "litellm_params": {"model": "demo/offline"}},
                   {"name": "gpt-4o", "litellm_params": {"model": "openai/gpt-4o", "api_key": "os.environ/OPENAI_API_KEY"}},
                   {"name": "claude", "litellm_params": {"model": "anthropic/claude-haiku-4-5"}}]})
    line = ready_line(config, "config.yaml", "http://127.0.0.1:8080")
    assert line == ("gateway ready on http://127.0.0.1:8080 · config config.yaml · store postgresql://gw@db:5432/gateway"
                    " · 3 models, without keys: gpt-4o (no OPENAI_API_KEY) · dashboard http://127.0.0.1:8080/dashboard")
    assert "s3cret" not in line
