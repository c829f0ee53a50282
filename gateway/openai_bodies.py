"""The OpenAI API's request bodies, with its field names, and vLLM's extra sampling fields (so a
vLLM client moves over unchanged). Only the shape and the ranges of the proto fields behind them
are checked here; values are checked by the one validation every request takes
(gateway/validation.py), which names the field. Every optional field takes an explicit null."""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

UInt32 = Annotated[int, Field(ge=0, le=2**32 - 1)]
Int32 = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]


class _Body(BaseModel):
    # Fields another server takes that change nothing here (user, store, metadata, ...) are ignored,
    # as vLLM does; the ones that would change the answer and are not served are refused by name.
    model_config = ConfigDict(extra="allow")


class TextPart(BaseModel):
    type: str
    text: str = ""


class ChatMessageBody(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[TextPart] | None = None


class JsonSchemaFormat(BaseModel):
    name: str = ""
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs`: at most one of these."""

    model_config = ConfigDict(extra="forbid")

    json_: str | dict[str, Any] | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool | None = None


class SamplingBody(_Body):
    """Fields both generation endpoints take."""

    model: str | None = None
    max_tokens: UInt32 | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: UInt32 | None = None
    stop: str | list[str] | None = None
    seed: int | None = None  # any integer, as vLLM takes it; used modulo 2**64
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    # vLLM's extras
    top_k: Int32 | None = None  # -1 = off, as 0 is here
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: UInt32 | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[UInt32] | None = None
    priority: Int32 | None = None  # vLLM's: lower runs first
    structured_outputs: StructuredOutputs | None = None
    prompt_logprobs: UInt32 | None = None
    allowed_token_ids: list[UInt32] | None = None
    # vLLM's older names of structured outputs
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None


class ChatCompletionBody(SamplingBody):
    messages: list[ChatMessageBody]
    max_completion_tokens: UInt32 | None = None
    logprobs: bool | None = None
    top_logprobs: UInt32 | None = None


class CompletionBody(SamplingBody):
    prompt: str | list[str] | list[UInt32] | list[list[UInt32]]
    logprobs: UInt32 | None = None
    echo: bool | None = None
    suffix: str | None = None


class EmbeddingBody(_Body):
    model: str | None = None
    input: str | list[str] | list[UInt32] | list[list[UInt32]]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(None, ge=1)


class TokenizeBody(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessageBody] | None = None
    add_special_tokens: bool | None = None


class DetokenizeBody(_Body):
    model: str | None = None
    tokens: list[UInt32]
