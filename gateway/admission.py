"""Admission: a GenerateRequest checked, tokenized off the event loop, and turned into a Job."""

import asyncio
import json
import time
import uuid
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

import grpc
from opentelemetry.context import Context
from opentelemetry.trace import Tracer

from gateway.auth import Principal
from gateway.errors import GatewayError
from gateway.fleet import FleetMonitor
from gateway.generation import Generation
from gateway.job_queue import JobQueue
from gateway.job_watch import WatchPolicy
from gateway.load_limits import LoadLimits
from gateway.metrics import GatewayMetrics
from gateway.request_trace import RequestTrace
from gateway.response_router import ResponseRouter
from gateway.validation import Limits, check_input, check_prompt_length, check_request_id, resolve_sampling
from protos import inference_pb2, jobs_pb2
from tokenization import TextStream, Tokenizer


def configured_max_context(model_dir: Path, override: int | None) -> int:
    """The context limit from the checkpoint's config.json, until live workers report theirs."""
    config = json.loads((model_dir / "config.json").read_text())
    limit = int(config.get("max_position_embeddings", 2048))
    return min(limit, override) if override else limit


@dataclass(frozen=True, slots=True)
class Caller:
    """Who sent a request: a name for limits and logs, and the API key's grants if keys are on."""

    name: str
    principal: Principal | None


class Admission:
    """Everything between a request arriving and its job being ready to submit."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        executor: Executor,
        jobs: JobQueue,
        router: ResponseRouter,
        fleet: FleetMonitor,
        gateway_id: str,
        model_name: str,
        default_max_tokens: int,
        watch_policy: WatchPolicy,
        load_limits: LoadLimits,
        metrics: GatewayMetrics,
        tracer: Tracer,
    ):
        self.tokenizer = tokenizer
        self.executor = executor
        self.jobs = jobs
        self.router = router
        self.fleet = fleet
        self.gateway_id = gateway_id
        self.model_name = model_name
        self.default_max_tokens = default_max_tokens
        self.watch_policy = watch_policy
        self.load_limits = load_limits
        self.metrics = metrics
        self.tracer = tracer

    @property
    def limits(self) -> Limits:
        return Limits(self.tokenizer.vocab_size, self.fleet.max_context, self.default_max_tokens)

    def check_model(self, model: str, caller: Caller) -> None:
        if model and model != self.model_name:
            raise GatewayError(
                f"model: {model!r} is not served here (served: {self.model_name!r})",
                grpc.StatusCode.NOT_FOUND,
            )
        if caller.principal is not None:
            caller.principal.check_model(model or self.model_name)

    async def accept(
        self,
        request: inference_pb2.GenerateRequest,
        timeout_s: float | None,
        caller: Caller,
        parent: Context,
    ) -> Generation:
        """Validate, tokenize and take a lease within the load limits; raises GatewayError with the
        status to answer. The request's trace starts here, under `parent` (the caller's, if any)."""
        request_trace = RequestTrace.start(
            self.tracer, parent, **{"conveyor.model": self.model_name, "conveyor.caller": caller.name}
        )
        try:
            with request_trace.child("validate"):
                limits = self.limits
                check_request_id(request.request_id)
                self.check_model(request.model, caller)
                check_input(request, limits)
                sampling = resolve_sampling(request.sampling, limits)
                # Before tokenizing: under a flood, refusing must cost nothing.
                lease = self.load_limits.admit(caller.name, self.jobs.num_queued_jobs)
            try:
                with request_trace.child("tokenize"):
                    token_ids = await self.tokenize(request)
                    check_prompt_length(len(token_ids), limits)
            except BaseException:
                lease.release()
                raise
        except GatewayError as error:
            request_trace.end(error.message)
            raise
        except BaseException:
            request_trace.end("failed")
            raise
        now_ms = int(time.time() * 1000)
        job = jobs_pb2.Job(
            request_id=uuid.uuid4().hex,
            gateway_id=self.gateway_id,
            prompt_token_ids=token_ids,
            sampling=sampling,
            priority=request.priority,
            arrival_unix_ms=now_ms,
            deadline_unix_ms=now_ms + int(timeout_s * 1000) if timeout_s is not None else 0,
        )
        request_trace.root.set_attribute("conveyor.request_id", job.request_id)
        request_trace.carry(job.trace_context)  # type: ignore[arg-type]
        return Generation(
            client_request_id=request.request_id or job.request_id,
            job=job,
            text_stream=TextStream(self.tokenizer, tuple(sampling.stop)),
            jobs=self.jobs,
            router=self.router,
            executor=self.executor,
            watch_policy=self.watch_policy,
            lease=lease,
            metrics=self.metrics,
            trace=request_trace,
        )

    async def tokenize(
        self, request: inference_pb2.GenerateRequest | inference_pb2.TokenizeRequest
    ) -> list[int]:
        """Token ids of the request's input; the tokenizer runs in a thread, not on the event loop."""
        kind = request.WhichOneof("input")
        if kind == "token_ids":
            return list(request.token_ids.ids)  # type: ignore[union-attr]
        loop = asyncio.get_running_loop()
        if kind == "chat":
            messages = [{"role": m.role, "content": m.content} for m in request.chat.messages]
            try:
                return await loop.run_in_executor(self.executor, self.tokenizer.encode_chat, messages)
            except ValueError as error:
                raise GatewayError(f"chat: {error}", grpc.StatusCode.INVALID_ARGUMENT) from error
        return await loop.run_in_executor(self.executor, self.tokenizer.encode, request.prompt)
