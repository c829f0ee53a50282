"""GatewayQueues: the gateway's side of the Redis layout (`protos/redis_layout.py`), every Redis
call a gateway makes — jobs and cancels out, its own response streams in (one reader task a model,
each routing a chunk to the call waiting for it), its heartbeat out and the workers' heartbeats in."""

import asyncio
import contextlib
import logging
import time

import redis.asyncio as aioredis
from google.protobuf.message import DecodeError
from prometheus_client import Histogram
from redis.exceptions import RedisError

from gateway.background import stop_task
from gateway.errors import Unavailable
from protos import jobs_pb2
from protos.redis_layout import CANCEL_MAXLEN, FIELD, WORKER_STATUS_FIELD, StreamKeys

logger = logging.getLogger(__name__)

_BLOCK_MS = 1000
_RETRY_S = 0.5


class GatewayQueues:
    def __init__(
        self,
        client: aioredis.Redis | aioredis.RedisCluster,
        keys: StreamKeys,
        gateway_id: str,
        models: list[str],
        transit: Histogram,
    ):
        self.client = client
        self.transit = transit  # observes how long each batch took from its worker to here
        self.keys = keys
        self.gateway_id = gateway_id
        self.responses_keys = [keys.responses(model, gateway_id) for model in models]
        self._queues: dict[str, asyncio.Queue[jobs_pb2.TokenChunk]] = {}
        self._submitted: dict[str, int] = {}  # jobs this gateway has submitted, per model
        self._readers: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self._readers = [
            asyncio.create_task(self._read_responses(key), name=f"responses {key}")
            for key in self.responses_keys
        ]

    async def stop(self) -> None:
        """Stop reading, and drop this gateway's response streams and heartbeat (a key at a time:
        in a cluster they live in different slots)."""
        for reader in self._readers:
            await stop_task(reader)
        with contextlib.suppress(RedisError):
            for key in [*self.responses_keys, self.keys.gateway(self.gateway_id)]:
                await self.client.delete(key)

    def register(self, request_id: str) -> asyncio.Queue[jobs_pb2.TokenChunk]:
        """Where the chunks of a job go from now on; `unregister` when the call ends."""
        queue: asyncio.Queue[jobs_pb2.TokenChunk] = asyncio.Queue()
        self._queues[request_id] = queue
        return queue

    def unregister(self, request_id: str) -> None:
        self._queues.pop(request_id, None)

    async def submit(self, model: str, job: jobs_pb2.Job) -> bytes:
        """Queue the job on its model's stream; returns its entry id."""
        try:
            entry_id: bytes = await self.client.xadd(
                self.keys.requests(model), {FIELD: job.SerializeToString()}
            )
        except RedisError as error:
            raise Unavailable(f"the job queue is unreachable: {error}") from error
        self._submitted[model] = self._submitted.get(model, 0) + 1
        return entry_id

    def submitted(self, model: str) -> int:
        """Jobs this gateway has submitted for the model since it started."""
        return self._submitted.get(model, 0)

    async def is_pending(self, model: str, entry_id: bytes) -> bool:
        """Whether the job is still queued or running (an acknowledged job leaves its stream)."""
        return bool(await self.client.xrange(self.keys.requests(model), entry_id, entry_id, count=1))

    async def cancel(
        self, model: str, request_id: str, stopped: bool = False, choice_index: int | None = None
    ) -> None:
        """Tell every worker to drop the request (`stopped`: it is answered, its job done; with
        `choice_index`, only that choice is); best effort (the job may already have ended)."""
        cancel = jobs_pb2.Cancel(request_id=request_id, stopped=stopped)
        if choice_index is not None:
            cancel.choice_index = choice_index
        payload = cancel.SerializeToString()
        try:
            await self.client.xadd(
                self.keys.cancel(model), {FIELD: payload}, maxlen=CANCEL_MAXLEN, approximate=True
            )
        except RedisError as error:
            logger.warning("cancel of request_id=%s not published: %s", request_id, error)

    async def queued_jobs(self, model: str) -> int:
        """Jobs queued or running for a model: its stream's length (acknowledged jobs leave it)."""
        return int(await self.client.xlen(self.keys.requests(model)))

    async def heartbeat(self, status: jobs_pb2.GatewayStatus, ttl_s: float) -> None:
        """Workers drop the jobs of a gateway whose heartbeat expired: nobody would hear the answer."""
        await self.client.set(
            self.keys.gateway(self.gateway_id), status.SerializeToString(), px=int(ttl_s * 1000)
        )

    async def worker_statuses(self) -> list[jobs_pb2.WorkerStatus]:
        """Heartbeats of the workers that are alive now (their keys have not expired)."""
        statuses = []
        async for key in self.client.scan_iter(match=self.keys.worker_pattern, count=100):
            payload = await self.client.hget(key, WORKER_STATUS_FIELD)
            try:
                statuses.append(jobs_pb2.WorkerStatus.FromString(payload or b""))
            except DecodeError:
                logger.warning("unreadable worker status under %s ignored", key)
        return statuses

    async def _read_responses(self, key: str) -> None:
        cursor = b"0-0"
        while True:
            try:
                reply = await self.client.xread({key: cursor}, count=1000, block=_BLOCK_MS)
            except RedisError as error:
                logger.warning("response stream read failed, retrying: %s", error)
                await asyncio.sleep(_RETRY_S)
                continue
            for _stream, entries in reply or []:
                for entry_id, fields in entries:
                    cursor = entry_id
                    try:
                        batch = jobs_pb2.TokenBatch.FromString(fields.get(FIELD, b""))
                    except DecodeError:
                        logger.error("unreadable entry %s on %s skipped", entry_id, key)
                        continue
                    if batch.published_unix_us:
                        self.transit.observe(max(time.time() - batch.published_unix_us / 1e6, 0.0))
                    for chunk in batch.chunks:
                        queue = self._queues.get(chunk.request_id)
                        if queue is not None:  # else the call already ended (cancelled, client gone)
                            queue.put_nowait(chunk)
