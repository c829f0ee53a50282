"""JobSpans: a job's time on this worker, as spans in the trace its gateway started."""

import time
from dataclasses import dataclass

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Status, StatusCode, Tracer

from protos import jobs_pb2
from telemetry.logs import request_fields
from telemetry.tracing import extract


@dataclass(slots=True)
class JobSpans:
    """Times are recorded as the job runs and turned into spans when it ends: queue (from the
    gateway's acceptance to this worker taking it), prefill (to the first token it produced),
    decode (to the end)."""

    parent: Context
    arrival_unix_ms: int
    received_unix_ms: int
    first_token_ns: int = 0

    @classmethod
    def of(cls, job: jobs_pb2.Job, received_unix_ms: int) -> "JobSpans":
        return cls(
            extract(dict(job.trace_context)), job.arrival_unix_ms or received_unix_ms, received_unix_ms
        )

    def log_fields(self, request_id: str) -> dict[str, str]:
        """`extra=` for a log line about this job: its request id and the trace it belongs to."""
        return request_fields(request_id, trace.get_current_span(self.parent))

    def token_produced(self) -> None:
        self.first_token_ns = self.first_token_ns or time.time_ns()

    def end(self, tracer: Tracer, worker_id: str, error: str | None = None) -> None:
        now = time.time_ns()
        received = self.received_unix_ms * 1_000_000
        first = self.first_token_ns or now
        phases = (
            ("worker.queue", self.arrival_unix_ms * 1_000_000, received),
            ("worker.prefill", received, first),
            ("worker.decode", first, now),
        )
        for name, start, end in phases:
            span = tracer.start_span(
                name, context=self.parent, start_time=start, attributes={"conveyor.worker": worker_id}
            )
            if error is not None and name == "worker.decode":
                span.set_status(Status(StatusCode.ERROR, error))
            span.end(end_time=max(end, start))
