"""JobRunner: what the serving loop needs from an engine, so one loop (Redis, claims, fencing,
cancels, deadlines, drain) serves a generation model and an embedding model alike."""

from typing import Protocol

from protos import jobs_pb2


class JobRunner(Protocol):
    @property
    def max_jobs(self) -> int:
        """Jobs held at once: the loop reads no more, so idle workers in the group get the rest."""
        ...

    @property
    def max_context(self) -> int:
        """Tokens one input may hold, for the heartbeat (gateways check requests against it)."""
        ...

    def block_ms(self, idle_block_ms: int) -> int | None:
        """How long the loop may wait for Redis now: None while work is due."""
        ...

    def problem(self, job: jobs_pb2.Job) -> str | None:
        """Why this job can never run here (it is buried), or None."""
        ...

    def start(self, job: jobs_pb2.Job, delivered_token_ids: tuple[int, ...]) -> None:
        """Take the job (a resumed one with the tokens its client has); ValueError refuses it."""
        ...

    def abort(self, request_id: str) -> None: ...

    def step(self) -> list[jobs_pb2.TokenChunk]:
        """Run what is due; the chunks it produced (a last chunk has a finish reason)."""
        ...

    def load(self, status: jobs_pb2.WorkerStatus) -> None:
        """Fill the heartbeat's load fields."""
        ...

    def refresh_metrics(self) -> None: ...

    def stats_line(self) -> str:
        """The periodic log line."""
        ...
