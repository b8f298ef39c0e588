"""Each upstream attempt is dispatched exactly once, whatever combination of reservation
overlap, retry, fallback and stream applies. The fake upstream counts what it received.

(With the reservation overlapping the upstream call, a request a fallback served used to
run its whole retry-and-fallback chain a second time: the gate compared its choice with
the model that served instead of the one dispatch started with.)
"""

from __future__ import annotations

import pytest

from tests.conftest import FULL_CHAIN, base_config
from tests.fakes import Fault

MSGS = [{"role": "user", "content": "hi"}]

SCENARIOS = {
    # faults pushed before the request -> models the upstream must see, in order
    "plain": ([], ["gpt-4o"]),
    "one retry": ([Fault.status(500, "blip")], ["gpt-4o", "gpt-4o"]),
    "fallback": ([Fault.status(500, "down")] * 3, ["gpt-4o", "gpt-4o", "gpt-4o", "gpt-4o-mini"]),
    "rate limited, then fallback": ([Fault.status(429, "slow down", {"Retry-After": "0"})] * 3,
                                    ["gpt-4o", "gpt-4o", "gpt-4o", "gpt-4o-mini"]),
}


def models_with_fallback(upstream):
    models = base_config(upstream, store_url="sqlite:///unused")["models"]
    for entry in models:
        if entry["name"] == "gpt-4o":
            entry["fallbacks"] = ["gpt-4o-mini"]
    return models


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "reserve-first"])
def test_every_attempt_reaches_the_upstream_once(gateway_factory, upstream, scenario, stream, overlap):
    plugins = [p if p != "energy" else {"name": "energy", "settings": {"overlap": overlap}} for p in FULL_CHAIN]
    gw = gateway_factory(plugins=plugins, models=models_with_fallback(upstream))
    user_id, key = gw.make_user(energy=1000)
    client = gw.client(key)
    client.chat.completions.create(model="gpt-4o-mini", messages=MSGS)  # a recent reservation: overlap applies
    upstream.requests.clear()
    faults, expected = SCENARIOS[scenario]
    upstream.push(*faults)
    if stream:
        chunks = list(client.chat.completions.create(model="gpt-4o", messages=MSGS, stream=True))
        served = chunks[0].model
    else:
        served = client.chat.completions.create(model="gpt-4o", messages=MSGS).model
    assert [r.json["model"] for r in upstream.requests if r.path.endswith("/chat/completions")] == expected
    assert served == expected[-1]
    gw.settle()
    # Charged once, at the price of what was reserved (gpt-4o: 5; the warm-up gpt-4o-mini: 2).
    assert gw.balance(user_id) == 1000 - 2 - 5
