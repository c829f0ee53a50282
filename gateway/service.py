"""InferenceService: the public gRPC API. Short handlers: the work is in Admission, the calls and
ClientStream; a GatewayError ends a call with the status its table row gives (`abort`)."""

import asyncio
import logging
from collections.abc import AsyncIterable, AsyncIterator
from typing import NoReturn

import grpc
from opentelemetry.context import Context

from gateway.admission import Admission
from gateway.auth import ApiKeys
from gateway.call_context import Caller
from gateway.client_stream import ClientStream
from gateway.errors import GatewayError
from gateway.validation import check_input
from protos import inference_pb2, inference_pb2_grpc
from telemetry.tracing import extract

logger = logging.getLogger(__name__)


class InferenceService(inference_pb2_grpc.InferenceServicer):
    def __init__(self, admission: Admission, max_open_requests_per_stream: int, api_keys: ApiKeys | None):
        self.admission = admission
        self.max_open_requests_per_stream = max_open_requests_per_stream
        self.api_keys = api_keys

    def identify(self, context: grpc.aio.ServicerContext) -> Caller:
        """Who calls: the API key's principal when keys are configured (else UNAUTHENTICATED),
        otherwise the peer's address."""
        if self.api_keys is None:
            return Caller(caller_of(context), None)
        principal = self.api_keys.authenticate(context.invocation_metadata())
        return Caller(principal.name, principal)

    async def Generate(  # noqa: N802 - gRPC method name
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        try:
            generation = await self.admission.generation(
                request, context.time_remaining(), self.identify(context), trace_parent(context)
            )
            async for response in generation.run():
                yield response
        except GatewayError as error:
            await abort(context, error)

    async def GenerateStream(  # noqa: N802 - gRPC method name
        self, request_iterator: AsyncIterable[inference_pb2.ClientFrame], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.ServerFrame]:
        try:
            caller = self.identify(context)
        except GatewayError as error:
            await abort(context, error)
        stream = ClientStream(
            self.admission,
            self.max_open_requests_per_stream,
            context.time_remaining(),
            caller,
            trace_parent(context),
        )
        reader = asyncio.create_task(stream.read_all(request_iterator))
        try:
            async for frame in stream.outbox():
                yield frame
        finally:
            reader.cancel()
            await stream.close()

    async def Tokenize(  # noqa: N802 - gRPC method name
        self, request: inference_pb2.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.TokenizeResponse:
        calls = self.admission.context
        try:
            model = calls.check_model(request.model, self.identify(context), None)
            check_input(request, calls.limits(model))
            token_ids = await self.admission.tokenize(request, model.tokenizer)
        except GatewayError as error:
            await abort(context, error)
        return inference_pb2.TokenizeResponse(token_ids=token_ids, max_context=calls.max_context(model))

    async def ListModels(  # noqa: N802 - gRPC method name
        self, request: inference_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ListModelsResponse:
        try:
            caller = self.identify(context)
        except GatewayError as error:
            await abort(context, error)
        calls = self.admission.context
        return inference_pb2.ListModelsResponse(
            models=[
                calls.info(model)
                for model in calls.models
                if caller.principal is None or caller.principal.may_use(model.name)
            ]
        )

    async def Embed(  # noqa: N802 - gRPC method name
        self, request: inference_pb2.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.EmbedResponse:
        try:
            call = await self.admission.embedding(
                request, context.time_remaining(), self.identify(context), trace_parent(context)
            )
            return await call.run()
        except GatewayError as error:
            await abort(context, error)


async def abort(context: grpc.aio.ServicerContext, error: GatewayError) -> NoReturn:
    """End the call with the error's status and message, and its retry hint as a trailer."""
    if error.trailers():
        context.set_trailing_metadata(error.trailers())
    await context.abort(error.code, error.message)


def caller_of(context: grpc.aio.ServicerContext) -> str:
    """Who is calling, for per-caller limits: the peer's address without its port."""
    peer: str = context.peer()  # "ipv4:127.0.0.1:5555", "ipv6:[::1]:5555", "unix:/path"
    return peer.rsplit(":", 1)[0] if peer.startswith(("ipv4:", "ipv6:")) else peer


def trace_parent(context: grpc.aio.ServicerContext) -> Context:
    """The caller's trace context from its metadata (`traceparent`), or an empty one."""
    carrier = {key: value for key, value in context.invocation_metadata() or () if isinstance(value, str)}
    return extract(carrier)
