"""FleetMonitor: watches Redis and the workers' heartbeats; drives gRPC health and the model's limits."""

import asyncio
import contextlib
import logging
import time

from grpc_health.v1 import health, health_pb2
from redis.exceptions import RedisError

from gateway.job_queue import JobQueue
from gateway.load_limits import LoadLimits
from protos import jobs_pb2
from protos.probes import LIVENESS, READINESS

logger = logging.getLogger(__name__)

SERVICE_NAME = "conveyor.v1.Inference"
# For Kubernetes probes. Liveness: the server answers at all. Readiness: Redis answers and the
# gateway is not shutting down; it does not wait for a worker, so jobs can queue for a fleet that
# scales up from zero on them. "" and SERVICE_NAME say whether a worker serves the model now.
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


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
        load_limits: LoadLimits,
        metrics_url: str,
    ):
        self.jobs = jobs
        self.load_limits = load_limits
        self.metrics_url = metrics_url
        self.gateway_id = gateway_id
        self.heartbeat_ttl_s = heartbeat_ttl_s
        self.health_servicer = health_servicer
        self.model_name = model_name
        self.max_context = fallback_max_context  # the smallest context among live workers, once known
        self.num_workers = 0
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    async def start(self) -> None:
        await self.health_servicer.set(LIVENESS, _SERVING)
        await self.refresh()
        self._task = asyncio.create_task(self._run(), name="fleet-monitor")

    async def close(self) -> None:
        """Shutting down: not ready, not serving, from now on (refreshes no longer change that)."""
        self._closing = True
        for service in ("", SERVICE_NAME, READINESS):
            await self.health_servicer.set(service, _NOT_SERVING)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(RedisError):
            await self.jobs.remove_heartbeat(self.gateway_id)

    async def refresh(self) -> None:
        serving = reachable = False
        try:
            heartbeat = jobs_pb2.GatewayStatus(
                gateway_id=self.gateway_id,
                model=self.model_name,
                in_flight=self.load_limits.in_flight,
                metrics_url=self.metrics_url,
                updated_unix_ms=int(time.time() * 1000),
            )
            await self.jobs.heartbeat(heartbeat, self.heartbeat_ttl_s)
            statuses = [s for s in await self.jobs.worker_statuses() if s.model == self.model_name]
            self.jobs.num_queued_jobs = await self.jobs.queued_jobs()
            self.num_workers = len(statuses)
            if statuses:
                self.max_context = min(s.max_context for s in statuses)
            serving = any(s.accepting for s in statuses)
            reachable = True
        except RedisError as error:
            logger.warning("Redis unreachable: %s", error)
            self.num_workers = 0
        if self._closing:
            return
        for service in ("", SERVICE_NAME):
            await self.health_servicer.set(service, _SERVING if serving else _NOT_SERVING)
        await self.health_servicer.set(READINESS, _SERVING if reachable else _NOT_SERVING)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.refresh()
