"""Outbox: what the serving loop has to tell Redis, kept until Redis has taken it."""

from dataclasses import dataclass, field

from protos import jobs_pb2


@dataclass(frozen=True, slots=True)
class Burial:
    """A job that goes to the dead stream instead of running, and why."""

    entry_id: bytes
    payload: bytes
    reason: str


@dataclass(frozen=True, slots=True)
class Ack:
    """A job to acknowledge; with a request id, the progress of its `num_choices` choices is dropped."""

    request_id: str
    entry_id: bytes
    num_choices: int = 1


@dataclass(slots=True)
class Outbox:
    """Chunks per gateway, jobs to acknowledge and jobs to bury, in the order they were produced.

    A publish that fails (Redis unreachable) leaves everything here; the next flush sends it all in
    one script, before anything newer, so no chunk is skipped and none is sent twice.
    """

    batches: dict[str, list[jobs_pb2.TokenChunk]] = field(default_factory=dict)
    finished: list[Ack] = field(default_factory=list)
    buried: list[Burial] = field(default_factory=list)
    # (request id, choice, its tokens so far): choices its gateway ended while the job goes on
    stopped: list[tuple[str, int, int]] = field(default_factory=list)

    def add(
        self, gateway_id: str, chunk: jobs_pb2.TokenChunk, entry_id: bytes | None = None, num_choices: int = 1
    ) -> None:
        """Queue a chunk; with `entry_id`, the chunk ends its job (of `num_choices` choices) and the
        entry is acknowledged."""
        self.batches.setdefault(gateway_id, []).append(chunk)
        if entry_id is not None:
            self.finished.append(Ack(chunk.request_id, entry_id, num_choices))

    def stop_choice(self, request_id: str, choice_index: int, num_tokens: int) -> None:
        """Record in the job's progress that one choice ended (its gateway stopped it): a resume
        does not run it again."""
        self.stopped.append((request_id, choice_index, num_tokens))

    def bury(self, burial: Burial) -> None:
        """To the dead stream, acknowledged (the client's failure chunk goes through `add`)."""
        self.buried.append(burial)

    def acknowledge(self, request_id: str, entry_id: bytes, num_choices: int = 1) -> None:
        """Acknowledge a job without telling its gateway anything (it is gone, or the job vanished
        from the stream); with a request_id, its progress is dropped too."""
        self.finished.append(Ack(request_id, entry_id, num_choices))

    @property
    def is_empty(self) -> bool:
        return not (self.batches or self.finished or self.buried or self.stopped)

    @property
    def entry_ids(self) -> set[bytes]:
        return {ack.entry_id for ack in self.finished} | {b.entry_id for b in self.buried}

    def clear(self) -> None:
        self.batches = {}
        self.finished = []
        self.buried = []
        self.stopped = []
