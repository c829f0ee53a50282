"""The OpenAI API's request bodies, with its field names, and vLLM's extra sampling fields (so a
vLLM client moves over unchanged). Only the shape is checked here; values are checked by the one
validation every request takes (gateway/validation.py), which names the field."""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


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
    include_usage: bool = False


class SamplingBody(_Body):
    """Fields both generation endpoints take."""

    model: str = ""
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = None
    top_p: float | None = None
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM's extras
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    priority: int = 0
    structured_outputs: StructuredOutputs | None = None


class ChatCompletionBody(SamplingBody):
    messages: list[ChatMessageBody]
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)


class CompletionBody(SamplingBody):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0)
    echo: bool = False
    suffix: str | None = None


class EmbeddingBody(_Body):
    model: str = ""
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)


class TokenizeBody(_Body):
    model: str = ""
    prompt: str | None = None
    messages: list[ChatMessageBody] | None = None
    add_special_tokens: bool = True


class DetokenizeBody(_Body):
    model: str = ""
    tokens: list[int]
