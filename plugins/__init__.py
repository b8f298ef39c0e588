"""Built-in plugins, by the name config.yaml uses for them.

A third-party plugin is named by its import path instead: `- name: mypkg.module:MyPlugin`.
"""

from __future__ import annotations

import importlib
from typing import Any

from pydantic import ValidationError

from plugins.base import Plugin, Services

BUILTIN = {
    "request_log": "plugins.request_log:RequestLog",
    "auth": "plugins.auth:Auth",
    "tier_policy": "plugins.tier_policy:TierPolicy",
    "rate_limit": "plugins.rate_limit:RateLimit",
    "energy": "plugins.energy:Energy",
    "idempotency": "plugins.idempotency:Idempotency",
    "workspace_prompt": "plugins.workspace_prompt:WorkspacePrompt",
    "accounting": "plugins.accounting:Accounting",
    "metrics": "plugins.metrics:Metrics",
    "cache": "plugins.cache:ResponseCache",
    "experiments": "plugins.experiments:Experiments",
}


def plugin_class(name: str) -> type[Plugin]:
    target = BUILTIN.get(name, name)
    if ":" not in target:
        raise ValueError(f"unknown plugin {name!r} (built-in: {', '.join(BUILTIN)})")
    module_name, _, attr = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot load plugin {name!r}: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, Plugin)):
        raise ValueError(f"{target} is not a Plugin subclass")
    return cls


def validate_plugin_settings(entries: list[Any]) -> list[str]:
    """Errors ("plugins[1].settings.x: ...") for every entry that would not load."""
    errors: list[str] = []
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        if entry.name in seen:
            errors.append(f"plugins[{i}].name: {entry.name!r} is listed twice")
        seen.add(entry.name)
        try:
            cls = plugin_class(entry.name)
        except ValueError as exc:
            errors.append(f"plugins[{i}].name: {exc}")
            continue
        try:
            cls.Settings.model_validate(entry.settings)
        except ValidationError as exc:
            for err in exc.errors():
                where = ".".join(str(p) for p in err["loc"])
                msg = "unknown key (typo?)" if err["type"] == "extra_forbidden" else err["msg"]
                errors.append(f"plugins[{i}].settings{'.' + where if where else ''}: {msg}")
    return errors


def build_plugins(entries: list[Any], services: Services) -> list[Plugin]:
    plugins = []
    for entry in entries:
        if not entry.enabled:
            continue
        cls = plugin_class(entry.name)
        plugins.append(cls(cls.Settings.model_validate(entry.settings), services))
    return plugins
