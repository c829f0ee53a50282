"""A small Python client over the generated stubs, for users who would rather not touch protobuf."""

import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from protos import inference_pb2, inference_pb2_grpc


@dataclass(frozen=True, slots=True)
class Security:
    """How a client proves itself: an API key (default: $CONVEYOR_API_KEY), and TLS — a CA to trust
    the gateway by, plus a certificate and key where the gateway wants mutual TLS."""

    api_key: str | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        key = self.api_key or os.environ.get("CONVEYOR_API_KEY")
        return (("authorization", f"Bearer {key}"),) if key else ()

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        if self.ca_file is None:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_file.read_bytes(),
            private_key=self.key_file.read_bytes() if self.key_file else None,
            certificate_chain=self.cert_file.read_bytes() if self.cert_file else None,
        )


@dataclass(slots=True)
class Choice:
    """One of a generation's n completions."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""


@dataclass(slots=True)
class Completion:
    """A finished generation: its choices (one unless n was asked for), usage and timings."""

    choices: list[Choice] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0  # over every choice
    time_to_first_token_s: float = 0.0
    total_s: float = 0.0
    last_response: inference_pb2.GenerateResponse | None = None

    @property
    def text(self) -> str:
        """Choice 0's text."""
        return self.choices[0].text if self.choices else ""

    @property
    def token_ids(self) -> list[int]:
        return self.choices[0].token_ids if self.choices else []

    @property
    def finish_reason(self) -> str:
        return self.choices[0].finish_reason if self.choices else ""


def build_request(
    prompt: str | None = None,
    *,
    messages: list[dict[str, str]] | None = None,
    token_ids: list[int] | None = None,
    request_id: str = "",
    model: str = "",
    priority: int = 0,
    **sampling: Any,
) -> inference_pb2.GenerateRequest:
    """One GenerateRequest from plain Python values; sampling keywords are SamplingParams fields."""
    request = inference_pb2.GenerateRequest(
        request_id=request_id,
        model=model,
        priority=priority,
        sampling=inference_pb2.SamplingParams(**sampling),
    )
    if messages is not None:
        request.chat.messages.extend(inference_pb2.ChatMessage(**m) for m in messages)
    elif token_ids is not None:
        request.token_ids.ids.extend(token_ids)
    elif prompt is not None:
        request.prompt = prompt
    return request


def _accumulate(completion: Completion, response: inference_pb2.GenerateResponse) -> None:
    while len(completion.choices) <= response.choice_index:
        completion.choices.append(Choice())
    choice = completion.choices[response.choice_index]
    choice.text += response.text
    choice.token_ids.extend(response.token_ids)
    if response.finish_reason:
        choice.finish_reason = inference_pb2.FinishReason.Name(response.finish_reason)
    if response.HasField("usage"):  # the request's last frame
        completion.prompt_tokens = response.usage.prompt_tokens
        completion.completion_tokens = response.usage.completion_tokens
        completion.time_to_first_token_s = response.timings.time_to_first_token_s
        completion.total_s = response.timings.total_s
        completion.last_response = response


def build_embed_request(
    inputs: list[str], model: str = "", normalize: bool | None = None, truncate: bool = False
) -> inference_pb2.EmbedRequest:
    request = inference_pb2.EmbedRequest(inputs=inputs, model=model, truncate=truncate)
    if normalize is not None:
        request.normalize = normalize
    return request


def vectors_of(response: inference_pb2.EmbedResponse) -> list[list[float]]:
    return [list(embedding.values) for embedding in response.embeddings]


class ConveyorClient:
    """Blocking client: `stream()` yields responses, `generate()` returns the whole completion."""

    def __init__(
        self,
        address: str = "127.0.0.1:50051",
        channel: grpc.Channel | None = None,
        security: Security = Security(),
    ):
        credentials = security.channel_credentials()
        if channel is None:
            channel = (
                grpc.insecure_channel(address)
                if credentials is None
                else grpc.secure_channel(address, credentials)
            )
        self.channel = channel
        self.metadata = security.metadata
        self.stub = inference_pb2_grpc.InferenceStub(self.channel)

    def stream(
        self, prompt: str | None = None, *, timeout_s: float | None = None, **kwargs: Any
    ) -> Iterator[inference_pb2.GenerateResponse]:
        request = build_request(prompt, **kwargs)
        yield from self.stub.Generate(request, timeout=timeout_s, metadata=self.metadata)

    def generate(self, prompt: str | None = None, **kwargs: Any) -> Completion:
        completion = Completion()
        for response in self.stream(prompt, **kwargs):
            _accumulate(completion, response)
        return completion

    def list_models(self) -> list[inference_pb2.ModelInfo]:
        return list(self.stub.ListModels(inference_pb2.ListModelsRequest(), metadata=self.metadata).models)

    def embed(
        self, inputs: list[str], *, timeout_s: float | None = None, **kwargs: Any
    ) -> inference_pb2.EmbedResponse:
        """One vector per input, in order (`vectors_of` gives them as lists)."""
        request = build_embed_request(inputs, **kwargs)
        response: inference_pb2.EmbedResponse = self.stub.Embed(
            request, timeout=timeout_s, metadata=self.metadata
        )
        return response

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "ConveyorClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncConveyorClient:
    """asyncio client with the same methods as ConveyorClient."""

    def __init__(
        self,
        address: str = "127.0.0.1:50051",
        channel: grpc.aio.Channel | None = None,
        security: Security = Security(),
    ):
        credentials = security.channel_credentials()
        if channel is None:
            channel = (
                grpc.aio.insecure_channel(address)
                if credentials is None
                else grpc.aio.secure_channel(address, credentials)
            )
        self.channel = channel
        self.metadata = security.metadata
        self.stub = inference_pb2_grpc.InferenceStub(self.channel)

    async def stream(
        self, prompt: str | None = None, *, timeout_s: float | None = None, **kwargs: Any
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        request = build_request(prompt, **kwargs)
        async for response in self.stub.Generate(request, timeout=timeout_s, metadata=self.metadata):
            yield response

    async def generate(self, prompt: str | None = None, **kwargs: Any) -> Completion:
        completion = Completion()
        async for response in self.stream(prompt, **kwargs):
            _accumulate(completion, response)
        return completion

    async def list_models(self) -> list[inference_pb2.ModelInfo]:
        reply = await self.stub.ListModels(inference_pb2.ListModelsRequest(), metadata=self.metadata)
        return list(reply.models)

    async def embed(
        self, inputs: list[str], *, timeout_s: float | None = None, **kwargs: Any
    ) -> inference_pb2.EmbedResponse:
        request = build_embed_request(inputs, **kwargs)
        response: inference_pb2.EmbedResponse = await self.stub.Embed(
            request, timeout=timeout_s, metadata=self.metadata
        )
        return response

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "AsyncConveyorClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
