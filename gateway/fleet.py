"""FleetMonitor: watches Redis and the workers' heartbeats; drives gRPC health and the model's limits."""

import asyncio
import contextlib
import logging

from grpc_health.v1 import health, health_pb2
from redis.exceptions import RedisError

from gateway.job_queue import JobQueue

logger = logging.getLogger(__name__)

SERVICE_NAME = "conveyor.v1.Inference"


class FleetMonitor:
    """SERVING only while Redis answers and at least one live worker accepts jobs for the model.

    Each refresh also renews this gateway's heartbeat, which keeps workers running its jobs.
    """

    def __init__(
        self,
        jobs: JobQueue,
        health_servicer: health.aio.HealthServicer,
        model_name: str,
        fallback_max_context: int,
        gateway_id: str,
        interval_s: float,
        heartbeat_ttl_s: float,
    ):
        self.jobs = jobs
        self.gateway_id = gateway_id
        self.heartbeat_ttl_s = heartbeat_ttl_s
        self.health_servicer = health_servicer
        self.model_name = model_name
        self.max_context = fallback_max_context  # the smallest context among live workers, once known
        self.num_workers = 0
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._run(), name="fleet-monitor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(RedisError):
            await self.jobs.remove_heartbeat(self.gateway_id)

    async def refresh(self) -> None:
        serving = False
        try:
            await self.jobs.heartbeat(self.gateway_id, self.heartbeat_ttl_s)
            statuses = [s for s in await self.jobs.worker_statuses() if s.model == self.model_name]
            self.jobs.num_queued_jobs = await self.jobs.queued_jobs()
            self.num_workers = len(statuses)
            if statuses:
                self.max_context = min(s.max_context for s in statuses)
            serving = any(s.accepting for s in statuses)
        except RedisError as error:
            logger.warning("Redis unreachable: %s", error)
            self.num_workers = 0
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", SERVICE_NAME):
            await self.health_servicer.set(service, status)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.refresh()
