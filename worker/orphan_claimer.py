"""OrphanClaimer: takes over the pending jobs of workers whose heartbeat expired.

Not XAUTOCLAIM: a pending entry's idle time counts from its delivery, so a live worker's long
generation looks exactly as idle as a dead worker's. Only consumers whose heartbeat key is gone
are claimed from (XPENDING by consumer, then XCLAIM), and XPENDING's delivery count is what finds
a poison job: one that has been handed to `max_attempts` workers, all of which died holding it.
XCLAIM's minimum idle time keeps two claimers from taking the same entry: the first claim resets it.
"""

import dataclasses
import logging

import grpc
from google.protobuf.message import DecodeError

from protos import jobs_pb2
from protos.streams import FIELD, GROUP
from worker.job_codec import error_chunk
from worker.job_stream import Burial, JobStream, ReceivedJob

logger = logging.getLogger(__name__)

_MAX_OWNED_LISTED = 10_000


@dataclasses.dataclass(frozen=True, slots=True)
class _Claimed:
    entry_id: bytes
    fields: dict[bytes, bytes]
    attempts: int  # workers that were handed it before this one

    @property
    def payload(self) -> bytes:
        return self.fields.get(FIELD, b"")


class OrphanClaimer:
    def __init__(self, jobs: JobStream, min_idle_ms: int, max_attempts: int):
        self.jobs = jobs
        self.min_idle_ms = min_idle_ms
        self.max_attempts = max_attempts

    def claim(self, max_jobs: int) -> list[ReceivedJob]:
        """Up to `max_jobs` orphaned jobs, each with the tokens already delivered; poison is buried."""
        claimed: list[_Claimed] = []
        for name, num_pending in self._dead_consumers():
            if num_pending == 0:
                self.jobs.forget_consumer(name)
            elif len(claimed) < max_jobs:
                claimed += self._claim_from(name, max_jobs - len(claimed))
        poison = [c for c in claimed if c.attempts >= self.max_attempts]
        if poison:
            self._bury_poison(poison)
        resumed = self.jobs.with_progress(
            self.jobs.parse_jobs([(c.entry_id, c.fields) for c in claimed if c.attempts < self.max_attempts])
        )
        for job in resumed:
            logger.warning(
                "resuming orphaned request_id=%s after %d delivered tokens",
                job.job.request_id,
                len(job.delivered_token_ids),
            )
        return resumed

    def _dead_consumers(self) -> list[tuple[str, int]]:
        """(name, pending entries) of the group's consumers that have no heartbeat."""
        client = self.jobs.client
        consumers = [
            (c["name"].decode(), int(c["pending"]))
            for c in client.xinfo_consumers(self.jobs.requests_key, GROUP)
            if c["name"].decode() != self.jobs.worker_id
        ]
        if not consumers:
            return []
        pipe = client.pipeline(transaction=False)
        for name, _ in consumers:
            pipe.exists(self.jobs.keys.worker(name))
        return [c for c, alive in zip(consumers, pipe.execute(), strict=True) if not alive]

    def _claim_from(self, consumer: str, count: int) -> list[_Claimed]:
        client, key = self.jobs.client, self.jobs.requests_key
        pending = client.xpending_range(key, GROUP, "-", "+", count, consumername=consumer)
        attempts = {p["message_id"]: int(p["times_delivered"]) for p in pending}
        if not attempts:
            return []
        reply = client.xclaim(key, GROUP, self.jobs.worker_id, self.min_idle_ms, list(attempts))
        claimed = [_Claimed(e, f, attempts[e]) for e, f in reply if e is not None]
        if len(claimed) < len(reply):
            self._ack_vanished(set(attempts) - {c.entry_id for c in claimed})
        return claimed

    def _ack_vanished(self, entry_ids: set[bytes]) -> None:
        """Claimed entries whose job was deleted from the stream (XCLAIM names them nil): nothing to
        run, so acknowledge the ones now ours rather than hold them pending for ever."""
        client, key = self.jobs.client, self.jobs.requests_key
        owned = client.xpending_range(
            key, GROUP, "-", "+", _MAX_OWNED_LISTED, consumername=self.jobs.worker_id
        )
        vanished = [p["message_id"] for p in owned if p["message_id"] in entry_ids]
        if vanished:
            client.xack(key, GROUP, *vanished)

    def _bury_poison(self, poison: list[_Claimed]) -> None:
        """To the dead stream, and an ERROR to the client, for jobs that outlived their workers."""
        batches: dict[str, list[jobs_pb2.TokenChunk]] = {}
        finished: list[tuple[str, bytes]] = []
        burials: list[Burial] = []
        for item in poison:
            reason = f"{item.attempts} worker{'s' if item.attempts != 1 else ''} died running it"
            burials.append(Burial(item.entry_id, item.payload, reason))
            try:
                job = jobs_pb2.Job.FromString(item.payload)
            except DecodeError:
                continue
            logger.error("poison request_id=%s buried: %s", job.request_id, reason)
            chunk = error_chunk(
                job.request_id, grpc.StatusCode.INTERNAL.value[0], f"the job failed: {reason}"
            )
            batches.setdefault(job.gateway_id, []).append(chunk)
            finished.append((job.request_id, item.entry_id))
        self.jobs.publish(batches, finished, burials)
