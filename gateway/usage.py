"""Tokens and USD cost of a request, computed once at its ending for every plugin.

Tokens come from the provider's reported usage. Where it reported nothing (or a stream
was cut short, or the client left mid-stream), they are counted with litellm's token
counter over what was actually sent and received, and `Usage.estimated` is set: such a
request is never silently billed at zero.

Cost is USD from config.yaml's `pricing` for the model when given, else litellm's bundled
(offline) price map for the deployment's model. An unknown price gives `cost_usd = None`
(logged at start-up by `unpriced_models`), never a made-up zero.
"""

from __future__ import annotations

import functools
from typing import Any

import structlog

from gateway.config import Config
from gateway.dispatch import load_litellm
from plugins.base import RequestContext, Usage

log = structlog.get_logger("gateway.usage")

# Deployment model strings that cost nothing (the offline demo).
_FREE_PROVIDERS = ("demo/",)


@functools.lru_cache(maxsize=1024)
def _litellm_prices(model: str) -> tuple[float, float] | None:
    """(USD per input token, USD per output token) from litellm's map, or None."""
    if model.startswith(_FREE_PROVIDERS):
        return (0.0, 0.0)
    candidates = [model]
    if "/" in model:
        candidates.append(model.split("/", 1)[1])
    for name in candidates:
        try:
            info = load_litellm().get_model_info(name)
        except Exception:  # noqa: BLE001 — "not mapped" is the expected failure
            continue
        inp, out = info.get("input_cost_per_token"), info.get("output_cost_per_token")
        if inp is not None or out is not None:
            return (float(inp or 0.0), float(out or 0.0))
    return None


def prices_for(config: Config, public_model: str, deployment_model: str | None) -> tuple[float, float] | None:
    entries = config.deployments(public_model)
    if entries:
        pricing = config.model_settings(public_model).pricing
        if pricing is not None:
            return (pricing.input_per_million / 1e6, pricing.output_per_million / 1e6)
    if deployment_model is None:
        return None
    return _litellm_prices(deployment_model)


def cost_usd(config: Config, public_model: str, deployment_model: str | None, usage: Usage | None) -> float | None:
    if usage is None:
        return 0.0
    prices = prices_for(config, public_model, deployment_model)
    if prices is None:
        return None
    return round(usage.prompt_tokens * prices[0] + usage.completion_tokens * prices[1], 9)


def unpriced_models(config: Config) -> list[str]:
    """Configured deployments with no known price (logged loudly at start)."""
    missing = []
    for entry in config.models:
        if prices_for(config, entry.name, entry.litellm_params.model) is None:
            missing.append(f"{entry.name} ({entry.litellm_params.model})")
    return missing


def _count(model: str | None, **kw: Any) -> int:
    try:
        return int(load_litellm().token_counter(model=model or "gpt-4o-mini", **kw))
    except Exception:  # noqa: BLE001 — unknown tokenizer: fall back to the default one
        return int(load_litellm().token_counter(model="gpt-4o-mini", **kw))


def estimate_usage(ctx: RequestContext) -> Usage:
    """Count tokens over what was actually sent upstream and produced so far."""
    model = (ctx.deployment or "").split("/", 1)[-1] or None
    if ctx.endpoint == "embeddings":
        value = ctx.body.get("input")
        text = " ".join(map(str, value)) if isinstance(value, list) else str(value or "")
        prompt = _count(model, text=text)
        return Usage(prompt, 0, prompt, estimated=True)
    messages = ctx.body.get("messages") or []
    prompt = _count(model, messages=messages) if messages else 0
    if ctx.response is not None:
        choices = ctx.response.get("choices") or [{}]
        text = "".join(str((c.get("message") or {}).get("content") or "") for c in choices)
    else:
        text = "".join(ctx.streamed_text)
    completion = _count(model, text=text) if text else 0
    return Usage(prompt, completion, prompt + completion, estimated=True)


def finalize_usage(ctx: RequestContext) -> None:
    """Fill ctx.usage (estimating where needed) and ctx.cost_usd before the endings run."""
    if ctx.endpoint == "models" or ctx.short_circuit is not None:
        if ctx.short_circuit is not None:
            ctx.cost_usd = 0.0  # a replay costs the provider nothing
        return
    dispatched = ctx.attempts > 0
    if not dispatched:
        ctx.cost_usd = 0.0  # rejected before any upstream call: nothing spent (not "price unknown")
        return
    reported = ctx.usage
    produced = bool(ctx.streamed_text) or ctx.response is not None
    if reported is None or (reported.total_tokens == 0 and produced):
        if ctx.error is not None and not produced:
            ctx.cost_usd = 0.0  # nothing reached or left the upstream successfully: no tokens to bill
            return
        try:
            ctx.usage = estimate_usage(ctx)
        except Exception:  # noqa: BLE001 — accounting fails open, loudly
            log.exception("usage_estimate_failed", request_id=ctx.request_id, model=ctx.model)
            return
    ctx.cost_usd = cost_usd(ctx.config, ctx.model, ctx.deployment, ctx.usage)


def warm_up() -> None:
    """Load the default tokenizer now, not on the first cut-off stream (~0.4 s)."""
    try:
        load_litellm().token_counter(model="gpt-4o-mini", text="warm up")
    except Exception:  # noqa: BLE001
        pass

