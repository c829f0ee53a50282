"""Generation: one accepted request — its job, its chunk queue and its detokenizer — as response frames."""

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from contextlib import aclosing
from dataclasses import dataclass, field

from gateway.errors import GatewayError
from gateway.job_chunks import job_chunks
from gateway.job_queue import JobQueue
from gateway.job_watch import WatchPolicy
from gateway.load_limits import Lease
from gateway.metrics import ModelMetrics
from gateway.request_trace import RequestTrace
from gateway.response_router import ResponseRouter
from protos import inference_pb2, jobs_pb2
from protos.log_format import request_fields
from tokenization import TextStream

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class Generation:
    """Streams one job's chunks back as GenerateResponse frames, each token exactly once.

    Leaving before the last chunk (client cancel, disconnect, deadline) publishes a Cancel.
    """

    client_request_id: str
    job: jobs_pb2.Job
    text_stream: TextStream
    jobs: JobQueue
    router: ResponseRouter
    executor: Executor
    watch_policy: WatchPolicy
    lease: Lease  # this generation's place within the load limits, released when it ends
    metrics: ModelMetrics
    trace: RequestTrace  # ended when the generation ends
    accepted_s: float = field(default_factory=time.time)

    async def run(self) -> AsyncIterator[inference_pb2.GenerateResponse]:
        outcome: str | None = "ended early"  # what the trace records: None for a finished generation
        next_index = 0
        try:
            started_s = first_token_s = last_token_s = 0.0
            async with aclosing(job_chunks(self.job, self.jobs, self.router, self.watch_policy)) as chunks:
                async for chunk in chunks:
                    if chunk.started_unix_ms:
                        started_s = chunk.started_unix_ms / 1000
                    skip = next_index - chunk.index  # a chunk resent after a worker handover
                    token_ids = list(chunk.token_ids)[max(skip, 0) :]
                    finished = chunk.finish_reason != inference_pb2.FINISH_REASON_UNSPECIFIED
                    if not token_ids and not finished:
                        continue
                    now = time.time()
                    if not first_token_s:  # observed now, as vLLM does: a long generation shows at once
                        first_token_s = now
                        self.metrics.ttft.observe(now - self.accepted_s)
                    if token_ids:
                        if last_token_s:  # tokens that came together share the gap since the last ones
                            gap = (now - last_token_s) / len(token_ids)
                            for _ in token_ids:
                                self.metrics.inter_token.observe(gap)
                        last_token_s = now
                    text = await asyncio.get_running_loop().run_in_executor(
                        self.executor, self._text, token_ids, finished
                    )
                    response = inference_pb2.GenerateResponse(
                        request_id=self.client_request_id,
                        text=text,
                        token_ids=token_ids,
                        index=max(chunk.index, next_index),
                        finish_reason=chunk.finish_reason,
                        logprobs=list(chunk.logprobs)[max(skip, 0) :],
                    )
                    next_index = max(chunk.index, next_index) + len(token_ids)
                    if finished:
                        self._finish(
                            response,
                            chunk.prompt_tokens or len(self.job.prompt_token_ids),
                            next_index,
                            started_s,
                            first_token_s,
                        )
                    yield response
            outcome = None
        except GatewayError as error:
            outcome = error.message
            raise
        finally:
            logger.info(
                "generation %s after %.3f s: %d prompt tokens, %d tokens streamed; client's id %s",
                outcome or "finished",
                time.time() - self.accepted_s,
                len(self.job.prompt_token_ids),
                next_index,
                self.client_request_id,
                extra=request_fields(self.job.request_id, self.trace.root),
            )
            self.trace.end(outcome)
            self.lease.release()

    def _text(self, token_ids: list[int], finished: bool) -> str:
        text = self.text_stream.push(token_ids)
        return text + self.text_stream.flush() if finished else text

    def _finish(
        self,
        response: inference_pb2.GenerateResponse,
        prompt_tokens: int,
        completion_tokens: int,
        started_s: float,
        first_token_s: float,
    ) -> None:
        now = time.time()
        response.usage.prompt_tokens = prompt_tokens
        response.usage.completion_tokens = completion_tokens
        response.timings.queued_s = max(started_s - self.accepted_s, 0.0) if started_s else 0.0
        response.timings.time_to_first_token_s = first_token_s - self.accepted_s
        response.timings.total_s = now - self.accepted_s
        self.metrics.finished(response)
        self.trace.interval("queue", self.accepted_s, started_s or first_token_s)
        self.trace.interval("stream", first_token_s, now)
