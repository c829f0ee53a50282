"""Backend: what the serving loop needs from a model, so one loop (Redis, claims, fencing, cancels,
deadlines, drain) serves a generation model and an embedding model alike. Two implementations:
`GenerationBackend` (scheduler and decoder) and `EmbeddingBackend` (batcher and encoder)."""

from typing import Protocol

from protos import jobs_pb2
from protos.redis_layout import ChoiceProgress
from worker.job_check import JobLimits


class Backend(Protocol):
    @property
    def limits(self) -> JobLimits:
        """What jobs it takes; the loop refuses the others (see `job_check.refusal`)."""
        ...

    @property
    def max_jobs(self) -> int:
        """Jobs held at once: the loop reads no more, so idle workers in the group get the rest."""
        ...

    def block_ms(self, idle_block_ms: int) -> int | None:
        """How long the loop may wait for Redis now: None while work is due."""
        ...

    def start(self, job: jobs_pb2.Job, progress: tuple[ChoiceProgress, ...]) -> None:
        """Take a job that passed the refusal check (a resumed one with, by choice, what its client
        has; () for a new one)."""
        ...

    def abort(self, request_id: str) -> None:
        """Drop a job now and free what it holds."""
        ...

    def finish_choice(self, request_id: str, choice_index: int) -> None:
        """End one choice of a job now (its gateway matched a stop string in it); no chunk follows."""
        ...

    def step(self) -> list[jobs_pb2.TokenChunk]:
        """Run what is due and observe it in the metrics; the chunks it produced (a last chunk has
        a finish reason)."""
        ...

    def load(self, status: jobs_pb2.WorkerStatus) -> None:
        """Fill the heartbeat's load fields, and what the model is and computes in."""
        ...

    def refresh_metrics(self) -> None: ...

    def stats_line(self) -> str:
        """The periodic log line."""
        ...
