"""Structured-output constraints: vLLM's five fields, each compiled once (cached by its text) to an
llguidance grammar that the job carries, so a bad schema, regex or grammar is refused here, naming
the field, and the worker only builds a matcher from a grammar known to compile."""

import functools
import json

import llguidance

from gateway.errors import InvalidRequest
from protos import inference_pb2

FIELDS = ("json", "json_object", "regex", "choice", "grammar")
MAX_CONSTRAINT_BYTES = 64 * 1024
_FORMATS = {"json": "json_schema", "json_object": "json_schema", "regex": "regex", "choice": "choice"}
_ANY_OBJECT = '{"type": "object"}'


def constraint_of(sampling: inference_pb2.SamplingParams) -> tuple[str, str] | None:
    """(field, text) of the request's one constraint, or None; refuses two at once, an empty choice
    and a text over the size limit."""
    present = [
        field
        for field in FIELDS
        if (sampling.json_object if field == "json_object" else getattr(sampling, field))
    ]
    if not present:
        return None
    if len(present) > 1:
        raise InvalidRequest(f"sampling: set at most one of {', '.join(FIELDS)} (got {', '.join(present)})")
    field = present[0]
    if sampling.min_tokens:  # past a finished match only EOS may come, which min_tokens bans
        raise InvalidRequest(f"sampling.min_tokens: cannot be combined with sampling.{field}")
    if sampling.allowed_token_ids:
        raise InvalidRequest(f"sampling.allowed_token_ids: cannot be combined with sampling.{field}")
    if field == "choice":
        for index, choice in enumerate(sampling.choice):
            if not choice:
                raise InvalidRequest(f"sampling.choice[{index}]: must not be empty")
        text = json.dumps(list(sampling.choice))
    else:
        text = _ANY_OBJECT if field == "json_object" else str(getattr(sampling, field))
    size = len(text.encode())
    if size > MAX_CONSTRAINT_BYTES:
        raise InvalidRequest(f"sampling.{field}: {size} bytes exceed the limit of {MAX_CONSTRAINT_BYTES}")
    return field, text


@functools.lru_cache(maxsize=512)
def compile_constraint(field: str, text: str) -> str:
    """The llguidance grammar of a constraint; INVALID_ARGUMENT with llguidance's own message when it
    cannot compile or is past llguidance's limits (grammar size, lexer states)."""
    try:
        grammar = llguidance.grammar_from(_FORMATS.get(field, "grammar"), text)  # type: ignore[arg-type]
    except ValueError as error:
        raise InvalidRequest(f"sampling.{field}: {error}") from None
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise InvalidRequest(f"sampling.{field}: {messages[0]}")
    return grammar
