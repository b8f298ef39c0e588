"""The documentation keeps up with the code: a hook, plugin or config section that is not
documented fails the build (datasette's test_docs, adapted)."""

from __future__ import annotations

import asyncio
import importlib
import re
from pathlib import Path

import pytest

from gateway.admin import reports
from gateway.config import Config
from gateway.store import USAGE_COLUMNS, open_store
from plugins import BUILTIN
from plugins.base import HOOKS, Plugin

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


@pytest.mark.parametrize("hook", sorted(HOOKS))
def test_every_hook_has_a_docstring_in_the_contract(hook):
    method = getattr(Plugin, hook)
    assert method.__doc__ and len(method.__doc__.strip()) > 20, f"Plugin.{hook} needs a docstring"


@pytest.mark.parametrize("hook", sorted(h for h in HOOKS if h.startswith("on_")))
def test_every_request_hook_is_named_in_the_readme(hook):
    assert f"`{hook}`" in README


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_every_builtin_plugin_is_documented_in_its_module_and_the_readme(name):
    module = importlib.import_module(BUILTIN[name].split(":")[0])
    assert module.__doc__ and "plugins:" in module.__doc__, f"{module.__name__} must show its YAML"
    assert f"`{name}`" in README, f"README must describe the {name} plugin"


@pytest.mark.parametrize("section", sorted(Config.model_fields))
def test_every_config_section_is_in_the_readme_and_the_shipped_config(section):
    assert f"`{section}" in README, f"README must explain config section {section!r}"
    assert f"\n{section}:" in (ROOT / "config.yaml").read_text(), f"config.yaml should show {section!r}"


def _readme_section(title: str) -> str:
    start = README.index(title)
    end = README.find("\n#", start + len(title))
    return README[start:end if end != -1 else None]


@pytest.mark.parametrize("column", sorted(USAGE_COLUMNS))
def test_every_usage_log_column_is_in_the_readme(column):
    """README "Usage log, cost, metrics" lists every ai_usage_logs column."""
    assert re.search(rf"\b{column}\b", _readme_section("## Usage log, cost, metrics")), \
        f"README must list the ai_usage_logs column {column!r}"


def test_every_admin_metrics_field_is_in_the_readme(tmp_path):
    """README "Reports at scale" names every field GET /admin/metrics returns."""
    async def fields() -> list[str]:
        async with open_store(f"sqlite:///{tmp_path}/docs.db") as store:
            return list(await reports.dashboard(store, 0.0))

    section = _readme_section("### Reports at scale")
    missing = [name for name in asyncio.run(fields()) if not re.search(rf"\b{name}\b", section)]
    assert not missing, f"README 'Reports at scale' must name the /admin/metrics fields {missing}"
