"""OpenAIFront: the OpenAI HTTP API as a Starlette app on the gateway's own event loop, over the same
admission as gRPC (API keys, load limits, validation, tokenization with the chat template), the
same metrics (labelled api="openai") and the same traces."""

import asyncio
import base64
import math
import struct
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from checkpoints import ModelKind
from gateway.admission import Admission
from gateway.auth import ApiKeys
from gateway.call_context import Caller
from gateway.errors import GatewayError, InvalidRequest, Unavailable
from gateway.generation import Generation
from gateway.openai_bodies import (
    ChatCompletionBody,
    CompletionBody,
    DetokenizeBody,
    EmbeddingBody,
    TokenizeBody,
)
from gateway.openai_errors import CHAT_NAMES, NO_NAMES, error_object, error_response
from gateway.openai_requests import (
    chat_messages,
    chat_request,
    completion_requests,
    embed_request,
    refuse_not_served,
)
from gateway.openai_responses import FINISH_REASONS, ChoiceText, Shape, usage
from gateway.openai_streams import (
    EventStream,
    deadline_of,
    event_line,
    frames_of,
    until_deadline,
    while_connected,
)
from protos import inference_pb2
from telemetry.tracing import extract

Body = TypeVar("Body", bound=BaseModel)
API = "openai"  # the `api` label of this front's requests in the metrics
TIMEOUT_HEADER = "x-request-timeout"  # seconds: past it the call ends with 504, as a gRPC deadline
MAX_TIMEOUT_S = 1e6
MAX_BODY_BYTES = 32 << 20
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}  # pydantic's union members in `loc`


class OpenAIFront:
    def __init__(
        self,
        admission: Admission,
        api_keys: ApiKeys | None,
        registry: CollectorRegistry,
        is_serving: Callable[[], bool],
    ):
        self.admission = admission
        self.api_keys = api_keys
        self.registry = registry
        self.is_serving = is_serving

    def app(self) -> Starlette:
        routes = [
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/embeddings", self.embeddings, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/tokenize", self.tokenize, methods=["POST"]),
            Route("/detokenize", self.detokenize, methods=["POST"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
        ]

        async def no_route(request: Request, error: Exception) -> Response:
            code = getattr(error, "status_code", 404)
            message = f"{request.method} {request.url.path}: no such endpoint"
            body = {"error": {"message": message, "type": "not_found_error", "param": None, "code": code}}
            return JSONResponse(body, status_code=code)

        async def failed(request: Request, error: Exception) -> Response:
            return error_response(GatewayError(f"internal error: {error}"))

        return Starlette(routes=routes, exception_handlers={404: no_route, 405: no_route, Exception: failed})

    async def chat(self, request: Request) -> Response:
        async def answer(body: ChatCompletionBody, caller: Caller) -> Response:
            generation = await self._admit(request, chat_request(body), caller)
            shape = Shape(f"chatcmpl-{generation.call.job.request_id}", generation.call.model.name, chat=True)
            return await self._respond(request, shape, [generation], body)

        return await self._answer(request, ChatCompletionBody, answer, CHAT_NAMES)

    async def completions(self, request: Request) -> Response:
        async def answer(body: CompletionBody, caller: Caller) -> Response:
            generations: list[Generation] = []
            try:
                for grpc_request in completion_requests(body):
                    generations.append(await self._admit(request, grpc_request, caller))
            except BaseException:
                for generation in generations:  # admitted, never submitted: their leases go back
                    generation.call.abandon()
                raise
            first = generations[0].call
            shape = Shape(f"cmpl-{first.job.request_id}", first.model.name, chat=False)
            return await self._respond(request, shape, generations, body)

        return await self._answer(request, CompletionBody, answer)

    async def embeddings(self, request: Request) -> Response:
        async def answer(body: EmbeddingBody, caller: Caller) -> Response:
            refuse_not_served(body)
            model = self._check_served(body.model, caller, ModelKind.EMBED)
            if body.dimensions is not None and body.dimensions != model.dimension:
                raise InvalidRequest(
                    f"dimensions: this model's vectors have {model.dimension} dimensions; they are not cut"
                )
            timeout_s = _timeout_s(request)
            call = await self.admission.embedding(
                embed_request(body), timeout_s, caller, extract(request.headers), API
            )
            response = await while_connected(request, call.run(), deadline_of(timeout_s))
            data = [
                {
                    "object": "embedding",
                    "index": index,
                    "embedding": _encoded(list(e.values), body.encoding_format),
                }
                for index, e in enumerate(response.embeddings)
            ]
            tokens = response.usage.prompt_tokens
            return JSONResponse(
                {
                    "object": "list",
                    "data": data,
                    "model": response.model,
                    "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                }
            )

        return await self._answer(request, EmbeddingBody, answer)

    async def models(self, request: Request) -> Response:
        try:
            caller = self._identify(request)
        except GatewayError as error:
            return error_response(error)
        context = self.admission.context
        data = [
            {
                "id": model.name,
                "object": "model",
                "created": 0,
                "owned_by": "conveyor",
                "max_model_len": context.max_context(model),
            }
            for model in context.models
            if caller.principal is None or caller.principal.may_use(model.name)
        ]
        return JSONResponse({"object": "list", "data": data})

    async def tokenize(self, request: Request) -> Response:
        async def answer(body: TokenizeBody, caller: Caller) -> Response:
            context = self.admission.context
            model = context.check_model(body.model or "", caller, None)
            if body.add_special_tokens is False:
                raise InvalidRequest("add_special_tokens: false is not served (prompts take the model's own)")
            grpc_request = inference_pb2.TokenizeRequest(model=model.name)
            if body.messages is not None:
                grpc_request.chat.messages.extend(chat_messages(body.messages))
            elif body.prompt is not None:
                grpc_request.prompt = body.prompt
            else:
                raise InvalidRequest("prompt: set prompt or messages")
            token_ids = await self.admission.tokenize(grpc_request, model.tokenizer)
            limit = context.max_context(model)
            return JSONResponse({"count": len(token_ids), "max_model_len": limit, "tokens": token_ids})

        return await self._answer(request, TokenizeBody, answer)

    async def detokenize(self, request: Request) -> Response:
        async def answer(body: DetokenizeBody, caller: Caller) -> Response:
            model = self.admission.context.check_model(body.model or "", caller, None)
            for index, token_id in enumerate(body.tokens):
                if token_id >= model.tokenizer.vocab_size:
                    raise InvalidRequest(f"tokens[{index}]: {token_id} is outside the vocabulary")
            loop = asyncio.get_running_loop()
            text = await loop.run_in_executor(
                self.admission.context.executor, model.tokenizer.decode, body.tokens
            )
            return JSONResponse({"prompt": text})

        return await self._answer(request, DetokenizeBody, answer)

    async def health(self, request: Request) -> Response:
        """200 while Redis answers and a live worker serves every model (as gRPC health's SERVING)."""
        return Response(status_code=200 if self.is_serving() else 503)

    async def metrics(self, request: Request) -> Response:
        loop = asyncio.get_running_loop()
        page = await loop.run_in_executor(self.admission.context.executor, generate_latest, self.registry)
        return Response(page, media_type=CONTENT_TYPE_LATEST)

    async def _answer(
        self,
        request: Request,
        body_type: type[Body],
        answer: Callable[[Body, Caller], Awaitable[Response]],
        names: Mapping[str, str] = NO_NAMES,
    ) -> Response:
        """The body parsed and answered; any failure is an OpenAI error object with its status."""
        try:
            caller = self._identify(request)
            return await answer(await _body(request, body_type), caller)
        except GatewayError as error:
            return error_response(error, names)

    def _identify(self, request: Request) -> Caller:
        """As gRPC: the API key's principal when keys are configured, else the peer's address, named
        as gRPC names it (so one client has one budget on both fronts)."""
        if self.api_keys is None:
            host = request.client.host if request.client else "unknown"
            return Caller(f"ipv6:[{host}]" if ":" in host else f"ipv4:{host}", None)
        header = request.headers.get("authorization")
        principal = self.api_keys.authenticate([("authorization", header)] if header is not None else [])
        return Caller(principal.name, principal)

    async def _admit(
        self, request: Request, grpc_request: inference_pb2.GenerateRequest, caller: Caller
    ) -> Generation:
        self._check_served(grpc_request.model, caller, ModelKind.GENERATE)
        return await self.admission.generation(
            grpc_request, _timeout_s(request), caller, extract(request.headers), API
        )

    def _check_served(self, name: str | None, caller: Caller, kind: ModelKind) -> Any:
        """The model, if a live worker serves it; else 503, as an OpenAI client expects (and
        retries). gRPC calls queue instead, for a fleet scaling up from zero on them."""
        context = self.admission.context
        model = context.check_model(name or "", caller, kind)
        if not context.fleet.view.of(model.name).serving:
            retry_after_ms = context.load_limits.settings.retry_after_ms
            raise Unavailable(
                f"no live worker serves model {model.name!r} now: retry", retry_after_ms=retry_after_ms
            )
        return model

    async def _respond(
        self,
        request: Request,
        shape: Shape,
        generations: list[Generation],
        body: ChatCompletionBody | CompletionBody,
    ) -> Response:
        deadline = deadline_of(_timeout_s(request))
        if not body.stream:
            return JSONResponse(await while_connected(request, self._whole(shape, generations), deadline))
        # The first event is awaited here, not by the response: a failure before any token still
        # gets its status, and a client leaving before it cancels the job.
        include_usage = body.stream_options is not None and bool(body.stream_options.include_usage)
        events = self._events(shape, generations, include_usage)
        try:
            first = await while_connected(request, anext(events), deadline)
        except BaseException:
            await events.aclose()
            raise

        async def rest() -> AsyncGenerator[str, None]:
            yield first
            async for event in until_deadline(events, deadline):
                yield event

        return EventStream(rest(), events)

    async def _whole(self, shape: Shape, generations: list[Generation]) -> dict[str, Any]:
        choices: list[ChoiceText] = []
        prompt_tokens = completion_tokens = 0
        async for offset, frame in frames_of(generations):
            index = offset + frame.choice_index
            while len(choices) <= index:
                choices.append(ChoiceText())
            choice = choices[index]
            choice.text += frame.text
            choice.logprobs.extend(frame.logprobs)
            if frame.finish_reason:
                choice.finish_reason = FINISH_REASONS.get(frame.finish_reason)
            if frame.HasField("usage"):
                prompt_tokens += frame.usage.prompt_tokens
                completion_tokens += frame.usage.completion_tokens
        tokenizer = generations[0].call.model.tokenizer
        return shape.whole(choices, tokenizer, usage(prompt_tokens, completion_tokens))

    async def _events(
        self, shape: Shape, generations: list[Generation], include_usage: bool
    ) -> AsyncGenerator[str, None]:
        """Server-sent events: a chunk per frame, usage if asked, then [DONE]. A failure once the
        stream has begun is an error event (the status is already sent); before, it is raised."""
        tokenizer = generations[0].call.model.tokenizer
        text_offsets: dict[int, int] = {}  # by choice: characters sent, for completions' text_offset
        prompt_tokens = completion_tokens = 0
        try:
            async for offset, frame in frames_of(generations):
                index = offset + frame.choice_index
                first = index not in text_offsets
                if not (frame.text or frame.finish_reason or frame.logprobs or first):
                    continue
                reason = FINISH_REASONS.get(frame.finish_reason)
                logprobs = list(frame.logprobs)
                yield event_line(
                    shape.chunk(
                        index, frame.text, logprobs, reason, tokenizer, first, text_offsets.get(index, 0)
                    )
                )
                text_offsets[index] = text_offsets.get(index, 0) + len(frame.text)
                if frame.HasField("usage"):
                    prompt_tokens += frame.usage.prompt_tokens
                    completion_tokens += frame.usage.completion_tokens
            if include_usage:
                yield event_line(shape.usage_chunk(usage(prompt_tokens, completion_tokens)))
        except GatewayError as error:
            if not text_offsets:
                raise  # nothing sent yet: the call gets the error's status
            yield event_line(error_object(error))
        yield "data: [DONE]\n\n"


async def _body(request: Request, body_type: type[Body]) -> Body:
    if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
        raise InvalidRequest(f"body: over {MAX_BODY_BYTES} bytes")
    raw = bytearray()
    async for piece in request.stream():
        raw += piece
        if len(raw) > MAX_BODY_BYTES:
            raise InvalidRequest(f"body: over {MAX_BODY_BYTES} bytes")
    try:
        return body_type.model_validate_json(bytes(raw))
    except ValidationError as error:
        problem = error.errors()[0]
        if problem["type"] == "json_invalid":
            raise InvalidRequest(f"body: not valid JSON ({problem['msg']})") from error
        raise InvalidRequest(f"{_path(problem['loc']) or 'body'}: {problem['msg']}") from error


def _path(loc: tuple[int | str, ...]) -> str:
    """A pydantic error location as the body's field path, without the union members it tried."""
    parts = [p for p in loc if isinstance(p, int) or (p.isidentifier() and p not in _TYPE_TAGS)]
    return "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else p) for i, p in enumerate(parts))


def _timeout_s(request: Request) -> float | None:
    value = request.headers.get(TIMEOUT_HEADER)
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds <= MAX_TIMEOUT_S:
        raise InvalidRequest(
            f"{TIMEOUT_HEADER}: {value!r} is not a number of seconds in (0, {MAX_TIMEOUT_S:g}]"
        )
    return seconds


def _encoded(values: list[float], encoding_format: str | None) -> list[float] | str:
    if encoding_format == "base64":  # little-endian float32, as OpenAI's SDK decodes it
        return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()
    return values
