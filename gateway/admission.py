"""Admission: a GenerateRequest or EmbedRequest checked, given a place within the load limits,
tokenized off the event loop, and turned into a JobCall for the model it names."""

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

from opentelemetry.context import Context

from checkpoints import ModelKind
from gateway.call_context import CallContext, Caller
from gateway.constraints import compile_constraint, constraint_of
from gateway.embedding_call import EmbeddingCall
from gateway.errors import GatewayError, InvalidRequest
from gateway.generation import Generation
from gateway.job_call import JobCall
from gateway.request_trace import RequestTrace
from gateway.served_models import ServedModel
from gateway.validation import (
    check_embed_inputs,
    check_embed_lengths,
    check_input,
    check_prompt_length,
    check_request_id,
    resolve_sampling,
)
from protos import inference_pb2, jobs_pb2
from tokenization import Tokenizer

T = TypeVar("T")

# Each kind's noun in log lines and its trace's root span.
_CALL_NAMES = {
    ModelKind.GENERATE: ("generation", "conveyor.generate"),
    ModelKind.EMBED: ("embedding", "conveyor.embed"),
}


class Admission:
    """Everything between a request arriving and its job being ready to submit."""

    def __init__(self, context: CallContext):
        self.context = context

    async def generation(
        self,
        request: inference_pb2.GenerateRequest,
        timeout_s: float | None,
        caller: Caller,
        parent: Context,
        api: str = "grpc",
    ) -> Generation:
        """Raises GatewayError with what to answer. The request's trace starts here, under `parent`
        (the caller's, if any)."""
        sampling = jobs_pb2.Sampling()  # resolved by validate(), before the lease is taken
        constraint: tuple[str, str] | None = None

        def validate() -> ServedModel:
            nonlocal sampling, constraint
            model = self.context.check_model(request.model, caller, ModelKind.GENERATE)
            limits = self.context.limits(model)
            check_input(request, limits)
            sampling = resolve_sampling(request.sampling, limits)
            constraint = constraint_of(request.sampling)
            return model

        async def tokenize(model: ServedModel) -> list[int]:
            token_ids = await self.tokenize(request, model.tokenizer)
            check_prompt_length(len(token_ids), self.context.limits(model))
            if constraint is not None:  # compiling a large schema takes a while: not on the loop
                loop = asyncio.get_running_loop()
                sampling.grammar = await loop.run_in_executor(
                    self.context.executor, compile_constraint, *constraint
                )
            return token_ids

        def job(token_ids: list[int]) -> dict[str, object]:
            return {"prompt_token_ids": token_ids, "sampling": sampling, "priority": request.priority}

        call = await self._admit(
            ModelKind.GENERATE, request.request_id, caller, parent, validate, tokenize, job, timeout_s, api
        )
        return Generation.of(call, tuple(request.sampling.stop))

    async def embedding(
        self,
        request: inference_pb2.EmbedRequest,
        timeout_s: float | None,
        caller: Caller,
        parent: Context,
        api: str = "grpc",
    ) -> EmbeddingCall:
        """As `generation`, for an embedding call: every input tokenized (and cut, if the request
        allows)."""

        def validate() -> ServedModel:
            model = self.context.check_model(request.model, caller, ModelKind.EMBED)
            check_embed_inputs(request.inputs)
            return model

        async def tokenize(model: ServedModel) -> list[list[int]]:
            max_context = self.context.max_context(model)
            inputs = await asyncio.get_running_loop().run_in_executor(
                self.context.executor,
                model.tokenizer.encode_many,
                list(request.inputs),
                max_context if request.truncate else None,
            )
            check_embed_lengths([len(ids) for ids in inputs], max_context)
            return inputs

        def job(inputs: list[list[int]]) -> dict[str, object]:
            embed = jobs_pb2.EmbedTask(inputs=[inference_pb2.TokenIds(ids=ids) for ids in inputs])
            if request.HasField("normalize"):
                embed.normalize = request.normalize
            return {"embed": embed}

        call = await self._admit(
            ModelKind.EMBED, request.request_id, caller, parent, validate, tokenize, job, timeout_s, api
        )
        return EmbeddingCall(call)

    async def _admit(
        self,
        kind: ModelKind,
        request_id: str,
        caller: Caller,
        parent: Context,
        validate: Callable[[], ServedModel],
        tokenize: Callable[[ServedModel], Awaitable[T]],
        job_fields: Callable[[T], dict[str, object]],
        timeout_s: float | None,
        api: str,
    ) -> JobCall:
        """The steps every request takes, each a span of its trace: validate, take a lease (before
        tokenizing: under a flood, refusing must cost nothing), tokenize. The trace ends here if
        the request is refused."""
        context = self.context
        noun, span_name = _CALL_NAMES[kind]
        trace = RequestTrace.start(context.tracer, span_name, parent, **{"conveyor.caller": caller.name})
        try:
            with trace.child("validate"):
                check_request_id(request_id)
                model = validate()
                trace.root.set_attribute("conveyor.model", model.name)
                lease = context.load_limits.admit(caller.name, context.queued_jobs(model))
            try:
                with trace.child("tokenize"):
                    tokens = await tokenize(model)
            except BaseException:
                lease.release()
                raise
        except GatewayError as error:
            trace.end(error.message)
            raise
        except BaseException:
            trace.end("failed")
            raise
        now_ms = int(time.time() * 1000)
        try:
            job = jobs_pb2.Job(
                request_id=uuid.uuid4().hex,
                gateway_id=context.queues.gateway_id,
                arrival_unix_ms=now_ms,
                deadline_unix_ms=now_ms + int(timeout_s * 1000) if timeout_s is not None else 0,
                **job_fields(tokens),  # type: ignore[arg-type]
            )
        except BaseException:  # whatever it was, the lease goes back and the trace ends
            lease.release()
            trace.end("failed")
            raise
        trace.root.set_attribute("conveyor.request_id", job.request_id)
        trace.carry(job.trace_context)  # type: ignore[arg-type]  # the worker's spans join this trace
        return JobCall(context, noun, request_id or job.request_id, model, job, lease, trace, api)

    async def tokenize(
        self, request: inference_pb2.GenerateRequest | inference_pb2.TokenizeRequest, tokenizer: Tokenizer
    ) -> list[int]:
        """Token ids of the request's input; the tokenizer runs in a thread, not on the event loop."""
        kind = request.WhichOneof("input")
        if kind == "token_ids":
            return list(request.token_ids.ids)  # type: ignore[union-attr]
        loop = asyncio.get_running_loop()
        if kind == "chat":
            messages = [{"role": m.role, "content": m.content} for m in request.chat.messages]
            try:
                return await loop.run_in_executor(self.context.executor, tokenizer.encode_chat, messages)
            except ValueError as error:
                raise InvalidRequest(f"chat: {error}") from error
        return await loop.run_in_executor(self.context.executor, tokenizer.encode, request.prompt)
