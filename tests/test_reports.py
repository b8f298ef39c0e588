"""Usage reports: `python proxy.py usage daily|top-users|actions|weekly` and
`GET /admin/usage/{report}` aggregate `ai_usage_logs` exactly, by window and workspace;
the weekly cost threshold is flagged in the report and warned about once when crossed.

Rows are inserted with known dates and costs through the store, so every number is known.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from structlog.testing import capture_logs

from gateway.admin.reports import iso_week
from tests.conftest import MASTER_KEY
from tests.test_accounting import COMPLETION, HELLO, PROMPT, start, usage_rows

ROOT = Path(__file__).resolve().parent.parent
NOW = time.time()
DAY = 86400.0
THRESHOLD = 2.0


def day_of(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d")


def week_of(ts: float) -> str:
    year, week = iso_week(ts)
    return f"{year}-W{week:02d}"


def seed(gw: Any) -> dict[str, Any]:
    """Five rows: two 3 days ago, two yesterday (one in another workspace), one 10 days ago."""
    gw.make_user(workspace="acme")
    gw.make_user(workspace="globex")
    acme = gw.run(gw.store.get_workspace("acme")).id
    globex = gw.run(gw.store.get_workspace("globex")).id
    t3, t1, t10 = NOW - 3 * DAY, NOW - 1 * DAY, NOW - 10 * DAY

    def row(n: int, ts: float, user: str, workspace: str, action: str, cost: float, tokens: int,
            energy: int, error: str | None = None) -> dict[str, Any]:
        return {"request_id": f"req_seed_{n}", "user_id": user, "workspace_id": workspace, "action": action,
                "provider": "openai", "model": "gpt-4o", "requested_model": "gpt-4o", "tokens_prompt": tokens,
                "tokens_completion": 0, "tokens_total": tokens, "cost_usd": cost, "energy_cost": energy,
                "status": 502 if error else 200, "error_type": error, "latency_ms": 100, "created_at": ts}

    rows = [
        row(1, t3, "usr_a", acme, "ai_message", 0.5, 100, 5),
        row(2, t3 + 60, "usr_b", acme, "email_draft", 1.25, 300, 0, error="upstream_error"),
        row(3, t1, "usr_a", acme, "ai_message", 0.25, 50, 5),
        row(4, t1 + 60, "usr_c", globex, "email_draft", 2.0, 400, 3),
        row(5, t10, "usr_a", acme, "ai_message", 100.0, 1000, 5),
    ]
    assert gw.run(gw.store.insert_usage(rows)) == 5
    return {"acme": acme, "globex": globex, "t3": t3, "t1": t1, "t10": t10}


@pytest.fixture
def seeded(gateway_factory, upstream, tmp_path):
    gw = start(gateway_factory, upstream, reports={"weekly_cost_threshold_usd": THRESHOLD})
    data = seed(gw)
    config = {"store": {"url": gw.config.store.url}, "models": [{"name": "demo", "litellm_params": {
        "model": "demo/offline"}}], "reports": {"weekly_cost_threshold_usd": THRESHOLD}}
    path = tmp_path / "reports.yaml"
    path.write_text(yaml.safe_dump(config))
    return gw, data, path


def run_cli(config: Path, *args: str) -> subprocess.CompletedProcess:
    """The real entry point in a subprocess (it pays ~4 s of CPU importing litellm)."""
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    return subprocess.run([sys.executable, "proxy.py", *args, "--config", str(config)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=90)


def cli_json(capsys: Any, config: Path, *args: str) -> dict[str, Any]:
    """The same CLI, parsed and run in this process (no litellm import per command)."""
    from proxy import main

    capsys.readouterr()
    assert main([*args, "--config", str(config), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def expected(data: dict[str, Any]) -> dict[str, Any]:
    d3, d1 = day_of(data["t3"]), day_of(data["t1"])
    nothing_cached = {"cache_hits": 0, "saved_usd": 0.0}
    daily = [{"date": d3, "requests": 2, "errors": 1, "tokens": 400, "cost_usd": 1.75, **nothing_cached},
             {"date": d1, "requests": 2, "errors": 0, "tokens": 450, "cost_usd": 2.25, **nothing_cached}]
    if d3 == d1:  # impossible two days apart, but keep the arithmetic honest
        raise AssertionError("seed dates collapsed")
    top = [{"user_id": "usr_c", "workspace_id": data["globex"], "requests": 1, "tokens": 400, "cost_usd": 2.0,
            "energy": 3},
           {"user_id": "usr_b", "workspace_id": data["acme"], "requests": 1, "tokens": 300, "cost_usd": 1.25,
            "energy": 0},
           {"user_id": "usr_a", "workspace_id": data["acme"], "requests": 2, "tokens": 150, "cost_usd": 0.75,
            "energy": 10}]
    actions = [{"action": "email_draft", "count": 2, "total_cost_usd": 3.25, "avg_cost_usd": 1.625,
                "avg_tokens": 350.0},
               {"action": "ai_message", "count": 2, "total_cost_usd": 0.75, "avg_cost_usd": 0.375,
                "avg_tokens": 75.0}]
    return {"daily": daily, "top-users": top, "actions": actions}


def expected_weekly(data: dict[str, Any]) -> list[dict[str, Any]]:
    weeks: dict[str, list[float]] = {}
    for ts, cost in ((data["t10"], 100.0), (data["t3"], 0.5), (data["t3"] + 60, 1.25), (data["t1"], 0.25),
                     (data["t1"] + 60, 2.0)):
        weeks.setdefault(week_of(ts), []).append(cost)
    return [{"week": w, "requests": len(c), "cost_usd": round(sum(c), 6), "threshold_usd": THRESHOLD,
             "over_threshold": round(sum(c), 6) > THRESHOLD} for w, c in sorted(weeks.items())]


def test_the_cli_reports_aggregate_the_usage_log_exactly(seeded, capsys):
    gw, data, config = seeded
    want = expected(data)
    assert cli_json(capsys, config, "usage", "daily")["rows"] == want["daily"]
    assert cli_json(capsys, config, "usage", "top-users")["rows"] == want["top-users"]
    assert cli_json(capsys, config, "usage", "actions")["rows"] == want["actions"]
    report = cli_json(capsys, config, "usage", "weekly", "--days", "14")
    assert report["rows"] == expected_weekly(data)
    assert report["threshold_exceeded"] == [w["week"] for w in expected_weekly(data) if w["over_threshold"]]
    assert week_of(data["t10"]) in report["threshold_exceeded"]  # the $100 day
    acme = cli_json(capsys, config, "usage", "daily", "--workspace", "acme")
    assert acme["workspace_id"] == data["acme"]
    assert acme["rows"] == [want["daily"][0], {"date": day_of(data["t1"]), "requests": 1, "errors": 0,
                                               "tokens": 50, "cost_usd": 0.25, "cache_hits": 0, "saved_usd": 0.0}]


def test_the_cli_weekly_report_warns_about_weeks_over_the_threshold(seeded):
    gw, data, config = seeded
    result = run_cli(config, "usage", "weekly", "--days", "14")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("weekly report, last 14 days")
    assert f"WARNING: weekly cost threshold exceeded in {week_of(data['t10'])}" in result.stdout


def admin_get(gw: Any, path: str, key: str = MASTER_KEY) -> httpx.Response:
    return httpx.get(gw.url + path, headers={"Authorization": f"Bearer {key}"}, timeout=10)


@pytest.mark.parametrize("report", ["daily", "top-users", "actions"])
def test_the_admin_api_gives_the_same_reports(seeded, report):
    gw, data, _ = seeded
    response = admin_get(gw, f"/admin/usage/{report}?days=7")
    assert response.status_code == 200
    assert response.json()["rows"] == expected(data)[report]


def test_the_admin_weekly_report_flags_weeks_over_the_threshold(seeded):
    gw, data, _ = seeded
    body = admin_get(gw, "/admin/usage/weekly?days=14").json()
    assert body["rows"] == expected_weekly(data)
    assert body["threshold_exceeded"] == [w["week"] for w in expected_weekly(data) if w["over_threshold"]]


def test_the_report_window_is_the_last_n_days(seeded):
    gw, data, _ = seeded
    assert sum(d["requests"] for d in admin_get(gw, "/admin/usage/daily?days=2").json()["rows"]) == 2
    assert sum(d["requests"] for d in admin_get(gw, "/admin/usage/daily?days=14").json()["rows"]) == 5
    top = admin_get(gw, "/admin/usage/top-users?days=14&limit=1").json()["rows"]
    assert [u["user_id"] for u in top] == ["usr_a"]  # the $100 request 10 days ago


def test_a_workspace_admin_gets_only_its_workspace_in_reports(seeded):
    gw, data, _ = seeded
    _, admin_key = gw.make_user(workspace="globex", role="workspace_admin")
    body = admin_get(gw, "/admin/usage/top-users?days=7", admin_key).json()
    assert [u["user_id"] for u in body["rows"]] == ["usr_c"]
    assert admin_get(gw, "/admin/usage/daily?workspace=acme", admin_key).status_code == 404


def test_unknown_reports_and_bad_windows_are_client_errors(seeded):
    gw, _, _ = seeded
    assert admin_get(gw, "/admin/usage/monthly").status_code == 404
    assert admin_get(gw, "/admin/usage/daily?days=0").status_code == 400
    assert admin_get(gw, "/admin/usage/daily?days=abc").status_code == 400


def test_the_weekly_cost_already_logged_counts_after_a_restart(gateway_factory, upstream):
    """The running week's cost is seeded from the log at start: a restart does not reset it."""
    per_request = PROMPT * 1e-3 + COMPLETION * 2e-3
    pricing = {"input_per_million": 1000, "output_per_million": 2000}
    overrides = {"reports": {"weekly_cost_threshold_usd": per_request * 1.5}}
    first = start(gateway_factory, upstream, pricing=pricing, **overrides)
    _, key = first.make_user()
    first.client(key).chat.completions.create(model="gpt-4o", messages=HELLO)
    usage_rows(first, 1)
    with capture_logs() as logs:
        second = start(gateway_factory, upstream, pricing=pricing, **overrides)
        second.client(key).chat.completions.create(model="gpt-4o", messages=HELLO)
        usage_rows(second, 2)
    warnings = [e for e in logs if e["event"] == "weekly_cost_threshold_exceeded"]
    assert len(warnings) == 1
    assert float(warnings[0]["week_cost_usd"]) == pytest.approx(per_request * 2, abs=1e-6)
