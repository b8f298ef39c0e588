"""/v1/files and /v1/batches: the openai SDK against the gateway, the gateway against a fake
OpenAI account that holds files and runs batches (tests/fake_batches.py).

Exact money: every input line is one usage row at the provider's batch prices (litellm's
`*_batches` keys), the batch's energy is reserved once and settled at the lines that
succeeded, and a batch is billed once, also across a gateway restart."""

from __future__ import annotations

import http.client
import io
import json
import time
import tracemalloc
from decimal import Decimal
from typing import Any

import anthropic
import openai
import pytest

from gateway.batches import BATCHES, usage_key
from gateway.money import usd
from tests.fake_batches import FakeBatchProvider, dated, usage_of

MINI_IN, MINI_OUT = Decimal("7.5e-08"), Decimal("3e-07")  # gpt-4o-mini's *_batches prices in litellm's map
EMBED_IN = Decimal("1e-08")  # text-embedding-3-small's input_cost_per_token_batches
MINI_ENERGY = 2  # energy.actions.ai_message.models.gpt-4o-mini


@pytest.fixture
def provider(server_thread):
    fake = server_thread.run(FakeBatchProvider().start())
    yield fake
    server_thread.run(fake.stop())


@pytest.fixture
def batch_gateway(gateway_factory, upstream, store_url, provider):
    def make(mini: dict[str, Any] | None = None, claude: dict[str, Any] | None = None,
             gateway: dict[str, Any] | None = None, **batches: Any):
        key = "sk-fake-account-SECRET"
        models = [
            {"name": "gpt-4o-mini", "litellm_params": {"model": "openai/gpt-4o-mini", "api_base": provider.base,
                                                       "api_key": key}, **(mini or {})},
            {"name": "embed", "litellm_params": {"model": "openai/text-embedding-3-small", "api_base": provider.base,
                                                 "api_key": key}},
            {"name": "gpt-4o", "litellm_params": {"model": "openai/gpt-4o", "api_base": provider.base,
                                                  "api_key": key}},
            {"name": "claude", "litellm_params": {"model": "anthropic/claude-haiku-4-5", "api_base": provider.url,
                                                  "api_key": "sk-ant-fake-SECRET"}, **(claude or {})},
            {"name": "demo", "litellm_params": {"model": "demo/offline"}},
        ]
        settings = {"poll_interval": 0.05, "lease": 5, **batches}
        return gateway_factory(models=models, batches=settings, **(gateway or {}), tiers={
            "free": {"models": ["gpt-4o-mini", "embed", "demo"]}, "pro": {"models": ["*"]}})

    return make


def chat_lines(n: int, model: str = "gpt-4o-mini", **extra: Any) -> bytes:
    return b"".join(json.dumps({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
                                "body": {"model": model, "messages": [{"role": "user", "content": f"hi {i}"}],
                                         **extra}}).encode() + b"\n" for i in range(n))


def wait_settled(gw, batch_id: str, timeout: float = 15.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = gw.run(gw.store.batch_record(batch_id=batch_id))
        if record is not None and record["settled_at"] is not None:
            return record
        time.sleep(0.02)
    raise AssertionError(f"batch {batch_id} was not settled within {timeout}s")


def line_rows(gw, record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    rows = [r for r in gw.run(gw.store.usage_rows()) if r["request_id"].startswith(record["id"] + ":")]
    return {r["request_id"].split(":", 1)[1]: r for r in rows}


def batch_ledger(gw, user_id: str, record: dict[str, Any]) -> list[tuple[str, int]]:
    return [(e.kind, e.amount) for e in gw.ledger(user_id) if e.request_id == record["id"]]


def mini_cost(index: int) -> Decimal:
    usage = usage_of(index, "/v1/chat/completions")
    return usd(usage["prompt_tokens"] * MINI_IN + usage["completion_tokens"] * MINI_OUT)


def start_batch(client: openai.OpenAI, content: bytes, endpoint: str = "/v1/chat/completions"):
    uploaded = client.files.create(file=("input.jsonl", io.BytesIO(content)), purpose="batch")
    return uploaded, client.batches.create(input_file_id=uploaded.id, endpoint=endpoint, completion_window="24h")


@pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)
def test_a_completed_batch_bills_each_line_at_batch_prices_and_refunds_the_failed_ones(batch_gateway, provider):
    gw = batch_gateway()
    user, key = gw.make_user(energy=100)
    client = gw.client(key)
    uploaded, batch = start_batch(client, chat_lines(4))
    assert batch.status == "in_progress" and batch.input_file_id == uploaded.id
    assert gw.balance(user) == 100 - 4 * MINI_ENERGY  # reserved for every line
    # What ran upstream: the rewritten copy, with the upstream's model name.
    upstream_input = provider.lines_of(provider.batches[batch.id]["input_file_id"])
    assert [line["body"]["model"] for line in upstream_input] == ["gpt-4o-mini"] * 4
    assert provider.batches[batch.id]["input_file_id"] != uploaded.id

    provider.finish(batch.id, fail={"line-2"})
    record = wait_settled(gw, batch.id)
    done = client.batches.retrieve(batch.id)
    assert done.status == "completed" and done.request_counts.completed == 3
    assert upstream_input and provider.batches[batch.id]["input_file_id"] not in provider.files  # the copy is deleted
    assert uploaded.id in provider.files  # the user's own file is theirs to delete

    rows = line_rows(gw, record)
    assert sorted(rows) == ["line-0", "line-1", "line-2", "line-3"]
    for i in (0, 1, 3):
        row = rows[f"line-{i}"]
        assert (row["status"], row["energy_cost"], row["model"]) == (200, MINI_ENERGY, "gpt-4o-mini")
        assert (row["tokens_prompt"], row["tokens_completion"]) == (10 + i, 5)
        assert row["cost_usd"] == mini_cost(i)
        assert json.loads(row["unit_prices"])["service_tier"] == "batches"
    failed = rows["line-2"]
    assert (failed["status"], failed["energy_cost"], failed["cost_usd"], failed["error_type"]) == (
        400, 0, Decimal(0), "invalid_value")
    assert gw.balance(user) == 100 - 3 * MINI_ENERGY
    assert batch_ledger(gw, user, record) == [("reserve", -8), ("settle", 2)]

    # The output file is the user's, with the public model name in every answer.
    output = client.files.content(done.output_file_id).text.splitlines()
    assert len(output) == 3
    assert {json.loads(line)["response"]["body"]["model"] for line in output} == {"gpt-4o-mini"}
    assert dated("gpt-4o-mini") in provider.files[done.output_file_id]["content"].decode()
    errors = client.files.content(done.error_file_id).text.splitlines()
    assert [json.loads(line)["custom_id"] for line in errors] == ["line-2"]


def test_an_embeddings_batch_is_billed_at_the_embedding_batch_price(batch_gateway, provider):
    gw = batch_gateway()
    user, key = gw.make_user(energy=50)
    client = gw.client(key)
    content = b"".join(json.dumps({"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings",
                                   "body": {"model": "embed", "input": f"text {i}"}}).encode() + b"\n"
                       for i in range(3))
    _, batch = start_batch(client, content, "/v1/embeddings")
    assert [line["body"]["model"] for line in provider.lines_of(provider.batches[batch.id]["input_file_id"])] == [
        "text-embedding-3-small"] * 3
    provider.finish(batch.id)
    record = wait_settled(gw, batch.id)
    rows = line_rows(gw, record)
    assert [rows[f"e{i}"]["cost_usd"] for i in range(3)] == [usd((7 + i) * EMBED_IN) for i in range(3)]
    assert gw.balance(user) == 50 - 3  # ai_message's default energy: 1 per line


@pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)
def test_an_expired_batch_bills_what_ran_and_refunds_the_rest(batch_gateway, provider):
    gw = batch_gateway()
    user, key = gw.make_user(energy=100)
    client = gw.client(key)
    _, batch = start_batch(client, chat_lines(5))
    provider.finish(batch.id, outcome="expired", run=2)
    record = wait_settled(gw, batch.id)
    assert client.batches.retrieve(batch.id).status == "expired"
    rows = line_rows(gw, record)
    assert [rows[f"line-{i}"]["energy_cost"] for i in range(5)] == [2, 2, 0, 0, 0]
    assert [rows[f"line-{i}"]["error_type"] for i in range(2, 5)] == ["batch_expired"] * 3
    assert [rows[f"line-{i}"]["cost_usd"] for i in range(2)] == [mini_cost(0), mini_cost(1)]
    assert gw.balance(user) == 100 - 2 * MINI_ENERGY
    assert batch_ledger(gw, user, record) == [("reserve", -10), ("settle", 6)]


def test_a_cancelled_batch_bills_what_ran_before_the_cancel(batch_gateway, provider):
    gw = batch_gateway()
    user, key = gw.make_user(energy=100)
    client = gw.client(key)
    _, batch = start_batch(client, chat_lines(3))
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status == "cancelling"
    assert provider.batches[batch.id]["status"] == "cancelling"
    provider.finish(batch.id, outcome="cancelled", run=1)
    record = wait_settled(gw, batch.id)
    assert client.batches.retrieve(batch.id).status == "cancelled"
    rows = line_rows(gw, record)
    assert [rows[f"line-{i}"]["energy_cost"] for i in range(3)] == [2, 0, 0]
    assert rows["line-1"]["error_type"] == "batch_cancelled"
    assert gw.balance(user) == 100 - MINI_ENERGY


def test_a_batch_the_provider_failed_refunds_everything(batch_gateway, provider):
    gw = batch_gateway()
    user, key = gw.make_user(energy=100)
    client = gw.client(key)
    _, batch = start_batch(client, chat_lines(3))
    provider.finish(batch.id, outcome="failed")
    record = wait_settled(gw, batch.id)
    assert client.batches.retrieve(batch.id).status == "failed"
    rows = line_rows(gw, record)
    assert len(rows) == 3 and all(r["energy_cost"] == 0 and r["error_type"] == "not_run" for r in rows.values())
    assert gw.balance(user) == 100
    assert batch_ledger(gw, user, record) == [("reserve", -6), ("settle", 6)]


@pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)
def test_a_batch_is_billed_once_across_a_restart_and_a_repeated_settlement(batch_gateway, provider, server_thread):
    first = batch_gateway()
    user, key = first.make_user(energy=100)
    _, batch = start_batch(first.client(key), chat_lines(3))
    server_thread.run(first.runner.cleanup(), timeout=30)  # the gateway stops while the batch runs

    provider.finish(batch.id, fail={"line-0"})
    second = batch_gateway()  # a new gateway on the same store
    record = wait_settled(second, batch.id)
    assert len(line_rows(second, record)) == 3
    assert second.balance(user) == 100 - 2 * MINI_ENERGY

    # The settlement running again (a process that died before marking it settled) bills nothing twice.
    service = second.app[BATCHES]
    deployment = second.config.deployments("gpt-4o-mini")[0]
    second.run(service.settle(record, provider.batches[batch.id], deployment))
    assert len(line_rows(second, record)) == 3
    assert second.balance(user) == 100 - 2 * MINI_ENERGY
    assert batch_ledger(second, user, record) == [("reserve", -6), ("settle", 2)]
    assert second.client(key).batches.retrieve(batch.id).status == "completed"


@pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)
def test_files_and_batches_are_their_owners_alone(batch_gateway, provider):
    gw = batch_gateway()
    _, key_a = gw.make_user(workspace="acme")
    _, key_b = gw.make_user(workspace="acme")
    _, key_c = gw.make_user(workspace="globex")
    alice = gw.client(key_a)
    uploaded, batch = start_batch(alice, chat_lines(2))
    asked = len(provider.requests)
    for other in (gw.client(key_b), gw.client(key_c)):
        for call in (lambda: other.files.retrieve(uploaded.id), lambda: other.files.content(uploaded.id),
                     lambda: other.files.delete(uploaded.id), lambda: other.batches.retrieve(batch.id),
                     lambda: other.batches.cancel(batch.id),
                     lambda: other.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                                  completion_window="24h")):
            with pytest.raises(openai.NotFoundError) as caught:
                call()
            assert caught.value.body["code"] in ("file_not_found", "batch_not_found")
        assert other.files.list().data == [] and other.batches.list().data == []
    # Never asked the provider (what it got meanwhile is the poller asking about the running batch).
    assert set(provider.requests[asked:]) <= {("GET", f"/v1/batches/{batch.id}")}
    assert [f.id for f in alice.files.list().data] == [uploaded.id]
    assert [b.id for b in alice.batches.list().data] == [batch.id]
    assert alice.files.retrieve(uploaded.id).purpose == "batch"
    for unknown in ("file-nope", "x" * 300):
        with pytest.raises(openai.NotFoundError):
            alice.files.retrieve(unknown)


def test_a_deleted_file_is_gone_at_the_provider_and_here(batch_gateway, provider):
    gw = batch_gateway()
    _, key = gw.make_user()
    client = gw.client(key)
    uploaded = client.files.create(file=("a.jsonl", io.BytesIO(chat_lines(1))), purpose="batch")
    assert client.files.content(uploaded.id).content == chat_lines(1)
    assert client.files.delete(uploaded.id).deleted is True
    assert uploaded.id not in provider.files
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)


@pytest.mark.parametrize("content, line, words", [
    (chat_lines(2) + b'{"custom_id": "x", "method": "POST", "url": "/v1/chat/completions", '
                     b'"body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "a"}], "bogus": 1}}\n',
     3, "bogus"),
    (chat_lines(1) + chat_lines(1), 2, "used twice"),
    (chat_lines(1, model="gpt-4o"), 1, "gpt-4o"),  # the free tier may not use it
    (chat_lines(1) + b"not json\n", 2, "not a JSON object"),
    (chat_lines(1, stream=True), 1, "stream"),
    (b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "gpt-4o-mini", '
     b'"messages": [{"role": "user", "content": [{"type": "file", "file": {"file_id": "file-other"}}]}]}}\n',
     1, "file"),
])
def test_a_bad_line_refuses_the_batch_naming_the_line(batch_gateway, provider, content, line, words):
    gw = batch_gateway()
    user, key = gw.make_user(tier="free", energy=100)
    client = gw.client(key)
    uploaded = client.files.create(file=("in.jsonl", io.BytesIO(content)), purpose="batch")
    with pytest.raises(openai.BadRequestError) as caught:
        client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    error = caught.value.body
    assert error["code"] == "invalid_batch_line" and f"line {line} " in error["message"] and words in error["message"]
    assert provider.batches == {} and gw.balance(user) == 100


def test_a_batch_the_balance_cannot_afford_is_refused_before_it_goes_out(batch_gateway, provider):
    gw = batch_gateway()
    user, key = gw.make_user(energy=5)
    client = gw.client(key)
    uploaded = client.files.create(file=("in.jsonl", io.BytesIO(chat_lines(3))), purpose="batch")
    with pytest.raises(openai.RateLimitError) as caught:
        client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert caught.value.body["code"] == "insufficient_energy"
    assert provider.batches == {} and gw.balance(user) == 5 and client.batches.list().data == []


def test_an_oversized_upload_is_refused_while_streaming_without_holding_it(batch_gateway):
    limit = 1024 * 1024
    gw = batch_gateway(max_file_bytes=limit)
    _, key = gw.make_user()
    host, port = gw.url.removeprefix("http://").split(":")
    chunk = b"x" * (64 * 1024)
    total = 64 * limit  # measured: the peak is ~2 MB whether 2 MB or 64 MB are sent
    boundary = "gwtestboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.jsonl\"\r\n"
            f"Content-Type: application/jsonl\r\n\r\n").encode()
    tracemalloc.start()
    try:
        conn = http.client.HTTPConnection(host, int(port), timeout=20)
        conn.putrequest("POST", "/v1/files")
        conn.putheader("Authorization", f"Bearer {key}")
        conn.putheader("Content-Type", f"multipart/form-data; boundary={boundary}")
        conn.putheader("Transfer-Encoding", "chunked")  # no Content-Length: the limit must hold while streaming
        conn.endheaders()
        sent = 0
        try:
            conn.send(b"%x\r\n%s\r\n" % (len(head), head))
            while sent < total:
                conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the gateway answered and stopped reading
        response = conn.getresponse()
        body = json.loads(response.read())
        conn.close()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert response.status == 413
    assert body["error"]["code"] == "file_too_large" and body["error"]["type"] == "invalid_request_error"
    assert peak < total / 16, f"peak {peak} bytes while {total} were uploaded"


def test_an_upload_for_a_model_of_another_tier_is_refused(batch_gateway, provider):
    gw = batch_gateway()
    _, key = gw.make_user(tier="free")
    with pytest.raises(openai.NotFoundError):
        gw.client(key).files.create(file=("a.jsonl", io.BytesIO(b"{}\n")), purpose="batch",
                                    extra_body={"model": "gpt-4o"})
    assert provider.files == {}


def test_usage_key_is_bounded_and_distinct():
    assert usage_key("gwb_1", "a") == "gwb_1:a"
    long_a, long_b = usage_key("gwb_1", "a" * 400), usage_key("gwb_1", "a" * 399 + "b")
    assert long_a != long_b and len(long_a) < 100


def test_a_file_the_caller_owns_may_be_named_in_a_request_on_the_account_that_holds_it(batch_gateway, provider):
    gw = batch_gateway()
    _, key_a = gw.make_user(energy=100)
    _, key_b = gw.make_user(energy=100)
    alice, bob = gw.client(key_a), gw.client(key_b)
    uploaded = alice.files.create(file=("doc.pdf", io.BytesIO(b"%PDF-1.4 fake")), purpose="user_data",
                                  extra_body={"model": "gpt-4o-mini"})
    part = {"type": "file", "file": {"file_id": uploaded.id}}
    answer = alice.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": [
        {"type": "text", "text": "summarise"}, part]}])
    assert answer.choices[0].message.content == "answer 0"
    assert provider.bodies[-1]["messages"][0]["content"][1] == part
    response = alice.responses.create(model="gpt-4o-mini", store=False, input=[{"role": "user", "content": [
        {"type": "input_text", "text": "summarise"}, {"type": "input_file", "file_id": uploaded.id}]}])
    assert response.output_text == "read it" and provider.bodies[-1]["input"][0]["content"][1]["file_id"] == uploaded.id
    sent = len(provider.bodies)
    # Someone else's file (or one the gateway never recorded) is refused as before, the provider not asked.
    for client, file_id in ((bob, uploaded.id), (alice, "file-unknown")):
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": [
                {"type": "file", "file": {"file_id": file_id}}]}])
        assert caught.value.body["code"] == "object_id_not_allowed"
    assert len(provider.bodies) == sent


def test_a_batch_whose_creation_died_is_refunded_by_the_poller_and_never_by_the_sweeper(batch_gateway):
    gw = batch_gateway()
    user, _ = gw.make_user(energy=100)
    now = time.time()
    row = {"id": "gwb_dead0001", "batch_id": None, "user_id": user, "workspace_id": "ws", "model": "gpt-4o-mini",
           "upstream": "http://127.0.0.1:9/v1", "endpoint": "/v1/chat/completions", "input_file_id": "file-x",
           "action": "ai_message", "energy_per_line": 2, "status": "creating", "payload": None,
           "next_poll_at": now + 3600, "created_at": now - 7200}
    gw.run(gw.store.insert_batch(row, ["a", "b"]))
    gw.run(gw.store.reserve_energy(user, 4, "gwb_dead0001", now=now - 7200))  # two hours old: stale for the sweeper
    energy = next(p for p in gw.state.chain.plugins if p.name == "energy")
    assert gw.run(energy.sweep_stale_reservations()) == 0  # a batch's reservation is the poller's to settle
    assert gw.balance(user) == 96
    gw.run(gw.store.update_batch("gwb_dead0001", {"next_poll_at": now - 1}))  # its creation's grace is over
    deadline = time.monotonic() + 15
    while gw.run(gw.store.batch_record(id="gwb_dead0001"))["settled_at"] is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert gw.run(gw.store.batch_record(id="gwb_dead0001"))["status"] == "failed"
    assert gw.balance(user) == 100
    assert [(e.kind, e.amount) for e in gw.ledger(user) if e.request_id == "gwb_dead0001"] == [
        ("reserve", -4), ("refund", 4)]


@pytest.fixture
def other_account(server_thread):
    fake = server_thread.run(FakeBatchProvider().start())
    yield fake
    server_thread.run(fake.stop())


def test_with_two_accounts_an_upload_names_its_model_and_stays_on_that_account(gateway_factory, provider,
                                                                              other_account):
    key = "sk-fake-account-SECRET"
    gw = gateway_factory(models=[
        {"name": "gpt-4o-mini", "litellm_params": {"model": "openai/gpt-4o-mini", "api_base": provider.base,
                                                   "api_key": key}},
        {"name": "gpt-4o", "litellm_params": {"model": "openai/gpt-4o", "api_base": other_account.base,
                                              "api_key": key}},
        {"name": "demo", "litellm_params": {"model": "demo/offline"}},
    ], tiers={"pro": {"models": ["*"]}}, auth={"master_key": "gw-master-test-0123456789abcdef", "cache_ttl": 300,
                                               "default_tier": "pro"},
        batches={"poll_interval": 0.05})
    _, api_key = gw.make_user(energy=100)
    client = gw.client(api_key)
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(file=("a.jsonl", io.BytesIO(chat_lines(1))), purpose="batch")
    assert caught.value.body["code"] == "model_required"
    uploaded = client.files.create(file=("a.jsonl", io.BytesIO(chat_lines(1))), purpose="batch",
                                   extra_body={"model": "gpt-4o"})
    assert uploaded.id in other_account.files and provider.files == {}
    with pytest.raises(openai.BadRequestError) as caught:  # its lines name a model of the other account
        client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert "line 1 " in caught.value.body["message"] and "upstream account" in caught.value.body["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": [
            {"type": "file", "file": {"file_id": uploaded.id}}]}])
    assert caught.value.body["code"] == "file_elsewhere"
    assert provider.bodies == [] and other_account.batches == {}


HAIKU_IN, HAIKU_OUT = Decimal("5e-07"), Decimal("2.5e-06")  # claude-haiku-4-5's *_batches prices in litellm's map


@pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)
def test_an_anthropic_message_batch_is_billed_per_request_at_batch_prices(batch_gateway, provider):
    gw = batch_gateway()
    user, key = gw.make_user(energy=100)
    _, other_key = gw.make_user(energy=100)
    client = anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=0)
    requests = [{"custom_id": f"r{i}", "params": {"model": "claude", "max_tokens": 50,
                                                  "messages": [{"role": "user", "content": f"hi {i}"}]}}
                for i in range(3)]
    batch = client.messages.batches.create(requests=requests)
    assert batch.processing_status == "in_progress" and batch.results_url is None
    assert [r["params"]["model"] for r in provider.message_batches[batch.id]["requests"]] == ["claude-haiku-4-5"] * 3
    assert gw.balance(user) == 97  # ai_message's default energy, per request

    provider.finish_message_batch(batch.id, errored={"r1"}, run=2)  # r2 expired
    record = wait_settled(gw, batch.id)
    done = client.messages.batches.retrieve(batch.id)
    assert done.processing_status == "ended" and done.results_url.startswith(gw.url)
    rows = line_rows(gw, record)
    assert rows["r0"]["cost_usd"] == usd(20 * HAIKU_IN + 4 * HAIKU_OUT) and rows["r0"]["energy_cost"] == 1
    assert rows["r0"]["provider"] == "anthropic" and rows["r0"]["model"] == "claude"
    assert (rows["r1"]["energy_cost"], rows["r1"]["error_type"]) == (0, "invalid_request_error")
    assert (rows["r2"]["energy_cost"], rows["r2"]["error_type"]) == (0, "batch_expired")
    assert gw.balance(user) == 99
    assert batch_ledger(gw, user, record) == [("reserve", -3), ("settle", 2)]
    results = {r.custom_id: r for r in client.messages.batches.results(batch.id)}
    assert results["r0"].result.type == "succeeded" and results["r0"].result.message.model == "claude"
    assert results["r1"].result.type == "errored" and results["r2"].result.type == "expired"
    assert [b.id for b in client.messages.batches.list().data] == [batch.id]

    other = anthropic.Anthropic(base_url=gw.url, api_key=other_key, max_retries=0)
    asked = len(provider.requests)
    with pytest.raises(anthropic.NotFoundError):
        other.messages.batches.retrieve(batch.id)
    with pytest.raises(anthropic.NotFoundError):
        other.messages.batches.cancel(batch.id)
    assert other.messages.batches.list().data == []
    with pytest.raises(openai.NotFoundError):  # nor is it an OpenAI batch
        gw.client(key).batches.retrieve(batch.id)
    assert len(provider.requests) == asked


def test_a_bad_anthropic_batch_request_refuses_the_batch_naming_it(batch_gateway, provider):
    gw = batch_gateway()
    user, key = gw.make_user(energy=100)
    client = anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=0)
    good = {"model": "claude", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
    for bad, words in (({**good, "bogus": 1}, "bogus"), ({**good, "max_tokens": None}, "max_tokens"),
                       ({**good, "model": "gpt-4o-mini"}, "same model")):
        with pytest.raises(anthropic.BadRequestError) as caught:
            client.messages.batches.create(requests=[{"custom_id": "a", "params": good},
                                                     {"custom_id": "b", "params": bad}])
        assert "requests[1]" in caught.value.message and words in caught.value.message
    assert provider.message_batches == {} and gw.balance(user) == 100


def test_a_cancelled_anthropic_batch_bills_what_ran(batch_gateway, provider):
    gw = batch_gateway()
    user, key = gw.make_user(energy=100)
    client = anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=0)
    batch = client.messages.batches.create(requests=[{"custom_id": f"r{i}", "params": {
        "model": "claude", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}} for i in range(4)])
    assert client.messages.batches.cancel(batch.id).processing_status == "canceling"
    provider.finish_message_batch(batch.id, run=1, reason="canceled")
    record = wait_settled(gw, batch.id)
    rows = line_rows(gw, record)
    assert [rows[f"r{i}"]["energy_cost"] for i in range(4)] == [1, 0, 0, 0]
    assert rows["r3"]["error_type"] == "batch_cancelled"
    assert gw.balance(user) == 99


def test_a_batch_the_provider_would_not_create_costs_nothing_and_leaves_no_copy(batch_gateway, provider):
    gw = batch_gateway()
    user, key = gw.make_user(energy=100)
    client = gw.client(key)
    uploaded = client.files.create(file=("in.jsonl", io.BytesIO(chat_lines(2))), purpose="batch")
    provider.refuse_batches = 1
    with pytest.raises(openai.APIStatusError) as caught:
        client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h",
                              metadata={"action": "ai_message", "team": "sales"})
    assert caught.value.status_code == 502 and caught.value.body["code"] == "upstream_error"
    assert gw.balance(user) == 100 and client.batches.list().data == []
    assert list(provider.files) == [uploaded.id]  # the rewritten copy was deleted
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h",
                                  metadata={"action": "ai_message", "team": "sales"})
    assert provider.batches[batch.id]["metadata"] == {"team": "sales"}  # the gateway's fields stay here


@pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)
def test_two_gateways_on_one_store_settle_a_batch_once(batch_gateway, provider):
    first, second = batch_gateway(), batch_gateway()  # two processes' pollers, one database
    user, key = first.make_user(energy=100)
    _, batch = start_batch(first.client(key), chat_lines(3))
    provider.finish(batch.id)
    record = wait_settled(second, batch.id)
    time.sleep(0.3)  # both pollers had their turns after it
    output = provider.batches[batch.id]["output_file_id"]
    assert provider.count("GET", f"/v1/files/{output}/content") == 1  # one settlement read the results
    assert len(line_rows(first, record)) == 3
    assert batch_ledger(first, user, record) == [("reserve", -6), ("settle", 0)]
    assert first.balance(user) == 94


@pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)
def test_a_claimed_batch_is_no_other_claims_until_its_lease_ends(batch_gateway):
    gw = batch_gateway()
    now = time.time() + 7200  # due two hours from now: the gateway's own poller (at the real time) never claims them
    for i in range(3):
        gw.run(gw.store.insert_batch({
            "id": f"gwb_claim{i}", "batch_id": f"batch_claim{i}", "user_id": "u", "workspace_id": "w",
            "model": "gpt-4o-mini", "upstream": "http://x/v1", "endpoint": "/v1/chat/completions",
            "input_file_id": "file-x", "action": "ai_message", "energy_per_line": 1, "status": "in_progress",
            "payload": None, "next_poll_at": now - 10 + i, "created_at": now}, ["a"]))
    store = gw.store
    first = gw.run(store.claim_batches("A", lease=60, limit=2, now=now))
    second = gw.run(store.claim_batches("B", lease=60, limit=5, now=now))
    assert [r["id"] for r in first] == ["gwb_claim0", "gwb_claim1"] and [r["id"] for r in second] == ["gwb_claim2"]
    assert gw.run(store.claim_batches("C", lease=60, limit=5, now=now + 30)) == []
    assert not gw.run(store.update_batch("gwb_claim0", {"status": "x"}, owner="B"))  # not B's
    assert gw.run(store.update_batch("gwb_claim0", {"lease_owner": None, "lease_until": None}, owner="A"))
    assert [r["id"] for r in gw.run(store.claim_batches("C", lease=60, limit=5, now=now + 30))] == ["gwb_claim0"]
    assert {r["id"] for r in gw.run(store.claim_batches("D", lease=60, limit=5, now=now + 61))} == {
        "gwb_claim1", "gwb_claim2"}  # leases ended


def _set_budget(gw, **body) -> dict:
    import httpx

    from tests.conftest import MASTER_KEY
    answer = httpx.post(gw.url + "/admin/budgets", headers={"Authorization": f"Bearer {MASTER_KEY}"}, json=body,
                        timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()


def _budget_spent(gw, budget_id: str) -> Decimal:
    import httpx

    from tests.conftest import MASTER_KEY
    rows = httpx.get(gw.url + "/admin/budgets", headers={"Authorization": f"Bearer {MASTER_KEY}"}, timeout=30).json()
    return Decimal(str(next(r for r in rows if r["id"] == budget_id)["spent"]))


def test_a_batch_is_held_by_the_callers_budgets_and_cannot_run_past_them(batch_gateway, provider):
    # The attack: a user whose budget refuses a 5th single request sends the same work as a
    # batch (the batch reserved energy without the budget holds, so it ran unbounded).
    gw = batch_gateway()
    user, key = gw.make_user(energy=1000)
    client = gw.client(key)
    _set_budget(gw, user=user, unit="energy", amount=3, period="day", timezone="UTC")
    with pytest.raises(openai.RateLimitError) as refused:
        start_batch(client, chat_lines(4))  # 4 lines x 2 energy = 8 > 3
    assert refused.value.code == "budget_exceeded"
    assert gw.balance(user) == 1000

    # A USD budget holds the lines' ceiling and settles at what they cost at batch prices.
    other, other_key = gw.make_user(energy=1000)
    b = _set_budget(gw, user=other, unit="usd", amount="1", period="month", timezone="UTC")
    _, batch = start_batch(gw.client(other_key), chat_lines(2, max_tokens=50))
    assert _budget_spent(gw, b["id"]) > 0  # held while it runs
    provider.finish(batch.id)
    wait_settled(gw, batch.id)
    assert _budget_spent(gw, b["id"]) == mini_cost(0) + mini_cost(1)


def test_a_batch_line_gets_the_models_output_bounds_and_no_hosted_tool(batch_gateway, provider):
    # The attacks: a line asking max_tokens far above the model's max_tokens_cap (a single
    # request is capped; the batch line went to the provider as asked), and a line with
    # web_search_options (a hosted tool charged per use, refused for this model on a single
    # request, unbilled in a batch).
    gw = batch_gateway(mini={"max_tokens_cap": 100, "max_tokens_default": 50})
    user, key = gw.make_user(energy=100)
    client = gw.client(key)
    content = chat_lines(1, max_tokens=100_000) + json.dumps({
        "custom_id": "no-limit", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}}).encode() + b"\n"
    _, batch = start_batch(client, content)
    sent = provider.lines_of(provider.batches[batch.id]["input_file_id"])
    assert [line["body"].get("max_tokens") for line in sent] == [100, 50]

    with pytest.raises(openai.BadRequestError) as refused:
        start_batch(client, chat_lines(1, web_search_options={}))
    assert refused.value.code == "invalid_batch_line" and "hosted tool" in refused.value.message
    assert gw.balance(user) == 100 - 2 * MINI_ENERGY


def test_a_message_batch_request_gets_the_models_output_cap_and_no_server_tool(batch_gateway, provider):
    # The same attacks on /v1/messages/batches: max_tokens above the cap, a web search server tool.
    gw = batch_gateway(claude={"max_tokens_cap": 100})
    _, key = gw.make_user(energy=100)
    client = anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=0)
    batch = client.messages.batches.create(requests=[{"custom_id": "r0", "params": {
        "model": "claude", "max_tokens": 60_000, "messages": [{"role": "user", "content": "hi"}]}}])
    assert [r["params"]["max_tokens"] for r in provider.message_batches[batch.id]["requests"]] == [100]
    with pytest.raises(anthropic.BadRequestError) as refused:
        client.messages.batches.create(requests=[{"custom_id": "r0", "params": {
            "model": "claude", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 50}]}}])
    assert "hosted tool" in str(refused.value)


@pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)
def test_a_cancel_answered_after_the_batch_was_settled_does_not_hide_its_output(batch_gateway, provider):
    # The race: a cancel reaches the provider, the batch ends and the poller settles it (the
    # user billed for the lines that ran), then the cancel's answer ("cancelling") was
    # written over the settled batch: "cancelling" forever, its output file id gone.
    import asyncio

    gw = batch_gateway()
    _, key = gw.make_user(energy=100)
    client = gw.client(key)
    _, batch = start_batch(client, chat_lines(3))

    async def ends_first(batch_id: str) -> None:
        provider.finish(batch_id, "cancelled", run=2)
        await asyncio.to_thread(wait_settled, gw, batch_id)

    provider.on_cancel = ends_first
    client.batches.cancel(batch.id)
    done = client.batches.retrieve(batch.id)
    assert done.status == "cancelled" and done.output_file_id and done.error_file_id
    assert len(client.files.content(done.output_file_id).text.splitlines()) == 2


def test_an_upload_whose_filename_carries_a_header_injection_is_a_400(batch_gateway, provider):
    # The attack: a filename with CR LF (RFC 5987 `filename*`, percent-encoded, so it
    # survives the client's own header parsing) meant for the multipart headers of the
    # gateway's upload to the provider.
    gw = batch_gateway()
    _, key = gw.make_user(energy=100)
    boundary = "gwtestboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename*=UTF-8''a%0D%0AContent-Type%3A%20text%2Fevil.jsonl\r\n"
            f"Content-Type: application/jsonl\r\n\r\n{{}}\n\r\n--{boundary}--\r\n").encode()
    host, port = gw.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/files", body=body, headers={
        "Authorization": f"Bearer {key}", "Content-Type": f"multipart/form-data; boundary={boundary}"})
    answer = conn.getresponse()
    payload = json.loads(answer.read())
    assert answer.status == 400 and payload["error"]["param"] == "file", payload
    assert set(payload["error"]) == {"message", "type", "param", "code"}
    assert not provider.files


@pytest.mark.parametrize("body,content_type", [
    (b"garbage without a boundary", "multipart/form-data; boundary=zz"),  # no part at all
    (b"--zz\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jsonl\"\r\n\r\n{}\n",
     "multipart/form-data; boundary=zz"),  # cut short: no closing boundary
    (b"--zz\r\n\r\n{}\n\r\n--zz--\r\n", "multipart/form-data"),  # no boundary parameter
])
def test_a_malformed_multipart_upload_is_a_400_not_a_500(batch_gateway, provider, body, content_type):
    gw = batch_gateway()
    _, key = gw.make_user(energy=100)
    host, port = gw.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/files", body=body, headers={"Authorization": f"Bearer {key}",
                                                          "Content-Type": content_type})
    answer = conn.getresponse()
    payload = json.loads(answer.read())
    assert answer.status == 400 and payload["error"]["code"] == "invalid_body", payload
    assert not provider.files


def test_one_user_cannot_fill_the_provider_accounts_file_storage(batch_gateway, provider):
    # The attack: upload file after file (each under max_file_bytes) until the operator's
    # provider account, shared by every user, is full. A user's files are bounded in all.
    gw = batch_gateway(max_user_bytes=1000)
    _, key = gw.make_user(energy=100)
    _, other_key = gw.make_user(energy=100)
    client = gw.client(key)
    first = client.files.create(file=("a.jsonl", io.BytesIO(b"x" * 600)), purpose="batch")
    with pytest.raises(openai.APIStatusError) as refused:
        client.files.create(file=("b.jsonl", io.BytesIO(b"x" * 600)), purpose="batch")
    assert refused.value.status_code == 413 and refused.value.body["code"] == "file_quota_exceeded"
    assert len(provider.files) == 1
    gw.client(other_key).files.create(file=("c.jsonl", io.BytesIO(b"x" * 600)), purpose="batch")  # their own
    client.files.delete(first.id)
    client.files.create(file=("b.jsonl", io.BytesIO(b"x" * 600)), purpose="batch")  # room again


def test_a_batchs_budget_hold_sends_the_threshold_alerts_it_crosses(batch_gateway, provider, server_thread):
    from tests.test_alerts import Receiver, endpoint, wait_for

    receiver = server_thread.run(Receiver(fail_first=0).start())
    try:
        gw = batch_gateway(gateway={"alerts": {"endpoints": [endpoint(receiver)], "retry_base": 0.05,
                                               "retry_max": 0.2}})
        user, key = gw.make_user(energy=100)
        b = _set_budget(gw, user=user, unit="energy", amount=10, period="day", alerts=[50, 100], hard="refuse")
        start_batch(gw.client(key), chat_lines(3))  # 6 of 10: 50% crossed
        events = wait_for(lambda: receiver.of_type("budget.threshold_crossed"), what="a budget alert")
        assert [(e["json"]["data"]["budget"], e["json"]["data"]["percent"]) for e in events] == [(b["id"], 50)]
    finally:
        server_thread.run(receiver.stop())
