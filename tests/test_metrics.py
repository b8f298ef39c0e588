"""Metrics: the Prometheus scrape at /metrics and the dashboard JSON at /admin/metrics
agree with the usage log after a known set of requests, and leak no key or user.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import MASTER_KEY
from tests.fakes import Fault
from tests.test_accounting import CHAIN, COMPLETION, HELLO, PROMPT, start, usage_rows


def scrape(gw: Any) -> tuple[str, dict[str, list[Any]]]:
    response = httpx.get(gw.url + "/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    families = {f.name: f.samples for f in text_string_to_metric_families(response.text)}
    return response.text, families


def total(samples: list[Any], name: str, **labels: str) -> float:
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def known_traffic(gw: Any, upstream: Any) -> dict[str, Any]:
    """2 completions + 1 stream (success), 1 upstream failure, 1 missing key, 1 without energy."""
    user_id, key = gw.make_user(energy=100)
    poor_id, poor_key = gw.make_user(energy=0)
    client = gw.client(key)
    client.chat.completions.create(model="gpt-4o", messages=HELLO)
    client.chat.completions.create(model="gpt-4o", messages=HELLO)
    list(client.chat.completions.create(model="gpt-4o-mini", messages=HELLO, stream=True))
    upstream.push(Fault.status(500), Fault.status(500), Fault.status(500))
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    with pytest.raises(openai.AuthenticationError):
        gw.client("sk-not-a-key").chat.completions.create(model="gpt-4o", messages=HELLO)
    with pytest.raises(openai.RateLimitError):
        gw.client(poor_key).chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    return {"user_id": user_id, "key": key, "poor_id": poor_id, "poor_key": poor_key,
            "rows": usage_rows(gw, 6)}


# ---------------------------------------------------------------------------- /metrics


def test_prometheus_counters_match_the_usage_log(gateway_factory, upstream):
    gw = start(gateway_factory, upstream)
    traffic = known_traffic(gw, upstream)
    rows = traffic["rows"]
    _, families = scrape(gw)

    requests = families["gateway_requests"]
    assert total(requests, "gateway_requests_total") == len(rows) == 6
    # A request refused before its body was read (401) has no model: its label is "unknown".
    by_outcome = Counter((r["model"] or "unknown", r["provider"] or "none", str(r["status"])) for r in rows)
    for (model, provider, status), count in by_outcome.items():
        assert total(requests, "gateway_requests_total", model=model, provider=provider, status=status) == count
    assert total(requests, "gateway_requests_total", status="200") == 3

    tokens = families["gateway_tokens"]
    for model in {r["model"] for r in rows}:
        mine = [r for r in rows if r["model"] == model]
        assert total(tokens, "gateway_tokens_total", model=model, direction="prompt") == sum(
            r["tokens_prompt"] for r in mine)
        assert total(tokens, "gateway_tokens_total", model=model, direction="completion") == sum(
            r["tokens_completion"] for r in mine)
    assert total(tokens, "gateway_tokens_total") == 3 * (PROMPT + COMPLETION)

    cost = families["gateway_cost_usd"]
    per_model: dict[str, Decimal] = defaultdict(Decimal)
    for r in rows:
        per_model[r["model"]] += r["cost_usd"]
    for model, usd in per_model.items():
        assert total(cost, "gateway_cost_usd_total", model=model) == pytest.approx(float(usd), abs=1e-9)

    energy = families["gateway_energy"]
    settled = sum(r["energy_cost"] for r in rows)
    assert settled == 5 + 5 + 2
    assert total(energy, "gateway_energy_total", event="settled") == settled
    assert total(energy, "gateway_energy_total", event="refunded") == 2  # the failed gpt-4o-mini call
    assert total(energy, "gateway_energy_total", event="reserved") == settled + 2

    assert total(families["gateway_retries"], "gateway_retries_total", model="gpt-4o-mini") == 2
    assert total(families["gateway_in_flight_requests"], "gateway_in_flight_requests") == 0
    assert total(families["gateway_usage_write_queue_depth"], "gateway_usage_write_queue_depth") == 0
    latency = families["gateway_request_latency_seconds"]
    assert total(latency, "gateway_request_latency_seconds_count") == 6
    assert total(latency, "gateway_request_latency_seconds_count", stream="true") == 1


def test_the_scrape_contains_no_key_no_user_and_no_workspace(gateway_factory, upstream):
    gw = start(gateway_factory, upstream)
    traffic = known_traffic(gw, upstream)
    text, _ = scrape(gw)
    workspace_id = gw.run(gw.store.get_workspace("acme")).id
    for secret in (traffic["key"], traffic["key"][:12], traffic["poor_key"], traffic["user_id"],
                   traffic["poor_id"], workspace_id, "sk-not-a-key", "sk-upstream-openai-SECRET"):
        assert secret not in text


def test_a_model_name_the_gateway_does_not_serve_never_becomes_a_label(gateway_factory, upstream):
    """Label values come from config, not from the client: an unknown model (which may be
    anything a client typed, a key pasted in the wrong field included) is 'unknown'."""
    gw = start(gateway_factory, upstream)
    _, key = gw.make_user()
    with pytest.raises(openai.NotFoundError):
        gw.client(key).chat.completions.create(model="sk-live-pasted-into-the-model-field", messages=HELLO)
    with pytest.raises(openai.AuthenticationError):
        gw.client("nope").chat.completions.create(model="attacker-chosen-label-1", messages=HELLO)
    usage_rows(gw, 2)
    text, families = scrape(gw)
    assert "sk-live-pasted" not in text and "attacker-chosen" not in text
    requests = families["gateway_requests"]
    assert total(requests, "gateway_requests_total", model="unknown", status="404") == 1
    assert total(requests, "gateway_requests_total", model="unknown", status="401") == 1


# ------------------------------------------------------------------------ /admin/metrics


def admin_get(gw: Any, path: str, key: str = MASTER_KEY) -> httpx.Response:
    return httpx.get(gw.url + path, headers={"Authorization": f"Bearer {key}"}, timeout=10)


def test_the_dashboard_json_has_exact_numbers_for_a_known_set_of_requests(gateway_factory, upstream):
    gw = start(gateway_factory, upstream)
    _, key = gw.make_user(energy=100)
    client = gw.client(key)
    client.chat.completions.create(model="gpt-4o", messages=HELLO)
    client.chat.completions.create(model="claude", messages=HELLO)
    client.chat.completions.create(model="gpt-4o-mini", messages=HELLO, extra_headers={"Idempotency-Key": "a"})
    client.chat.completions.create(model="gpt-4o-mini", messages=HELLO, extra_headers={"Idempotency-Key": "a"})
    upstream.push(Fault.status(400))
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="gpt-4o", messages=HELLO)
    rows = usage_rows(gw, 5)
    body = admin_get(gw, "/admin/metrics").json()
    assert body["totalRequests"] == 5
    # 3 upstream answers and 1 replay of one of them carry tokens; the 400 carries none
    assert body["totalTokens"] == 4 * (PROMPT + COMPLETION)
    assert body["totalCost"] == float(sum(r["cost_usd"] for r in rows))  # the exact sum, as a JSON number
    assert body["averageLatency"] == round(sum(r["latency_ms"] for r in rows) / 5, 2)
    assert body["errorRate"] == 0.2
    assert body["cacheHitRate"] == 0.2
    assert body["providerDistribution"] == {"openai": 3, "anthropic": 1, "none": 1}  # the replay called no one
    assert body["modelDistribution"] == {"gpt-4o": 2, "claude": 1, "gpt-4o-mini": 2}


def test_a_workspace_admin_sees_only_its_own_workspace_on_the_dashboard(gateway_factory, upstream):
    gw = start(gateway_factory, upstream)
    _, acme_key = gw.make_user(workspace="acme")
    _, admin_key = gw.make_user(workspace="acme", role="workspace_admin")
    _, other_key = gw.make_user(workspace="globex")
    gw.client(acme_key).chat.completions.create(model="gpt-4o", messages=HELLO)
    for _ in range(3):
        gw.client(other_key).chat.completions.create(model="claude", messages=HELLO)
    usage_rows(gw, 4)
    mine = admin_get(gw, "/admin/metrics", admin_key)
    assert mine.status_code == 200
    assert mine.json()["totalRequests"] == 1
    assert mine.json()["modelDistribution"] == {"gpt-4o": 1}
    assert admin_get(gw, "/admin/metrics?workspace=globex", admin_key).status_code == 404
    assert admin_get(gw, "/admin/metrics").json()["totalRequests"] == 4
    assert admin_get(gw, "/admin/metrics?workspace=globex").json()["totalRequests"] == 3
    assert admin_get(gw, "/admin/metrics", acme_key).status_code == 403


def test_metrics_alone_counts_requests_without_accounting(gateway_factory, upstream):
    gw = start(gateway_factory, upstream, plugins=[p for p in CHAIN if p != CHAIN[-1]])
    _, key = gw.make_user()
    gw.client(key).chat.completions.create(model="gpt-4o", messages=HELLO)
    gw.settle()
    _, families = scrape(gw)
    assert total(families["gateway_requests"], "gateway_requests_total", model="gpt-4o", status="200") == 1
    assert total(families["gateway_usage_write_queue_depth"], "gateway_usage_write_queue_depth") == 0


@pytest.mark.parametrize("require_key", [False, True])
def test_the_scrape_needs_the_master_key_only_with_require_key(gateway_factory, upstream, require_key):
    """Open by default, as Prometheus exporters are; `require_key: true` wants the master key."""
    gw = start(gateway_factory, upstream, plugins=[{"name": "metrics", "settings": {"require_key": require_key}},
                                                   *CHAIN[1:]])
    _, user_key = gw.make_user()
    anonymous = httpx.get(gw.url + "/metrics", timeout=10)
    as_user = httpx.get(gw.url + "/metrics", headers={"Authorization": f"Bearer {user_key}"}, timeout=10)
    as_master = httpx.get(gw.url + "/metrics", headers={"Authorization": f"Bearer {MASTER_KEY}"}, timeout=10)
    assert as_master.status_code == 200 and "gateway_in_flight_requests" in as_master.text
    if require_key:
        assert (anonymous.status_code, as_user.status_code) == (401, 401)
        assert anonymous.json()["error"]["code"] == "invalid_api_key"
        assert "require_key" in anonymous.json()["error"]["message"]
    else:
        assert (anonymous.status_code, as_user.status_code) == (200, 200)
