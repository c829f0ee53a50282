"""EmbeddingCall: one accepted Embed request — its job submitted and its vectors awaited."""

import logging
import time
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

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class EmbeddingCall:
    """The worker answers with one chunk that holds every vector; leaving before it cancels the job."""

    client_request_id: str
    model_name: str
    job: jobs_pb2.Job
    jobs: JobQueue
    router: ResponseRouter
    watch_policy: WatchPolicy
    lease: Lease  # this call's place within the load limits, released when it ends
    metrics: ModelMetrics
    trace: RequestTrace  # ended when the call ends
    accepted_s: float = field(default_factory=time.time)

    async def run(self) -> inference_pb2.EmbedResponse:
        outcome: str | None = "ended early"
        num_inputs = len(self.job.embed.inputs)
        last = jobs_pb2.TokenChunk()
        try:
            async with aclosing(job_chunks(self.job, self.jobs, self.router, self.watch_policy)) as chunks:
                async for chunk in chunks:
                    last = chunk
            if len(last.embeddings) != num_inputs:
                returned = len(last.embeddings)
                raise GatewayError(f"a worker returned {returned} vectors for {num_inputs} inputs")
            now = time.time()
            started_s = last.started_unix_ms / 1000 if last.started_unix_ms else now
            response = inference_pb2.EmbedResponse(
                request_id=self.client_request_id,
                model=self.model_name,
                embeddings=last.embeddings,
                usage=inference_pb2.Usage(prompt_tokens=last.prompt_tokens),
                timings=inference_pb2.Timings(
                    queued_s=max(started_s - self.accepted_s, 0.0), total_s=now - self.accepted_s
                ),
            )
            self.metrics.embedded(response)
            self.trace.interval("queue", self.accepted_s, started_s)
            self.trace.interval("embed", started_s, now)
            outcome = None
            return response
        except GatewayError as error:
            outcome = error.message
            raise
        finally:
            logger.info(
                "embedding %s after %.3f s: %d inputs, %d tokens; client's id %s",
                outcome or "finished",
                time.time() - self.accepted_s,
                num_inputs,
                sum(len(item.ids) for item in self.job.embed.inputs),
                self.client_request_id,
                extra=request_fields(self.job.request_id, self.trace.root),
            )
            self.trace.end(outcome)
            self.lease.release()
