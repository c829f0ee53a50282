"""Pure checks of a GenerateRequest or EmbedRequest: every rule names the field it is about."""

import math
from collections.abc import Sequence
from dataclasses import dataclass

from checkpoints import SamplingDefaults
from gateway.errors import InvalidRequest
from protos import inference_pb2, jobs_pb2
from protos.redis_layout import MAX_CHOICES

MAX_REQUEST_ID_LEN = 256
MAX_STOP_STRINGS = 16
MAX_STOP_LEN = 256
MAX_LOGPROBS = 20
MAX_TEMPERATURE = 100.0
CHAT_ROLES = ("system", "user", "assistant", "tool")
MAX_EMBED_INPUTS = 2048  # OpenAI's bound on inputs per embeddings call
MAX_LOGIT_BIAS = 300  # OpenAI's bound on logit_bias entries
MAX_BIAS = 100.0


@dataclass(frozen=True, slots=True)
class Limits:
    """What a request is checked against: the model's vocabulary and context, the server default
    and the checkpoint's sampling defaults."""

    vocab_size: int
    max_context: int
    default_max_tokens: int
    defaults: SamplingDefaults = SamplingDefaults()


def check_request_id(request_id: str) -> None:
    if len(request_id) > MAX_REQUEST_ID_LEN:
        raise InvalidRequest(f"request_id: at most {MAX_REQUEST_ID_LEN} characters, got {len(request_id)}")


def check_input(
    request: inference_pb2.GenerateRequest | inference_pb2.TokenizeRequest, limits: Limits
) -> None:
    kind = request.WhichOneof("input")
    if kind is None:
        raise InvalidRequest("input: set one of prompt, chat or token_ids")
    if kind == "prompt" and not request.prompt:
        raise InvalidRequest("prompt: must not be empty")
    if kind == "chat":
        if not request.chat.messages:
            raise InvalidRequest("chat.messages: must not be empty")
        for index, message in enumerate(request.chat.messages):
            if message.role not in CHAT_ROLES:
                raise InvalidRequest(
                    f"chat.messages[{index}].role: {message.role!r} is not one of {', '.join(CHAT_ROLES)}"
                )
    if kind == "token_ids":
        ids = request.token_ids.ids  # type: ignore[union-attr]
        if not ids:
            raise InvalidRequest("token_ids.ids: must not be empty")
        check_token_ids("token_ids.ids", ids, limits.vocab_size)


def check_token_ids(field: str, ids: list[int], vocab_size: int) -> None:
    for index, token_id in enumerate(ids):
        if token_id >= vocab_size:
            raise InvalidRequest(
                f"{field}[{index}]: {token_id} is outside the vocabulary (size {vocab_size})"
            )


def check_prompt_length(num_tokens: int, limits: Limits) -> None:
    if num_tokens == 0:
        raise InvalidRequest("prompt: it encodes to no tokens")
    if num_tokens >= limits.max_context:
        raise InvalidRequest(
            f"prompt: {num_tokens} tokens leave no room in the model's context of {limits.max_context} tokens"
        )


def check_embed_inputs(inputs: Sequence[str]) -> None:
    if not inputs:
        raise InvalidRequest("inputs: must hold at least one text")
    if len(inputs) > MAX_EMBED_INPUTS:
        raise InvalidRequest(f"inputs: at most {MAX_EMBED_INPUTS} texts per call, got {len(inputs)}")
    for index, text in enumerate(inputs):
        if not text:
            raise InvalidRequest(f"inputs[{index}]: must not be empty")


def check_embed_lengths(lengths: Sequence[int], max_length: int) -> None:
    for index, length in enumerate(lengths):
        if length > max_length:
            raise InvalidRequest(
                f"inputs[{index}]: {length} tokens exceed the model's limit of {max_length} "
                "(special tokens included); shorten it or set truncate"
            )


def _range(field: str, value: float, low: float, high: float, *, low_open: bool = False) -> float:
    if not math.isfinite(value) or value < low or value > high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise InvalidRequest(f"sampling.{field}: {value} is outside {bracket}{low}, {high}]")
    return value


def _or_default(
    sampling: inference_pb2.SamplingParams, field: str, checkpoint: float | None, ours: float
) -> float:
    """The request's value if set, else the checkpoint's, else ours."""
    if sampling.HasField(field):
        return float(getattr(sampling, field))
    return ours if checkpoint is None else checkpoint


def resolve_sampling(sampling: inference_pb2.SamplingParams, limits: Limits) -> jobs_pb2.Sampling:
    """Check every sampling field and fill in the defaults the request leaves unset."""
    defaults = limits.defaults
    top_k = int(_or_default(sampling, "top_k", defaults.top_k, 0))
    max_tokens = sampling.max_tokens or limits.default_max_tokens
    if max_tokens >= limits.max_context:
        raise InvalidRequest(
            f"sampling.max_tokens: {max_tokens} exceeds the context of {limits.max_context} tokens"
        )
    if sampling.min_tokens > max_tokens:
        raise InvalidRequest(f"sampling.min_tokens: {sampling.min_tokens} exceeds max_tokens {max_tokens}")
    if len(sampling.stop) > MAX_STOP_STRINGS:
        raise InvalidRequest(
            f"sampling.stop: at most {MAX_STOP_STRINGS} stop strings, got {len(sampling.stop)}"
        )
    for index, stop in enumerate(sampling.stop):
        if not stop or len(stop) > MAX_STOP_LEN:
            raise InvalidRequest(f"sampling.stop[{index}]: must be 1 to {MAX_STOP_LEN} characters")
    check_token_ids("sampling.stop_token_ids", list(sampling.stop_token_ids), limits.vocab_size)
    if top_k > limits.vocab_size:
        raise InvalidRequest(f"sampling.top_k: {top_k} exceeds the vocabulary size {limits.vocab_size}")
    if sampling.n > MAX_CHOICES:
        raise InvalidRequest(f"sampling.n: at most {MAX_CHOICES} completions, got {sampling.n}")
    for field in ("logprobs", "prompt_logprobs"):
        if sampling.HasField(field) and getattr(sampling, field) > MAX_LOGPROBS:
            raise InvalidRequest(f"sampling.{field}: at most {MAX_LOGPROBS}, got {getattr(sampling, field)}")
    resolved = jobs_pb2.Sampling(
        max_tokens=max_tokens,
        temperature=_range(
            "temperature",
            _or_default(sampling, "temperature", defaults.temperature, 1.0),
            0.0,
            MAX_TEMPERATURE,
        ),
        top_p=_range("top_p", _or_default(sampling, "top_p", defaults.top_p, 1.0), 0.0, 1.0, low_open=True),
        top_k=top_k,
        min_p=_range("min_p", _or_default(sampling, "min_p", defaults.min_p, 0.0), 0.0, 1.0),
        repetition_penalty=_range(
            "repetition_penalty",
            _or_default(sampling, "repetition_penalty", defaults.repetition_penalty, 1.0),
            0.0,
            10.0,
            low_open=True,
        ),
        presence_penalty=_range("presence_penalty", sampling.presence_penalty, -2.0, 2.0),
        frequency_penalty=_range("frequency_penalty", sampling.frequency_penalty, -2.0, 2.0),
        stop_token_ids=list(sampling.stop_token_ids),
        ignore_eos=sampling.ignore_eos,
        min_tokens=sampling.min_tokens,
        logprobs=sampling.logprobs if sampling.HasField("logprobs") else -1,
        n=sampling.n or 1,
    )
    if sampling.HasField("seed"):
        resolved.seed = sampling.seed
    if sampling.HasField("prompt_logprobs"):
        resolved.prompt_logprobs = sampling.prompt_logprobs
    if len(sampling.logit_bias) > MAX_LOGIT_BIAS:
        raise InvalidRequest(
            f"sampling.logit_bias: at most {MAX_LOGIT_BIAS} entries, got {len(sampling.logit_bias)}"
        )
    for token_id, bias in sorted(sampling.logit_bias.items()):
        if token_id >= limits.vocab_size:
            raise InvalidRequest(
                f"sampling.logit_bias: token {token_id} is outside the vocabulary (size {limits.vocab_size})"
            )
        resolved.logit_bias[token_id] = _range(f"logit_bias[{token_id}]", bias, -MAX_BIAS, MAX_BIAS)
    check_token_ids("sampling.allowed_token_ids", list(sampling.allowed_token_ids), limits.vocab_size)
    resolved.allowed_token_ids.extend(sampling.allowed_token_ids)
    return resolved
