"""The command line: `python proxy.py serve|check-config|users|keys|workspaces|energy|usage ...`.

    python proxy.py                      # serve with ./config.yaml
    python proxy.py serve --config FILE  # same, explicit
    python proxy.py check-config [FILE]  # validate only; exit 1 on error

The admin commands are gateway/admin/cli.py's. proxy.main() hands over to `main` with
its `create_app`, so nothing here imports proxy.py.
"""

from __future__ import annotations

import argparse
import os
import sys

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
