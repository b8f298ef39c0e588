"""Tokens and USD cost of a request, computed once at its ending for every plugin.

Tokens come from the provider's reported usage (`usage_from_payload`, for every path:
native and litellm, streamed and not). Where it reported nothing (or a stream was cut
short, or the client left mid-stream), they are counted with litellm's token counter over
what was actually sent and received, and `Usage.estimated` is set: such a request is
never silently billed at zero.

Token classes, and the rule that keeps them from being counted twice: `Usage` is always
in OpenAI's convention, where every class is a *part of* a total.

* OpenAI (and litellm's translation of every provider): `prompt_tokens` INCLUDES
  `prompt_tokens_details.cached_tokens` and `.audio_tokens`; `completion_tokens`
  INCLUDES `completion_tokens_details.reasoning_tokens` and `.audio_tokens`. Taken as
  they are.
* Anthropic's own Messages API: `input_tokens` EXCLUDES `cache_read_input_tokens` and
  `cache_creation_input_tokens`, so prompt_tokens = input + cache read + cache write.
  The cache writes' lifetimes are in `cache_creation` (`ephemeral_5m_input_tokens`,
  `ephemeral_1h_input_tokens`), parts of `cache_creation_input_tokens`; litellm puts them
  in `prompt_tokens_details.cache_creation_token_details`, and so does the native path.
  litellm 1.110.2 (`AnthropicConfig.calculate_usage`) already does that sum when it
  translates, and reports the parts twice: as `prompt_tokens_details.cached_tokens` /
  `.cache_creation_tokens` and as top-level `cache_read_input_tokens` /
  `cache_creation_input_tokens`. One value is read per class (details first), never both.
* The Responses API shape (`input_tokens` with `input_tokens_details`) is inclusive, like
  OpenAI's chat usage.

Cost is USD from config.yaml's `pricing` for the model when given, else litellm's bundled
(offline) price map for the deployment's model. Each class has its own unit price
(`UnitPrices`); a class without one is billed at the plain input price (cached, cache
write, audio in) or output price (reasoning, audio out); a 1-hour cache write without one
at the cache-write price. Plain text tokens are the total less its classes:

    cost = (prompt - cached - cache_write - audio_in) * input + cached * cached_input
         + (cache_write - cache_write_1h) * cache_write_price
         + cache_write_1h * cache_write_1h_price + audio_in * audio_input
         + (completion - reasoning - audio_out) * output + reasoning * reasoning_price
         + audio_out * audio_output

Classes are clamped so their sum never exceeds their total (a cached audio token is one
token, not two), and the 1-hour writes to the cache writes. That is litellm's rule
(`calculate_cache_writing_cost`: 1-hour writes at `cache_creation_input_token_cost_above_1hr`,
falling back to `cache_creation_input_token_cost`; writes of no stated lifetime at the
latter), held to litellm's own cost in tests/test_token_classes.py. An unknown price gives `cost_usd = None` (logged at start-up by
`unpriced_models`), never a made-up zero.

The cost is a `Decimal`: exact prices times integer tokens, rounded half-even to 1e-9 USD
once, at the end of `UnitPrices.cost` (gateway/money.py has the rule).

An answer served without the provider (a response cache hit, an idempotent replay) costs
0, and `saved_usd` is what it would have cost: its tokens (the stored answer's usage, its
classes included) priced by the same rule, at the prices of the model's first deployment,
the one dispatch tries first (or the model's `pricing`).
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, fields, replace
from decimal import Decimal
from typing import Any

import orjson
import structlog

from gateway.config import PRICED_SERVICE_TIERS, Config, ModelEntry, TokenPrices
from gateway.errors import ApiError, bad_request
from gateway.hosted_tools import cap_uses, requested, search_context_size, usd_per_use_in_map, uses_in
from gateway.money import USD_ZERO, json_default, price, usd
from gateway.price_map import count_messages, count_text, model_info
from plugins.base import TOOL_ENDPOINTS, RequestContext, UnbilledCall, Usage

log = structlog.get_logger("gateway.usage")

# Deployment model strings that cost nothing (the offline demo).
_FREE_PROVIDERS = ("demo/",)


def _int(value: Any) -> int:
    return int(value) if isinstance(value, (int, float)) and value > 0 else 0


def usage_from_payload(payload: dict[str, Any]) -> Usage | None:
    """The `Usage` of a response or stream chunk (`_token_usage`), with the price
    dimensions the answer reports: the service tier that served it (`service_tier`, of the
    answer or of Anthropic's usage) and its hosted-tool uses (gateway/hosted_tools.py)."""
    usage = _token_usage(payload)
    if usage is None:
        return None
    tier = payload.get("service_tier")
    if tier is None:
        tier = payload["usage"].get("service_tier")
    uses = uses_in(payload)
    if tier is None and not uses:
        return usage
    return replace(usage, service_tier=tier if isinstance(tier, str) else None, hosted_tool_uses=uses)


def _token_usage(payload: dict[str, Any]) -> Usage | None:
    """The tokens of a response or stream chunk (`payload["usage"]`), or None when it
    carries none. Reads OpenAI chat usage, litellm's translations (which add Anthropic's
    top-level cache keys), the Responses API shape and Anthropic's own; see the module
    docstring for which totals include which classes. One usage object is read as it is:
    an Anthropic stream reports input and cache counts in `message_start` and the output
    count in `message_delta`, so a native Anthropic path merges the two first (as
    litellm's stream handler does) rather than calling this on each."""
    usage = payload.get("usage")
    if not isinstance(usage, dict):
        return None
    get = usage.get
    if "prompt_tokens" not in usage and "input_tokens" in usage:
        if "input_tokens_details" in usage or "output_tokens_details" in usage:  # Responses API: inclusive
            prompt, completion = _int(get("input_tokens")), _int(get("output_tokens"))
            prompt_details = get("input_tokens_details") or {}
            completion_details = get("output_tokens_details") or {}
            return Usage(prompt, completion, _int(get("total_tokens")) or prompt + completion,
                         cached_tokens=_int(prompt_details.get("cached_tokens")),
                         reasoning_tokens=_int(completion_details.get("reasoning_tokens")))
        # Anthropic: input_tokens excludes the cache reads and writes.
        cached, written = _int(get("cache_read_input_tokens")), _int(get("cache_creation_input_tokens"))
        prompt = _int(get("input_tokens")) + cached + written
        completion = _int(get("output_tokens"))
        return Usage(prompt, completion, prompt + completion, cached_tokens=cached, cache_write_tokens=written,
                     cache_write_1h_tokens=_written_1h(get("cache_creation")))
    prompt, completion = _int(get("prompt_tokens")), _int(get("completion_tokens"))
    prompt_details = get("prompt_tokens_details")
    prompt_details = prompt_details if isinstance(prompt_details, dict) else {}
    completion_details = get("completion_tokens_details")
    completion_details = completion_details if isinstance(completion_details, dict) else {}
    return Usage(
        prompt, completion, _int(get("total_tokens")) or prompt + completion,
        cached_tokens=_int(prompt_details.get("cached_tokens")) or _int(get("cache_read_input_tokens")),
        cache_write_tokens=(_int(prompt_details.get("cache_creation_tokens"))
                            or _int(get("cache_creation_input_tokens"))),
        cache_write_1h_tokens=_written_1h(prompt_details.get("cache_creation_token_details")),
        reasoning_tokens=_int(completion_details.get("reasoning_tokens")),
        audio_in_tokens=_int(prompt_details.get("audio_tokens")),
        audio_out_tokens=_int(completion_details.get("audio_tokens")),
    )


def _written_1h(lifetimes: Any) -> int:
    """The 1-hour cache writes of Anthropic's `cache_creation` (or litellm's
    `cache_creation_token_details`, the same keys)."""
    return _int(lifetimes.get("ephemeral_1h_input_tokens")) if isinstance(lifetimes, dict) else 0


def openai_usage(usage: Usage) -> dict[str, Any]:
    """`usage` as OpenAI's chat usage object, the inverse of `usage_from_payload` (the
    details only when a class is not 0)."""
    out: dict[str, Any] = {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                           "total_tokens": usage.total_tokens}
    prompt = {k: v for k, v in (("cached_tokens", usage.cached_tokens),
                                ("cache_creation_tokens", usage.cache_write_tokens),
                                ("audio_tokens", usage.audio_in_tokens)) if v}
    completion = {k: v for k, v in (("reasoning_tokens", usage.reasoning_tokens),
                                    ("audio_tokens", usage.audio_out_tokens)) if v}
    if usage.cache_write_1h_tokens:
        prompt["cache_creation_token_details"] = {
            "ephemeral_5m_input_tokens": max(usage.cache_write_tokens - usage.cache_write_1h_tokens, 0),
            "ephemeral_1h_input_tokens": usage.cache_write_1h_tokens}
    if prompt:
        out["prompt_tokens_details"] = prompt
    if completion:
        out["completion_tokens_details"] = completion
    return out


@dataclass(frozen=True)
class UnitPrices:
    """USD per token of each class, fallbacks already applied (every field is a price).
    Given as floats (the map's, the config's), kept as exact decimals (gateway/money.py
    `price`): converted once per price book, not per request."""

    input: Decimal
    output: Decimal
    cached_input: Decimal
    cache_write: Decimal
    reasoning: Decimal
    audio_input: Decimal
    audio_output: Decimal
    cache_write_1h: Decimal  # a cache write with a 1-hour lifetime (Anthropic: 2x input, vs 1.25x)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float):
                object.__setattr__(self, f.name, price(value))

    @classmethod
    def of(cls, input: float, output: float, *, cached_input: float | None = None,
           cache_write: float | None = None, reasoning: float | None = None,
           audio_input: float | None = None, audio_output: float | None = None,
           cache_write_1h: float | None = None) -> "UnitPrices":
        """Prices of the classes that have one; the others fall back to input / output
        (a 1-hour cache write to the cache-write price)."""
        write = input if cache_write is None else cache_write
        return cls(input, output,
                   input if cached_input is None else cached_input,
                   write,
                   output if reasoning is None else reasoning,
                   input if audio_input is None else audio_input,
                   output if audio_output is None else audio_output,
                   write if cache_write_1h is None else cache_write_1h)

    def cost(self, usage: Usage) -> Decimal:
        prompt, completion = usage.prompt_tokens, usage.completion_tokens
        cached = min(usage.cached_tokens, prompt)
        written = min(usage.cache_write_tokens, prompt - cached)
        written_1h = min(usage.cache_write_1h_tokens, written)
        audio_in = min(usage.audio_in_tokens, prompt - cached - written)
        reasoning = min(usage.reasoning_tokens, completion)
        audio_out = min(usage.audio_out_tokens, completion - reasoning)
        return usd((prompt - cached - written - audio_in) * self.input + cached * self.cached_input
                   + (written - written_1h) * self.cache_write + written_1h * self.cache_write_1h
                   + audio_in * self.audio_input
                   + (completion - reasoning - audio_out) * self.output + reasoning * self.reasoning
                   + audio_out * self.audio_output)  # the one rounding (gateway/money.py)

    @functools.cached_property
    def per_million_json(self) -> str:
        """What a usage row keeps (`unit_prices`): USD per million tokens of each class."""
        return orjson.dumps({k: v * _MILLION for k, v in asdict(self).items()}, default=json_default).decode()


_MILLION = Decimal(10**6)
FREE = UnitPrices.of(0.0, 0.0)


# --- price dimensions: service tiers, long-context steps, hosted-tool uses -------------
#
# The token prices above are those of one service tier below one long-context step. Which
# ones apply is decided per request, by litellm's rules (litellm_core_utils/llm_cost_calc/
# utils.py, `_get_token_base_cost`), held to litellm's own cost in
# tests/test_price_dimensions.py:
#
# * Service tier: the tier that served the request (the answer's `service_tier`; else the
#   one asked for), `priority` or `flex`, priced by the map's `<key>_<tier>` keys, a class
#   without one at its standard price (litellm's fallback). A tier the map (or the
#   config's `pricing.<tier>`) has no input or output price for is not served (`refusal`).
# * Long context: when the prompt has MORE than N tokens (`*_above_<N>k_tokens`), every
#   token (input, output, cache read, cache write) is billed at that step's price, a class
#   without one at the price below. Under a tier, the tier's step key first
#   (`input_cost_per_token_above_200k_tokens_priority`), then the standard step's. The map
#   as read carries the steps some Anthropic entries lack (gateway/price_map.py,
#   `LONG_CONTEXT_TWINS`).
# * Beyond the window: a prompt longer than the map's `max_input_tokens` for a chat model
#   with no long-context step was served on terms the map does not state (Anthropic's 1M beta on
#   a 200k model bills a premium the map lacks): no price (`cost_usd` null, counted as
#   unpriced and logged), never the base price. The operator's `pricing` is taken as given.
# * Hosted-tool uses: USD per use of each tool the answer reports (gateway/hosted_tools.py).

_NON_STANDARD_SUFFIXES = ("_priority", "_flex", "_batches", "_balanced", "_fast", "_ultrafast")
_STEP_PREFIXES = ("input_cost_per_token_above_", "output_cost_per_token_above_",
                  "cache_read_input_token_cost_above_", "cache_creation_input_token_cost_above_")
_WRITE_1H = "cache_creation_input_token_cost_above_1hr"


def _map_info(model: str) -> dict[str, Any] | None:
    """The map's entry for a deployment model (or for it without its provider prefix)
    that prices tokens, or None."""
    candidates = [model, model.split("/", 1)[1]] if "/" in model else [model]
    for name in candidates:
        info = model_info(name)
        if info is not None and (info.get("input_cost_per_token") is not None
                                 or info.get("output_cost_per_token") is not None):
            return info
    return None


def _map_has_tier(info: dict[str, Any], tier: str) -> bool:
    return info.get(f"input_cost_per_token_{tier}") is not None or info.get(f"output_cost_per_token_{tier}") is not None


@functools.lru_cache(maxsize=1024)
def _map_steps(model: str, tier: str | None) -> tuple[tuple[float, str], ...]:
    """The map's long-context thresholds for `tier`, ascending: (tokens, "200k")."""
    info = _map_info(model) or {}
    suffix = f"_{tier}" if tier else ""
    steps = set()
    for key in info:
        if not key.startswith(_STEP_PREFIXES) or "_tokens" not in key or info[key] is None:
            continue
        if key.endswith(_NON_STANDARD_SUFFIXES) and not (suffix and key.endswith(suffix)):
            continue
        name = key.rsplit("_above_", 1)[1].split("_tokens")[0]
        try:
            steps.add((float(name.replace("k", "")) * (1000 if "k" in name else 1), name))
        except ValueError:
            continue
    return tuple(sorted(steps))


@functools.lru_cache(maxsize=4096)
def _litellm_prices(model: str, tier: str | None = None, steps: int = 0) -> UnitPrices | None:
    """Prices from litellm's map for service tier `tier` (None: standard) once the prompt
    exceeds the first `steps` long-context thresholds; None when the map has none."""
    if model.startswith(_FREE_PROVIDERS):
        return FREE
    info = _map_info(model)
    if info is None or (tier is not None and not _map_has_tier(info, tier)):
        return None
    suffix = f"_{tier}" if tier else ""

    def price(key: str, fallback: float | None = None) -> float | None:
        value = info.get(key + suffix) if suffix else None  # litellm's get_cost_per_unit:
        if value is None:  # the tier's key, else the standard one
            value = info.get(key)
        return fallback if value is None else float(value)

    inp, out = price("input_cost_per_token", 0.0), price("output_cost_per_token", 0.0)
    cached, write = price("cache_read_input_token_cost"), price("cache_creation_input_token_cost")
    write_1h_key = _WRITE_1H
    for _, name in _map_steps(model, tier)[:steps]:
        above = f"_above_{name}_tokens"
        inp, out = price("input_cost_per_token" + above, inp), price("output_cost_per_token" + above, out)
        cached, write = price("cache_read_input_token_cost" + above, cached), price(
            "cache_creation_input_token_cost" + above, write)
        if info.get(_WRITE_1H + above + suffix) is not None:
            write_1h_key = _WRITE_1H + above
    return UnitPrices.of(inp or 0.0, out or 0.0, cached_input=cached, cache_write=write,
                         reasoning=price("output_cost_per_reasoning_token"),
                         audio_input=price("input_cost_per_audio_token"),
                         audio_output=price("output_cost_per_audio_token"),
                         cache_write_1h=price(write_1h_key))


@functools.lru_cache(maxsize=1024)
def _config_prices(pricing: TokenPrices) -> UnitPrices:
    def per_token(value: float | None) -> float | None:
        return None if value is None else value / 1e6

    return UnitPrices.of(pricing.input_per_million / 1e6, pricing.output_per_million / 1e6,
                         cached_input=per_token(pricing.cached_input_per_million),
                         cache_write=per_token(pricing.cache_write_per_million),
                         reasoning=per_token(pricing.reasoning_per_million),
                         audio_input=per_token(pricing.audio_input_per_million),
                         audio_output=per_token(pricing.audio_output_per_million),
                         cache_write_1h=per_token(pricing.cache_write_1h_per_million))


def token_prices(config: Config, public_model: str, deployment_model: str | None, tier: str | None,
                 prompt_tokens: int) -> tuple[UnitPrices, int | None] | None:
    """The token prices of service tier `tier` (None: standard) for a prompt of
    `prompt_tokens`, and the long-context threshold they apply above (None: below every
    one); None when there is no price: the model's `pricing` when given (all of it: a tier
    it does not price has none), else litellm's map for the deployment."""
    if config.deployments(public_model):
        pricing = config.model_settings(public_model).pricing
        if pricing is not None:
            block = pricing.tier(tier)
            if block is None:
                return None
            step = None
            for candidate in block.long_context:
                if prompt_tokens > candidate.above_tokens:
                    step = candidate
            return _config_prices(step or block), None if step is None else step.above_tokens
    if deployment_model is None:
        return None
    steps = _map_steps(deployment_model, tier)
    if _beyond_window(deployment_model, steps, prompt_tokens):
        return None
    exceeded = sum(1 for threshold, _ in steps if prompt_tokens > threshold)
    prices = _litellm_prices(deployment_model, tier, exceeded)
    return None if prices is None else (prices, int(steps[exceeded - 1][0]) if exceeded else None)


def _beyond_window(model: str, steps: tuple[tuple[float, str], ...], prompt_tokens: int) -> bool:
    """A prompt longer than the map's `max_input_tokens` for `model`, a chat model with no
    long-context step: the map does not say what such a prompt costs. (An embedding
    model's window is per input: a request's inputs together may well exceed it.)"""
    if steps:
        return False
    info = _map_info(model) or {}
    if info.get("mode") not in _WINDOWED_MODES:
        return False
    window = info.get("max_input_tokens")
    return isinstance(window, (int, float)) and not isinstance(window, bool) and 0 < window < prompt_tokens


# The map's modes whose `max_input_tokens` bounds one request's whole prompt.
_WINDOWED_MODES = ("chat", "responses", "completion")


def batch_prices(config: Config, public_model: str, deployment_model: str | None,
                 prompt_tokens: int) -> BilledPrices | None:
    """The token prices of a line of a provider batch (gateway/batches.py): the model's
    `pricing.batches` when its pricing is given, else litellm's `*_batches` keys for the
    deployment (above the long-context step the prompt exceeds, when the map has that step's
    `*_batches` keys); None when neither says."""
    if config.deployments(public_model):
        pricing = config.model_settings(public_model).pricing
        if pricing is not None:
            block = pricing.batches
            if block is None:
                return None
            step = None
            for candidate in block.long_context:
                if prompt_tokens > candidate.above_tokens:
                    step = candidate
            return BilledPrices(_config_prices(step or block), "batches",
                                None if step is None else step.above_tokens)
    if deployment_model is None:
        return None
    steps = _map_steps(deployment_model, "batches")
    if _beyond_window(deployment_model, steps, prompt_tokens):
        return None
    exceeded = sum(1 for threshold, _ in steps if prompt_tokens > threshold)
    if exceeded and not any(key.endswith(f"_above_{steps[exceeded - 1][1]}_tokens_batches")
                            for key in _map_info(deployment_model) or {}):
        # Above a step the map has no batch price for: the standard step's price is not
        # what a batch costs (Anthropic halves the long-context price too), the base batch
        # price is under it. Unknown (null), as the module's rule for any unknown price.
        return None
    prices = _litellm_prices(deployment_model, "batches", exceeded)
    if prices is None:
        return None
    return BilledPrices(prices, "batches", int(steps[exceeded - 1][0]) if exceeded else None)


def prices_for(config: Config, public_model: str, deployment_model: str | None) -> UnitPrices | None:
    """The standard tier's token prices below any long-context step."""
    found = token_prices(config, public_model, deployment_model, None, 0)
    return None if found is None else found[0]


def hosted_tool_price(config: Config, public_model: str, deployment_model: str | None, kind: str,
                      body: dict[str, Any]) -> float | None:
    """USD per use of hosted tool `kind`: the model's `hosted_tools.<kind>.usd_per_use`,
    else litellm's map (gateway/hosted_tools.py); None when neither says."""
    allowed = (config.model_settings(public_model).hosted_tools or {}) if config.deployments(public_model) else {}
    tool = allowed.get(kind)
    if tool is not None and tool.usd_per_use is not None:
        return tool.usd_per_use
    if deployment_model is None:
        return None
    if deployment_model.startswith(_FREE_PROVIDERS):
        return 0.0
    return usd_per_use_in_map(kind, deployment_model, search_context_size(body))


@dataclass(frozen=True)
class BilledPrices:
    """The prices one request was billed at: its token prices (of the service tier that
    served it, above the long-context threshold its prompt exceeded) and USD per use of
    each hosted tool it used. What a usage row's `unit_prices` shows."""

    tokens: UnitPrices
    service_tier: str | None = None  # "priority" / "flex"; None: the standard tier
    above_tokens: int | None = None  # the long-context threshold the prompt exceeded
    per_use: tuple[tuple[str, Decimal], ...] = ()  # (hosted tool, USD per use), for those used

    def cost(self, usage: Usage) -> Decimal:
        if not self.per_use:
            return self.tokens.cost(usage)
        uses = dict(usage.hosted_tool_uses)
        return usd(self.tokens.cost(usage) + sum((each * uses.get(kind, 0) for kind, each in self.per_use), USD_ZERO))

    @functools.cached_property
    def per_million_json(self) -> str:
        """The token prices (USD per million tokens), and, when they apply, the service
        tier, the long-context threshold and the USD per hosted-tool use."""
        if self.service_tier is None and self.above_tokens is None and not self.per_use:
            return self.tokens.per_million_json
        out = orjson.loads(self.tokens.per_million_json)
        if self.service_tier is not None:
            out["service_tier"] = self.service_tier
        if self.above_tokens is not None:
            out["above_tokens"] = self.above_tokens
        if self.per_use:
            out["usd_per_use"] = dict(self.per_use)
        return orjson.dumps(out, default=json_default).decode()


def billed_tier(usage: Usage, body: dict[str, Any]) -> str | None:
    """The priced service tier of a request: the one the answer says served it, else the
    one asked for; None for the standard tier (`default`, `auto`, ...)."""
    tier = usage.service_tier if usage.service_tier is not None else body.get("service_tier")
    return tier if tier in PRICED_SERVICE_TIERS else None


def billed_prices(config: Config, public_model: str, deployment_model: str | None, usage: Usage,
                  body: dict[str, Any]) -> BilledPrices | None:
    """Every price that applies to `usage`; None when one of them is unknown."""
    tier = billed_tier(usage, body)
    found = token_prices(config, public_model, deployment_model, tier, usage.prompt_tokens)
    if found is None:
        return None
    per_use = []
    for kind, _ in usage.hosted_tool_uses:
        per_use_usd = hosted_tool_price(config, public_model, deployment_model, kind, body)
        if per_use_usd is None:
            return None
        per_use.append((kind, price(per_use_usd)))
    return BilledPrices(found[0], tier, found[1], tuple(per_use))


def admit(ctx: RequestContext, public_model: str, deployment: ModelEntry, *,
          takes_inbound_tools: bool) -> ApiError | None:
    """Why `deployment` (of `public_model`) may not serve this request: a service tier it
    has no price for, or a hosted tool its model does not allow or cannot bill (never
    billed at the base price instead); None when it may, its hosted-tool uses then capped
    at the model's `max_uses` (what energy reserved for). `takes_inbound_tools`: the
    deployment gets a /v1/messages body as the client sent it (Anthropic's server tools
    reach only such a one)."""
    body, config = ctx.body, ctx.config
    tier = body.get("service_tier") if ctx.inbound != "anthropic" else None  # Anthropic's: auto / standard_only
    if tier is not None and tier not in ("auto", "default"):
        if tier not in PRICED_SERVICE_TIERS:
            return bad_request(f"service_tier {str(tier)[:32]!r} is not supported by the gateway (it bills auto, "
                               f"default, priority and flex)", param="service_tier", code="unsupported_service_tier")
        if token_prices(config, public_model, deployment.litellm_params.model, tier, 0) is None:
            return bad_request(f"service_tier '{tier}' has no known price for the model '{public_model}'; the "
                               f"gateway does not serve a request it cannot bill", param="service_tier",
                               code="unpriced_service_tier")
    tools = requested(body, ctx.inbound, ctx.inbound_body)
    if not tools:
        return None
    allowed = config.model_settings(public_model).hosted_tools or {}
    for kind, param in tools.items():
        if kind not in allowed:
            return bad_request(f"the hosted tool '{kind}' is not enabled for the model '{public_model}' (it runs at "
                               f"the provider, charged per use)", param=param, code="hosted_tool_not_allowed")
        if hosted_tool_price(config, public_model, deployment.litellm_params.model, kind, body) is None:
            return bad_request(f"the hosted tool '{kind}' has no known price for the model '{public_model}'",
                               param=param, code="unpriced_hosted_tool")
        if ctx.inbound == "anthropic" and not takes_inbound_tools:
            return bad_request(f"the server tool '{kind}' reaches only an Anthropic deployment; the model "
                               f"'{public_model}' is not served by one", param=param, code="unsupported_tool_type")
    cap_uses(body, ctx.inbound, ctx.inbound_body, {kind: allowed[kind].max_uses for kind in tools})
    return None


def cost_usd(config: Config, public_model: str, deployment_model: str | None, usage: Usage | None) -> Decimal | None:
    if usage is None:
        return USD_ZERO
    prices = prices_for(config, public_model, deployment_model)
    if prices is None:
        return None
    return prices.cost(usage)


def unpriced_models(config: Config) -> list[str]:
    """Configured deployments with no known price (logged loudly at start)."""
    missing = []
    for entry in config.models:
        if prices_for(config, entry.name, entry.litellm_params.model) is None:
            missing.append(f"{entry.name} ({entry.litellm_params.model})")
    return missing


def _count(model: str | None, *, text: str | None = None, messages: list[Any] | None = None) -> int:
    """Tokens by litellm's bundled tiktoken files, counted as its token_counter does, without
    importing litellm (gateway/price_map.py)."""
    return count_messages(messages, model) if messages is not None else count_text(text or "", model)


def estimate_usage(ctx: RequestContext) -> Usage:
    """Count tokens over what was actually sent upstream and produced so far."""
    model = (ctx.deployment or "").split("/", 1)[-1] or None
    prompt = _estimate_prompt(ctx, model)
    if ctx.endpoint == "embeddings":
        return Usage(prompt, 0, prompt, estimated=True)
    completion = _estimate_output(ctx, model)
    return Usage(prompt, completion, prompt + completion, estimated=True)


# Output tokens a USD budget holds for a request that names no limit on a model without
# max_tokens_default / max_tokens_cap (gateway/budgets.py).
OUTPUT_CEILING_TOKENS = 4096


def estimate_usd_ceiling(ctx: RequestContext, public_model: str) -> Decimal | None:
    """What a request may cost on `public_model`, held by a USD budget before the call: the
    prompt counted, the output at the request's limit (max_tokens, max_completion_tokens,
    max_output_tokens), else the model's cap or default, else OUTPUT_CEILING_TOKENS, times
    the choices asked (`n`), at the model's standard prices (above the long-context step the
    counted prompt exceeds), plus its hosted tools' uses;
    embeddings only their input. None: no known price (or an
    MCP tool without a `cost_usd`)."""
    if ctx.endpoint in TOOL_ENDPOINTS:
        found = ctx.config.mcp_tool(public_model)
        cost = found[0].tool_cost_usd(found[1]) if found is not None else None
        return None if cost is None else usd(cost)
    deployments = ctx.config.deployments(public_model)
    deployment = deployments[0].litellm_params.model if deployments else None
    prices = prices_for(ctx.config, public_model, deployment)
    if prices is None:
        return None
    prompt = _estimate_prompt(ctx, None)
    stepped = token_prices(ctx.config, public_model, deployment, None, prompt)
    if stepped is not None:  # above a long-context step: every token at its price
        prices = stepped[0]
    output = 0
    if ctx.endpoint != "embeddings":
        body = ctx.body
        asked = [body.get(k) for k in ("max_tokens", "max_completion_tokens", "max_output_tokens")]
        limits = [v for v in asked if isinstance(v, int) and not isinstance(v, bool) and v > 0]
        settings = ctx.config.model_settings(public_model) if deployments else None
        cap = settings.max_tokens_cap if settings is not None else None
        default = settings.max_tokens_default if settings is not None else None
        output = min(limits) if limits else (default or cap or OUTPUT_CEILING_TOKENS)
        if cap is not None:
            output = min(output, cap)
        choices = body.get("n")  # each choice is an answer of up to that many tokens, all billed
        if isinstance(choices, int) and not isinstance(choices, bool) and choices > 1:
            output *= choices
    return prices.cost(Usage(prompt, output, prompt + output)) + _hosted_tools_ceiling(ctx, public_model, deployment)


def _hosted_tools_ceiling(ctx: RequestContext, public_model: str, deployment: str | None) -> Decimal:
    """What the hosted tools a request asks for may cost: each tool's price per use times
    the uses it is capped to (its `max_uses`; a chat answer's web search: once)."""
    if ctx.endpoint == "embeddings" or not ctx.config.deployments(public_model):
        return USD_ZERO
    inbound = getattr(ctx, "inbound", None)
    tools = requested(ctx.body, inbound, getattr(ctx, "inbound_body", None))
    allowed = ctx.config.model_settings(public_model).hosted_tools or {}
    total = USD_ZERO
    for kind in tools:
        per_use = hosted_tool_price(ctx.config, public_model, deployment, kind, ctx.body)
        if per_use:
            uses = allowed[kind].max_uses if kind in allowed and inbound in ("responses", "anthropic") else 1
            total += usd(Decimal(str(per_use)) * uses)
    return total


def _estimate_prompt(ctx: RequestContext, model: str | None) -> int:
    """The tokens of the prompt sent upstream: an embeddings `input`; a Responses body's
    `instructions` and `input` (a string, or a list of items counted as chat messages);
    a chat body's `messages`."""
    body = ctx.body
    if ctx.endpoint == "embeddings":
        value = body.get("input")
        return _count(model, text=" ".join(map(str, value)) if isinstance(value, list) else str(value or ""))
    if ctx.endpoint == "responses":
        messages: list[Any] = []
        if isinstance(body.get("instructions"), str) and body["instructions"]:
            messages.append({"role": "system", "content": body["instructions"]})
        given = body.get("input")
        if isinstance(given, str) and given:
            messages.append({"role": "user", "content": given})
        elif isinstance(given, list):
            messages.extend(given)
    else:
        messages = body.get("messages") or []
    return _count(model, messages=messages) if messages else 0


def _estimate_output(ctx: RequestContext, model: str | None) -> int:
    """The tokens of what was produced: the answer, or what a stream sent so far (its
    reasoning, a passed-through Anthropic stream's thinking, included)."""
    if ctx.response is not None:
        choices = ctx.response.get("choices") or [{}]
        text = "".join(str((c.get("message") or {}).get("content") or "") for c in choices)
    else:
        text = "".join(ctx.streamed_text)
    reasoning = "".join(ctx.streamed_reasoning) if ctx.response is None else ""
    return (_count(model, text=text) if text else 0) + (_count(model, text=reasoning) if reasoning else 0)


def record_unbilled_call(ctx: RequestContext, answer: dict[str, Any] | None) -> None:
    """The gate discarded the answer of the call just made to `ctx.model` (refused or moved
    the request): keep its tokens and cost on `ctx.unbilled_calls`. `answer` is the whole
    answer, or a stream's first chunk (the stream is closed after it: its prompt and what
    the chunk carried are counted, estimated where the provider reported nothing yet)."""
    if ctx.attempts == 0 or ctx.short_circuit is not None:
        return  # nothing reached the provider
    model = (ctx.deployment or "").split("/", 1)[-1] or None
    usage = usage_from_payload(answer) if answer is not None else None
    if ctx.stream or usage is None or usage.total_tokens == 0:
        try:
            text = ""
            for choice in (answer or {}).get("choices") or ():
                part = choice.get("delta") or choice.get("message") or {}
                text += str(part.get("content") or "") + str(part.get("reasoning_content") or "")
            prompt = usage.prompt_tokens if usage is not None and usage.prompt_tokens else 0
            if not prompt:
                prompt = _estimate_prompt(ctx, model)
            completion = max(usage.completion_tokens if usage is not None else 0,
                             _count(model, text=text) if text else 0)
            usage = Usage(prompt, completion, prompt + completion, estimated=True)
        except Exception:  # noqa: BLE001 — accounting fails open, loudly
            log.exception("usage_estimate_failed", request_id=ctx.request_id, model=ctx.model)
            usage = Usage(estimated=True)
    prices = billed_prices(ctx.config, ctx.model, ctx.deployment, usage, ctx.body)
    ctx.unbilled_calls.append(UnbilledCall(ctx.model, ctx.deployment, usage,
                                           None if prices is None else prices.cost(usage), prices))


def unbilled_cost_usd(ctx: RequestContext) -> Decimal | None:
    """The USD of the calls whose answers were discarded (0 without any; None when one
    of them has no known price)."""
    total = USD_ZERO
    for call in ctx.unbilled_calls:
        if call.cost_usd is None:
            return None
        total += call.cost_usd
    return total


def finalize_usage(ctx: RequestContext) -> None:
    """Fill ctx.usage (estimating where needed) and ctx.cost_usd before the endings run.
    `cost_usd` includes the calls whose answers the gate discarded (`ctx.unbilled_calls`);
    a request that served nothing else carries the last such call's tokens and prices."""
    if not ctx.billed:
        return
    if ctx.endpoint in TOOL_ENDPOINTS:
        _price_tool_call(ctx)
        return
    if ctx.short_circuit is not None:
        _price_saved(ctx)
        return
    served_nothing = (ctx.error is not None and ctx.response is None and not ctx.streamed_text
                      and not ctx.streamed_reasoning)
    if ctx.unbilled_calls and served_nothing:
        last = ctx.unbilled_calls[-1]
        ctx.usage, ctx.unit_prices = last.usage, last.unit_prices
        ctx.cost_usd = unbilled_cost_usd(ctx)
        return
    _price_served(ctx)
    if ctx.unbilled_calls:
        extra = unbilled_cost_usd(ctx)
        ctx.cost_usd = None if extra is None or ctx.cost_usd is None else ctx.cost_usd + extra


def _price_tool_call(ctx: RequestContext) -> None:
    """An MCP tool call has no tokens: its USD is mcp_servers' `cost_usd` per call made
    upstream (the tool's, else the server's; None when neither is set), 0 when refused
    before the upstream saw it."""
    if ctx.usage is None:
        ctx.usage = Usage()
    if ctx.attempts == 0:
        ctx.cost_usd = USD_ZERO
        return
    found = ctx.config.mcp_tool(ctx.model)
    price = found[0].tool_cost_usd(found[1]) if found is not None else None
    ctx.cost_usd = None if price is None else usd(price)


def _price_served(ctx: RequestContext) -> None:
    dispatched = ctx.attempts > 0
    if not dispatched:
        ctx.cost_usd = USD_ZERO  # rejected before any upstream call: nothing spent (not "price unknown")
        return
    reported = ctx.usage
    produced = bool(ctx.streamed_text) or bool(ctx.streamed_reasoning) or ctx.response is not None
    if reported is not None and ctx.stream and ctx.finish_reason is None and produced:
        # Cut off after the provider reported the prompt (Anthropic's message_start, on a
        # passed-through stream): its prompt classes are exact, the output is what was
        # produced so far, estimated (the provider's output count comes only at the end).
        try:
            output = _estimate_output(ctx, (ctx.deployment or "").split("/", 1)[-1] or None)
        except Exception:  # noqa: BLE001 — accounting fails open, loudly
            log.exception("usage_estimate_failed", request_id=ctx.request_id, model=ctx.model)
            output = 0
        if output > reported.completion_tokens:
            ctx.usage = reported = replace(reported, completion_tokens=output,
                                           total_tokens=reported.prompt_tokens + output, estimated=True)
    if reported is None or (reported.total_tokens == 0 and produced):
        if ctx.error is not None and not produced:
            ctx.cost_usd = USD_ZERO  # nothing reached or left the upstream successfully: no tokens to bill
            return
        try:
            ctx.usage = estimate_usage(ctx)
        except Exception:  # noqa: BLE001 — accounting fails open, loudly
            log.exception("usage_estimate_failed", request_id=ctx.request_id, model=ctx.model)
            return
    if ctx.usage is None:
        ctx.cost_usd = USD_ZERO
        return
    ctx.usage = _with_chat_web_search(ctx, ctx.usage)
    ctx.unit_prices = billed_prices(ctx.config, ctx.model, ctx.deployment, ctx.usage, ctx.body)
    ctx.cost_usd = None if ctx.unit_prices is None else ctx.unit_prices.cost(ctx.usage)


def _with_chat_web_search(ctx: RequestContext, usage: Usage) -> Usage:
    """A chat answer to `web_search_options` searched once when the provider reported no
    count (OpenAI's search models do not; litellm bills one search too)."""
    if ctx.inbound != "openai" or ctx.body.get("web_search_options") is None:
        return usage
    if any(kind == "web_search" for kind, _ in usage.hosted_tool_uses):
        return usage
    return replace(usage, hosted_tool_uses=tuple(sorted((*usage.hosted_tool_uses, ("web_search", 1)))))


def _price_saved(ctx: RequestContext) -> None:
    """A replay costs the provider nothing; `saved_usd` is what it would have cost
    (module docstring), and `unit_prices` the prices that says."""
    ctx.cost_usd = USD_ZERO
    if ctx.error is not None or ctx.usage is None:
        return
    entries = ctx.config.deployments(ctx.model)
    ctx.unit_prices = billed_prices(ctx.config, ctx.model, entries[0].litellm_params.model if entries else None,
                                    ctx.usage, ctx.body)
    ctx.saved_usd = None if ctx.unit_prices is None else ctx.unit_prices.cost(ctx.usage)


def warm_up() -> None:
    """Load the default tokenizer now, not on the first cut-off stream (~0.4 s)."""
    try:
        count_text("warm up", "gpt-4o-mini")
    except Exception:  # noqa: BLE001
        pass

