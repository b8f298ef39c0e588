"""A/B experiments (plugins/experiments.py) and feedback (gateway/feedback.py): sticky,
weight-proportional assignment that moves the fewest users when weights change; variants
that set the model, the system prompt and parameters; tier policy respected; usage rows
and X-Experiment; feedback only on one's own requests; the report checked against data."""

from __future__ import annotations

import math

import httpx
import pytest

from gateway.config import ExperimentConfig
from plugins.experiments import assign
from tests.conftest import MASTER_KEY

MSGS = [{"role": "user", "content": "Write a reply"}]
CHAIN = ["auth", "experiments", "tier_policy", "energy", {"name": "accounting", "settings": {"flush_interval": 0.05}}]


def experiment(weights=(50, 50), **extra) -> dict:
    return {"name": "drafts", "match": {"actions": ["email_draft"]}, "variants": [
        {"name": "current", "weight": weights[0]},
        {"name": "mini", "weight": weights[1], "model": "gpt-4o-mini", "system_prompt": "Be brief.",
         "params": {"temperature": 0.3}}], **extra}


def test_assignment_follows_the_weights_within_one_percent_over_10000_users():
    config = ExperimentConfig.model_validate(experiment(weights=(70, 30)))
    counts = {"current": 0, "mini": 0}
    for i in range(10_000):
        counts[assign(config, f"usr_{i}").name] += 1
    assert abs(counts["current"] / 10_000 - 0.70) < 0.01


def test_assignment_is_sticky_and_a_weight_change_moves_only_the_users_it_must():
    before = ExperimentConfig.model_validate(experiment(weights=(50, 50)))
    after = ExperimentConfig.model_validate(experiment(weights=(60, 40)))
    users = [f"usr_{i}" for i in range(10_000)]
    first = {u: assign(before, u).name for u in users}
    assert all(assign(before, u).name == first[u] for u in users[:500])  # sticky
    moved = [u for u in users if assign(after, u).name != first[u]]
    assert all(first[u] == "mini" and assign(after, u).name == "current" for u in moved)  # one way only
    assert abs(len(moved) / 10_000 - 0.10) < 0.01  # the 10% the change requires, no more


def gateway(gateway_factory, **kw):
    return gateway_factory(plugins=CHAIN, experiments=[experiment(**kw)])


def users_in_both_variants(gw, tier="pro"):
    """Users created until each variant has one: {variant: (user_id, key)}."""
    config = gw.config.experiments[0]
    found: dict[str, tuple[str, str]] = {}
    while len(found) < 2:
        user_id, key = gw.make_user(tier=tier, energy=100)
        found.setdefault(assign(config, user_id).name, (user_id, key))
    return found


def ask(gw, key, action="email_draft"):
    return gw.client(key).chat.completions.with_raw_response.create(
        model="gpt-4o", messages=MSGS, metadata={"action": action})


def test_each_variant_changes_the_request_as_configured_and_is_recorded(gateway_factory, upstream):
    gw = gateway(gateway_factory)
    users = users_in_both_variants(gw)
    control = ask(gw, users["current"][1])
    assert control.headers["X-Experiment"] == "drafts=current"
    assert upstream.last.json["model"] == "gpt-4o" and upstream.last.json["messages"] == MSGS
    variant = ask(gw, users["mini"][1])
    assert variant.headers["X-Experiment"] == "drafts=mini" and variant.parse().model == "gpt-4o-mini"
    sent = upstream.last.json
    assert sent["model"] == "gpt-4o-mini" and sent["temperature"] == 0.3
    assert sent["messages"][0] == {"role": "system", "content": "Be brief."}
    unmatched = ask(gw, users["mini"][1], action="ai_message")  # another action: no experiment
    assert "X-Experiment" not in unmatched.headers
    gw.settle()
    rows = sorted(gw.run(gw.store.usage_rows()), key=lambda r: r["created_at"])
    assert [(r["experiment"], r["variant"]) for r in rows] == [("drafts", "current"), ("drafts", "mini"), (None, None)]


def test_a_variant_the_tier_may_not_use_falls_back_to_the_control(gateway_factory, upstream):
    gw = gateway_factory(plugins=CHAIN, experiments=[{
        "name": "x", "variants": [{"name": "control", "weight": 1},
                                  {"name": "big", "weight": 1000, "model": "gpt-4o"}]}])
    _, key = gw.make_user(tier="free", energy=100)  # free may not use gpt-4o
    raw = gw.client(key).chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MSGS)
    assert raw.headers["X-Experiment"] == "x=control" and upstream.last.json["model"] == "gpt-4o-mini"


@pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)
def test_feedback_is_only_for_ones_own_requests_and_idempotent(gateway_factory, upstream, store_url):
    gw = gateway(gateway_factory)
    users = users_in_both_variants(gw)
    (_, my_key), (_, their_key) = users["current"], users["mini"]
    request_id = ask(gw, my_key).headers["X-Request-Id"]

    def send(key, body):
        return httpx.post(gw.url + "/v1/feedback", json=body, headers={"Authorization": f"Bearer {key}"})

    for value in (True, True, 1):  # again: the same single record
        assert send(my_key, {"request_id": request_id, "metric": "reply_sent", "value": value}).status_code == 200
    assert send(their_key, {"request_id": request_id, "metric": "reply_sent", "value": 0}).status_code == 404
    assert send(my_key, {"request_id": "req_nope", "metric": "m", "value": 1}).status_code == 404
    assert send("gw-nobody", {"request_id": request_id, "metric": "m", "value": 1}).status_code == 401
    for bad in ({"request_id": request_id, "metric": "bad metric!", "value": 1},
                {"request_id": request_id, "metric": "m", "value": "yes"},
                {"request_id": request_id, "metric": "m", "value": 1, "extra": 2}):
        response = send(my_key, bad)
        assert response.status_code == 400 and response.json()["error"]["param"]
    rows = gw.run(gw.store.report_query("SELECT request_id, metric, value FROM feedback", []))
    assert rows == [{"request_id": request_id, "metric": "reply_sent", "value": 1.0}]


@pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)
def test_the_experiments_report_matches_the_seeded_data(gateway_factory, upstream, store_url):
    gw = gateway(gateway_factory)
    users = users_in_both_variants(gw)
    ratings = {"current": [1, 0, 1, 1], "mini": [0, 0, 1]}
    for variant, values in ratings.items():
        for value in values:
            request_id = ask(gw, users[variant][1]).headers["X-Request-Id"]
            httpx.post(gw.url + "/v1/feedback", json={"request_id": request_id, "metric": "good", "value": value},
                       headers={"Authorization": f"Bearer {users[variant][1]}"}).raise_for_status()
    gw.settle()
    report = httpx.get(gw.url + "/admin/usage/experiments", params={"days": 1},
                       headers={"Authorization": f"Bearer {MASTER_KEY}"}).json()
    (drafts,) = report["rows"]
    assert drafts["experiment"] == "drafts" and drafts["control"] == "current"
    by_name = {v["variant"]: v for v in drafts["variants"]}
    assert by_name["current"]["requests"] == 4 and by_name["mini"]["requests"] == 3
    assert by_name["current"]["energy"] == 4 * 3 and by_name["current"]["error_rate"] == 0
    good = by_name["mini"]["feedback"]["good"]
    mean, n = 1 / 3, 3
    half = 1.96 * math.sqrt((sum((x - mean) ** 2 for x in ratings["mini"]) / (n - 1)) / n)
    assert good["n"] == 3 and good["mean"] == pytest.approx(mean)
    assert good["ci95"] == pytest.approx([round(mean - half, 6), round(mean + half, 6)], abs=1e-6)
    assert good["vs_control"]["diff"] == pytest.approx(1 / 3 - 3 / 4)
    assert by_name["current"]["latency_p50_ms"] is not None


def test_experiments_start_change_and_stop_on_a_config_reload(gateway_factory, upstream, tmp_path):
    import yaml

    from proxy import GATEWAY, reload_config
    from tests.conftest import base_config

    data = base_config(upstream, store_url=f"sqlite:///{tmp_path}/gw.db", plugins=CHAIN)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    gw = gateway_factory(raw=data)
    gw.state.config_path = str(path)
    _, key = gw.make_user(energy=100)
    assert "X-Experiment" not in ask(gw, key).headers
    data["experiments"] = [experiment(weights=(1, 1000))]
    path.write_text(yaml.safe_dump(data))
    assert gw.run(reload_config(gw.app, reason="test"))
    assert ask(gw, key).headers["X-Experiment"] in ("drafts=current", "drafts=mini")
    data["experiments"] = []
    path.write_text(yaml.safe_dump(data))
    assert gw.run(reload_config(gw.app, reason="test"))
    assert "X-Experiment" not in ask(gw, key).headers
    assert gw.app[GATEWAY] is gw.state  # the same gateway throughout
