"""OrphanClaimer: takes over the pending jobs of workers whose heartbeat expired.

Not XAUTOCLAIM: a pending entry's idle time counts from its delivery, so a live worker's long
generation looks exactly as idle as a dead worker's. Only consumers whose heartbeat key is gone
are claimed from (their pending entries, then XCLAIM), and the delivery count is what finds a
poison job: one that has been handed to `max_attempts` workers, all of which died holding it.
XCLAIM's minimum idle time keeps two claimers from taking the same entry: the first claim resets it.
The policy is here; every Redis call is the job stream's.
"""

import logging

from google.protobuf.message import DecodeError

from protos import jobs_pb2
from protos.redis_layout import FIELD
from worker.job_codec import failure_chunk
from worker.job_stream import JobStream, ReceivedJob, num_choices
from worker.outbox import Burial, Outbox

logger = logging.getLogger(__name__)


class OrphanClaimer:
    def __init__(self, jobs: JobStream, min_idle_ms: int, max_attempts: int):
        self.jobs = jobs
        self.min_idle_ms = min_idle_ms
        self.max_attempts = max_attempts

    def claim(self, max_jobs: int, outbox: Outbox) -> list[ReceivedJob]:
        """Up to `max_jobs` orphaned jobs, each with the tokens already delivered. Poison, and
        entries that are no job, go to the outbox."""
        entries: list[tuple[bytes, dict[bytes, bytes] | None]] = []
        for name, num_pending in self.jobs.dead_consumers():
            if num_pending == 0:
                self.jobs.forget_consumer(name)
            elif len(entries) < max_jobs:
                attempts = self.jobs.deliveries(name, max_jobs - len(entries))
                if not attempts:  # another worker claimed them since the consumers were listed
                    continue
                for entry_id, fields in self.jobs.claim(list(attempts), self.min_idle_ms):
                    if fields and attempts[entry_id] >= self.max_attempts:
                        self._bury_poison(entry_id, fields.get(FIELD, b""), attempts[entry_id], outbox)
                    else:
                        entries.append((entry_id, fields))
        resumed = self.jobs.with_progress(self.jobs.parse_jobs(entries, outbox))
        for job in resumed:
            logger.warning(
                "resuming orphaned request_id=%s after %s delivered tokens",
                job.job.request_id,
                "+".join(str(len(choice.token_ids)) for choice in job.progress),
            )
        return resumed

    def _bury_poison(self, entry_id: bytes, payload: bytes, attempts: int, outbox: Outbox) -> None:
        """To the dead stream, and a failure to the client, for a job that outlived its workers."""
        reason = f"{attempts} worker{'s' if attempts != 1 else ''} died running it"
        outbox.bury(Burial(entry_id, payload, reason))
        try:
            job = jobs_pb2.Job.FromString(payload)
        except DecodeError:
            return
        logger.error("poison request_id=%s buried: %s", job.request_id, reason)
        chunk = failure_chunk(job.request_id, jobs_pb2.JOB_FAILURE_WORKERS_DIED, f"the job failed: {reason}")
        outbox.add(job.gateway_id, chunk, entry_id, num_choices(job))
