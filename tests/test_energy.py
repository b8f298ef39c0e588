"""Energy: priced per action and model, reserved before the upstream call, settled on
success (also when the client leaves mid-stream), refunded in full on failure, never
charged twice for an idempotent retry, never overdrawn under concurrency.

Prices in the test config: ai_message gpt-4o 5, gpt-4o-mini 2, demo 1; email_draft 3.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter

import aiohttp
import openai
import pytest

from tests.fakes import Fault

HELLO = [{"role": "user", "content": "hi"}]


def wait_until(predicate, timeout: float = 5.0, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(interval)


def kinds(ledger) -> list[tuple[str, int]]:
    return [(e.kind, e.amount) for e in ledger]


def assert_ledger_matches_balance(gw, user_id: str) -> None:
    ledger = gw.ledger(user_id)
    balance = gw.balance(user_id)
    assert sum(e.amount for e in ledger) == balance
    assert ledger[-1].balance_after == balance
    assert all(e.balance_after >= 0 for e in ledger)


# --------------------------------------------------------------------------- headers


def test_every_model_response_carries_energy_and_request_id_headers(gateway):
    user_id, key = gateway.make_user(energy=20)
    raw = gateway.client(key).chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=HELLO)
    assert raw.headers["X-Energy-Cost"] == "2"
    assert raw.headers["X-Energy-Remaining"] == "18"
    assert raw.headers["X-Request-Id"].startswith("req_")
    embed = gateway.client(key).embeddings.with_raw_response.create(model="embed", input="x")
    assert embed.headers["X-Energy-Cost"] == "1"
    assert embed.headers["X-Energy-Remaining"] == "17"
    assert embed.headers["X-Request-Id"].startswith("req_")


def test_error_responses_to_authenticated_requests_carry_energy_headers(gateway, upstream):
    _, key = gateway.make_user(energy=20)
    upstream.push(Fault.status(400))
    with pytest.raises(openai.BadRequestError) as info:
        gateway.client(key).chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    headers = info.value.response.headers
    assert headers["X-Energy-Cost"] == "0"
    assert headers["X-Energy-Remaining"] == "20"
    assert headers["X-Request-Id"].startswith("req_")


# --------------------------------------------------------------------------- actions


def test_action_from_sdk_metadata_is_priced_by_its_own_price_book(gateway, upstream):
    _, key = gateway.make_user(energy=20)
    raw = gateway.client(key).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=HELLO, metadata={"action": "email_draft"})
    assert raw.headers["X-Energy-Cost"] == "3"
    assert raw.headers["X-Energy-Remaining"] == "17"


def test_action_from_x_action_header_is_priced_by_its_own_price_book(gateway):
    _, key = gateway.make_user(energy=20)
    raw = gateway.client(key).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=HELLO, extra_headers={"X-Action": "email_draft"})
    assert raw.headers["X-Energy-Cost"] == "3"
    default = gateway.client(key).chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=HELLO)
    assert default.headers["X-Energy-Cost"] == "2"


def test_metadata_is_stripped_before_the_upstream(gateway, upstream):
    _, key = gateway.make_user(energy=20)
    gateway.client(key).chat.completions.create(
        model="gpt-4o-mini", messages=HELLO, metadata={"action": "email_draft", "prospect_id": "p-1"})
    sent = upstream.last.json
    assert "metadata" not in sent
    assert "p-1" not in upstream.last.raw.decode()


def test_unknown_action_is_rejected_with_400_and_costs_nothing(gateway, upstream):
    user_id, key = gateway.make_user(energy=20)
    with pytest.raises(openai.BadRequestError) as info:
        gateway.client(key).chat.completions.create(model="gpt-4o-mini", messages=HELLO,
                                                    metadata={"action": "launch_rockets"})
    assert info.value.code == "unknown_action"
    assert upstream.count() == 0
    gateway.settle()
    assert gateway.balance(user_id) == 20


# --------------------------------------------------------------------------- refunds and charges


@pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)
def test_upstream_failing_after_all_retries_is_refunded_in_full(gateway, upstream):
    user_id, key = gateway.make_user(energy=20)
    upstream.push(Fault.status(500), Fault.status(500), Fault.status(500))
    with pytest.raises(openai.InternalServerError) as info:
        gateway.client(key).chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    assert upstream.count("/chat/completions") == 3
    assert info.value.response.headers["X-Energy-Cost"] == "0"
    assert info.value.response.headers["X-Energy-Remaining"] == "20"
    gateway.settle()
    assert gateway.balance(user_id) == 20
    assert kinds(gateway.ledger(user_id)) == [("grant", 20), ("reserve", -2), ("refund", 2)]


def test_stream_failing_upstream_before_its_first_byte_is_refunded(gateway, upstream):
    user_id, key = gateway.make_user(energy=20)
    upstream.push(Fault.status(500), Fault.status(500), Fault.status(500))
    with pytest.raises(openai.InternalServerError) as info:
        list(gateway.client(key).chat.completions.create(model="gpt-4o-mini", messages=HELLO, stream=True))
    assert info.value.response.headers["X-Energy-Remaining"] == "20"
    gateway.settle()
    assert kinds(gateway.ledger(user_id)) == [("grant", 20), ("reserve", -2), ("refund", 2)]


def test_streamed_answer_carries_energy_headers_and_is_charged(gateway):
    user_id, key = gateway.make_user(energy=20)
    raw = gateway.client(key).chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=HELLO,
                                                                       stream=True)
    assert (raw.headers["X-Energy-Cost"], raw.headers["X-Energy-Remaining"]) == ("2", "18")
    assert raw.headers["X-Request-Id"].startswith("req_")
    list(raw.parse())
    gateway.settle()
    assert kinds(gateway.ledger(user_id)) == [("grant", 20), ("reserve", -2), ("settle", 0)]


@pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)
def test_client_disconnecting_mid_stream_is_charged_not_refunded(gateway, upstream):
    user_id, key = gateway.make_user(energy=20)
    upstream.chunks = 30
    upstream.chunk_delay = 0.05
    upstream.reply = " ".join(f"word{i}" for i in range(30))

    async def read_one_chunk_then_leave() -> bytes:
        async with aiohttp.ClientSession() as session:
            response = await session.post(
                gateway.base_url + "/chat/completions", headers={"Authorization": f"Bearer {key}"},
                json={"model": "gpt-4o-mini", "messages": HELLO, "stream": True})
            assert response.status == 200
            first = await response.content.readline()
            response.close()  # drop the connection mid-stream
            return first

    assert asyncio.run(read_one_chunk_then_leave()).startswith(b"data: ")
    wait_until(lambda: any(e.kind in ("settle", "refund") for e in gateway.ledger(user_id)))
    gateway.settle()
    assert kinds(gateway.ledger(user_id)) == [("grant", 20), ("reserve", -2), ("settle", 0)]
    assert gateway.balance(user_id) == 18


# --------------------------------------------------------------------------- idempotency


@pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)
def test_idempotent_retry_is_charged_once_and_replays_the_first_result(gateway, upstream):
    user_id, key = gateway.make_user(energy=20)
    client = gateway.client(key)
    headers = {"Idempotency-Key": "order-42"}
    first = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=HELLO,
                                                            extra_headers=headers)
    gateway.settle()
    second = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=HELLO,
                                                             extra_headers=headers)
    assert second.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert second.parse().id == first.parse().id
    assert second.parse().choices[0].message.content == first.parse().choices[0].message.content
    assert second.headers["X-Energy-Cost"] == "0"
    assert second.headers["X-Energy-Remaining"] == "18"
    assert second.headers["X-Request-Id"] != first.headers["X-Request-Id"]
    assert upstream.count("/chat/completions") == 1
    gateway.settle()
    assert gateway.balance(user_id) == 18
    assert kinds(gateway.ledger(user_id)) == [("grant", 20), ("reserve", -2), ("settle", 0)]


def test_idempotent_retry_of_a_stream_replays_its_text_without_a_second_charge(gateway, upstream):
    user_id, key = gateway.make_user(energy=20)
    client = gateway.client(key)
    headers = {"Idempotency-Key": "stream-1"}

    def streamed() -> tuple[dict, str]:
        raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=HELLO, stream=True,
                                                              extra_headers=headers)
        text = "".join(chunk.choices[0].delta.content or "" for chunk in raw.parse() if chunk.choices)
        return raw.headers, text

    first_headers, first_text = streamed()
    gateway.settle()
    second_headers, second_text = streamed()
    assert first_text == upstream.reply
    assert second_text == first_text
    assert second_headers["Idempotent-Replayed"] == "true"
    assert upstream.count("/chat/completions") == 1
    gateway.settle()
    assert gateway.balance(user_id) == 18


@pytest.mark.parametrize("streamed", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("params", [{"n": 2}, {"n": 2, "logprobs": True, "top_logprobs": 2}],
                         ids=["n2", "n2-logprobs"])
def test_idempotent_retry_of_n_choices_replays_every_choice_whole(gateway, upstream, params, streamed):
    """A stream interleaves its n choices: the replay gives each of them back as the first
    answer had it, its logprobs included, not their text run together. (A retry is the
    same request, so it takes the first one's form: JSON or stream.)"""
    from tests.test_cache import answer_of

    user_id, key = gateway.make_user(energy=20)
    headers = {"Idempotency-Key": "n2"}
    first = answer_of(gateway, key, streamed, params, headers)
    gateway.settle()
    again = answer_of(gateway, key, streamed, params, headers)
    assert upstream.count("/chat/completions") == 1  # the second was the replay
    assert len(first["choices"]) == 2 and first["choices"][0] != first["choices"][1]
    assert all((c["logprobs"] is not None) == bool(params.get("logprobs")) for c in first["choices"])
    assert again == first
    gateway.settle()
    assert gateway.balance(user_id) == 18


def test_idempotent_retry_replays_even_after_the_workspace_prompt_changed(gateway, upstream):
    """The fingerprint is the client's request, not the gateway's rewrite of it."""
    from gateway.admin.operations import MASTER

    user_id, key = gateway.make_user(energy=20)
    admin = gateway.admin()
    prompt = {"inject_system_prompt": True, "system_prompt_template": "v1"}
    gateway.run(admin.update_workspace(MASTER, "acme", ai_settings=prompt))
    client = gateway.client(key)
    headers = {"Idempotency-Key": "prompt-edit"}
    first = client.chat.completions.create(model="gpt-4o-mini", messages=HELLO, extra_headers=headers)
    gateway.settle()
    gateway.run(admin.update_workspace(MASTER, "acme", ai_settings={**prompt, "system_prompt_template": "v2"}))
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=HELLO, extra_headers=headers)
    assert raw.headers["Idempotent-Replayed"] == "true"
    assert raw.parse().id == first.id
    assert upstream.count("/chat/completions") == 1
    gateway.settle()
    assert gateway.balance(user_id) == 18


def test_idempotency_keys_are_per_user(gateway, upstream):
    _, alice = gateway.make_user(energy=20)
    bob_id, bob = gateway.make_user(energy=20)
    headers = {"Idempotency-Key": "shared-key"}
    gateway.client(alice).chat.completions.create(model="gpt-4o-mini", messages=HELLO, extra_headers=headers)
    raw = gateway.client(bob).chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=HELLO,
                                                                       extra_headers=headers)
    assert "Idempotent-Replayed" not in raw.headers
    assert upstream.count("/chat/completions") == 2
    gateway.settle()
    assert gateway.balance(bob_id) == 18


@pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)
def test_idempotent_duplicate_while_first_is_in_flight_gets_409(gateway, upstream):
    user_id, key = gateway.make_user(energy=20)
    upstream.push(Fault.slow(1.0))
    headers = {"Idempotency-Key": "slow-1"}
    results: dict[str, object] = {}

    def first() -> None:
        results["first"] = gateway.client(key).chat.completions.create(
            model="gpt-4o-mini", messages=HELLO, extra_headers=headers)

    thread = threading.Thread(target=first)
    thread.start()
    gateway.run(upstream.wait_for_requests(1))
    with pytest.raises(openai.ConflictError) as info:
        gateway.client(key).chat.completions.create(model="gpt-4o-mini", messages=HELLO, extra_headers=headers)
    assert info.value.code == "idempotency_key_in_use"
    thread.join(10)
    assert results["first"].choices[0].message.content
    assert upstream.count("/chat/completions") == 1
    gateway.settle()
    assert gateway.balance(user_id) == 18


@pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)
def test_same_idempotency_key_with_a_different_body_gets_422(gateway, upstream):
    user_id, key = gateway.make_user(energy=20)
    client = gateway.client(key)
    headers = {"Idempotency-Key": "k-reused"}
    client.chat.completions.create(model="gpt-4o-mini", messages=HELLO, extra_headers=headers)
    with pytest.raises(openai.UnprocessableEntityError) as info:
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "other"}],
                                       extra_headers=headers)
    assert info.value.code == "idempotency_key_reused"
    assert upstream.count("/chat/completions") == 1
    gateway.settle()
    assert gateway.balance(user_id) == 18


def test_idempotent_retry_after_a_failure_runs_again(gateway, upstream):
    user_id, key = gateway.make_user(energy=20)
    client = gateway.client(key)
    headers = {"Idempotency-Key": "k-fail"}
    upstream.push(Fault.status(400))
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="gpt-4o-mini", messages=HELLO, extra_headers=headers)
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=HELLO,
                                                          extra_headers=headers)
    assert "Idempotent-Replayed" not in raw.headers
    assert upstream.count("/chat/completions") == 2
    gateway.settle()
    assert gateway.balance(user_id) == 18


# --------------------------------------------------------------------------- refill


@pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)
def test_refill_tops_up_lazily_on_the_first_request_after_its_period(gateway_factory, upstream):
    gw = gateway_factory(tiers={"free": {"models": ["*"]},
                                "pro": {"models": ["*"], "refill": {"amount": 10, "period": "1s"}}})
    user_id, key = gw.make_user(tier="pro", energy=10)
    client = gw.client(key)
    # Creation started the period with the energy given; two requests spend it.
    client.chat.completions.create(model="gpt-4o", messages=HELLO)
    client.chat.completions.create(model="gpt-4o", messages=HELLO)
    gw.settle()
    assert gw.balance(user_id) == 0
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="demo", messages=HELLO)
    time.sleep(1.05)
    assert gw.balance(user_id) == 0, "refill is lazy: nothing happens without a request"
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=HELLO)
    assert raw.headers["X-Energy-Remaining"] == "5"
    gw.settle()
    assert [k for k, _ in kinds(gw.ledger(user_id))].count("refill") == 1
    assert_ledger_matches_balance(gw, user_id)


# --------------------------------------------------------------------------- concurrency


@pytest.mark.parametrize("store_url", ["sqlite", "postgres", "pgbouncer"], indirect=True)
def test_concurrent_requests_spend_exactly_the_balance_and_no_more(gateway_factory, upstream):
    """200 requests at once from 4 users whose balances afford exactly half of them."""
    gw = gateway_factory()
    cost = 3  # email_draft, on every model: a downgrade cannot make a request cheaper
    per_user = 50
    affordable = [10, 20, 30, 40]  # sums to 100 of 200
    users = [gw.make_user(tier="pro", energy=n * cost) for n in affordable]

    async def fire() -> list[tuple[str, object]]:
        clients = [gw.aclient(key, max_retries=0, timeout=60) for _, key in users]

        async def one(i: int, client: openai.AsyncOpenAI) -> tuple[str, object]:
            try:
                await client.chat.completions.create(model="gpt-4o-mini", messages=HELLO,
                                                     metadata={"action": "email_draft"})
                return users[i][0], "ok"
            except openai.RateLimitError as exc:
                return users[i][0], exc

        try:
            return await asyncio.gather(*(one(i, c) for i, c in enumerate(clients) for _ in range(per_user)))
        finally:
            for c in clients:
                await c.close()

    outcomes = asyncio.run(fire())
    gw.settle()
    assert len(outcomes) == 200
    successes = Counter(uid for uid, result in outcomes if result == "ok")
    rejections = [result for _, result in outcomes if result != "ok"]
    assert sum(successes.values()) == 100
    assert len(rejections) == 100
    for exc in rejections:
        assert exc.status_code == 429
        assert exc.code == "insufficient_energy"
        assert exc.response.headers["x-should-retry"] == "false"
    assert upstream.count("/chat/completions") == 100
    for (user_id, _), n in zip(users, affordable):
        assert successes[user_id] == n
        assert gw.balance(user_id) == 0
        ledger = gw.ledger(user_id)
        assert Counter(e.kind for e in ledger) == {"grant": 1, "reserve": n, "settle": n}
        assert_ledger_matches_balance(gw, user_id)


# --------------------------------------------------------------------------- orphaned reservations


def test_reservation_orphaned_by_a_dead_process_is_refunded_by_the_sweeper(gateway_factory):
    """A process killed between reserve and settle must not lock the user's energy forever;
    a reservation younger than `stale_after` (a request still running somewhere) is left alone."""
    chain = ["auth", "tier_policy", {"name": "energy", "settings": {"stale_after": "1h", "sweep_interval": "0.1s"}}]
    gw = gateway_factory(plugins=chain)
    user_id, _ = gw.make_user(energy=20)
    # What a process that died two hours ago, and one still streaming now, left behind:
    gw.run(gw.store.reserve_energy(user_id, 5, "req_dead_process", now=time.time() - 7200))
    gw.run(gw.store.reserve_energy(user_id, 2, "req_still_running"))
    assert gw.balance(user_id) == 13
    wait_until(lambda: any(e.kind == "refund" for e in gw.ledger(user_id)))
    time.sleep(0.3)  # more sweeps: nothing else may be refunded
    ledger = gw.ledger(user_id)
    assert [(e.request_id, e.kind, e.amount) for e in ledger if e.kind == "refund"] == [("req_dead_process", "refund", 5)]
    assert gw.balance(user_id) == 18
    assert_ledger_matches_balance(gw, user_id)


# ------------------------------------------------ the reservation overlaps the upstream call


def _chat(gw, key, model, results, **kw):
    """One chat call in a thread; its raw response (or exception) lands in `results`."""
    def run():
        try:
            results.append(gw.client(key, timeout=30).chat.completions.with_raw_response.create(
                model=model, messages=HELLO, **kw))
        except Exception as exc:  # noqa: BLE001 — the test inspects it
            results.append(exc)
    thread = threading.Thread(target=run)
    thread.start()
    return thread


@pytest.mark.parametrize("overlap", [True, False])
def test_the_reservation_overlaps_the_upstream_call_but_nothing_is_sent_before_it_commits(
        gateway_factory, upstream, overlap):
    import sqlite3

    gw = gateway_factory(plugins=["auth", "tier_policy", {"name": "energy", "settings": {"overlap": overlap}}])
    user_id, key = gw.make_user(energy=20)
    gw.client(key).chat.completions.create(model="gpt-4o-mini", messages=HELLO)  # reserves first: 18 seen
    assert upstream.count("/chat/completions") == 1
    other = sqlite3.connect(gw.store.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process writes: the reservation cannot commit
    results: list = []
    try:
        thread = _chat(gw, key, "gpt-4o-mini", results)
        if overlap:  # the upstream call went out while the reservation waits for the lock...
            wait_until(lambda: upstream.count("/chat/completions") == 2)
        time.sleep(0.3)
        assert not results  # ...but the client has nothing yet
        assert upstream.count("/chat/completions") == (2 if overlap else 1)
    finally:
        other.execute("ROLLBACK")
        other.close()
    thread.join(30)
    raw = results[0]
    assert raw.headers["X-Energy-Cost"] == "2" and raw.headers["X-Energy-Remaining"] == "16"
    assert raw.parse().choices[0].message.content
    gw.settle()
    # Settlements are written behind the answers: compare what, not in which order.
    assert Counter(kinds(gw.ledger(user_id))) == Counter({("grant", 20): 1, ("reserve", -2): 2, ("settle", 0): 2})


@pytest.mark.parametrize("store_url", ["sqlite", "postgres", "pgbouncer"], indirect=True)
def test_an_overlapped_reservation_that_fails_downgrades_and_dispatches_again(gateway_factory, upstream, store_url):
    """Another process spent the balance this process last saw: the overlapped
    reservation for gpt-4o fails, so the request goes down its ladder exactly as without
    the overlap (gpt-4o-mini unaffordable, demo affordable) and is dispatched again.
    The first upstream answer is discarded and not billed."""
    from gateway.store import open_store

    gw = gateway_factory()
    user_id, key = gw.make_user(energy=10)
    gw.client(key).chat.completions.create(model="gpt-4o", messages=HELLO)  # 5: 5 left, as this process sees it

    async def spend_elsewhere():
        async with open_store(store_url) as elsewhere:
            await elsewhere.grant_energy(user_id, -4, kind="adjust", reason="spent by another process")
    gw.run(spend_elsewhere())

    raw = gw.client(key).chat.completions.with_raw_response.create(model="gpt-4o", messages=HELLO)
    assert raw.parse().model == "demo"
    assert raw.headers["X-Model-Downgraded-From"] == "gpt-4o"
    assert "insufficient energy" in raw.headers["X-Model-Downgrade-Reason"]
    assert (raw.headers["X-Energy-Cost"], raw.headers["X-Energy-Remaining"]) == ("1", "0")
    assert [r.json["model"] for r in upstream.requests] == ["gpt-4o", "gpt-4o"]  # 2nd: overlapped, discarded
    gw.settle()
    assert Counter(kinds(gw.ledger(user_id))) == Counter(
        [("grant", 10), ("reserve", -5), ("settle", 0), ("adjust", -4), ("reserve", -1), ("settle", 0)])
    assert_ledger_matches_balance(gw, user_id)


def test_an_overlapped_reservation_with_nothing_affordable_left_is_a_429(gateway_factory, upstream):
    from gateway.store import open_store

    gw = gateway_factory(plugins=["auth", "tier_policy", "energy"])
    user_id, key = gw.make_user(energy=4)
    gw.client(key).chat.completions.create(model="gpt-4o-mini", messages=HELLO)  # 2: 2 left, as seen here

    async def spend_elsewhere():
        async with open_store(gw.store.url) as elsewhere:
            await elsewhere.grant_energy(user_id, -2, kind="adjust")
    gw.run(spend_elsewhere())
    with pytest.raises(openai.RateLimitError) as info:  # overlapped; then neither gpt-4o-mini nor demo
        gw.client(key).chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    assert info.value.code == "insufficient_energy"
    assert info.value.response.headers["X-Energy-Remaining"] == "0"
    assert upstream.count("/chat/completions") == 2  # the second: overlapped, its answer discarded
    gw.settle()
    assert [e.kind for e in gw.ledger(user_id)].count("reserve") == 1  # none for the rejected request
    assert_ledger_matches_balance(gw, user_id)


def test_a_store_failure_during_an_overlapped_reservation_fails_closed(gateway_factory, upstream):
    import sqlite3

    gw = gateway_factory(plugins=["auth", "tier_policy", "energy"])
    user_id, key = gw.make_user(energy=20)
    gw.client(key).chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    db = sqlite3.connect(gw.store.path, isolation_level=None)
    db.execute("ALTER TABLE reservations RENAME TO reservations_gone")  # the store breaks
    db.close()
    for _ in range(2):  # the overlapped one, then (store not trusted any more) one reserved first
        with pytest.raises(openai.InternalServerError) as info:
            gw.client(key).chat.completions.create(model="gpt-4o-mini", messages=HELLO)
        assert info.value.status_code == 500 and info.value.code == "internal_error"
        assert "Hello" not in info.value.response.text  # the upstream's answer never leaves
    assert upstream.count("/chat/completions") == 2  # 1 + the overlapped one; the last never went out
    db = sqlite3.connect(gw.store.path, isolation_level=None)
    db.execute("ALTER TABLE reservations_gone RENAME TO reservations")  # repaired: it settles
    db.close()
    gw.settle()
    assert [e.kind for e in gw.ledger(user_id)] == ["grant", "reserve", "settle"]
