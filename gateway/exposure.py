"""Secure by default: who may spend the operator's provider keys through a plugin chain.

A config without a `plugins:` section runs STANDARD_CHAIN (the shipped config.yaml's
list; tests/test_secure_default.py holds the two equal). A chain the operator lists
must guard what it serves:

* `auth`, so every caller is a known user (else anyone who reaches the port calls every
  model with the operator's keys);
* `energy` and `accounting` when a model calls a provider (every model but the offline
  demo), so its calls are limited by a balance and recorded in the usage log.

A chain that leaves any of these open is refused (config validation, so `check-config`,
start-up and a live reload) unless the operator states it with
`server.allow_unauthenticated: true`, which is accepted only when the server binds a
loopback address; the ready line then says in words what is open. A built-in's subclass
(a plugin of one's own that extends `plugins.auth:Auth`) counts as the built-in.
docs/operations.md "Secure by default".
"""

from __future__ import annotations

import ipaddress
from typing import Any

STANDARD_CHAIN = ("metrics", "request_log", "auth", "workspace_prompt", "rate_limit", "idempotency",
                  "tier_policy", "energy", "accounting")
# Deployments whose calls cost nothing and reach no provider (the offline demo).
OFFLINE_MODELS = ("demo/",)
FLAG = "server.allow_unauthenticated"


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or `localhost`: only this machine can connect."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def _has(plugins: list[Any], builtin: str) -> bool:
    from plugins import BUILTIN, plugin_class  # plugins import gateway.config, which imports this module

    wanted = plugin_class(BUILTIN[builtin])
    for entry in plugins:
        if not entry.enabled:
            continue
        try:
            if issubclass(plugin_class(entry.name), wanted):
                return True
        except ValueError:  # an unknown plugin: reported by plugins.validate_plugin_settings
            continue
    return False


def open_doors(config: Any) -> list[tuple[str, str]]:
    """What `config`'s chain leaves open: (label, in words); [] for a guarded chain."""
    doors = []
    if not _has(config.plugins, "auth"):
        doors.append(("unauthenticated", "no 'auth' plugin: anyone who reaches the port can call every model"))
    paid = [name for name in config.model_names()
            if any(not d.litellm_params.model.startswith(OFFLINE_MODELS) for d in config.deployments(name))]
    missing = [name for name in ("energy", "accounting") if not _has(config.plugins, name)]
    if paid and missing:
        effect = {"energy": "not limited by energy", "accounting": "not recorded in the usage log"}
        doors.append(("unmetered", f"no {' or '.join(repr(m) for m in missing)} plugin in front of models that "
                                   f"call a provider ({', '.join(paid)}): their calls are "
                                   f"{' and '.join(effect[m] for m in missing)}"))
    return doors


def config_errors(config: Any) -> list[str]:
    """Config validation's errors: an open chain not stated, or stated off loopback."""
    errors = [f"plugins: the chain runs {label} ({words}): list the standard chain ({', '.join(STANDARD_CHAIN)}) "
              f"or delete the plugins section, or state {FLAG}: true (on a loopback host only)"
              for label, words in open_doors(config) if not config.server.allow_unauthenticated]
    errors.extend(bind_errors(config, config.server.host))
    return errors


def bind_errors(config: Any, host: str) -> list[str]:
    """`server.allow_unauthenticated` with a host others can reach (also `serve --host`)."""
    if config.server.allow_unauthenticated and not is_loopback(host):
        return [f"{FLAG}: accepted only when the server binds a loopback address (127.0.0.1, ::1, localhost), "
                f"not {host!r}"]
    return []


def ready_warning(config: Any) -> str:
    """The ready line's words for an open chain ('' for a guarded one)."""
    return "".join(f" · {label.upper()} ({FLAG}): {words}" for label, words in open_doors(config))
