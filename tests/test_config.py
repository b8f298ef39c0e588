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
