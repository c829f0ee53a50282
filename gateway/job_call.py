"""JobCall: one accepted call and its job — the one path both call kinds run: submit the job, read
its chunks back (watching a quiet one), cancel it if the call leaves early, and at the end one log
line, the end of the trace and the release of the lease."""

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from gateway.call_context import CallContext
from gateway.errors import GatewayError
from gateway.job_watch import JobWatch
from gateway.load_limits import Lease
from gateway.metrics import ModelMetrics
from gateway.request_trace import RequestTrace
from gateway.served_models import ServedModel
from protos import inference_pb2, jobs_pb2
from telemetry.logs import request_fields

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class JobCall:
    context: CallContext
    noun: str  # "generation" or "embedding", for the log line
    client_request_id: str
    model: ServedModel
    job: jobs_pb2.Job
    lease: Lease  # the call's place within the load limits
    trace: RequestTrace
    api: str  # the front it came through: "grpc" or "openai"
    accepted_s: float = field(default_factory=time.time)
    _outcome: str | None = "ended early"  # what the log and the trace record; None: finished

    async def stop_choice(self, choice_index: int) -> None:
        """One choice has its answer (a stop string matched in it): its worker ends it; the others go on."""
        await self.context.queues.cancel(self.model.name, self.job.request_id, True, choice_index)

    @property
    def metrics(self) -> ModelMetrics:
        return self.model.metrics[self.api]

    def abandon(self) -> None:
        """The call ends before its job was submitted (another part of its request was refused):
        its lease goes back and its trace ends."""
        self._outcome = "not submitted"
        self._end("nothing submitted")

    def finish(self) -> None:
        """The call has its answer (its last frame is out): leaving now is no early exit, even
        before the job's last chunk (a stop string matched), when the job is stopped."""
        self._outcome = None

    def fail(self, error: GatewayError) -> None:
        """The call fails on a chunk that came whole (a worker's answer that does not fit)."""
        self._outcome = error.message

    async def chunks(self, describe: Callable[[], str]) -> AsyncIterator[jobs_pb2.TokenChunk]:
        """The job's chunks up to its last (every choice's last, when it has n); a failure chunk
        raises its status, a lost job raises UNAVAILABLE. `describe` says, for the final log line,
        what the call did. Use under `contextlib.aclosing`."""
        queues, policy = self.context.queues, self.context.watch_policy
        request_id = self.job.request_id
        queue = queues.register(request_id)
        open_choices = set(range(max(self.job.sampling.n, 1)))
        last_seen = False
        try:
            watch = JobWatch(queues, self.model.name, await queues.submit(self.model.name, self.job), policy)
            while not last_seen:
                try:  # not asyncio.wait_for: Python 3.11's drops a cancel that comes with a chunk
                    async with asyncio.timeout(policy.interval_s):
                        chunk = await queue.get()
                except TimeoutError:
                    await watch.check()
                    continue
                if chunk.finish_reason == inference_pb2.FINISH_REASON_ERROR:
                    last_seen = True
                    raise GatewayError.of_failure(chunk)
                if chunk.finish_reason != inference_pb2.FINISH_REASON_UNSPECIFIED:
                    open_choices.discard(chunk.choice_index)
                    last_seen = not open_choices
                yield chunk
            self._outcome = None
        except GatewayError as error:
            self._outcome = error.message
            raise
        finally:
            queues.unregister(request_id)
            try:
                if not last_seen:  # a finished call stops its job, one left early cancels it
                    await asyncio.shield(
                        queues.cancel(self.model.name, request_id, stopped=self._outcome is None)
                    )
            finally:
                self._end(describe())

    def _end(self, description: str) -> None:
        """The log line, the trace's end and the lease's release: once per call, whatever happened."""
        logger.info(
            "%s %s after %.3f s: %s; client's id %s",
            self.noun,
            self._outcome or "finished",
            time.time() - self.accepted_s,
            description,
            self.client_request_id,
            extra=request_fields(self.job.request_id, self.trace.root),
        )
        self.trace.end(self._outcome)
        self.lease.release()
