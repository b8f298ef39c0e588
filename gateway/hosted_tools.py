"""Hosted tools: tools the provider runs itself, at its own per-use price.

A web search, a file search, a code-interpreter session or a generated image is charged
by the provider per use, beyond tokens, to the shared provider account. Such a tool is
refused unless the operator allows it for the model (config.yaml `models[].hosted_tools`),
and an allowed one is billed per use in USD (gateway/usage.py) and energy
(plugins/energy.py):

    models:
      - name: gpt-4o
        litellm_params: {model: openai/gpt-4o, api_key: os.environ/OPENAI_API_KEY}
        hosted_tools:
          web_search: {energy_per_use: 2, max_uses: 3}      # USD: litellm's price map
          image_generation: {usd_per_use: 0.04, energy_per_use: 5}

Where a client asks for one (`requested`): chat `web_search_options` and chat tools of a
hosted type, Responses `tools` (web_search[_preview], file_search, code_interpreter,
image_generation, ...), Anthropic server tools on /v1/messages (`web_search_2025...`).
Any other tool type that is not the client's own (`function`, `custom`; on /v1/messages
an untyped or `custom` tool) is refused: the gateway cannot tell what it costs. So is a
client tool with a field its type does not have (`_CLIENT_TOOLS`): litellm runs a tool
holding `googleSearch` as Gemini's paid built-in search, `"type": "function"` or not.

Where uses are counted (`uses_in`), from the provider's answer: Responses output items
(`web_search_call`, `file_search_call`, `image_generation_call`; a code-interpreter
session per container), `usage.server_tool_use.web_search_requests` (Anthropic, and
litellm's translation of it), and one search per chat answer to `web_search_options`
(OpenAI's search models report no count; litellm bills one too).

USD per use: `usd_per_use`, else litellm's map (`usd_per_use_in_map`): web search at
`search_context_cost_per_query` for the request's `search_context_size` (medium when
unsaid, as litellm), code interpreter at `code_interpreter_cost_per_session` (the model's
or `<provider>/container`'s), file search at `file_search_cost_per_1k_calls` / 1000.
Generated images have no per-use price in the map: `usd_per_use` is required.
"""

from __future__ import annotations

from typing import Any, Iterable

from gateway.errors import bad_request
from gateway.price_map import model_info

# The hosted tools a model may allow, by the name config.yaml uses.
KINDS = ("web_search", "file_search", "code_interpreter", "image_generation")

# Responses API tool types (and chat tool types, which litellm forwards) -> kind.
_RESPONSES_TYPES = {
    "web_search": "web_search", "web_search_preview": "web_search", "web_search_2025_08_26": "web_search",
    "web_search_preview_2025_03_11": "web_search", "file_search": "file_search",
    "code_interpreter": "code_interpreter", "image_generation": "image_generation",
}
# Tools the client runs itself (no provider charge beyond tokens), by API and type, with
# the only fields such a tool has. A tool of a client type with any other field is not
# the client's own: litellm turns a tool holding `googleSearch`, `google_search`,
# `codeExecution`, `urlContext`, `googleMaps`, `enterpriseWebSearch` or
# `googleSearchRetrieval` (with or without `"type": "function"`) into Gemini's built-in
# tool of that name, run and charged by Google per use. So the shape is the table, not a
# list of names to refuse: a built-in tool added tomorrow is refused too.
_CLIENT_TOOLS: dict[str, dict[str, frozenset[str]]] = {
    "chat": {"function": frozenset({"type", "function"}), "custom": frozenset({"type", "custom"})},
    "responses": {"function": frozenset({"type", "name", "description", "parameters", "strict"}),
                  "custom": frozenset({"type", "name", "description", "format"})},
}
# The legacy chat `functions`: each a function's own fields, nothing else.
_FUNCTION_KEYS = frozenset({"name", "description", "parameters"})
# Responses output items -> the kind they are a use of.
_OUTPUT_ITEMS = {"web_search_call": "web_search", "file_search_call": "file_search",
                 "image_generation_call": "image_generation"}


def _anthropic_kind(tool_type: str) -> str | None:
    """Anthropic's versioned server tool types: web_search_20250305 -> web_search."""
    return "web_search" if tool_type.startswith("web_search_") else None


def requested(body: dict[str, Any], inbound: str | None, inbound_body: dict[str, Any] | None) -> dict[str, str]:
    """The hosted tools a request asks for: kind -> the body field that asks (for the
    error's `param`). 400 `unsupported_tool_type` for a tool type the gateway does not know."""
    found: dict[str, str] = {}
    if inbound == "anthropic":
        for i, tool in enumerate((inbound_body or {}).get("tools") or ()):
            kind_name = tool.get("type", "custom") if isinstance(tool, dict) else "custom"
            if kind_name in (None, "custom"):
                continue
            kind = _anthropic_kind(str(kind_name))
            if kind is None:
                raise _unsupported(kind_name, f"tools[{i}].type")
            found.setdefault(kind, f"tools[{i}]")
        return found
    api = "responses" if inbound == "responses" else "chat"
    if api == "chat" and body.get("web_search_options") is not None:
        found["web_search"] = "web_search_options"
    for i, function in enumerate(body.get("functions") or ()) if api == "chat" else ():
        if isinstance(function, dict) and not function.keys() <= _FUNCTION_KEYS:
            raise _not_a_client_tool(function.keys() - _FUNCTION_KEYS, f"functions[{i}]")
    for i, tool in enumerate(body.get("tools") or ()):
        tool_type = tool.get("type", "function") if isinstance(tool, dict) else "function"
        keys = _CLIENT_TOOLS[api].get(tool_type) if isinstance(tool_type, str) else None
        if keys is not None:
            if isinstance(tool, dict) and not tool.keys() <= keys:
                raise _not_a_client_tool(tool.keys() - keys, f"tools[{i}]")
            continue
        kind = _RESPONSES_TYPES.get(tool_type) if isinstance(tool_type, str) else None
        if kind is None:
            raise _unsupported(tool_type, f"tools[{i}].type")
        found.setdefault(kind, f"tools[{i}]")
    return found


def _unsupported(tool_type: Any, param: str) -> Exception:
    return bad_request(f"tool type {str(tool_type)[:64]!r} is not supported by the gateway (it runs at the provider "
                       f"at a price the gateway does not know)", param=param, code="unsupported_tool_type")


def _not_a_client_tool(extra: Any, param: str) -> Exception:
    names = ", ".join(sorted(str(k)[:40] for k in extra)[:3])
    return bad_request(f"{param} has fields a tool the client runs does not have ({names}): a provider may run it "
                       f"as a built-in tool of its own, at a price the gateway does not know", param=param,
                       code="unsupported_tool_type")


def search_context_size(body: dict[str, Any]) -> str:
    """The web search's context size the request asks for (litellm: medium when unsaid)."""
    options = body.get("web_search_options")
    candidates: Iterable[Any] = [options] if isinstance(options, dict) else []
    candidates = [*candidates, *(t for t in body.get("tools") or () if isinstance(t, dict)
                                 and _RESPONSES_TYPES.get(t.get("type")) == "web_search")]
    for found in candidates:
        size = found.get("search_context_size")
        if size in ("low", "medium", "high"):
            return size
    return "medium"


def usd_per_use_in_map(kind: str, deployment_model: str, size: str = "medium") -> float | None:
    """litellm's map price of one use of `kind` on the deployment, or None (see module docstring)."""
    info = model_info(deployment_model) or {}
    if kind == "web_search":
        table = info.get("search_context_cost_per_query")
        value = table.get(f"search_context_size_{size}") if isinstance(table, dict) else None
    elif kind == "code_interpreter":
        value = info.get("code_interpreter_cost_per_session")
        if value is None:
            provider = deployment_model.split("/", 1)[0] if "/" in deployment_model else "openai"
            value = (model_info(f"{provider}/container") or {}).get("code_interpreter_cost_per_session")
    elif kind == "file_search":
        per_1k = info.get("file_search_cost_per_1k_calls")
        value = None if per_1k is None else float(per_1k) / 1000
    else:
        value = None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def uses_in(payload: dict[str, Any]) -> tuple[tuple[str, int], ...]:
    """Hosted-tool uses an answer reports (a Responses object, a chat completion or chunk,
    an Anthropic message), as sorted (kind, count) pairs; () when none."""
    counts: dict[str, int] = {}
    output = payload.get("output")
    if isinstance(output, list):  # a Responses object
        containers: set[str] = set()
        for item in output:
            kind = _OUTPUT_ITEMS.get(item.get("type")) if isinstance(item, dict) else None
            if kind is not None:
                counts[kind] = counts.get(kind, 0) + 1
            elif isinstance(item, dict) and item.get("type") == "code_interpreter_call":
                containers.add(str(item.get("container_id") or item.get("id")))
        if containers:
            counts["code_interpreter"] = len(containers)  # billed per session (container)
    usage = payload.get("usage")
    server = usage.get("server_tool_use") if isinstance(usage, dict) else None
    searches = server.get("web_search_requests") if isinstance(server, dict) else None
    if isinstance(searches, int) and not isinstance(searches, bool) and searches > 0:
        counts["web_search"] = max(counts.get("web_search", 0), searches)
    return tuple(sorted(counts.items()))


def cap_uses(body: dict[str, Any], inbound: str | None, inbound_body: dict[str, Any] | None,
             max_uses: dict[str, int]) -> None:
    """Bound the provider's uses to what was reserved (`max_uses` per requested kind): the
    Responses API's `max_tool_calls` (built-in tool calls in all), Anthropic's `max_uses`
    on each server tool. A chat answer to `web_search_options` searches once."""
    if inbound == "responses":
        total = sum(max_uses.values())
        given = body.get("max_tool_calls")
        body["max_tool_calls"] = min(given, total) if isinstance(given, int) and given > 0 else total
    elif inbound == "anthropic":
        for tool in (inbound_body or {}).get("tools") or ():
            kind = _anthropic_kind(str(tool.get("type", ""))) if isinstance(tool, dict) else None
            if kind in max_uses:
                given = tool.get("max_uses")
                tool["max_uses"] = min(given, max_uses[kind]) if isinstance(given, int) and given > 0 \
                    else max_uses[kind]
