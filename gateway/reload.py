"""The config, loaded and checked as a whole (`check_config`: schema, environment,
references, every plugin's settings), and swapped in live (`reload_config`) on SIGHUP or
when the file changes: in-flight requests finish on the snapshot they started with."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from gateway.chain import Chain
from gateway.config import RESTART_ONLY, Config, ConfigError, config_changes, load_config
from gateway.state import GATEWAY, SERVICES, Snapshot
from gateway.telemetry import build_telemetry, retire_telemetry
from plugins import build_plugins, plugin_class, validate_plugin_settings
from plugins.base import Plugin

log = structlog.get_logger("gateway")

CONFIG_POLL_SECONDS = 1.0


def check_config(path: str | Path) -> Config:
    """Load and validate config.yaml, plugin settings included; raises ConfigError with
    every error found in one run (schema, environment, references, plugin settings)."""
    errors: list[str] = []
    config: Config | None = None
    try:
        config = load_config(path)
    except ConfigError as exc:
        errors.extend(exc.errors)
    entries = config.plugins if config is not None else _plugin_entries_of(path)
    errors.extend(e for e in validate_plugin_settings(entries) if e not in errors)
    if errors or config is None:
        raise ConfigError(errors)
    return config


def _plugin_entries_of(path: str | Path) -> list[Any]:
    """The plugin entries of a config that did not load as a whole (to check them too)."""
    import yaml

    from gateway.config import PluginEntry

    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return []
    entries = []
    for item in (raw.get("plugins") if isinstance(raw, dict) else None) or []:
        try:
            entries.append(PluginEntry.model_validate(item))
        except Exception:  # noqa: BLE001 — its shape is already among the schema errors
            continue
    return entries


async def reload_config(app: web.Application, reason: str = "manual") -> bool:
    """Validate config.yaml and, if valid, swap it in atomically. In-flight requests finish
    on the snapshot they started with. Invalid: keep serving the last good config."""
    gw, services = app[GATEWAY], app[SERVICES]
    if gw.config_path is None:
        return False
    loop = asyncio.get_running_loop()
    try:
        new = await loop.run_in_executor(None, check_config, gw.config_path)
    except ConfigError as exc:
        log.error("config_reload_rejected", reason=reason, path=gw.config_path, errors=exc.errors,
                  keeping="the last good config")
        return False
    old = gw.config
    changes = config_changes(old, new)
    if not changes:
        log.info("config_reload_unchanged", reason=reason)
        return True
    for section, keys in RESTART_ONLY.items():
        changed = [k for k in keys if getattr(getattr(old, section), k) != getattr(getattr(new, section), k)]
        if changed:
            log.warning("config_change_needs_restart", section=section, keys=changed)
    # Reuse plugin instances whose entry did not change (they keep queues, metrics, caches);
    # build and start the others. Replaced ones are shut down when the gateway stops.
    # A plugin whose start-up depends on a changed section is rebuilt too.
    rebuild = {"rate_limit"} if old.rate_limits.redis_url != new.rate_limits.redis_url else set()
    current = {(p.name, repr(e.settings)): p
               for p, e in zip(gw.chain.plugins, [e for e in old.plugins if e.enabled]) if p.name not in rebuild}
    plugins: list[Plugin] = []
    started: list[Plugin] = []
    previous_config, services.config = services.config, new  # new plugins start on the new config
    try:
        for entry in (e for e in new.plugins if e.enabled):
            key = (plugin_class(entry.name).name, repr(entry.settings))
            plugin = current.pop(key, None)
            if plugin is None:
                plugin = build_plugins([entry], services)[0]
                await plugin.startup()
                started.append(plugin)
                if plugin.routes():
                    log.warning("config_change_needs_restart", plugin=entry.name, why="its HTTP routes")
            plugins.append(plugin)
    except Exception:
        log.exception("config_reload_failed", reason=reason)
        services.config = previous_config
        for plugin in started:
            await plugin.shutdown()
        return False
    gw.retired_plugins.extend(current.values())
    services.plugins = plugins
    if gw.directory is not None:
        gw.directory.ttl = new.auth.cache_ttl
    telemetry = gw.snapshot.telemetry
    if new.telemetry != old.telemetry:  # a new tracer
        if telemetry is not None:  # flushed and stopped once the requests it traces ended
            retire_telemetry(telemetry, gw.retired_telemetry)
        telemetry = build_telemetry(new.telemetry)
    gw.snapshot = Snapshot(new, Chain(plugins, inflight=gw.chain.inflight, journal=gw.chain.journal), telemetry)
    log.info("config_reloaded", reason=reason, changes=changes)
    return True


async def watch_config_file(app: web.Application, path: str) -> None:
    """Reload when the file's mtime or size changes (editors replace files; no inotify)."""
    def stamp() -> tuple[float, int] | None:
        try:
            st = os.stat(path)
            return (st.st_mtime, st.st_size)
        except OSError:
            return None

    last = stamp()
    while True:
        await asyncio.sleep(CONFIG_POLL_SECONDS)
        now = stamp()
        if now is not None and now != last:
            last = now
            await reload_config(app, reason="file changed")
