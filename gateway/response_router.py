"""ResponseRouter: the one task that reads this gateway's response stream and routes each chunk."""

import asyncio
import contextlib
import logging

import redis.asyncio as aioredis
from google.protobuf.message import DecodeError
from redis.exceptions import RedisError

from gateway.background import stop_task
from protos import jobs_pb2
from protos.streams import FIELD

logger = logging.getLogger(__name__)

_BLOCK_MS = 1000
_RETRY_S = 0.5


class ResponseRouter:
    """XREADs `{ns}:responses:{gateway_id}` and puts each chunk on its request's queue."""

    def __init__(self, client: aioredis.Redis, stream_key: str):
        self.client = client
        self.stream_key = stream_key
        self._queues: dict[str, asyncio.Queue[jobs_pb2.TokenChunk]] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="response-router")

    async def stop(self) -> None:
        if self._task is not None:
            await stop_task(self._task)
        with contextlib.suppress(RedisError):
            await self.client.delete(self.stream_key)

    def register(self, request_id: str) -> asyncio.Queue[jobs_pb2.TokenChunk]:
        queue: asyncio.Queue[jobs_pb2.TokenChunk] = asyncio.Queue()
        self._queues[request_id] = queue
        return queue

    def unregister(self, request_id: str) -> None:
        self._queues.pop(request_id, None)

    async def _run(self) -> None:
        cursor = b"0-0"
        while True:
            try:
                reply = await self.client.xread({self.stream_key: cursor}, count=1000, block=_BLOCK_MS)
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
                        logger.error("unreadable entry %s on %s skipped", entry_id, self.stream_key)
                        continue
                    self._route(batch)

    def _route(self, batch: jobs_pb2.TokenBatch) -> None:
        for chunk in batch.chunks:
            queue = self._queues.get(chunk.request_id)
            if queue is not None:  # else the request already ended here (cancelled, client gone)
                queue.put_nowait(chunk)
