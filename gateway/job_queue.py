"""JobQueue: one model's request stream as the gateway sees it — jobs in, cancels out."""

import logging

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.errors import Unavailable
from protos import jobs_pb2
from protos.streams import CANCEL_MAXLEN, FIELD, StreamKeys

logger = logging.getLogger(__name__)


class JobQueue:
    """XADDs jobs to the model's request stream and cancels to the cancel stream."""

    def __init__(self, client: aioredis.Redis, keys: StreamKeys, model: str):
        self.client = client
        self.keys = keys
        self.requests_key = keys.requests(model)
        self.num_queued_jobs = 0  # refreshed by the fleet monitor: jobs not yet acknowledged

    async def submit(self, job: jobs_pb2.Job) -> bytes:
        """Queue the job; returns its entry id."""
        try:
            entry_id: bytes = await self.client.xadd(self.requests_key, {FIELD: job.SerializeToString()})
        except RedisError as error:
            raise Unavailable(f"the job queue is unreachable: {error}") from error
        self.num_queued_jobs += 1
        return entry_id

    async def is_pending(self, entry_id: bytes) -> bool:
        """Whether the job is still queued or running: workers delete it when they acknowledge it."""
        return bool(await self.client.xrange(self.requests_key, entry_id, entry_id, count=1))

    async def cancel(self, request_id: str) -> None:
        """Tell every worker to drop the request; best effort (the job may already be done)."""
        payload = jobs_pb2.Cancel(request_id=request_id).SerializeToString()
        try:
            await self.client.xadd(self.keys.cancel, {FIELD: payload}, maxlen=CANCEL_MAXLEN, approximate=True)
        except RedisError as error:
            logger.warning("cancel of request_id=%s not published: %s", request_id, error)

    async def queued_jobs(self) -> int:
        """Entries in the request stream: workers delete each job when they acknowledge it."""
        return int(await self.client.xlen(self.requests_key))
