"""GatewayError as the OpenAI API answers it: an HTTP status and `{"error": {message, type, param,
code}}`, with the field named as the OpenAI body names it."""

import math
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from starlette.responses import JSONResponse

from gateway.errors import ErrorKind, GatewayError

STATUS: dict[ErrorKind, tuple[int, str]] = {
    ErrorKind.INVALID: (400, "invalid_request_error"),
    ErrorKind.NOT_FOUND: (404, "not_found_error"),
    ErrorKind.DUPLICATE: (409, "conflict_error"),
    ErrorKind.UNAUTHENTICATED: (401, "authentication_error"),
    ErrorKind.FORBIDDEN: (403, "permission_error"),
    ErrorKind.OVERLOADED: (429, "rate_limit_error"),
    ErrorKind.UNAVAILABLE: (503, "service_unavailable_error"),
    ErrorKind.CANCELLED: (499, "cancelled_error"),
    ErrorKind.DEADLINE: (504, "timeout_error"),
    ErrorKind.INTERNAL: (500, "server_error"),
}

_FIELD = re.compile(r"^([A-Za-z_][\w.\[\]]*): ")
# The gRPC request's field paths, as the OpenAI bodies name them (an endpoint may say otherwise).
_RENAMES = {
    "sampling": "response_format",  # two structured outputs at once
    "sampling.json": "response_format",
    "sampling.json_object": "response_format",
    "sampling.regex": "structured_outputs.regex",
    "sampling.choice": "structured_outputs.choice",
    "sampling.grammar": "structured_outputs.grammar",
    "chat": "messages",
    "chat.messages": "messages",
    "token_ids.ids": "prompt",
    "inputs": "input",
}
NO_NAMES: Mapping[str, str] = MappingProxyType({})
CHAT_NAMES: Mapping[str, str] = MappingProxyType(  # what /v1/chat/completions calls them
    {"sampling.logprobs": "top_logprobs", "prompt": "messages"}
)


def openai_param(field: str, names: Mapping[str, str] = NO_NAMES) -> str:
    """The OpenAI body's name for a field path (maybe indexed) of the gRPC request."""
    head = re.match(r"^[\w.]+", field)
    stem = head.group(0) if head else field
    for table in (names, _RENAMES):
        if stem in table:
            return table[stem] + field[len(stem) :]
    prefix = stem.rpartition(".")[0]
    if prefix and prefix != "sampling" and prefix in _RENAMES:
        return _RENAMES[prefix] + field[len(prefix) :]
    return field.removeprefix("sampling.")


def error_object(error: GatewayError, names: Mapping[str, str] = NO_NAMES) -> dict[str, Any]:
    """`{"error": {...}}`, naming the field as the endpoint's body does."""
    status, kind = STATUS[error.kind]
    message, param = error.message, None
    found = _FIELD.match(message)
    if found is not None:
        param = openai_param(found.group(1), names)
        message = f"{param}: {message[found.end() :]}"
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def error_response(error: GatewayError, names: Mapping[str, str] = NO_NAMES) -> JSONResponse:
    """The error object with its status, and Retry-After (seconds) when the error has a hint."""
    headers = {"Retry-After": str(math.ceil(error.retry_after_ms / 1000))} if error.retry_after_ms else None
    return JSONResponse(error_object(error, names), STATUS[error.kind][0], headers)
