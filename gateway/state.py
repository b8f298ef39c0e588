"""App state: the config snapshot a request keeps to its end, and the typed app keys
(aiohttp-demos' typedefs) through which handlers and route modules reach it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from gateway.chain import Chain
from gateway.config import Config
from gateway.directory import Directory
from gateway.router import Router
from plugins.base import Plugin, Services

if TYPE_CHECKING:
    from gateway.telemetry import Telemetry


@dataclass(frozen=True)
class Snapshot:
    """The config and the chain built from it. A request takes the current snapshot when it
    arrives and keeps it to its end, so a live reload never changes a request mid-way."""

    config: Config
    chain: Chain
    telemetry: "Telemetry | None" = None  # the tracer of config.telemetry; None: tracing off


@dataclass
class Gateway:
    snapshot: Snapshot
    router: Router
    store: Any = None
    directory: Directory | None = None
    started_at: float = field(default_factory=time.time)
    ready: bool = False
    config_path: str | None = None
    retired_plugins: list[Plugin] = field(default_factory=list)  # replaced by a reload
    retired_telemetry: list[Any] = field(default_factory=list)  # tracers a reload replaced: flushed at stop

    @property
    def config(self) -> Config:
        return self.snapshot.config

    @property
    def chain(self) -> Chain:
        return self.snapshot.chain

    async def flush_endings(self, timeout: float = 2.0) -> None:
        """Run the endings still owed and write what the plugins hold behind the answers
        (feedback on an answer whose usage row is not written yet)."""
        await self.chain.drain(timeout=timeout)
        await self.chain.flush()


GATEWAY = web.AppKey("gateway", Gateway)

SERVICES = web.AppKey("services", Services)
