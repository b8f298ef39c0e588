"""litellm's bundled data (its price map, its tiktoken files) read without importing litellm.

Importing litellm costs ~150 MB of RSS and ~3 s; a gateway whose models are all native
never calls it. Prices come from the JSON file litellm ships
(`model_prices_and_context_window_backup.json`, the map it loads itself with
LITELLM_LOCAL_MODEL_COST_MAP=True), and token estimates from tiktoken with litellm's bundled
encodings (no download), counted as litellm's `token_counter` counts OpenAI chat messages
(3 tokens per message and 3 to prime the reply, plus each string field, +1 for a name).
tests/test_price_map.py holds both to litellm's own answers.

The map as read here carries one supplement (`LONG_CONTEXT_TWINS`): the long-context
steps (`*_above_200k_tokens`) some Anthropic-direct entries lack, copied from a twin entry
of the same model that has them (Bedrock's), so every reader of the map (token prices,
batches, the USD ceiling of a budget) sees them. Nothing is invented: a step is copied
only when the entry has no step of its own and its base prices equal the twin's
(`supplement_long_context`); a map that gains the step, or a twin whose prices moved,
turns the supplement off by itself. An operator's `models[].pricing` replaces the map
for that model, supplement included (docs/billing.md: Price dimensions).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
from pathlib import Path
from typing import Any

import orjson

_PRICE_FILE = "model_prices_and_context_window_backup.json"
_DEFAULT_ENCODING = "o200k_base"

# Anthropic bills every token of a request whose prompt exceeds 200,000 tokens (the 1M
# window of Claude Sonnet 4 and 4.5, beta `context-1m-2025-08-07`) at 2x input and cache
# prices and 1.5x output. litellm 1.110.2's map has those steps for the Bedrock and Vertex
# entries of these models but not for Anthropic's own names: entry -> its twin.
# (Sonnet 4.6 and later, and Opus 4.6 and later, have a 1M window at their base price;
# neither their entries nor their twins have a step, and none is added.)
_SONNET_4_5_TWIN = "anthropic.claude-sonnet-4-5-20250929-v1:0"
_SONNET_4_TWIN = "anthropic.claude-sonnet-4-20250514-v1:0"
LONG_CONTEXT_TWINS: dict[str, str] = {
    "claude-sonnet-4-5": _SONNET_4_5_TWIN,
    "claude-sonnet-4-5-20250929": _SONNET_4_5_TWIN,
    # not in litellm 1.110.2's map at all (unpriced without `pricing`); kept for a map that has them
    "claude-sonnet-4-20250514": _SONNET_4_TWIN,
    "claude-sonnet-4-0": _SONNET_4_TWIN,
}
# The base prices a twin must share with the entry for its steps to be copied.
_BASE_KEYS = ("input_cost_per_token", "output_cost_per_token", "cache_read_input_token_cost",
              "cache_creation_input_token_cost", "cache_creation_input_token_cost_above_1hr")


_STEP_KEY = re.compile(r"_above_\d+k?_tokens")


def _is_step(key: str) -> bool:
    """A long-context step's key (`..._above_200k_tokens[_<tier>]`, not `..._above_1hr`)."""
    return _STEP_KEY.search(key) is not None


def supplement_long_context(prices: dict[str, Any], twins: dict[str, str]) -> None:
    """Copy, in place, each twin's long-context step keys into its entry of `prices`, when
    the entry has no step of its own and the same base prices as its twin."""
    for name, twin_name in twins.items():
        entry, twin = prices.get(name), prices.get(twin_name)
        if not isinstance(entry, dict) or not isinstance(twin, dict) or any(_is_step(k) for k in entry):
            continue
        if any(entry.get(key) != twin.get(key) for key in _BASE_KEYS if key in entry or key in twin):
            continue
        steps = {key: value for key, value in twin.items() if _is_step(key) and value is not None}
        if steps:
            prices[name] = {**entry, **steps}


@functools.lru_cache(maxsize=1)
def _litellm_dir() -> Path | None:
    spec = importlib.util.find_spec("litellm")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


@functools.lru_cache(maxsize=1)
def _price_map() -> dict[str, Any]:
    directory = _litellm_dir()
    if directory is None or not (directory / _PRICE_FILE).is_file():
        return {}
    prices = orjson.loads((directory / _PRICE_FILE).read_bytes())
    supplement_long_context(prices, LONG_CONTEXT_TWINS)
    return prices


def model_info(model: str) -> dict[str, Any] | None:
    """The price map's entry for `model` (or for it without its provider prefix)."""
    prices = _price_map()
    found = prices.get(model)
    if found is None and "/" in model:
        found = prices.get(model.split("/", 1)[1])
    return found if isinstance(found, dict) else None


def prices_long_prompts(model: str, prompt_tokens: int) -> bool:
    """Whether the map prices a prompt of `prompt_tokens` on `model`: its entry has a
    long-context step, or a `max_input_tokens` at least that large (gateway/usage.py bills
    a longer prompt on a model with neither as unknown)."""
    info = model_info(model) or {}
    window = info.get("max_input_tokens")
    return any(_is_step(key) for key in info) or (isinstance(window, (int, float)) and window >= prompt_tokens)


@functools.lru_cache(maxsize=64)
def _encoding(model: str | None) -> Any:
    directory = _litellm_dir()
    if directory is not None:  # litellm's own files: tiktoken never goes to the network
        os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(directory / "litellm_core_utils" / "tokenizers"))
    import tiktoken

    try:
        encoding = tiktoken.encoding_for_model(model or "gpt-4o")
    except KeyError:
        encoding = tiktoken.get_encoding(_DEFAULT_ENCODING)
    # The Python copy of the merge table (o200k: ~27 MB of RSS) is only read to list or
    # decode single tokens, never to encode (the Rust CoreBPE holds its own): counting
    # needs none of it. The encoding is tiktoken's shared one, litellm's too (it encodes
    # and decodes whole texts, both through CoreBPE).
    if getattr(encoding, "_mergeable_ranks", None) is not None:
        encoding._mergeable_ranks = None
    return encoding


def count_text(text: str, model: str | None = None) -> int:
    return len(_encoding(model).encode(text, disallowed_special=()))


def count_messages(messages: list[Any], model: str | None = None) -> int:
    """Tokens of OpenAI chat messages, as litellm's token_counter counts them."""
    total = 0
    for message in messages:
        if not isinstance(message, dict):
            continue
        total += 3
        for key, value in message.items():
            if value is None:
                continue
            if key in ("tool_calls", "function_call"):
                calls = value if isinstance(value, list) else [{"function": value}]
                for call in calls:
                    function = call.get("function") if isinstance(call, dict) else None
                    if isinstance(function, dict):
                        total += sum(count_text(str(function.get(k) or ""), model) for k in ("name", "arguments"))
            elif isinstance(value, str):
                total += count_text(value, model) + (1 if key == "name" else 0)
            elif key == "content" and isinstance(value, list):
                for part in value:
                    if isinstance(part, dict) and isinstance(part.get("text"), str):
                        total += count_text(part["text"], model)
                    elif isinstance(part, dict) and part.get("type") == "image_url":
                        total += 85  # an image at its lowest detail; an estimate, marked as one
    return total + 3 if total else 0
