"""JobQueue: the gateway's writes to Redis — jobs and cancels — and what it reads of the fleet."""

import logging

import redis.asyncio as aioredis
from google.protobuf.message import DecodeError
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

    async def heartbeat(self, status: jobs_pb2.GatewayStatus, ttl_s: float) -> None:
        """Workers drop the jobs of a gateway whose heartbeat expired: nobody would hear the answer."""
        key = self.keys.gateway(status.gateway_id)
        await self.client.set(key, status.SerializeToString(), px=int(ttl_s * 1000))

    async def remove_heartbeat(self, gateway_id: str) -> None:
        await self.client.delete(self.keys.gateway(gateway_id))

    async def queued_jobs(self) -> int:
        """Entries in the request stream: workers delete each job when they acknowledge it."""
        return int(await self.client.xlen(self.requests_key))

    async def worker_statuses(self) -> list[jobs_pb2.WorkerStatus]:
        """Heartbeats of the workers that are alive now (their keys have not expired)."""
        statuses = []
        async for key in self.client.scan_iter(match=self.keys.worker_pattern, count=100):
            payload = await self.client.hget(key, "status")
            try:
                statuses.append(jobs_pb2.WorkerStatus.FromString(payload or b""))
            except DecodeError:
                logger.warning("unreadable worker status under %s ignored", key)
        return statuses
