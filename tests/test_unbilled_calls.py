"""Every upstream call is in the usage log (issue 21 point 6): a dispatch whose overlapped
energy reservation lost (another process spent the balance meanwhile; here the store
itself, behind the energy plugin's back) is recorded on the request's own row, so the sum
of `cost_usd` equals what the provider bills. docs/billing.md "Calls the gateway could not
bill"."""

from __future__ import annotations

import httpx
import openai
import pytest

from gateway.price_map import count_text
from gateway.usage import cost_usd
from plugins.base import Usage
from tests.conftest import FULL_CHAIN, MASTER_KEY
from tests.test_accounting import usage_rows

HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture
def gateway(gateway_factory):
    return gateway_factory(plugins=[*FULL_CHAIN, "accounting"])


def call_cost(gw, model: str, upstream) -> float:
    """What the provider bills for one call of the fake upstream to `model`."""
    usage = Usage(upstream.prompt_tokens, upstream.completion_tokens,
                  upstream.prompt_tokens + upstream.completion_tokens)
    return cost_usd(gw.config, model, f"openai/{model}", usage)


def spend_behind_the_gateways_back(gw, user_id: str, amount: int) -> None:
    """What another gateway process on the same store does: the energy plugin here still
    trusts the balance it saw last, so the next request overlaps its reservation."""
    assert gw.run(gw.store.reserve_energy(user_id, amount, "another-process")).ok


def metrics(gw) -> dict:
    response = httpx.get(gw.url + "/admin/metrics?window=1h", headers={"Authorization": f"Bearer {MASTER_KEY}"},
                         timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def upstream_models(upstream) -> list[str]:
    return [r.json["model"] for r in upstream.requests if r.path.endswith("/chat/completions")]


@pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)
@pytest.mark.parametrize("stream", [False, True])
def test_a_dispatch_refused_by_its_lost_reservation_is_on_its_row(gateway, upstream, stream):
    user_id, key = gateway.make_user(energy=4)
    client = gateway.client(key)
    client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)  # 2 energy; 2 left, seen
    spend_behind_the_gateways_back(gateway, user_id, 2)
    with pytest.raises(openai.RateLimitError) as refused:
        if stream:
            list(client.chat.completions.create(model="gpt-4o-mini", messages=HELLO, stream=True))
        else:
            client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    assert refused.value.code == "insufficient_energy"
    assert upstream_models(upstream) == ["gpt-4o-mini", "gpt-4o-mini"]  # the overlap did dispatch

    served, lost = sorted(usage_rows(gateway, 2), key=lambda r: r["status"])
    assert (served["status"], served["unbilled_calls"], served["unbilled_cost_usd"]) == (200, 0, None)
    assert (lost["status"], lost["error_type"], lost["energy_cost"], lost["unbilled_calls"]) == \
        (429, "insufficient_energy", 0, 1)
    assert lost["cost_usd"] == lost["unbilled_cost_usd"] > 0
    assert lost["tokens_prompt"] > 0 and lost["unbilled_tokens"] == lost["tokens_total"]
    if not stream:  # a stream is closed after its first chunk: its tokens are estimated
        assert (lost["tokens_prompt"], lost["tokens_completion"]) == (served["tokens_prompt"],
                                                                     served["tokens_completion"])
        assert lost["cost_usd"] == pytest.approx(served["cost_usd"], rel=1e-9)
        # The provider's bill: every upstream call, each at its price.
        billed = sum(call_cost(gateway, m, upstream) for m in upstream_models(upstream))
        assert served["cost_usd"] + lost["cost_usd"] == pytest.approx(billed, rel=1e-9)
    else:
        assert lost["usage_estimated"]
    # Money: the user paid for the one answer only.
    assert gateway.balance(user_id) == 0
    shown = metrics(gateway)
    assert (shown["unbilledCalls"], shown["unbilledCostUsd"]) == (1, float(lost["cost_usd"]))
    assert shown["totalCost"] == float(served["cost_usd"] + lost["cost_usd"])


def test_a_dispatch_moved_to_a_cheaper_model_bills_both_calls_on_one_row(gateway, upstream):
    user_id, key = gateway.make_user(energy=10)
    client = gateway.client(key)
    client.chat.completions.create(model="gpt-4o", messages=HELLO)  # 5 energy; 5 left, seen
    spend_behind_the_gateways_back(gateway, user_id, 3)  # 2 left: gpt-4o-mini only
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=HELLO)
    assert raw.parse().model == "gpt-4o-mini"
    assert raw.headers["X-Model-Downgraded-From"] == "gpt-4o"
    calls = upstream_models(upstream)
    assert calls == ["gpt-4o", "gpt-4o", "gpt-4o-mini"]

    rows = usage_rows(gateway, 2)
    assert len(calls) == sum(1 + r["unbilled_calls"] for r in rows)  # every upstream call, on a row
    moved = next(r for r in rows if r["model"] == "gpt-4o-mini")
    gpt4o, mini = call_cost(gateway, "gpt-4o", upstream), call_cost(gateway, "gpt-4o-mini", upstream)
    assert (moved["status"], moved["energy_cost"], moved["unbilled_calls"]) == (200, 2, 1)
    assert moved["unbilled_cost_usd"] == pytest.approx(gpt4o, rel=1e-9)
    assert moved["cost_usd"] == pytest.approx(gpt4o + mini, rel=1e-9)
    assert sum(r["cost_usd"] for r in rows) == pytest.approx(sum(call_cost(gateway, m, upstream) for m in calls),
                                                             rel=1e-9)
    assert gateway.balance(user_id) == 0
    assert metrics(gateway)["unbilledCalls"] == 1


LONG = "Summarise the following report in three bullet points, plainly. " * 8
INSTRUCTIONS = "You are a careful analyst; answer in British English. " * 4


@pytest.mark.parametrize("given", ["text", "items"])
def test_a_discarded_responses_stream_counts_its_input_and_instructions(gateway, upstream, given):
    """A /v1/responses body has no `messages`: its prompt is `instructions` and `input` (a
    string or a list of items), and the discarded stream's row counts them."""
    user_id, key = gateway.make_user(energy=4)
    client = gateway.client(key)
    client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)  # 2 energy; 2 left, seen
    spend_behind_the_gateways_back(gateway, user_id, 2)
    given_input = LONG if given == "text" else [
        {"role": "user", "content": [{"type": "input_text", "text": LONG}]}]
    with pytest.raises(openai.RateLimitError) as refused:
        list(client.responses.create(model="gpt-4o-mini", input=given_input, instructions=INSTRUCTIONS,
                                     stream=True))
    assert refused.value.code == "insufficient_energy"
    assert [r.path for r in upstream.requests][-1].endswith("/responses")  # the overlap did dispatch

    lost = next(r for r in usage_rows(gateway, 2) if r["status"] == 429)
    assert lost["unbilled_calls"] == 1 and lost["usage_estimated"]
    assert lost["tokens_prompt"] > count_text(LONG) + count_text(INSTRUCTIONS)
    assert lost["cost_usd"] == lost["unbilled_cost_usd"] > 0
