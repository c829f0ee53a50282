"""Admission: a GenerateRequest or EmbedRequest checked, tokenized off the event loop, and turned
into a Job for the model it names."""

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TypeVar

import grpc
from opentelemetry.context import Context
from opentelemetry.trace import Tracer

from gateway.auth import Principal
from gateway.embedding_call import EmbeddingCall
from gateway.errors import GatewayError
from gateway.generation import Generation
from gateway.job_watch import WatchPolicy
from gateway.load_limits import Lease, LoadLimits
from gateway.request_trace import RequestTrace
from gateway.response_router import ResponseRouter
from gateway.served_models import ServedModel, ServedModels
from gateway.validation import (
    Limits,
    check_embed_inputs,
    check_embed_lengths,
    check_input,
    check_prompt_length,
    check_request_id,
    resolve_sampling,
)
from protos import inference_pb2, jobs_pb2
from protos.model_kind import ModelKind
from tokenization import TextStream, Tokenizer

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Caller:
    """Who sent a request: a name for limits and logs, and the API key's grants if keys are on."""

    name: str
    principal: Principal | None


class Admission:
    """Everything between a request arriving and its job being ready to submit."""

    def __init__(
        self,
        models: ServedModels,
        executor: Executor,
        router: ResponseRouter,
        gateway_id: str,
        default_max_tokens: int,
        watch_policy: WatchPolicy,
        load_limits: LoadLimits,
        tracer: Tracer,
    ):
        self.models = models
        self.executor = executor
        self.router = router
        self.gateway_id = gateway_id
        self.default_max_tokens = default_max_tokens
        self.watch_policy = watch_policy
        self.load_limits = load_limits
        self.tracer = tracer

    def limits(self, model: ServedModel) -> Limits:
        return Limits(model.tokenizer.vocab_size, model.max_context, self.default_max_tokens)

    def check_model(self, name: str, caller: Caller, kind: ModelKind | None) -> ServedModel:
        """The model a request names, if this caller may use it; `kind` None: either kind."""
        model = self.models.resolve(name, kind)
        if caller.principal is not None:
            caller.principal.check_model(model.name)
        return model

    async def accept(
        self,
        request: inference_pb2.GenerateRequest,
        timeout_s: float | None,
        caller: Caller,
        parent: Context,
    ) -> Generation:
        """Validate, tokenize and take a lease within the load limits; raises GatewayError with the
        status to answer. The request's trace starts here, under `parent` (the caller's, if any)."""
        sampling = jobs_pb2.Sampling()  # resolved by validate(), before the lease is taken

        def validate() -> ServedModel:
            nonlocal sampling
            model = self.check_model(request.model, caller, ModelKind.GENERATE)
            limits = self.limits(model)
            check_input(request, limits)
            sampling = resolve_sampling(request.sampling, limits)
            return model

        async def tokenize(model: ServedModel) -> list[int]:
            token_ids = await self.tokenize(request, model.tokenizer)
            check_prompt_length(len(token_ids), self.limits(model))
            return token_ids

        model, token_ids, lease, request_trace = await self._admit(
            request.request_id, caller, parent, validate, tokenize
        )
        job = self._job(
            timeout_s, request_trace, prompt_token_ids=token_ids, sampling=sampling, priority=request.priority
        )
        return Generation(
            client_request_id=request.request_id or job.request_id,
            job=job,
            text_stream=TextStream(model.tokenizer, tuple(sampling.stop)),
            jobs=model.jobs,
            router=self.router,
            executor=self.executor,
            watch_policy=self.watch_policy,
            lease=lease,
            metrics=model.metrics,
            trace=request_trace,
        )

    async def accept_embed(
        self,
        request: inference_pb2.EmbedRequest,
        timeout_s: float | None,
        caller: Caller,
        parent: Context,
    ) -> EmbeddingCall:
        """As `accept`, for an embedding call: every input tokenized (and cut, if the request allows)."""

        def validate() -> ServedModel:
            model = self.check_model(request.model, caller, ModelKind.EMBED)
            check_embed_inputs(request.inputs)
            return model

        async def tokenize(model: ServedModel) -> list[list[int]]:
            truncate_to = model.max_context if request.truncate else None
            loop = asyncio.get_running_loop()
            inputs = await loop.run_in_executor(
                self.executor, model.tokenizer.encode_many, list(request.inputs), truncate_to
            )
            check_embed_lengths([len(ids) for ids in inputs], model.max_context)
            return inputs

        model, inputs, lease, request_trace = await self._admit(
            request.request_id, caller, parent, validate, tokenize
        )
        embed = jobs_pb2.EmbedTask(inputs=[inference_pb2.TokenIds(ids=ids) for ids in inputs])
        if request.HasField("normalize"):
            embed.normalize = request.normalize
        job = self._job(timeout_s, request_trace, embed=embed)
        return EmbeddingCall(
            client_request_id=request.request_id or job.request_id,
            model_name=model.name,
            job=job,
            jobs=model.jobs,
            router=self.router,
            watch_policy=self.watch_policy,
            lease=lease,
            metrics=model.metrics,
            trace=request_trace,
        )

    async def _admit(
        self,
        request_id: str,
        caller: Caller,
        parent: Context,
        validate: Callable[[], ServedModel],
        tokenize: Callable[[ServedModel], Awaitable[T]],
    ) -> tuple[ServedModel, T, Lease, RequestTrace]:
        """The steps every request takes, each a span of its trace: validate, take a lease (before
        tokenizing: under a flood, refusing must cost nothing), tokenize. The trace ends here if
        the request is refused."""
        request_trace = RequestTrace.start(self.tracer, parent, **{"conveyor.caller": caller.name})
        try:
            with request_trace.child("validate"):
                check_request_id(request_id)
                model = validate()
                request_trace.root.set_attribute("conveyor.model", model.name)
                lease = self.load_limits.admit(caller.name, model.jobs.num_queued_jobs)
            try:
                with request_trace.child("tokenize"):
                    tokens = await tokenize(model)
            except BaseException:
                lease.release()
                raise
        except GatewayError as error:
            request_trace.end(error.message)
            raise
        except BaseException:
            request_trace.end("failed")
            raise
        return model, tokens, lease, request_trace

    def _job(self, timeout_s: float | None, request_trace: RequestTrace, **fields: object) -> jobs_pb2.Job:
        """A new job, carrying the request's trace context so the worker's spans join its trace."""
        now_ms = int(time.time() * 1000)
        job = jobs_pb2.Job(
            request_id=uuid.uuid4().hex,
            gateway_id=self.gateway_id,
            arrival_unix_ms=now_ms,
            deadline_unix_ms=now_ms + int(timeout_s * 1000) if timeout_s is not None else 0,
            **fields,  # type: ignore[arg-type]
        )
        request_trace.root.set_attribute("conveyor.request_id", job.request_id)
        request_trace.carry(job.trace_context)  # type: ignore[arg-type]
        return job

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
                return await loop.run_in_executor(self.executor, tokenizer.encode_chat, messages)
            except ValueError as error:
                raise GatewayError(f"chat: {error}", grpc.StatusCode.INVALID_ARGUMENT) from error
        return await loop.run_in_executor(self.executor, tokenizer.encode, request.prompt)
