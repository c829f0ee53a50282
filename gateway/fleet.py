"""FleetMonitor: watches Redis and the workers' heartbeats; drives gRPC health and the model's limits."""

import asyncio
import contextlib
import logging
import time

from grpc_health.v1 import health, health_pb2
from redis.exceptions import RedisError

from gateway.background import stop_task
from gateway.load_limits import LoadLimits
from gateway.presence import Presence
from gateway.served_models import ServedModels
from protos import jobs_pb2
from protos.probes import LIVENESS, READINESS

logger = logging.getLogger(__name__)

SERVICE_NAME = "conveyor.v1.Inference"
# For Kubernetes probes. Liveness: the server answers at all. Readiness: Redis answers and the
# gateway is not shutting down; it does not wait for a worker, so jobs can queue for a fleet that
# scales up from zero on them. "" and SERVICE_NAME say whether a worker serves each model now.
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class FleetMonitor:
    """SERVING only while Redis answers and every served model has a live worker accepting its jobs.

    Each refresh also renews this gateway's heartbeat, which keeps workers running its jobs, and
    each model's worker count, context limit and queue length.
    """

    def __init__(
        self,
        presence: Presence,
        models: ServedModels,
        health_servicer: health.aio.HealthServicer,
        gateway_id: str,
        interval_s: float,
        heartbeat_ttl_s: float,
        load_limits: LoadLimits,
        metrics_url: str,
    ):
        self.presence = presence
        self.models = models
        self.load_limits = load_limits
        self.metrics_url = metrics_url
        self.gateway_id = gateway_id
        self.heartbeat_ttl_s = heartbeat_ttl_s
        self.health_servicer = health_servicer
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
            await stop_task(self._task)
        with contextlib.suppress(RedisError):
            await self.presence.remove_heartbeat(self.gateway_id)

    async def refresh(self) -> None:
        serving = reachable = False
        try:
            heartbeat = jobs_pb2.GatewayStatus(
                gateway_id=self.gateway_id,
                model=self.models.first.name,
                in_flight=self.load_limits.in_flight,
                metrics_url=self.metrics_url,
                updated_unix_ms=int(time.time() * 1000),
            )
            await self.presence.heartbeat(heartbeat, self.heartbeat_ttl_s)
            statuses = await self.presence.worker_statuses()
            for model in self.models:
                workers = [s for s in statuses if s.model == model.name]
                model.jobs.num_queued_jobs = await model.jobs.queued_jobs()
                model.num_workers = len(workers)
                if workers:
                    model.max_context = min(s.max_context for s in workers)
                model.serving = any(s.accepting for s in workers)
            serving = all(model.serving for model in self.models)
            reachable = True
        except RedisError as error:
            logger.warning("Redis unreachable: %s", error)
            for model in self.models:
                model.num_workers = 0
        if self._closing:
            return
        for service in ("", SERVICE_NAME):
            await self.health_servicer.set(service, _SERVING if serving else _NOT_SERVING)
        await self.health_servicer.set(READINESS, _SERVING if reachable else _NOT_SERVING)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.refresh()
