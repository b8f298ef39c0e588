"""litellm's bundled data (its price map, its tiktoken files) read without importing litellm.

Importing litellm costs ~150 MB of RSS and ~3 s; a gateway whose models are all native
never calls it. Prices come from the JSON file litellm ships
(`model_prices_and_context_window_backup.json`, the map it loads itself with
LITELLM_LOCAL_MODEL_COST_MAP=True), and token estimates from tiktoken with litellm's bundled
encodings (no download), counted as litellm's `token_counter` counts OpenAI chat messages
(3 tokens per message and 3 to prime the reply, plus each string field, +1 for a name).
tests/test_price_map.py holds both to litellm's own answers.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path
from typing import Any

import orjson

_PRICE_FILE = "model_prices_and_context_window_backup.json"
_DEFAULT_ENCODING = "o200k_base"


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
    return orjson.loads((directory / _PRICE_FILE).read_bytes())


def model_info(model: str) -> dict[str, Any] | None:
    """The price map's entry for `model` (or for it without its provider prefix)."""
    prices = _price_map()
    found = prices.get(model)
    if found is None and "/" in model:
        found = prices.get(model.split("/", 1)[1])
    return found if isinstance(found, dict) else None


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
