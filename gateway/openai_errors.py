"""GatewayError as the OpenAI API answers it: an HTTP status and `{"error": {message, type, param,
code}}`, with the field named as the OpenAI body names it."""

import math
import re
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
# The gRPC request's field paths, as the OpenAI bodies name them.
_RENAMES = {
    "sampling.json": "response_format",
    "sampling.json_object": "response_format",
    "sampling.regex": "structured_outputs.regex",
    "sampling.choice": "structured_outputs.choice",
    "sampling.grammar": "structured_outputs.grammar",
    "chat.messages": "messages",
    "token_ids.ids": "prompt",
    "inputs": "input",
}


def openai_param(field: str, logprobs_name: str = "logprobs") -> str:
    """The OpenAI body's name for a field of the gRPC request (a path, maybe indexed)."""
    if field == "sampling.logprobs":
        return logprobs_name
    if field == "sampling":  # two structured outputs at once
        return "response_format"
    head = re.match(r"^[\w.]+", field)
    stem = head.group(0) if head else field
    while stem:
        if stem in _RENAMES:
            return _RENAMES[stem] + field[len(stem) :]
        stem = stem.rpartition(".")[0]
    return field.removeprefix("sampling.")


def error_object(error: GatewayError, logprobs_name: str = "logprobs") -> dict[str, Any]:
    """`{"error": {...}}`, naming the field as the OpenAI body does (`logprobs_name`: what the
    endpoint calls the number of top logprobs)."""
    status, kind = STATUS[error.kind]
    message, param = error.message, None
    found = _FIELD.match(message)
    if found is not None:
        param = openai_param(found.group(1), logprobs_name)
        message = f"{param}: {message[found.end() :]}"
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def error_response(error: GatewayError, logprobs_name: str = "logprobs") -> JSONResponse:
    """The error object with its status, and Retry-After (seconds) when the error has a hint."""
    headers = {"Retry-After": str(math.ceil(error.retry_after_ms / 1000))} if error.retry_after_ms else None
    return JSONResponse(error_object(error, logprobs_name), STATUS[error.kind][0], headers)
