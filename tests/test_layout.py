"""The house keeps its shape (docs/architecture.md): checked on the import graph of the product
modules (proxy.py, gateway/, plugins/), read with `ast` so nothing is imported or run."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _modules() -> dict[str, Path]:
    files = [ROOT / "proxy.py", *sorted((ROOT / "gateway").rglob("*.py")), *sorted((ROOT / "plugins").rglob("*.py"))]
    out = {}
    for path in files:
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _in_type_checking(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING":
            lines |= {n.lineno for sub in node.body for n in ast.walk(sub) if hasattr(n, "lineno")}
    return lines


def _imports(module: str) -> list[tuple[str, str | None]]:
    """(imported product module, the name taken from it or None), every import of `module`
    at any depth (function-level ones too), except those only for type checking."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    skip = _in_type_checking(tree)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: list[tuple[str, str | None]] = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.append((sub, None) if sub in MODULES else (base, alias.name))
    resolved = []
    for target, name in out:
        hit = target if target in MODULES else next((m for m in MODULES if target.startswith(m + ".")), None)
        if hit is not None and hit != module:
            resolved.append((hit, name))
    return resolved


GRAPH = {m: _imports(m) for m in MODULES}


def test_the_graph_sees_the_house():
    """A guard for the checks below: the walk finds the layers it is meant to check."""
    assert {"proxy", "gateway.lifecycle", "gateway.chain", "gateway.store", "plugins.base"} <= set(MODULES)
    assert any(m.startswith("gateway.inbound.") for m in MODULES)
    assert any(m.startswith("gateway.providers.") for m in MODULES)
    assert ("gateway.lifecycle", "run_request") in GRAPH["gateway.inbound.openai"]


def test_nothing_imports_proxy():
    """proxy.py runs as __main__: a module importing it would load a second copy."""
    assert [m for m, targets in GRAPH.items() if any(t == "proxy" for t, _ in targets)] == []


def test_no_module_imports_another_modules_underscore_names():
    private = [f"{m} imports {t}.{name}" for m, targets in GRAPH.items() for t, name in targets
               if name and name.startswith("_") and not name.startswith("__")]
    assert private == []


@pytest.mark.parametrize("provider", sorted(m for m in MODULES if m.startswith("gateway.providers.")))
def test_providers_never_import_inbound_adapters_or_the_lifecycle(provider):
    outward = [t for t, _ in GRAPH[provider]
               if t.startswith("gateway.inbound") or t in ("gateway.lifecycle", "gateway.state", "gateway.chain")]
    assert outward == []


def test_the_store_never_imports_the_layers_above_it():
    above = ("gateway.lifecycle", "gateway.chain", "gateway.inbound", "gateway.providers", "gateway.router", "plugins")
    found = [f"{m} -> {t}" for m, targets in GRAPH.items() if m.startswith("gateway.store")
             for t, _ in targets if t.startswith(above)]
    assert found == []


def test_no_import_circles():
    edges = {m: {t for t, _ in targets} for m, targets in GRAPH.items()}
    circles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                circles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module)
    assert circles == []


def test_proxy_stays_the_thin_http_surface():
    assert len((ROOT / "proxy.py").read_text().splitlines()) <= 500


def test_no_request_context_side_channel_for_passed_through_answers():
    """A pass-through answers with Relayed pieces (gateway/providers/base.py), not ctx.passthrough."""
    offenders = [str(p.relative_to(ROOT)) for p in MODULES.values() if "ctx.passthrough" in p.read_text()]
    assert offenders == []


def test_importing_the_gateway_loads_no_optional_sdk():
    """The MCP SDK (gateway/inbound/mcp.py), authlib and joserfc (gateway/admin/oidc.py) and the
    OpenTelemetry SDK (gateway/telemetry.py) are loaded when a config uses them, not by
    `proxy.py serve` itself: together they were ~40 MiB of every all-native gateway's RSS
    (docs/performance.md)."""
    import subprocess
    import sys

    code = ("import sys; sys.path.insert(0, '.'); import proxy; "
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))")
    loaded = set(subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                                check=True, timeout=120).stdout.split())
    assert loaded & {"mcp", "mcp_types", "starlette", "uvicorn", "authlib", "joserfc", "httpx", "httpx2",
                     "jsonschema", "opentelemetry", "litellm"} == set()
