"""The documentation keeps up with the code: a hook, plugin, config section, usage column,
/admin/metrics field or module that is not documented fails the build (datasette's
test_docs, adapted). Each fact is checked in the page of docs/ that owns it; README.md is
the door: short, and linking every page."""

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
DOCS = ROOT / "docs"
README = (ROOT / "README.md").read_text()
README_MAX_BYTES = 10_240
PAGES = ["clients", "configuration", "routing", "billing", "plugins", "errors", "admin", "usage",
         "operations", "performance", "architecture", "development"]


def page(name: str) -> str:
    return (DOCS / f"{name}.md").read_text()


def section(name: str, title: str) -> str:
    """A page's section: from its heading to the next heading of the same or a higher level."""
    text = page(name)
    match = re.search(rf"^(#+) {re.escape(title)}\s*$", text, re.M)
    assert match, f"docs/{name}.md has no section {title!r}"
    level = len(match.group(1))
    end = re.search(rf"^#{{1,{level}}} ", text[match.end():], re.M)
    return text[match.start():match.end() + end.start() if end else None]


@pytest.mark.parametrize("hook", sorted(HOOKS))
def test_every_hook_has_a_docstring_in_the_contract(hook):
    method = getattr(Plugin, hook)
    assert method.__doc__ and len(method.__doc__.strip()) > 20, f"Plugin.{hook} needs a docstring"


@pytest.mark.parametrize("hook", sorted(HOOKS))
def test_every_hook_is_in_the_hook_reference(hook):
    """docs/plugins.md "Hook reference" names every hook of plugins/base.py."""
    assert re.search(rf"`{hook}[`(]", section("plugins", "Hook reference")), \
        f"docs/plugins.md 'Hook reference' must describe the {hook} hook"


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_every_builtin_plugin_is_documented_in_its_module_and_the_plugins_page(name):
    module = importlib.import_module(BUILTIN[name].split(":")[0])
    assert module.__doc__ and "plugins:" in module.__doc__, f"{module.__name__} must show its YAML"
    assert f"`{name}`" in page("plugins"), f"docs/plugins.md must describe the {name} plugin"


@pytest.mark.parametrize("section_name", sorted(Config.model_fields))
def test_every_config_section_is_in_the_configuration_page_and_the_shipped_config(section_name):
    assert f"`{section_name}`" in page("configuration"), \
        f"docs/configuration.md must explain config section {section_name!r}"
    assert f"\n{section_name}:" in (ROOT / "config.yaml").read_text(), f"config.yaml should show {section_name!r}"


@pytest.mark.parametrize("column", sorted(USAGE_COLUMNS))
def test_every_usage_log_column_is_in_the_usage_page(column):
    """docs/usage.md "Usage log, cost, metrics" lists every ai_usage_logs column."""
    assert re.search(rf"\b{column}\b", section("usage", "Usage log, cost, metrics")), \
        f"docs/usage.md must list the ai_usage_logs column {column!r}"


def test_every_admin_metrics_field_is_in_the_usage_page(tmp_path):
    """docs/usage.md "Reports at scale" names every field GET /admin/metrics returns."""
    async def fields() -> list[str]:
        async with open_store(f"sqlite:///{tmp_path}/docs.db") as store:
            return list(await reports.dashboard(store, 0.0))

    text = section("usage", "Reports at scale")
    missing = [name for name in asyncio.run(fields()) if not re.search(rf"\b{name}\b", text)]
    assert not missing, f"docs/usage.md 'Reports at scale' must name the /admin/metrics fields {missing}"


@pytest.mark.parametrize("name", PAGES)
def test_the_manual_has_a_page_per_subject(name):
    assert (DOCS / f"{name}.md").is_file(), f"docs/{name}.md is missing"


@pytest.mark.parametrize("doc", sorted(p.name for p in DOCS.glob("*.md")))
def test_every_docs_page_is_linked_from_the_readme(doc):
    assert f"](docs/{doc})" in README, f"README.md must link docs/{doc}"


def test_the_readme_is_the_door_not_the_manual():
    size = len((ROOT / "README.md").read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size:,} bytes (at most {README_MAX_BYTES:,}): move it to docs/"


def test_every_make_target_is_in_the_readme():
    phony = re.search(r"^\.PHONY:(.*)$", (ROOT / "Makefile").read_text(), re.M).group(1).split()
    missing = [target for target in phony if f"make {target}" not in README]
    assert not missing, f"README.md 'Make targets' must list {missing}"


def _slug(title: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def _anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for title in re.findall(r"^#+ (.+)$", _without_code_blocks(text), re.M):
        slug = _slug(title)
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def _without_code_blocks(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


def test_every_link_between_the_pages_resolves():
    """A relative link in README.md, CHANGELOG.md or docs/ points at a file that exists, and
    its #anchor at one of that file's headings."""
    broken = []
    for source in [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted(DOCS.glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", _without_code_blocks(source.read_text())):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            resolved = (source.parent / path).resolve() if path else source
            if not resolved.exists():
                broken.append(f"{source.name}: {target} (no such file)")
            elif anchor and resolved.is_file() and anchor not in _anchors(resolved.read_text()):
                broken.append(f"{source.name}: {target} (no such heading)")
    assert not broken, f"broken links: {broken}"


def _product_modules() -> list[Path]:
    files = [ROOT / "proxy.py"]
    for top in ("gateway", "plugins"):
        files += sorted(p for p in (ROOT / top).rglob("*.py") if "__pycache__" not in p.parts)
    return files


def _names(path: Path) -> list[str]:
    """How the module map may name a module: its path or its dotted name (a package: also
    its folder)."""
    rel = path.relative_to(ROOT)
    dotted = ".".join(rel.with_suffix("").parts)
    names = [rel.as_posix(), dotted]
    if path.name == "__init__.py":
        names += [f"{rel.parent.as_posix()}/", ".".join(rel.parent.parts)]
    return names


def test_every_product_module_is_named_in_the_architecture_page():
    """docs/architecture.md's module map names every .py of proxy.py, gateway/ and plugins/."""
    text = page("architecture")
    missing = [path.relative_to(ROOT).as_posix() for path in _product_modules()
               if not any(re.search(rf"(?<![\w./]){re.escape(name)}(?![\w/])", text) for name in _names(path))]
    assert not missing, f"docs/architecture.md's module map must name {missing}"
