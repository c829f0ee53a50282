"""OpenAIFront: the OpenAI HTTP API as a Starlette app on the gateway's own event loop, over the same
admission as gRPC (API keys, load limits, validation, tokenization with the chat template), the
same metrics (labelled api="openai") and the same traces."""

import asyncio
import base64
import json
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any, TypeVar

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from checkpoints import ModelKind
from gateway.admission import Admission
from gateway.auth import ApiKeys
from gateway.call_context import Caller
from gateway.errors import ErrorKind, GatewayError, InvalidRequest, Unavailable
from gateway.generation import Generation
from gateway.openai_bodies import (
    ChatCompletionBody,
    CompletionBody,
    DetokenizeBody,
    EmbeddingBody,
    TokenizeBody,
)
from gateway.openai_errors import error_object, error_response
from gateway.openai_requests import chat_messages, chat_request, completion_requests, embed_request
from gateway.openai_responses import FINISH_REASONS, ChoiceText, Shape, usage
from protos import inference_pb2
from telemetry.tracing import extract

Body = TypeVar("Body", bound=BaseModel)
API = "openai"  # the `api` label of this front's requests in the metrics
TIMEOUT_HEADER = "x-request-timeout"  # seconds: past it the call ends with 504, as a gRPC deadline


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

        return Starlette(routes=routes, exception_handlers={404: no_route, 405: no_route})

    async def chat(self, request: Request) -> Response:
        async def answer(body: ChatCompletionBody, caller: Caller) -> Response:
            generation = await self._admit(request, chat_request(body), caller)
            shape = Shape(f"chatcmpl-{generation.call.job.request_id}", generation.call.model.name, chat=True)
            return await self._respond(request, shape, [generation], body.stream, _include_usage(body))

        return await self._answer(request, ChatCompletionBody, answer, "top_logprobs")

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
            return await self._respond(request, shape, generations, body.stream, _include_usage(body))

        return await self._answer(request, CompletionBody, answer)

    async def embeddings(self, request: Request) -> Response:
        async def answer(body: EmbeddingBody, caller: Caller) -> Response:
            self._check_served(body.model, caller, ModelKind.EMBED)
            call = await self.admission.embedding(
                embed_request(body), _timeout_s(request), caller, extract(request.headers), API
            )
            dimension = call.call.model.dimension
            if body.dimensions is not None and body.dimensions != dimension:
                call.call.abandon()
                raise InvalidRequest(
                    f"dimensions: this model's vectors have {dimension} dimensions and cannot be shortened"
                )
            response = await _until_disconnected(request, call.run())
            data = [
                {
                    "object": "embedding",
                    "index": index,
                    "embedding": _encoded(list(e.values), body.encoding_format),
                }
                for index, e in enumerate(response.embeddings)
            ]
            return JSONResponse(
                {
                    "object": "list",
                    "data": data,
                    "model": response.model,
                    "usage": {
                        "prompt_tokens": response.usage.prompt_tokens,
                        "total_tokens": response.usage.prompt_tokens,
                    },
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
            model = context.check_model(body.model, caller, None)
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
            model = self.admission.context.check_model(body.model, caller, None)
            for index, token_id in enumerate(body.tokens):
                if not 0 <= token_id < model.tokenizer.vocab_size:
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
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    async def _answer(
        self,
        request: Request,
        body_type: type[Body],
        answer: Callable[[Body, Caller], Awaitable[Response]],
        logprobs_name: str = "logprobs",
    ) -> Response:
        """The body parsed and answered; any failure is an OpenAI error object with its status."""
        try:
            caller = self._identify(request)
            return await answer(await _body(request, body_type), caller)
        except GatewayError as error:
            return error_response(error, logprobs_name)

    def _identify(self, request: Request) -> Caller:
        """As gRPC: the API key's principal when keys are configured, else the peer's address."""
        if self.api_keys is None:
            return Caller(request.client.host if request.client else "unknown", None)
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

    def _check_served(self, name: str, caller: Caller, kind: ModelKind) -> None:
        """503 while no live worker serves the model, as an OpenAI client expects (and retries); gRPC
        calls queue instead, for a fleet scaling up from zero on them."""
        context = self.admission.context
        model = context.check_model(name, caller, kind)
        if not context.fleet.view.of(model.name).serving:
            retry_after_ms = context.load_limits.settings.retry_after_ms
            raise Unavailable(
                f"no live worker serves model {model.name!r} now: retry", retry_after_ms=retry_after_ms
            )

    async def _respond(
        self,
        request: Request,
        shape: Shape,
        generations: list[Generation],
        stream: bool,
        include_usage: bool,
    ) -> Response:
        if not stream:
            return JSONResponse(await _until_disconnected(request, self._whole(shape, generations)))
        # The first event is awaited here, not by the response: a failure before any token still
        # gets its status, a client leaving before it cancels the job, and the events' generator has
        # started, so however the response ends its jobs are closed with it.
        events = self._events(shape, generations, include_usage)
        first = await _until_disconnected(request, anext(events))

        async def body() -> AsyncIterator[str]:
            async with aclosing(events):
                yield first
                async for event in events:
                    yield event

        return StreamingResponse(body(), media_type="text/event-stream")

    async def _whole(self, shape: Shape, generations: list[Generation]) -> dict[str, Any]:
        choices: list[ChoiceText] = []
        prompt_tokens = completion_tokens = 0
        async for offset, frame in _frames(generations):
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
    ) -> AsyncIterator[str]:
        """Server-sent events: a chunk per frame, usage if asked, then [DONE]. A failure once the
        stream has begun is an error event (the status is already sent); before, it is raised."""
        tokenizer = generations[0].call.model.tokenizer
        started: set[int] = set()  # choices that have had their first chunk
        prompt_tokens = completion_tokens = 0
        try:
            async for offset, frame in _frames(generations):
                index = offset + frame.choice_index
                if not (frame.text or frame.finish_reason or frame.logprobs or index not in started):
                    continue
                chunk = shape.chunk(
                    index,
                    frame.text,
                    list(frame.logprobs),
                    FINISH_REASONS.get(frame.finish_reason),
                    tokenizer,
                    index not in started,
                )
                started.add(index)
                yield _event(chunk)
                if frame.HasField("usage"):
                    prompt_tokens += frame.usage.prompt_tokens
                    completion_tokens += frame.usage.completion_tokens
            if include_usage:
                yield _event(shape.usage_chunk(usage(prompt_tokens, completion_tokens)))
        except GatewayError as error:
            if not started:
                raise  # nothing sent yet: the call gets the error's status
            yield _event(error_object(error))
        yield "data: [DONE]\n\n"


async def _frames(generations: list[Generation]) -> AsyncIterator[tuple[int, inference_pb2.GenerateResponse]]:
    """Every generation's frames as they come, each with the index of its first choice (a completion
    call of several prompts numbers its choices prompt by prompt, n each)."""
    if len(generations) == 1:
        async with aclosing(generations[0].run()) as frames:
            async for frame in frames:
                yield 0, frame
        return
    queue: asyncio.Queue[tuple[int, inference_pb2.GenerateResponse] | BaseException | None] = asyncio.Queue()
    num_choices = max(generations[0].call.job.sampling.n, 1)

    async def pump(offset: int, generation: Generation) -> None:
        try:
            async with aclosing(generation.run()) as frames:
                async for frame in frames:
                    queue.put_nowait((offset, frame))
        except Exception as error:  # noqa: BLE001 - handed to the reader, which raises it
            queue.put_nowait(error)
        finally:
            queue.put_nowait(None)

    tasks = [asyncio.create_task(pump(i * num_choices, g)) for i, g in enumerate(generations)]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _body(request: Request, body_type: type[Body]) -> Body:
    raw = await request.body()
    try:
        return body_type.model_validate_json(raw)
    except ValidationError as error:
        problem = error.errors()[0]
        field = "".join(
            f"[{part}]" if isinstance(part, int) else (f".{part}" if i else str(part))
            for i, part in enumerate(problem["loc"])
        )
        if problem["type"] == "json_invalid":
            raise InvalidRequest(f"body: not valid JSON ({problem['msg']})") from error
        raise InvalidRequest(f"{field or 'body'}: {problem['msg']}") from error


async def _until_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """The work's result, unless the client leaves first: then it is cancelled (its job with it)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.create_task(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise GatewayError("the client disconnected", ErrorKind.CANCELLED)
    return task.result()


def _include_usage(body: ChatCompletionBody | CompletionBody) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


def _timeout_s(request: Request) -> float | None:
    value = request.headers.get(TIMEOUT_HEADER)
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise InvalidRequest(f"{TIMEOUT_HEADER}: {value!r} is not a positive number of seconds")
    return seconds


def _encoded(values: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":  # little-endian float32, as OpenAI's SDK decodes it
        return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()
    return values


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"
