"""Presence: this gateway's heartbeat in Redis, and the heartbeats of the live workers."""

import logging

import redis.asyncio as aioredis
from google.protobuf.message import DecodeError

from protos import jobs_pb2
from protos.streams import StreamKeys

logger = logging.getLogger(__name__)


class Presence:
    def __init__(self, client: aioredis.Redis, keys: StreamKeys):
        self.client = client
        self.keys = keys

    async def heartbeat(self, status: jobs_pb2.GatewayStatus, ttl_s: float) -> None:
        """Workers drop the jobs of a gateway whose heartbeat expired: nobody would hear the answer."""
        key = self.keys.gateway(status.gateway_id)
        await self.client.set(key, status.SerializeToString(), px=int(ttl_s * 1000))

    async def remove_heartbeat(self, gateway_id: str) -> None:
        await self.client.delete(self.keys.gateway(gateway_id))

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
