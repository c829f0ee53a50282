"""OpenAI request bodies become the gRPC API's requests, so both fronts share one admission path:
one validation, one tokenization (the chat template included), one job codec."""

import json
from typing import Any

from gateway.errors import InvalidRequest
from gateway.openai_bodies import (
    ChatCompletionBody,
    ChatMessageBody,
    CompletionBody,
    EmbeddingBody,
    SamplingBody,
)
from protos import inference_pb2

# Fields other servers take that would change the answer and that this one does not serve.
_NOT_SERVED = ("tools", "tool_choice", "functions", "function_call", "audio", "modalities", "prediction")
_ROLES = {"developer": "system"}  # OpenAI's newer name for the system role
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's and vLLM's default for /v1/completions


def chat_request(body: ChatCompletionBody) -> inference_pb2.GenerateRequest:
    _refuse_not_served(body)
    request = inference_pb2.GenerateRequest(model=body.model, priority=body.priority)
    request.chat.messages.extend(chat_messages(body.messages))
    sampling = _sampling(body, body.max_completion_tokens or body.max_tokens or 0)
    if body.logprobs:
        sampling.logprobs = body.top_logprobs or 0
    elif body.top_logprobs:
        raise InvalidRequest("top_logprobs: needs logprobs set to true")
    request.sampling.CopyFrom(sampling)
    return request


def completion_requests(body: CompletionBody) -> list[inference_pb2.GenerateRequest]:
    """One request per prompt (a list of texts, or of token lists, is several)."""
    _refuse_not_served(body)
    if body.echo:
        raise InvalidRequest("echo: not supported")
    if body.suffix:
        raise InvalidRequest("suffix: not supported")
    sampling = _sampling(
        body, body.max_tokens if body.max_tokens is not None else DEFAULT_COMPLETION_MAX_TOKENS
    )
    if body.logprobs is not None:
        sampling.logprobs = body.logprobs
    prompts: list[Any] = list(body.prompt) if isinstance(body.prompt, list) and body.prompt else [body.prompt]
    if prompts and all(isinstance(p, int) for p in prompts):
        prompts = [prompts]  # one prompt of token ids
    requests = []
    for prompt in prompts:
        request = inference_pb2.GenerateRequest(model=body.model, priority=body.priority, sampling=sampling)
        if isinstance(prompt, str):
            request.prompt = prompt
        elif isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            request.token_ids.ids.extend(prompt)
        else:
            raise InvalidRequest(
                "prompt: a text, a list of texts, a list of token ids or a list of such lists"
            )
        requests.append(request)
    return requests


def embed_request(body: EmbeddingBody) -> inference_pb2.EmbedRequest:
    inputs = [body.input] if isinstance(body.input, str) else body.input
    return inference_pb2.EmbedRequest(model=body.model, inputs=inputs)


def chat_messages(messages: list[ChatMessageBody]) -> list[inference_pb2.ChatMessage]:
    """The messages as the chat template takes them: text only, OpenAI's developer role as system."""
    return [_message(index, message) for index, message in enumerate(messages)]


def _refuse_not_served(body: SamplingBody) -> None:
    for name in _NOT_SERVED:
        if (body.model_extra or {}).get(name) not in (None, [], False):
            raise InvalidRequest(f"{name}: not supported by this server")


def _message(index: int, message: ChatMessageBody) -> inference_pb2.ChatMessage:
    content = message.content
    if isinstance(content, list):
        for part, item in enumerate(content):
            if item.type != "text":
                raise InvalidRequest(f"messages[{index}].content[{part}].type: only text parts are served")
        content = "".join(item.text for item in content)
    return inference_pb2.ChatMessage(role=_ROLES.get(message.role, message.role), content=content or "")


def _sampling(body: SamplingBody, max_tokens: int) -> inference_pb2.SamplingParams:
    sampling = inference_pb2.SamplingParams(
        max_tokens=max_tokens,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        ignore_eos=body.ignore_eos,
        min_tokens=body.min_tokens,
        n=body.n,
        stop=[body.stop] if isinstance(body.stop, str) else body.stop or [],
        stop_token_ids=body.stop_token_ids or [],
    )
    for field in ("temperature", "top_p", "min_p", "repetition_penalty", "seed"):
        if getattr(body, field) is not None:
            setattr(sampling, field, getattr(body, field))
    if body.top_k is not None:
        sampling.top_k = max(body.top_k, 0)  # vLLM's -1 is off, as 0 is here
    for key, bias in (body.logit_bias or {}).items():
        if not key.isdigit():
            raise InvalidRequest(f"logit_bias: {key!r} is not a token id")
        sampling.logit_bias[int(key)] = bias
    _structured(body, sampling)
    return sampling


def _structured(body: SamplingBody, sampling: inference_pb2.SamplingParams) -> None:
    """response_format (OpenAI's) and structured_outputs (vLLM's) onto the structured-output fields."""
    given = [name for name in ("response_format", "structured_outputs") if getattr(body, name) is not None]
    if len(given) == 2 and body.response_format is not None and body.response_format.type != "text":
        raise InvalidRequest("response_format: set it or structured_outputs, not both")
    if body.response_format is not None:
        kind = body.response_format.type
        if kind == "json_object":
            sampling.json_object = True
        elif kind == "json_schema":
            if body.response_format.json_schema is None:
                raise InvalidRequest("response_format.json_schema: required when type is json_schema")
            sampling.json = json.dumps(body.response_format.json_schema.schema_)
    outputs = body.structured_outputs
    if outputs is None:
        return
    if outputs.json_ is not None:
        sampling.json = outputs.json_ if isinstance(outputs.json_, str) else json.dumps(outputs.json_)
    if outputs.regex is not None:
        sampling.regex = outputs.regex
    if outputs.choice is not None:
        sampling.choice.extend(outputs.choice)
    if outputs.grammar is not None:
        sampling.grammar = outputs.grammar
    if outputs.json_object:
        sampling.json_object = True
