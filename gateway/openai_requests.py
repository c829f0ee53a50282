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

# Fields other servers take that would change the answer and that this one does not serve, with
# the values that change nothing (and so are taken).
_NOT_SERVED: dict[str, tuple[Any, ...]] = {
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "best_of": (None, 1),
    "use_beam_search": (None, False),
    "include_stop_str_in_output": (None, False),
    "skip_special_tokens": (None, True),
    "bad_words": (None, []),
    "truncate_prompt_tokens": (None,),
    "chat_template": (None,),
    "chat_template_kwargs": (None, {}),
    "add_generation_prompt": (None, True),
    "continue_final_message": (None, False),
}
_ROLES = {"developer": "system"}  # OpenAI's newer name for the system role
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's and vLLM's default for /v1/completions


def chat_request(body: ChatCompletionBody) -> inference_pb2.GenerateRequest:
    refuse_not_served(body)
    request = inference_pb2.GenerateRequest(model=body.model or "", priority=_priority(body))
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
    refuse_not_served(body)
    if body.echo:
        raise InvalidRequest("echo: not supported")
    if body.suffix:
        raise InvalidRequest("suffix: not supported")
    max_tokens = body.max_tokens if body.max_tokens is not None else DEFAULT_COMPLETION_MAX_TOKENS
    sampling = _sampling(body, max_tokens)
    if body.logprobs is not None:
        sampling.logprobs = body.logprobs
    prompts: list[Any] = list(body.prompt) if isinstance(body.prompt, list) else [body.prompt]
    if not prompts or any(p in ("", []) for p in prompts):
        raise InvalidRequest("prompt: must not be empty")
    if all(isinstance(p, int) for p in prompts):
        prompts = [prompts]  # one prompt of token ids
    requests = []
    for prompt in prompts:
        request = inference_pb2.GenerateRequest(
            model=body.model or "", priority=_priority(body), sampling=sampling
        )
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
    if any(not isinstance(item, str) for item in inputs):
        raise InvalidRequest("input: token ids are not served for embeddings; send the texts")
    return inference_pb2.EmbedRequest(model=body.model or "", inputs=inputs)  # type: ignore[arg-type]


def chat_messages(messages: list[ChatMessageBody]) -> list[inference_pb2.ChatMessage]:
    """The messages as the chat template takes them: text only, OpenAI's developer role as system."""
    return [_message(index, message) for index, message in enumerate(messages)]


def refuse_not_served(body: Any) -> None:
    """A field this server does not serve, set to a value that would change the answer, is refused
    by name rather than ignored."""
    for name, harmless in _NOT_SERVED.items():
        value = (body.model_extra or {}).get(name)
        if value not in harmless:
            raise InvalidRequest(f"{name}: not supported by this server")


def _message(index: int, message: ChatMessageBody) -> inference_pb2.ChatMessage:
    content = message.content
    if isinstance(content, list):
        for part, item in enumerate(content):
            if item.type != "text":
                raise InvalidRequest(f"messages[{index}].content[{part}].type: only text parts are served")
        content = "".join(item.text for item in content)
    return inference_pb2.ChatMessage(role=_ROLES.get(message.role, message.role), content=content or "")


def _priority(body: SamplingBody) -> int:
    """vLLM's priority runs lower values first; ours runs higher ones first."""
    return -max(body.priority or 0, -(2**31) + 1)


def _sampling(body: SamplingBody, max_tokens: int) -> inference_pb2.SamplingParams:
    sampling = inference_pb2.SamplingParams(
        max_tokens=max_tokens,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        ignore_eos=bool(body.ignore_eos),
        min_tokens=body.min_tokens or 0,
        n=body.n or 1,
        stop=[body.stop] if isinstance(body.stop, str) else body.stop or [],
        stop_token_ids=body.stop_token_ids or [],
        allowed_token_ids=body.allowed_token_ids or [],
    )
    for field in ("temperature", "top_p", "min_p", "repetition_penalty", "prompt_logprobs"):
        if getattr(body, field) is not None:
            setattr(sampling, field, getattr(body, field))
    if body.seed is not None:
        sampling.seed = body.seed % 2**64
    if body.top_k is not None:
        sampling.top_k = max(body.top_k, 0)  # vLLM's -1 is off, as 0 is here
    for key, bias in (body.logit_bias or {}).items():
        if not (key.isascii() and key.isdigit()) or int(key) >= 2**32:
            raise InvalidRequest(f"logit_bias: {key!r} is not a token id")
        sampling.logit_bias[int(key)] = bias
    _structured(body, sampling)
    return sampling


def _structured(body: SamplingBody, sampling: inference_pb2.SamplingParams) -> None:
    """response_format (OpenAI's), structured_outputs and the guided_* fields (vLLM's) onto the
    structured-output fields; the one validation refuses two at once."""
    response_format = body.response_format
    vllm_fields = (
        body.structured_outputs,
        body.guided_json,
        body.guided_regex,
        body.guided_choice,
        body.guided_grammar,
    )
    if (
        response_format is not None
        and response_format.type != "text"
        and any(f is not None for f in vllm_fields)
    ):
        raise InvalidRequest("response_format: set it or structured_outputs, not both")
    if response_format is not None and response_format.type == "json_object":
        sampling.json_object = True
    elif response_format is not None and response_format.type == "json_schema":
        if response_format.json_schema is None:
            raise InvalidRequest("response_format.json_schema: required when type is json_schema")
        sampling.json = json.dumps(response_format.json_schema.schema_)
    outputs = body.structured_outputs
    json_schema = outputs.json_ if outputs is not None and outputs.json_ is not None else body.guided_json
    if json_schema is not None:
        sampling.json = json_schema if isinstance(json_schema, str) else json.dumps(json_schema)
    regex = outputs.regex if outputs is not None and outputs.regex is not None else body.guided_regex
    if regex is not None:
        sampling.regex = regex
    choice = outputs.choice if outputs is not None and outputs.choice is not None else body.guided_choice
    if choice is not None:
        sampling.choice.extend(choice)
    grammar = outputs.grammar if outputs is not None and outputs.grammar is not None else body.guided_grammar
    if grammar is not None:
        sampling.grammar = grammar
    if outputs is not None and outputs.json_object:
        sampling.json_object = True
