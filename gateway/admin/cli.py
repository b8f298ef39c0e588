"""Admin CLI: `python proxy.py users|keys|workspaces|energy ...`.

Runs the same operations as /admin (gateway/admin/operations.py) with master rights, directly on the
store named in config.yaml. Every command takes `--json` for scripts. A running gateway
picks up changes within `auth.cache_ttl` (its cache is per process).

    python proxy.py workspaces create acme [--profile JSON] [--ai-settings JSON]
    python proxy.py workspaces list | show acme | update acme --ai-settings JSON
    python proxy.py users create --workspace acme --tier pro --energy 500 [--name N] [--admin]
    python proxy.py users list [--workspace acme] | show USER
    python proxy.py users set-tier USER pro
    python proxy.py energy grant USER 100 [--reason R] | adjust USER -20 | ledger USER
    python proxy.py keys create USER [--admin | --service] [--label L] [--expires 30d] [--models a,b] [--rpm N] [--tpm N]
    python proxy.py keys update KEY [--label L] [--expires 30d] [--models a,b] [--rpm N] [--tpm N] [--clear rpm]
    python proxy.py keys list [--user USER] | revoke KEY | rotate KEY
    python proxy.py usage daily|top-users|actions|weekly|experiments [--days N] [--workspace W] [--json]
    python proxy.py audit [--limit N] [--since 24h] [--workspace W] [--json]
    python proxy.py alerts test [--endpoint NAME] | list [--limit N] [--since 24h] [--status failed] [--workspace W]
    python proxy.py budgets set (--workspace W | --user U | --key K) (--usd 50 | --energy 500) --period day|week|month|life
                                [--timezone Europe/Berlin] [--alerts 50,80,100] [--hard refuse|downgrade|none]
    python proxy.py budgets list [--workspace W] | delete BUDGET
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any, Awaitable, Callable

import orjson

from gateway.errors import ApiError
from gateway.money import json_default, usd_text

Operation = Callable[[Any, argparse.Namespace], Awaitable[Any]]


def _json_arg(value: str) -> dict:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return parsed


def iso_times(result: Any) -> Any:
    """Every `*_at` epoch in a result as ISO-8601 UTC ("2026-11-30T05:09:52Z"): what a person
    (and `date -d`) reads, unlike 1795928992.31."""
    if isinstance(result, list):
        return [iso_times(item) for item in result]
    if isinstance(result, dict):
        return {k: (_iso(v) if k.endswith("_at") else iso_times(v)) for k, v in result.items()}
    return result


def _iso(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    text = datetime.fromtimestamp(value, timezone.utc).isoformat(timespec="milliseconds")
    return text.replace(".000+00:00", "Z").replace("+00:00", "Z")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return usd_text(value) if isinstance(value, Decimal) else str(value)


def _print_table(rows: list[dict]) -> None:
    if not rows:
        print("(no usage in this window)")
        return
    columns = list(rows[0])
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _experiment_rows(rows: list[dict]) -> list[dict]:
    """The experiments report, one line per variant (its feedback metrics in one cell)."""
    flat = []
    for experiment in rows:
        for v in experiment["variants"]:
            metrics = []
            for name, m in v["feedback"].items():
                cell = f"{name} {m['mean']:.3g} [{m['ci95'][0]}, {m['ci95'][1]}] n={m['n']}"
                if "vs_control" in m:
                    cell += f" Δ{m['vs_control']['diff']:+.3g}"
                metrics.append(cell)
            flat.append({"experiment": experiment["experiment"],
                         "variant": v["variant"] + (" (control)" if v["variant"] == experiment["control"] else ""),
                         "requests": v["requests"], "cost_usd": v["cost_usd"], "energy": v["energy"],
                         "tokens": v["tokens"], "error_rate": v["error_rate"], "p50_ms": v["latency_p50_ms"],
                         "p95_ms": v["latency_p95_ms"], "feedback": "; ".join(metrics)})
    return flat


def _print_human(result: Any) -> None:
    if isinstance(result, dict) and result.get("report") == "experiments":
        result = {**result, "rows": _experiment_rows(result["rows"])}
    if isinstance(result, dict) and "report" in result and isinstance(result.get("rows"), list):
        print(f"{result['report']} report, last {result['days']} days"
              + (f", workspace {result['workspace_id']}" if result.get("workspace_id") else ""))
        _print_table(result["rows"])
        if result.get("threshold_exceeded"):
            print(f"WARNING: weekly cost threshold exceeded in {', '.join(result['threshold_exceeded'])}")
        return
    if isinstance(result, list):
        if not result:
            print("(none)")
        for item in result:
            _print_human(item)
            print("-")
        return
    if isinstance(result, dict):
        width = max((len(k) for k in result), default=0)
        for key, value in result.items():
            if isinstance(value, (dict, list)):
                value = orjson.dumps(value, default=json_default).decode()
            elif isinstance(value, Decimal):
                value = usd_text(value)
            print(f"{key.ljust(width)}  {value}")
        return
    print(result)


async def open_store_or_explain(config: Any) -> Any:
    """The opened store; an unreachable database is an operator error stated plainly (an
    ApiError the commands print), not a traceback."""
    from gateway.store import open_store
    from gateway.store.migrations import MigrationError

    store = open_store(config.store.url, **config.store.backend_options())
    try:
        await store.open()
    except (OSError, asyncio.TimeoutError, ImportError) as exc:
        where = config.store.url.split("?")[0].split("@")[-1]  # never print credentials
        raise ApiError(503, f"cannot open the store at {where}: {exc}", type="server_error",
                       code="store_unavailable") from None
    except MigrationError as exc:  # a newer release's schema, a migration behind a lock (docs/upgrades.md)
        raise ApiError(503, str(exc), type="server_error", code="store_schema") from None
    return store


def run_operation(args: argparse.Namespace, operation: Operation) -> int:
    from gateway.admin.operations import MASTER, Admin
    from gateway.config import ConfigError, load_config

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1

    async def go() -> Any:
        store = await open_store_or_explain(config)
        try:
            return await operation(Admin(store, config), args, MASTER)
        finally:
            await store.close()

    try:
        result = iso_times(asyncio.run(go()))
    except ApiError as err:
        if args.json:
            print(json.dumps(err.body()), file=sys.stderr)
        else:
            print(f"error: {err.message}", file=sys.stderr)
        return 2
    if args.json:
        print(orjson.dumps(result, default=json_default, option=orjson.OPT_INDENT_2).decode())  # USD: numbers
    else:
        _print_human(result)
        if isinstance(result, dict) and result.get("api_key"):
            print("\nStore this API key now: it is shown only once.", file=sys.stderr)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    add_bootstrap(sub)
    def command(group: argparse._SubParsersAction, name: str, operation: Operation, help: str) -> argparse.ArgumentParser:
        parser = group.add_parser(name, help=help)
        parser.add_argument("--config", default=os.environ.get("GATEWAY_CONFIG", "config.yaml"))
        parser.add_argument("--json", action="store_true", help="machine-readable output")
        parser.set_defaults(func=lambda args: run_operation(args, operation))
        return parser

    # workspaces
    ws = sub.add_parser("workspaces", help="manage workspaces").add_subparsers(dest="action", required=True)
    p = command(ws, "create", lambda a, x, s: a.create_workspace(s, x.name, x.profile, x.ai_settings), "create a workspace")
    p.add_argument("name")
    p.add_argument("--profile", type=_json_arg)
    p.add_argument("--ai-settings", dest="ai_settings", type=_json_arg)
    command(ws, "list", lambda a, x, s: a.list_workspaces(s), "list workspaces")
    p = command(ws, "show", lambda a, x, s: a.show_workspace(s, x.name), "show a workspace")
    p.add_argument("name")
    p = command(ws, "update", lambda a, x, s: a.update_workspace(s, x.name, x.profile, x.ai_settings),
                "set a workspace's profile / AI settings")
    p.add_argument("name")
    p.add_argument("--profile", type=_json_arg)
    p.add_argument("--ai-settings", dest="ai_settings", type=_json_arg)

    # users
    users = sub.add_parser("users", help="manage users").add_subparsers(dest="action", required=True)
    p = command(users, "create", lambda a, x, s: a.create_user(
        s, x.workspace, x.tier, x.energy, x.name, "workspace_admin" if x.admin else "user"),
        "create a user and print its API key (once)")
    p.add_argument("--workspace", required=True)
    p.add_argument("--tier")
    p.add_argument("--energy", type=int, help="initial energy (default: the tier's refill amount, else 0)")
    p.add_argument("--name")
    p.add_argument("--admin", action="store_true", help="the key is a workspace admin key")
    p = command(users, "list", lambda a, x, s: a.list_users(s, x.workspace), "list users")
    p.add_argument("--workspace")
    p = command(users, "show", lambda a, x, s: a.show_user(s, x.user), "show a user, balance and keys")
    p.add_argument("user")
    p = command(users, "set-tier", lambda a, x, s: a.set_tier(s, x.user, x.tier), "change a user's tier")
    p.add_argument("user")
    p.add_argument("tier")

    # energy
    energy = sub.add_parser("energy", help="grant energy, read the ledger").add_subparsers(dest="action", required=True)
    p = command(energy, "grant", lambda a, x, s: a.grant_energy(s, x.user, x.amount, x.reason, "grant"),
                "add energy to a user")
    p.add_argument("user")
    p.add_argument("amount", type=int)
    p.add_argument("--reason")
    p = command(energy, "adjust", lambda a, x, s: a.grant_energy(s, x.user, x.amount, x.reason, "adjust"),
                "correct a balance (may be negative; never below zero)")
    p.add_argument("user")
    p.add_argument("amount", type=int)
    p.add_argument("--reason")
    p = command(energy, "ledger", lambda a, x, s: a.ledger(s, x.user, x.limit), "a user's energy ledger")
    p.add_argument("user")
    p.add_argument("--limit", type=int, default=100)

    # keys
    keys = sub.add_parser("keys", help="issue, list, revoke, rotate API keys").add_subparsers(dest="action", required=True)
    p = command(keys, "create", lambda a, x, s: a.create_key(s, x.user, "workspace_admin" if x.admin else "user",
                                                               service=x.service, **_key_controls(x)),
                "issue another key for a user")
    p.add_argument("user")
    p.add_argument("--admin", action="store_true")
    p.add_argument("--service", action="store_true",
                   help="a service key: acts for the workspace's end users named by the app's own ids")
    _key_control_args(p)
    p = command(keys, "update", lambda a, x, s: a.update_key(s, x.key, **_key_controls(x)),
                "set a key's label, expiry, models, rpm, tpm (--clear NAME removes one)")
    p.add_argument("key")
    _key_control_args(p)
    p.add_argument("--clear", action="append", default=[], choices=["label", "expires", "models", "rpm", "tpm"],
                   help="remove this control (repeatable)")
    p = command(keys, "list", lambda a, x, s: a.list_keys(s, x.user), "list keys (prefixes only)")
    p.add_argument("--user")
    p = command(keys, "revoke", lambda a, x, s: a.revoke_key(s, x.key), "revoke a key")
    p.add_argument("key")
    p = command(keys, "rotate", lambda a, x, s: a.rotate_key(s, x.key), "revoke a key and issue its replacement")
    p.add_argument("key")

    # audit log
    p = command(sub, "audit", lambda a, x, s: a.audit(s, x.limit, _duration_arg(x.since), x.workspace),
                "the audit log of admin actions, newest first")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--since", help="only the last 24h, 7d, ...")
    p.add_argument("--workspace")

    # alerts
    alerts = sub.add_parser("alerts", help="pushed alerts: send a test event, list deliveries").add_subparsers(
        dest="action", required=True)
    p = command(alerts, "test", lambda a, x, s: a.send_test_alert(s, x.endpoint),
                "send a test event to the alerts endpoints now")
    p.add_argument("--endpoint", help="only this endpoint (its name in config.yaml)")
    p = command(alerts, "list", lambda a, x, s: a.alerts(s, x.limit, _duration_arg(x.since), x.workspace, x.status),
                "alert deliveries, newest first")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--since", help="only the last 24h, 7d, ...")
    p.add_argument("--status", choices=["pending", "delivered", "failed"])
    p.add_argument("--workspace")

    # budgets
    budgets = sub.add_parser("budgets", help="spending ceilings per workspace, user or key").add_subparsers(
        dest="action", required=True)
    p = command(budgets, "set", lambda a, x, s: a.set_budget(
        s, workspace=x.workspace, user=x.user, key=x.key, unit="usd" if x.usd is not None else "energy",
        amount=x.usd if x.usd is not None else x.energy, period=x.period, timezone=x.timezone, alerts=x.alerts,
        hard=x.hard), "create or change the budget of a workspace, user or key for a unit and period")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--workspace")
    target.add_argument("--user")
    target.add_argument("--key")
    amount = p.add_mutually_exclusive_group(required=True)
    amount.add_argument("--usd", help="the ceiling in dollars (e.g. 50 or 12.5)")
    amount.add_argument("--energy", type=int, help="the ceiling in energy")
    p.add_argument("--period", required=True, choices=["day", "week", "month", "life"])
    p.add_argument("--timezone", default="UTC", help="IANA time zone of the period's midnight (default UTC)")
    p.add_argument("--alerts", default="", help="percentages that send budget.threshold_crossed, e.g. 50,80,100")
    p.add_argument("--hard", default="refuse", choices=["refuse", "downgrade", "none"],
                   help="at the ceiling: refuse (429), downgrade (cheaper models), none (alerts only)")
    p = command(budgets, "list", lambda a, x, s: a.list_budgets(s, x.workspace),
                "budgets with their current period, spent and remaining")
    p.add_argument("--workspace")
    p = command(budgets, "delete", lambda a, x, s: a.delete_budget(s, x.budget), "remove a budget")
    p.add_argument("budget")

    # usage reports
    usage = sub.add_parser("usage", help="usage and cost reports").add_subparsers(dest="action", required=True)
    for report in ("daily", "top-users", "actions", "weekly", "experiments"):
        p = command(usage, report, lambda a, x, s: a.usage_report(s, x.action, x.days, x.workspace, x.limit),
                    f"{report} report")
        p.add_argument("--days", type=int, default=7)
        p.add_argument("--workspace")
        p.add_argument("--limit", type=int, default=10)
    p = command(usage, "metrics", lambda a, x, s: a.dashboard(s, _window_arg(x.window), x.workspace),
                "the /admin/metrics numbers: totals, rates, latency percentiles, energy")
    p.add_argument("--window", default="24h", help="the last 24h (default), 7d, 30d, ...")
    p.add_argument("--workspace")


def _window_arg(value: str) -> float:
    from gateway.config import parse_duration

    try:
        return parse_duration(value)
    except (ValueError, OverflowError) as exc:
        raise ApiError(400, f"window: {exc}", param="window") from None


def _duration_arg(value: str | None) -> float | None:
    from gateway.config import parse_duration

    if value is None:
        return None
    try:
        return parse_duration(value)
    except (ValueError, OverflowError) as exc:
        raise ApiError(400, f"since: {exc}", param="since") from None


def _key_control_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--label", help="a name for the key (shown in lists)")
    p.add_argument("--expires", help="refused (401 key_expired) this long from now: 30d, 12h, 3600s")
    p.add_argument("--models", help="comma-separated models this key may use (a subset of the tier's)")
    p.add_argument("--rpm", type=int, help="the key's own requests per minute")
    p.add_argument("--tpm", type=int, help="the key's own tokens per minute")


def _key_controls(args: argparse.Namespace) -> dict[str, Any]:
    controls: dict[str, Any] = {name: None for name in getattr(args, "clear", [])}
    for name in ("label", "expires", "rpm", "tpm"):
        if getattr(args, name) is not None:
            controls[name] = getattr(args, name)
    if args.models is not None:
        controls["models"] = [m.strip() for m in args.models.split(",") if m.strip()]
    return controls


DEMO_KEY_FILE = "data/demo-key.txt"


def bootstrap(args: argparse.Namespace) -> int:
    """First-run set-up for `make run`: a `demo` workspace and a free-tier user whose key
    is saved in data/demo-key.txt (mode 600). Does nothing when that key still works."""
    from gateway.admin.operations import MASTER, Admin
    from gateway.config import ConfigError, load_config

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    path = args.key_file

    async def go() -> str | None:
        store = await open_store_or_explain(config)
        try:
            if os.path.exists(path):
                with open(path) as fh:
                    found = await store.lookup_key(fh.read().strip())
                if found is not None and not found.revoked:
                    return None
            admin = Admin(store, config)
            if await store.get_workspace("demo") is None:
                await admin.create_workspace(MASTER, "demo", profile={"company_name": "Demo Co"})
            created = await admin.create_user(MASTER, "demo", config.auth.default_tier, args.energy, name="demo user")
            return created["api_key"]
        finally:
            await store.close()

    key = asyncio.run(go())
    if key is None:
        print(f"demo key in {path} is valid; nothing to do")
        return 0
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key + "\n")
    print(f"created workspace 'demo' and a {config.auth.default_tier}-tier user; API key saved in {path}")
    return 0


def add_bootstrap(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bootstrap", help="first-run demo workspace + user (used by `make run`)")
    p.add_argument("--config", default=os.environ.get("GATEWAY_CONFIG", "config.yaml"))
    p.add_argument("--key-file", default=DEMO_KEY_FILE)
    p.add_argument("--energy", type=int, default=100)
    p.set_defaults(func=bootstrap)
