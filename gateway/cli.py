"""The command line: `python proxy.py serve|check-config|users|keys|workspaces|energy|usage ...`.

    python proxy.py                      # serve with ./config.yaml
    python proxy.py serve --config FILE  # same, explicit
    python proxy.py check-config [FILE]  # validate only; exit 1 on error

The admin commands are gateway/admin/cli.py's. proxy.main() hands over to `main` with
its `create_app`, so nothing here imports proxy.py.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

import structlog

from gateway import exposure
from gateway.config import ConfigError
from gateway.reload import check_config
from gateway.workers import AppFactory, leave_despite_blocked_threads, run_worker, supervise

log = structlog.get_logger("gateway")

DEFAULT_CONFIG = "config.yaml"


def configure_logging(level: str = "info") -> None:
    from gateway import logs

    logs.configure(level)


def _serve(args: argparse.Namespace, create_app: AppFactory) -> int:
    try:
        config = check_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    configure_logging()
    host = args.host or config.server.host
    refused = exposure.bind_errors(config, host)  # `--host` past a loopback-only statement
    if refused:
        print(ConfigError(refused), file=sys.stderr)
        return 1
    refused = _schema_refused(config)
    if refused:
        print(f"serve: {refused}", file=sys.stderr)
        return 2
    port = args.port if args.port is not None else config.server.port
    workers = args.workers if args.workers is not None else config.server.workers
    log.info("gateway_starting", host=host, port=port, workers=workers, models=config.model_names(),
             plugins=[p.name for p in config.plugins if p.enabled], store=config.store.url.split("?")[0].split("@")[-1])
    if workers > 1:
        if port == 0:
            print("workers > 1 needs a fixed port", file=sys.stderr)
            return 1
        if any(p.name == "rate_limit" and p.enabled for p in config.plugins) and not config.rate_limits.redis_url:
            log.warning("rate_limits_per_process", hint="set rate_limits.redis_url so limits are shared by workers")
        return supervise(create_app, str(args.config), config, host, port, workers)
    run_worker(create_app, config, str(args.config), host, port, reuse_port=False)
    log.info("gateway_stopped")
    leave_despite_blocked_threads()
    return 0


def _schema_refused(config: Any) -> str | None:
    """Before serving: the store's schema is one this release can serve on (a later
    release's contract step would refuse it, naming both versions)."""
    from gateway.store import open_store
    from gateway.store.migrations import MigrationError, check_compatible, latest

    async def check() -> str | None:
        store = open_store(config.store.url, **config.store.backend_options())
        await store.open(migrate=False)
        try:
            check_compatible(await store.schema_versions(), latest(store.schema_known))
        except MigrationError as exc:
            return str(exc)
        finally:
            await store.close()
        return None

    try:
        return asyncio.run(check())
    except Exception:  # noqa: BLE001 — unreachable now: the start says so in its own words
        return None


def _fmt_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "never (store.backfill_pace: 0)"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _print_plan(plan: dict[str, Any], url: str, pace: float) -> None:
    from gateway.store.migrations import CHECKED_FROM

    schema = plan["schema"]
    print(f"store: {url.split('?')[0].split('@')[-1]} ({plan['dialect']})")
    print(f"schema: version {schema['applied']} applied, this release knows version {schema['known']}")
    if schema["newerExpandOnly"]:
        print(f"  newer migrations, expand-only (this release serves on them): {schema['newerExpandOnly']}")
    if plan["migrations"]:
        bound = f", lock_timeout {plan['lockTimeout']}" if plan["lockTimeout"] else ""
        old = [m["version"] for m in plan["migrations"] if m["version"] < CHECKED_FROM]
        rules = ("; migrations before {} predate the online rules and may rewrite tables or read the history"
                 .format(CHECKED_FROM) if old else "; no table rewrite, no history scan")
        print(f"migrations to apply (one transaction{bound}{rules}):")
        for m in plan["migrations"]:
            print(f"  {m['version']:>3}  {m['name']}")
    else:
        print("migrations to apply: none")
    if plan["backfills"]:
        print(f"backfills (after the schema step, in the background while serving at pace {pace:g},"
              " or ./gw migrate --backfill):")
        for b in plan["backfills"]:
            print(f"  {b['name']} (migration {b['migration']}): {b['rows']:,} rows, about"
                  f" {_fmt_seconds(b['seconds'])} at full pace, {_fmt_seconds(b['secondsWhileServing'])} while serving")
    else:
        print("backfills: none")


def _migrate(args: argparse.Namespace) -> int:
    """./gw migrate [--plan] [--backfill]: the schema step ahead of a deploy (a Kubernetes
    Job), with progress; docs/upgrades.md."""
    import json
    import time

    from gateway.store import backfill, open_store
    from gateway.store.migrations import MigrationError, plan

    try:
        config = check_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    pace = config.store.backfill_pace

    async def run() -> int:
        store = open_store(config.store.url, **config.store.backend_options())
        await store.open(migrate=False)
        try:
            what = await plan(store, pace)
            if args.json and args.plan:
                print(json.dumps(what, indent=2))
                return 0
            _print_plan(what, config.store.url, pace)
            if args.plan:
                return 0
            started = time.monotonic()
            applied = await store.migrate()
            took = time.monotonic() - started
            print(f"applied migrations {', '.join(map(str, applied))} in {took:.2f} s" if applied
                  else "schema up to date", flush=True)
            if not args.backfill:
                return 0
            last = [0.0]

            def progress(state: dict[str, Any]) -> None:
                if state["finished_at"] is not None or time.monotonic() - last[0] >= 1.0:
                    last[0] = time.monotonic()
                    print(f"  {state['name']}: {backfill.percent(state):g}% ({state['done_rows']:,} rows)", flush=True)

            if not 0 < args.pace <= 1:
                print("migrate: --pace must be above 0 and at most 1", file=sys.stderr)
                return 1
            await backfill.BackfillRunner(store, pace=args.pace, start_delay=0, on_progress=progress,
                                          chunk_seconds=backfill.CHUNK_SECONDS_ALONE).run()
            print("backfills complete", flush=True)
            return 0
        finally:
            await store.close()

    try:
        return asyncio.run(run())
    except MigrationError as exc:
        print(f"migrate: {exc}", file=sys.stderr)
        return 2


def _check(args: argparse.Namespace) -> int:
    try:
        config = check_config(args.file)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"{args.file}: OK ({len(config.model_names())} models, {len(config.tiers)} tiers, "
          f"{len(config.plugins)} plugins)")
    return 0


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise SystemExit(f"{name}: expected an integer, got {value!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="proxy.py", description="OpenAI-compatible AI gateway")
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="run the gateway (default)")
    serve.add_argument("--config", default=os.environ.get("GATEWAY_CONFIG", DEFAULT_CONFIG))
    # GATEWAY_HOST / GATEWAY_PORT / GATEWAY_WORKERS: the container image's way to set them
    # (Containerfile); a flag wins over its variable, the variable over config.yaml.
    serve.add_argument("--host", default=os.environ.get("GATEWAY_HOST") or None,
                       help="bind address (default: $GATEWAY_HOST, else server.host)")
    serve.add_argument("--port", type=int, default=_env_int("GATEWAY_PORT"),
                       help="port (default: $GATEWAY_PORT, else server.port)")
    serve.add_argument("--workers", type=int, default=_env_int("GATEWAY_WORKERS"),
                       help="processes sharing the port (default: $GATEWAY_WORKERS, else server.workers)")
    serve.set_defaults(func=_serve)
    migrate = sub.add_parser("migrate", help="apply the store's migrations ahead of a deploy (docs/upgrades.md)")
    migrate.add_argument("--config", default=os.environ.get("GATEWAY_CONFIG", DEFAULT_CONFIG))
    migrate.add_argument("--plan", action="store_true", help="say what would run (migrations, backfills, rows, time)")
    migrate.add_argument("--json", action="store_true", help="with --plan: the plan as JSON")
    migrate.add_argument("--backfill", action="store_true",
                         help="also run the background backfills to completion (else the gateways run them)")
    migrate.add_argument("--pace", type=float, default=1.0,
                         help="with --backfill: the share of the time spent backfilling (0-1, default 1)")
    migrate.set_defaults(func=_migrate)
    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("file", nargs="?", default=os.environ.get("GATEWAY_CONFIG", DEFAULT_CONFIG))
    check.set_defaults(func=_check)
    try:
        from gateway.admin import cli as admin_cli
    except ImportError:
        admin_cli = None
    if admin_cli is not None:
        admin_cli.add_commands(sub)
    return parser


def main(argv: list[str] | None = None, *, create_app: AppFactory) -> int:
    """`python proxy.py ...`: proxy.main hands over here with its app factory."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["serve", *argv]
    args = parser.parse_args(argv)
    if args.func is _serve:
        return _serve(args, create_app)
    return args.func(args)
