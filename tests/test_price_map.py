"""gateway/price_map.py reads litellm's bundled prices and tokenizers without importing
litellm, and agrees with litellm; a gateway whose models are all native never imports it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from gateway import price_map
from gateway.providers.litellm import load_litellm
from tests.test_shutdown import ROOT

PRICE_KEYS = ("input_cost_per_token", "output_cost_per_token", "cache_read_input_token_cost",
              "cache_creation_input_token_cost", "output_cost_per_reasoning_token")


@pytest.mark.parametrize("model", ["gpt-4o", "gpt-4o-mini", "openai/gpt-4o", "claude-haiku-4-5",
                                   "anthropic/claude-haiku-4-5", "text-embedding-3-small", "o3-mini"])
def test_prices_are_litellms(model):
    theirs = load_litellm().get_model_info(model)
    ours = price_map.model_info(model)
    assert ours is not None
    assert [ours.get(k) for k in PRICE_KEYS] == [theirs.get(k) for k in PRICE_KEYS]


def test_an_unknown_model_has_no_price():
    assert price_map.model_info("no-such/model-at-all") is None


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?", "name": "bob"}],
    [{"role": "user", "content": [{"type": "text", "text": "hello there"}, {"type": "text", "text": "again"}]}],
])
@pytest.mark.parametrize("model", ["gpt-4o", "gpt-4o-mini"])
def test_message_counts_are_litellms(messages, model):
    assert price_map.count_messages(messages, model) == load_litellm().token_counter(model=model, messages=messages)


@pytest.mark.parametrize("text", ["Hello from fake upstream", "x" * 1000, "<|endoftext|> is text here", ""])
def test_text_counts_are_litellms(text):
    assert price_map.count_text(text, "gpt-4o") == load_litellm().token_counter(model="gpt-4o", text=text)


def test_a_gateway_whose_models_are_all_native_never_imports_litellm(tmp_path):
    script = textwrap.dedent(f"""
        import asyncio, resource, sys
        sys.path.insert(0, {str(ROOT)!r})
        from aiohttp import web
        from gateway.config import load_config_data
        from proxy import create_app

        async def main():
            config = load_config_data({{
                "store": {{"url": "sqlite:///{tmp_path}/gw.db"}},
                "models": [{{"name": "m", "litellm_params": {{"model": "openai/gpt-4o-mini",
                                                            "api_base": "http://127.0.0.1:9/v1"}}}},
                           {{"name": "demo", "litellm_params": {{"model": "demo/offline"}}}}],
                "plugins": ["metrics", "request_log", "auth", "tier_policy", "energy", "accounting"]}})
            runner = web.AppRunner(create_app(config))
            await runner.setup()
            rss = int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) // 1024
            print("RESULT", "litellm" in sys.modules, rss)
            await runner.cleanup()

        asyncio.run(main())
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"})
    result = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert result, out.stderr[-2000:]
    _, imported, rss_mb = result[0].split()
    assert imported == "False", out.stderr[-2000:]
    print(f"started without litellm, RSS {rss_mb} MB")
