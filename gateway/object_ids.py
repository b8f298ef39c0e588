"""Provider-side object ids in a client's body: refused at any depth, on every inbound surface.

Every tenant of the gateway shares the operator's provider accounts. An object stored there
(a file, a vector store, a stored prompt, a container, a stored response item, an audio
answer, a conversation) is named by an id, and the provider hands whatever the id names to
whoever sends it: one tenant who learned another's `file-...` id could have the model read
that file back. The gateway knows whose an object is only for the responses it recorded
itself (`previous_response_id`, gateway/responses_inbound.py) and the files it uploaded for
them (gateway/batches.py `owned_files`: a `file_id` of the caller's own passes, on chat and
Responses bodies). Until the gateway knows the caller owns an object, its id is refused: a 400
`object_id_not_allowed` whose `param` is the JSON path of the id
(`input[0].content[1].file_id`).

One walker, one table. `ID_FIELDS` says what names an object (by field name, wherever it
sits: a tool result's nested content, an input item's output, a tool's settings);
`SURFACES` says, per inbound surface, which places are the caller's own (`owned`: checked
by the surface) and which subtrees are the client's free-form data the provider never
resolves (`client_data`: tool schemas, a previous tool call's input, metadata). Anything
else anywhere in the body is walked. The walk is by field name rather than by each API's
schema on purpose: a block type or tool a provider adds tomorrow, with a `file_id` in it,
is refused without anyone updating a schema (fails closed).

Storage URIs are object ids too: litellm hands `gs://` URIs (Vertex AI), Gemini Files API
URLs and `s3://` URIs (Bedrock) to the provider, which reads them with the operator's
credentials. They are refused in URL fields and, on /v1/embeddings, as inputs.

Every POST route that forwards a body to a provider is in some surface's `routes`
(tests/test_object_ids.py checks the app's routes against them, so a surface added later
cannot skip the walk); `NOT_FORWARDED` lists the ones whose body never leaves the gateway.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from gateway.errors import ApiError, bad_request


def _string(value: Any, _: dict[str, Any]) -> bool:
    return isinstance(value, str)


def _ids(value: Any, _: dict[str, Any]) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and len(value) > 0)


def _stored_prompt(value: Any, _: dict[str, Any]) -> bool:
    # {"id": "pmpt_...", "version", "variables"}; a tool schema's `prompt` property is a
    # dict without a string id (and schemas are client_data anyway).
    return isinstance(value, dict) and isinstance(value.get("id"), str)


def _container(value: Any, _: dict[str, Any]) -> bool:
    # code_interpreter's `container`: an id ("cntr_..."), or {"type": "auto", "file_ids"}
    # (whose file_ids are a field of their own).
    return isinstance(value, str)


def _stored_audio(value: Any, _: dict[str, Any]) -> bool:
    # An assistant message's `audio: {"id": "audio_..."}`: a previous audio answer the
    # provider kept; the request's own `audio` parameter ({voice, format}) has no id.
    return isinstance(value, dict) and isinstance(value.get("id"), str)


def _present(value: Any, _: dict[str, Any]) -> bool:
    return value is not None


@dataclass(frozen=True)
class IdField:
    """A field that names a provider-side object (when `names` says its value does)."""

    kind: str
    names: Callable[[Any, dict[str, Any]], bool]
    instead: str  # what a client can send in its place
    sample: Any  # a value that names one (documentation, tests)


_SEND_CONTENT = "send the content itself (base64 data or a public URL)"

# What names an object, wherever it sits in a body.
ID_FIELDS: dict[str, IdField] = {
    "file_id": IdField("file", _string, _SEND_CONTENT, "file-abc123"),
    "file_ids": IdField("file", _ids, _SEND_CONTENT, ["file-abc123"]),
    "vector_store_ids": IdField("vector store", _ids, "send the passages in the input", ["vs_abc123"]),
    "vector_store_id": IdField("vector store", _string, "send the passages in the input", "vs_abc123"),
    "prompt": IdField("stored prompt", _stored_prompt, "send the instructions and input themselves",
                      {"id": "pmpt_abc123"}),
    "container": IdField("container", _container, "use {'type': 'auto'}", "cntr_abc123"),
    "container_id": IdField("container", _string, "use a new container", "cntr_abc123"),
    "conversation": IdField("conversation", _present, "continue with previous_response_id", "conv_abc123"),
    "previous_response_id": IdField("stored response", _string, "send the conversation's items", "resp_abc123"),
    "audio": IdField("stored audio answer", _stored_audio, "send the previous answer's transcript as text",
                     {"id": "audio_abc123"}),
}

# Objects that are references by their type: {"type": "item_reference", "id"} names an
# item stored at the provider; a `reasoning` item with an id and no encrypted_content is
# looked up there by that id (with its encrypted_content, it carries itself).
_ITEM_HINT = "send the item itself, or continue with previous_response_id"

# Fields holding a URL the provider fetches (image_url, input_file.file_url, Anthropic's
# url sources, chat `file.file_data`): a storage URI there is an object id.
URL_FIELDS = frozenset({"url", "image_url", "file_url", "file_data", "audio_url", "video_url"})


def names_stored_object(value: str) -> bool:
    """A storage URI the provider reads with the operator's credentials: a Cloud Storage
    object (litellm passes any string with `gs://` in it to Vertex AI as a file URI), an
    S3 object (Bedrock), a file of the Gemini Files API."""
    return "gs://" in value or value[:5].lower() == "s3://" or (
        "generativelanguage.googleapis.com" in value and "/files/" in value)


@dataclass(frozen=True)
class Surface:
    """One inbound API's body: where the caller's own ids may be, and which subtrees are
    the client's data. Paths are dotted, `[*]` for any array element."""

    routes: tuple[str, ...]
    owned: dict[str, str] = field(default_factory=dict)  # path -> who checks the owner
    client_data: tuple[str, ...] = ()
    uri_inputs: tuple[str, ...] = ()  # strings the provider may read as a storage URI


SURFACES: dict[str, Surface] = {
    "chat.completions": Surface(
        routes=("/v1/chat/completions", "/chat/completions"),
        client_data=("metadata", "logit_bias", "tools[*].function.parameters", "functions[*].parameters",
                     "response_format.json_schema"),
    ),
    "embeddings": Surface(
        routes=("/v1/embeddings", "/embeddings"),
        client_data=("metadata",),
        uri_inputs=("input", "input[*]"),
    ),
    "messages": Surface(  # Anthropic's Messages API, as the client sent it (also passed through)
        routes=("/v1/messages", "/v1/messages/count_tokens", "/v1/messages/batches"),  # a batch: each request's params
        client_data=("metadata", "tools[*].input_schema", "messages[*].content[*].input"),
    ),
    "responses": Surface(
        routes=("/v1/responses", "/responses"),
        owned={"previous_response_id": "gateway/responses_inbound.py previous_upstream: the caller's own, "
                                       "else 404"},
        client_data=("metadata", "tools[*].parameters", "text.format.schema"),
    ),
}

# POST routes whose body the gateway keeps (never forwarded to a provider), besides the
# operator's /admin routes.
# Files and batches are not forwarded either: the gateway builds the upstream's request from
# checked fields (`input_file_id` must be the caller's own file, else 404), and every line
# of a batch's input file is walked as its endpoint's body before the batch is created
# (gateway/batches.py).
NOT_FORWARDED = frozenset({"/v1/feedback", "/feedback", "/v1/files", "/v1/batches", "/v1/batches/{batch_id}/cancel",
                           "/v1/messages/batches/{batch_id}/cancel"})


_END = None  # a trie node's key marking that a path ends there


def _trie(paths: tuple[str, ...] | list[str]) -> dict[Any, Any]:
    """Paths as nested dicts of their steps (`*`: any array index; `_END`: a path ends)."""
    root: dict[Any, Any] = {}
    for path in paths:
        node = root
        for step in path.replace("[*]", ".*").split("."):
            node = node.setdefault(step, {})
        node[_END] = True
    return root


@dataclass(frozen=True)
class _Compiled:
    owned: dict[Any, Any]
    skip: dict[Any, Any]
    uri_inputs: dict[Any, Any]


_COMPILED = {name: _Compiled(_trie(list(s.owned)), _trie(s.client_data), _trie(s.uri_inputs))
             for name, s in SURFACES.items()}


def _render(path: tuple[Any, ...]) -> str:
    out = ""
    for step in path:
        out += f"[{step}]" if isinstance(step, int) else (f".{step}" if out else step)
    return out


def _refusal(path: tuple[Any, ...], kind: str, instead: str) -> ApiError:
    where = _render(path)
    return bad_request(f"'{where}' names a {kind} held at the provider account that every tenant of this gateway "
                       f"shares; the gateway cannot tell it is yours, so it is not accepted: {instead}.",
                       param=where, code="object_id_not_allowed")


FILE_ID_FIELDS = ("file_id", "file_ids")


def _owned_file(key: str, value: Any, owned_files: frozenset[str]) -> bool:
    """A file id field naming only files the caller owns (gateway/batches.py records them)."""
    if not owned_files or key not in FILE_ID_FIELDS:
        return False
    if isinstance(value, str):
        return value in owned_files
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) and v in owned_files for v in value)


def file_ids_in(body: Any, limit: int = 64) -> set[str]:
    """The file ids a body names (`file_id`, `file_ids`, at any depth), at most `limit`:
    those the gateway may find the caller owns before the walk below refuses the rest."""
    found: set[str] = set()
    stack = [body]
    while stack and len(found) < limit:
        node = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            if key == "file_id" and isinstance(value, str):
                found.add(value)
            elif key == "file_ids" and isinstance(value, list):
                found.update(v for v in value[:limit] if isinstance(v, str))
            elif isinstance(value, (dict, list)) and value:
                stack.append(value)
    return found


def find_object_id(surface: str, body: dict[str, Any], owned_files: frozenset[str] = frozenset()) -> ApiError | None:
    """The first provider-side object id in `body` that `surface` does not let pass, as
    the 400 that refuses it; None when there is none. A file id the caller owns
    (`owned_files`: the inbound adapter looked them up) passes."""
    compiled = _COMPILED[surface]
    # (node, its path, the client_data / owned / uri_inputs trie nodes at that path or None)
    stack: list[tuple[Any, tuple[Any, ...], Any, Any, Any]] = [
        (body, (), compiled.skip, compiled.owned, compiled.uri_inputs)]
    while stack:
        node, path, skip, owned, uris = stack.pop()
        if isinstance(node, dict):
            kind = node.get("type")
            if kind == "item_reference":
                return _refusal(path, "stored item", _ITEM_HINT)
            if kind == "reasoning" and isinstance(node.get("id"), str) and not node.get("encrypted_content"):
                return _refusal(path + ("id",), "stored reasoning item",
                                "send it with its encrypted_content (include: ['reasoning.encrypted_content']), "
                                "or continue with previous_response_id")
            items: Any = node.items()
        else:
            items = enumerate(node)
        for key, value in items:
            step = "*" if isinstance(key, int) else key
            below_skip = skip.get(step) if skip else None
            if below_skip and _END in below_skip:
                continue  # the client's own data: the provider resolves nothing in it
            below_owned = owned.get(step) if owned else None
            below_uris = uris.get(step) if uris else None
            if isinstance(value, str):
                if below_uris and _END in below_uris and names_stored_object(value):
                    return _refusal(path + (key,), "storage object", _SEND_CONTENT)
                if isinstance(key, str) and key in URL_FIELDS and names_stored_object(value):
                    return _refusal(path + (key,), "storage object", _SEND_CONTENT)
            if isinstance(key, str):
                id_field = ID_FIELDS.get(key)
                if id_field is not None and not (below_owned and _END in below_owned) \
                        and id_field.names(value, node) and not _owned_file(key, value, owned_files):
                    return _refusal(path + (key,), id_field.kind, id_field.instead)
            if isinstance(value, (dict, list)) and value:
                if below_skip is None and below_owned is None and below_uris is None and not _holds_id(value):
                    continue  # the common case, checked without keeping paths (found: walked for its path)
                stack.append((value, path + (key,), below_skip, below_owned, below_uris))
    return None


_WATCHED = frozenset(ID_FIELDS) | URL_FIELDS


def _holds_id(node: dict[str, Any] | list[Any]) -> bool:
    """Whether a subtree with no owned places or client data in it names an object: the
    walk above without its bookkeeping (a body nests at most client_body.MAX_DEPTH deep)."""
    if type(node) is dict:
        kind = node.get("type")
        if kind == "item_reference" or (kind == "reasoning" and isinstance(node.get("id"), str)
                                        and not node.get("encrypted_content")):
            return True
        for key, value in node.items():
            if key in _WATCHED:
                id_field = ID_FIELDS.get(key)
                if id_field is not None and id_field.names(value, node):
                    return True
                if key in URL_FIELDS and isinstance(value, str) and names_stored_object(value):
                    return True
            if (type(value) is dict or type(value) is list) and value and _holds_id(value):
                return True
        return False
    for value in node:
        if (type(value) is dict or type(value) is list) and value and _holds_id(value):
            return True
    return False


def refuse_object_ids(surface: str, body: dict[str, Any], owned_files: frozenset[str] = frozenset()) -> None:
    """Raise the 400 for the first provider-side object id in `body` (see the module)."""
    refusal = find_object_id(surface, body, owned_files)
    if refusal is not None:
        raise refusal
