"""Serving processes: one worker (`run_worker`), or `server.workers: N` forked workers sharing
the port under a supervisor that forwards signals and restarts a worker that dies
(`supervise`); the ready line; leaving despite threads stuck in a blocking call."""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from typing import Any, Callable

import structlog
from aiohttp import web

from gateway import exposure
from gateway.config import Config, ConfigError
from gateway.reload import check_config

log = structlog.get_logger("gateway")

AppFactory = Callable[..., web.Application]  # proxy.create_app(config, config_path=...)


def ready_line(config: Config, config_path: str, base: str) -> str:
    """The one human line printed once the gateway listens (the JSON logs carry the rest)."""
    store_shown = re.sub(r"(//[^/:@]*):[^/@]*@", r"\1@", config.store.url.split("?")[0])  # no password
    missing: dict[str, list[str]] = {}
    for entry in config.models:
        env = config.missing_key(entry)  # its api_key names an unset variable
        if env is not None:
            missing.setdefault(env, []).append(entry.name)
    keys = "; ".join(f"{', '.join(dict.fromkeys(names))} (no {env})" for env, names in missing.items())
    return (f"gateway ready on {base} · config {config_path} · store {store_shown} · "
            f"{len(config.model_names())} models" + (f", without keys: {keys}" if keys else "") +
            f" · dashboard {base}/dashboard" + exposure.ready_warning(config))


def run_worker(create_app: AppFactory, config: Config, config_path: str, host: str, port: int, *,
               reuse_port: bool) -> None:
    """Serve in this process until a signal stops it; print the ready line once listening."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    def print_ready(aiohttp_banner: str) -> None:  # "Running on http://host:port", the bound port
        bound = re.findall(r"https?://[^\s,]+", aiohttp_banner)
        # stderr: stdout carries one JSON log object per line, for log shippers.
        print(ready_line(config, config_path, bound[0] if bound else f"http://{host}:{port}"), file=sys.stderr,
              flush=True)

    web.run_app(create_app(config, config_path=config_path), host=host, port=port, reuse_port=reuse_port,
                shutdown_timeout=config.server.shutdown_grace, access_log=None, handle_signals=True,
                print=print_ready)


def supervise(create_app: AppFactory, config_path: str, config: Config, host: str, port: int, workers: int) -> int:
    """`server.workers: N`: N forked processes share the port (SO_REUSEPORT); the kernel
    spreads connections. State that must be exact (energy, usage) lives in the store, rate
    limits in Redis. This process forwards SIGTERM/SIGINT/SIGHUP and restarts a worker that
    dies unexpectedly."""
    children: dict[int, int] = {}
    stopping = False
    exit_codes: list[int] = []

    def spawn(slot: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            code = 0
            try:
                # A worker restarted after live edits must serve the file as it is now.
                try:
                    current = check_config(config_path)
                except ConfigError:
                    current = config
                run_worker(create_app, current, config_path, host, port, reuse_port=True)
            except BaseException:  # noqa: BLE001 — report, then leave without running parent code
                log.exception("worker_crashed", slot=slot)
                code = 1
            os._exit(code)
        children[pid] = slot

    def forward(signum: int, frame: Any) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for pid in list(children):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    for slot in range(workers):
        spawn(slot)
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        slot = children.pop(pid, None)
        code = os.waitstatus_to_exitcode(status)
        if stopping or slot is None:
            exit_codes.append(code)
            continue
        log.warning("worker_exited", slot=slot, pid=pid, exit_code=code, restarting=True)
        time.sleep(1)
        if not stopping:
            spawn(slot)
    log.info("gateway_stopped", workers=workers, exit_codes=exit_codes)
    # A worker still starting when SIGTERM came (before its loop installed the handler, e.g.
    # one just restarted) dies of the signal itself: it served nothing, so that is clean too.
    return 0 if all(c in (0, -signal.SIGTERM) for c in exit_codes) else 1


def leave_despite_blocked_threads(wait: float = 2.0) -> None:
    """The store is closed and every ending ran; only threads still inside a blocking
    call (a litellm call the router gave up on) remain. Python would join them at exit,
    however long they take: shutdown must end within shutdown_grace, so leave without them."""
    import threading

    deadline = time.monotonic() + wait
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join(max(0.0, deadline - time.monotonic()))
    stuck = [t.name for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if stuck:
        log.warning("exit_without_blocked_threads", threads=stuck[:10], count=len(stuck))
        from gateway import logs

        logs.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
