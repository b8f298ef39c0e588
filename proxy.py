"""The gateway's HTTP surface: `create_app(config)`, its routes, the thin handlers of its own
(health, /admin/config) and the error middleware; `main()` hands over to gateway/cli.py.

    python proxy.py                      # serve with ./config.yaml
    python proxy.py serve --config FILE  # same, explicit
    python proxy.py check-config [FILE]  # validate only; exit 1 on error
    python proxy.py users|keys|workspaces|energy|usage ...   # admin (see --help)

Where the rest lives (docs/architecture.md has the whole map): the plugin chain in
gateway/chain.py, the request lifecycle in gateway/lifecycle.py, one adapter per inbound
wire format in gateway/inbound/, the providers in gateway/providers/, live reload in
gateway/reload.py, workers in gateway/workers.py. Nothing imports this module (it runs as
`__main__`): the plugin contract lives in plugins/base.py.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import sys
from typing import Any, AsyncIterator, Callable

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import structlog  # noqa: E402
from aiohttp import web  # noqa: E402

from gateway import http_server  # noqa: E402
from gateway.admin.api import admin_routes  # noqa: E402
from gateway.alerts import alerts_cleanup  # noqa: E402
from gateway.admin.dashboard import dashboard_routes  # noqa: E402
from gateway.admin.oidc import install_oidc  # noqa: E402
from gateway.batches import BATCHES, BatchService, batches_cleanup  # noqa: E402
from gateway.chain import Chain  # noqa: E402
from gateway.config import Config, redacted_config  # noqa: E402
from gateway.change_feed import ChangeFeed  # noqa: E402
from gateway.directory import Directory  # noqa: E402
from gateway.errors import ApiError, internal_error, store_unavailable  # noqa: E402
from gateway.feedback import feedback_routes  # noqa: E402
from gateway.inbound.anthropic import anthropic_count_tokens, anthropic_messages  # noqa: E402
from gateway.inbound.batches import batches_routes  # noqa: E402
from gateway.inbound.files import files_routes  # noqa: E402
from gateway.inbound.message_batches import message_batches_routes  # noqa: E402
from gateway.inbound.mcp_mount import install_mcp  # noqa: E402
from gateway.inbound.openai import chat_completions, embeddings, list_models  # noqa: E402
from gateway.inbound.responses import responses_create, stored_response  # noqa: E402
from gateway.journal import EndingsJournal, journal_dir  # noqa: E402
from gateway.lifecycle import error_response, json_response, new_request_id  # noqa: E402
from gateway.providers.litellm import use_blocking_executor  # noqa: E402
from gateway.reload import check_config, reload_config, watch_config_file  # noqa: E402
from gateway.router import Router  # noqa: E402
from gateway.state import GATEWAY, SERVICES, Gateway, Snapshot  # noqa: E402
from gateway.store import StoreUnavailable, backfill  # noqa: E402
from gateway.telemetry import build_telemetry, telemetry_cleanup  # noqa: E402
from gateway.usage import unpriced_models, warm_up  # noqa: E402
from gateway.workers import ready_line  # noqa: E402
from plugins import build_plugins  # noqa: E402
from plugins.auth import bearer_token, is_master_key  # noqa: E402
from plugins.base import Services  # noqa: E402

__all__ = ["GATEWAY", "Router", "check_config", "create_app", "main", "ready_line", "reload_config"]

log = structlog.get_logger("gateway")


async def health(request: web.Request) -> web.Response:
    return json_response(200, {"status": "ok"}, {})


async def health_ready(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    store_ok = True
    if gw.store is not None:
        try:
            store_ok = await asyncio.wait_for(gw.store.ping(), timeout=2)
        except Exception:  # noqa: BLE001 — any failure means not ready
            store_ok = False
    ready = gw.ready and store_ok
    return json_response(200 if ready else 503,
                          {"status": "ready" if ready else "not_ready", "config": "loaded",
                           "store": "ok" if store_ok else "unreachable", "models": len(gw.config.model_names())}, {})


@web.middleware
async def openai_errors(request: web.Request, handler: Callable) -> web.StreamResponse:
    """Whatever escapes a handler becomes an OpenAI-shaped error, never a traceback."""
    try:
        return await handler(request)
    except ApiError as err:
        return error_response(err)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status)
        message = {404: f"Unknown path {request.path}", 405: f"{request.method} is not allowed on {request.path}"}.get(
            exc.status, exc.reason)
        return error_response(ApiError(exc.status, message, code=code))
    except asyncio.CancelledError:
        raise
    except StoreUnavailable as exc:  # an admin read with the database away: say so, worth retrying
        request_id = new_request_id(request)
        log.warning("store_unavailable", path=request.path, request_id=request_id, error=str(exc)[:200])
        return error_response(store_unavailable(request_id))
    except Exception:
        request_id = new_request_id(request)
        log.exception("unhandled_error", path=request.path, request_id=request_id)
        return error_response(internal_error(request_id))


async def admin_config(request: web.Request) -> web.Response:
    """GET /admin/config: the effective config, secrets redacted. Master key only."""
    gw = request.app[GATEWAY]
    token = bearer_token(request.headers.get("Authorization"))
    if token is None or not is_master_key(token, gw.config.auth.master_key):
        raise ApiError(401 if token is None else 403, "GET /admin/config needs the master key",
                       code="invalid_api_key" if token is None else "forbidden")
    return json_response(200, redacted_config(gw.config), {})


def create_app(config: Config, *, router: Router | None = None, store: Any = None,
               config_path: str | None = None) -> web.Application:
    """Build the gateway. `store` may be passed in (tests); otherwise it is opened from
    `config.store.url` at start-up and closed at cleanup. With `config_path`, SIGHUP and
    changes of that file reload the config live (see `reload_config`)."""
    app = http_server.Application(middlewares=[openai_errors], client_max_size=config.server.max_body_bytes + 1024,
                                  handler_args={"header_timeout": config.server.header_timeout})
    services = Services(store=store, config=config)
    plugins = build_plugins(config.plugins, services)
    services.plugins = plugins
    gw = Gateway(snapshot=Snapshot(config, Chain(plugins), build_telemetry(config.telemetry)),
                 router=router or Router(), store=store, config_path=config_path)
    app[GATEWAY] = gw
    app[SERVICES] = services
    owns_store = store is None

    async def store_ctx(app: web.Application) -> AsyncIterator[None]:
        if owns_store:
            from gateway.store import open_store

            gw.store = open_store(config.store.url, **config.store.backend_options())
            await gw.store.open()
            services.store = gw.store
        services.directory = gw.directory = Directory(gw.store, config.auth.cache_ttl)
        feed = ChangeFeed(gw.store, gw.directory).start()  # admin changes of other processes
        yield
        await feed.stop()
        if owns_store:
            await gw.store.close()

    async def warm_ctx(app: web.Application) -> AsyncIterator[None]:
        """Say what cannot work (no price, no key), load what the first request would pay
        for (price map, litellm per provider), and freeze start-up objects out of the GC."""
        missing = unpriced_models(config)
        if missing:
            log.warning("model_price_unknown", models=missing,
                        hint="set models[].pricing in config.yaml; their cost_usd is logged as null")
        keyless = {e.name: config.missing_key(e) for e in config.models if config.missing_key(e) is not None}
        if keyless:
            log.warning("provider_key_missing", models=keyless,
                        hint="these deployments answer 502 upstream_auth_error until the variable is set")
        await asyncio.get_running_loop().run_in_executor(None, warm_up)
        await gw.router.warm_up(config)
        # litellm leaves ~400k long-lived objects; without this every full collection walks
        # them all (0.5 s pauses under load). Freeze them out of the collector's sight.
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 50, 100)  # per-request garbage is short-lived; collect it in bulk
        yield
        await gw.router.close()

    async def journal_ctx(app: web.Application) -> AsyncIterator[None]:
        """The endings journal (gateway/journal.py): replayed before the plugins start,
        closed after they flushed."""
        journal = await _open_journal(config, gw)
        yield
        if journal is not None:
            pending = gw.chain.pending_writes() + sum(p.pending_writes() for p in gw.retired_plugins)
            await journal.close(None, pending)

    async def plugins_ctx(app: web.Application) -> AsyncIterator[None]:
        await gw.chain.startup()
        gw.ready = True
        yield
        gw.ready = False
        # aiohttp has already waited for the handlers; endings still running (billing)
        # finish before the plugins flush and the store closes.
        if not await gw.chain.drain(timeout=max(5.0, config.server.shutdown_grace)):
            log.error("shutdown_endings_unfinished", requests=gw.chain.inflight.count)
        await gw.chain.shutdown()
        for plugin in gw.retired_plugins:
            try:
                await plugin.shutdown()
            except Exception:
                log.exception("plugin_shutdown_failed", plugin=plugin.name)

    async def reload_ctx(app: web.Application) -> AsyncIterator[None]:
        from gateway import logs

        tasks: list[asyncio.Task] = [asyncio.create_task(logs.flush_forever())]
        if config_path is not None:
            loop = asyncio.get_running_loop()
            try:
                loop.add_signal_handler(signal.SIGHUP, lambda: tasks.append(
                    asyncio.ensure_future(reload_config(app, reason="SIGHUP"))))
            except (NotImplementedError, RuntimeError, ValueError):
                pass  # not the main thread (tests) or no signals here: the file watcher remains
            tasks.append(asyncio.create_task(watch_config_file(app, config_path)))
        yield
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        logs.flush()

    async def executor_ctx(app: web.Application) -> AsyncIterator[None]:
        use_blocking_executor(asyncio.get_running_loop())
        yield

    app.cleanup_ctx.append(executor_ctx)
    app.cleanup_ctx.append(telemetry_cleanup(gw))
    app.cleanup_ctx.append(store_ctx)
    app.cleanup_ctx.append(alerts_cleanup(gw, services))  # before the plugins start, after they stop
    app.cleanup_ctx.append(warm_ctx)
    app.cleanup_ctx.append(journal_ctx)
    app.cleanup_ctx.append(plugins_ctx)
    app[BATCHES] = BatchService(gw)  # files and batches: the upstream client, the poller (gateway/batches.py)
    app.cleanup_ctx.append(batches_cleanup(app[BATCHES]))
    app.cleanup_ctx.append(reload_ctx)
    # After everything else started, stopped first: history after the gateway listens.
    app.cleanup_ctx.append(backfill.runner_ctx(lambda: gw.store, config.store.backfill_pace))
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/chat/completions", chat_completions)
    app.router.add_post("/v1/responses", responses_create)
    app.router.add_post("/responses", responses_create)
    for prefix in ("/v1", ""):
        app.router.add_get(prefix + "/responses/{response_id}", stored_response, allow_head=False)
        app.router.add_delete(prefix + "/responses/{response_id}", stored_response)
        app.router.add_get(prefix + "/responses/{response_id}/input_items", stored_response, allow_head=False)
    app.router.add_post("/v1/messages", anthropic_messages)
    app.router.add_post("/v1/messages/count_tokens", anthropic_count_tokens)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_post("/embeddings", embeddings)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/models", list_models)
    app.router.add_get("/v1/models/{model:.+}", list_models)
    app.router.add_get("/models/{model:.+}", list_models)
    app.router.add_get("/health", health)
    app.router.add_get("/health/ready", health_ready)
    app.router.add_routes(admin_routes())
    app.router.add_get("/admin/config", admin_config)
    app.router.add_routes(files_routes())
    app.router.add_routes(batches_routes())
    app.router.add_routes(message_batches_routes())
    app.router.add_routes(feedback_routes())
    app.router.add_routes(dashboard_routes())
    install_oidc(app)  # dashboard sign-in with an OIDC provider, /admin/session
    install_mcp(app)  # /mcp: the MCP gateway (gateway/inbound/mcp.py, its SDK loaded once servers are configured)
    for plugin in plugins:
        app.router.add_routes(plugin.routes())
    return app


async def _open_journal(config: Config, gw: Gateway) -> EndingsJournal | None:
    """The endings journal, when a plugin journals: replays what a dead process left
    (before the plugins start: the sweeper must not refund answered requests), then
    journals this process's answers."""
    plugins = gw.chain.plugins
    if not any(p.overrides("journal") for p in plugins):
        return None
    journal = EndingsJournal(journal_dir(config.store.url, config.store.journal_dir))
    journal.open()
    await journal.replay({p.name: p.replay for p in plugins if p.overrides("replay")})

    async def flush_all() -> None:
        for plugin in [*gw.chain.plugins, *gw.retired_plugins]:
            await plugin.flush()

    journal.start(flush_all)
    gw.chain.journal = journal
    return journal


def main(argv: list[str] | None = None) -> int:
    from gateway import cli

    return cli.main(argv, create_app=create_app)


if __name__ == "__main__":
    sys.exit(main())
