"""A chat completion and the stream chunks that carry it, both ways, exactly.

The response cache (plugins/cache.py) stores a streamed answer as the `chat.completion` it
amounts to, and serves a stored answer to a JSON request or to a stream; an idempotent
replay streams a stored completion too. Both directions keep every choice (`n > 1`: a
stream interleaves them by `index`), each choice's logprobs (`content` and `refusal`
token lists, `top_logprobs` inside them), its finish reason, and the answer's
`system_fingerprint` and `service_tier`.

What cannot be carried exactly is said, not approximated: `StreamAssembler.exact` turns
false on a delta field it does not assemble (streamed tool calls, audio, annotations), and
`replayable()` is false for a completion whose message holds something a replayed stream
would not carry. The cache stores neither.
"""

from __future__ import annotations

from typing import Any, Iterator

_TEXT_FIELDS = ("content", "refusal", "reasoning_content")  # delta strings that concatenate
_TOP_FIELDS = ("system_fingerprint", "service_tier")
# Message fields a replayed stream carries (annotations only when there are none).
_REPLAYED_MESSAGE_FIELDS = frozenset({"role", *_TEXT_FIELDS, "tool_calls", "annotations"})


class StreamAssembler:
    """Chunks in (`add`), the completion they amount to out (`completion`)."""

    def __init__(self) -> None:
        self.exact = True
        self.fields: dict[str, Any] = {}
        self.id: str | None = None  # the stream's, for a replay that says which answer it is
        self.created: int | None = None
        self._choices: dict[int, dict[str, Any]] = {}

    @property
    def choices(self) -> int:
        """How many choices the chunks so far carried."""
        return len(self._choices)

    def add(self, chunk: dict[str, Any]) -> None:
        if self.id is None and chunk.get("id"):
            self.id, self.created = chunk["id"], chunk.get("created")
        for key in _TOP_FIELDS:
            if chunk.get(key) is not None:
                self.fields[key] = chunk[key]
        for choice in chunk.get("choices") or ():
            index = choice.get("index", 0)
            state = self._choices.get(index)
            if state is None:
                state = self._choices[index] = {"role": None, "logprobs": None, "finish_reason": None,
                                                **{k: [] for k in _TEXT_FIELDS}}
            for key, value in (choice.get("delta") or {}).items():
                if value is None:
                    continue
                if key == "role":
                    state["role"] = value
                elif key in _TEXT_FIELDS and isinstance(value, str):
                    state[key].append(value)
                else:  # tool_calls, function_call, audio, annotations, ...: not assembled here
                    self.exact = False
            logprobs = choice.get("logprobs")
            if isinstance(logprobs, dict):
                held = state["logprobs"] = state["logprobs"] or {"content": None, "refusal": None}
                for key in ("content", "refusal"):
                    if isinstance(logprobs.get(key), list):
                        held[key] = (held[key] or []) + logprobs[key]
            elif logprobs is not None:
                self.exact = False
            if choice.get("finish_reason"):
                state["finish_reason"] = choice["finish_reason"]

    def completion(self, base: dict[str, Any]) -> dict[str, Any]:
        """`base` (id, created, model, usage, ...) with the choices and fields assembled."""
        choices = []
        for index in sorted(self._choices):
            state = self._choices[index]
            message: dict[str, Any] = {"role": state["role"] or "assistant",
                                       "content": "".join(state["content"]) if state["content"] else None,
                                       "refusal": "".join(state["refusal"]) or None}
            if state["reasoning_content"]:
                message["reasoning_content"] = "".join(state["reasoning_content"])
            choices.append({"index": index, "message": message, "logprobs": state["logprobs"],
                            "finish_reason": state["finish_reason"]})
        return {**base, "object": "chat.completion", **self.fields, "choices": choices}


def replayable(completion: dict[str, Any]) -> bool:
    """Whether `replay` carries every field of this completion's choices."""
    for choice in completion.get("choices") or ():
        message = choice.get("message") or {}
        if not set(message) <= _REPLAYED_MESSAGE_FIELDS or message.get("annotations"):
            return False
        if any(set(call) - {"id", "type", "function"} for call in message.get("tool_calls") or ()):
            return False
    return True


def replay(completion: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """A stored completion as stream chunks: one per choice (the whole message, its
    logprobs, its finish reason), then the usage chunk."""
    base = {k: completion.get(k) for k in ("id", "created", "model")}
    base.update({k: completion[k] for k in _TOP_FIELDS if completion.get(k) is not None})
    for choice in completion.get("choices") or ():
        message = choice.get("message") or {}
        delta: dict[str, Any] = {"role": message.get("role") or "assistant"}
        for key in _TEXT_FIELDS:
            if message.get(key) is not None:
                delta[key] = message[key]
        if message.get("tool_calls"):
            delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]
        yield {**base, "object": "chat.completion.chunk",
               "choices": [{"index": choice.get("index", 0), "delta": delta, "logprobs": choice.get("logprobs"),
                            "finish_reason": choice.get("finish_reason")}]}
    if completion.get("usage"):
        yield {**base, "object": "chat.completion.chunk", "choices": [], "usage": completion["usage"]}
