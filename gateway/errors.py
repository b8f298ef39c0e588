"""OpenAI-shaped errors: the only kind of error a client ever sees.

Every failure, whether a plugin rejecting a request, an upstream failing after retries or a
bug in our own code, becomes ``{"error": {"message", "type", "param", "code"}}``
with the status an OpenAI SDK expects. Messages are written for the client: they never
carry a traceback, a provider key or a user key.
"""

from __future__ import annotations

import re
from typing import Any

# Anything that looks like a credential is masked before a message leaves the gateway,
# whatever produced the message (an upstream echoing our key back, a litellm exception).
_SECRET_PATTERNS = [
    # provider and gateway keys: sk-..., sk-ant-..., gw-...
    re.compile(r"()\b(?:sk|gw|pk|rk)-[A-Za-z0-9_\-]{6,}"),
    re.compile(r"(?i)(bearer\s+)[A-Za-z0-9_\-\.]{8,}"),
    re.compile(r"(?i)(api[_-]?key['\"]?\s*[:=]\s*['\"]?)[^\s'\",}]{4,}"),
]


def redact(text: str, extra_secrets: tuple[str, ...] = ()) -> str:
    """Mask credentials in `text`; `extra_secrets` are known values (configured keys)."""
    for secret in extra_secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(lambda m: m.group(1) + "***", text)
    return text


class ApiError(Exception):
    """An error with its HTTP status and OpenAI error body fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": redact(self.message),
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def __repr__(self) -> str:
        return f"ApiError({self.status}, {self.code or self.type}: {self.message!r})"


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, type="invalid_request_error", param=param, code=code)


def internal_error(request_id: str) -> ApiError:
    return ApiError(
        500,
        f"The gateway failed to process this request (request id {request_id}).",
        type="server_error",
        code="internal_error",
    )


def store_unavailable(request_id: str) -> ApiError:
    """The database did not answer a gating write (the reservation) within store.timeout:
    the request fails closed, and says it is worth retrying."""
    return ApiError(
        503,
        f"The gateway's database did not answer in time; retry shortly (request id {request_id}).",
        type="server_error",
        code="store_unavailable",
        headers={"Retry-After": "1"},
    )
