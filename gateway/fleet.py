"""FleetMonitor: watches Redis and the workers' heartbeats; publishes what it saw as an immutable
`FleetView` (admission and ListModels read it), drives gRPC health and renews the heartbeat."""

import asyncio
import dataclasses
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from grpc_health.v1 import health, health_pb2
from redis.exceptions import RedisError

from gateway.background import stop_task
from gateway.load_limits import LoadLimits
from gateway.queues import GatewayQueues
from gateway.served_models import ServedModels
from protos import jobs_pb2
from telemetry.probes import LIVENESS, READINESS

logger = logging.getLogger(__name__)

SERVICE_NAME = "conveyor.v1.Inference"
# For Kubernetes probes. Liveness: the server answers at all. Readiness: Redis answers and the
# gateway is not shutting down; it does not wait for a worker, so jobs can queue for a fleet that
# scales up from zero on them. "" and SERVICE_NAME say whether a worker serves each model now.
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass(frozen=True, slots=True)
class ModelFleet:
    """One model's workers as the last refresh saw them."""

    num_workers: int = 0
    max_context: int | None = None  # the smallest among live workers; None: none seen
    serving: bool = False  # a live worker accepts its jobs
    queued_jobs: int = 0  # queued or running, across the fleet, when measured
    submitted_before: int = 0  # this gateway's submissions counted when it was measured
    architecture: str = ""  # as its live workers report it ("" while none is live)
    dtype: str = ""  # its live workers' dtypes, joined by ","
    quantization: str = ""  # its live workers' weight quantizations, joined by ","

    def queued_now(self, submitted: int) -> int:
        """The measured queue plus what this gateway submitted since: a flood counts against the
        queue limit before the next measurement."""
        return self.queued_jobs + submitted - self.submitted_before


@dataclass(frozen=True, slots=True)
class FleetView:
    models: Mapping[str, ModelFleet] = field(default_factory=lambda: MappingProxyType({}))

    def of(self, model: str) -> ModelFleet:
        return self.models.get(model, ModelFleet())


class FleetMonitor:
    """SERVING only while Redis answers and every served model has a live worker accepting its jobs.

    Each refresh also renews this gateway's heartbeat, which keeps workers running its jobs.
    """

    def __init__(
        self,
        queues: GatewayQueues,
        models: ServedModels,
        health_servicer: health.aio.HealthServicer,
        interval_s: float,
        heartbeat_ttl_s: float,
        load_limits: LoadLimits,
        metrics_url: str,
    ):
        self.queues = queues
        self.models = models
        self.health_servicer = health_servicer
        self.interval_s = interval_s
        self.heartbeat_ttl_s = heartbeat_ttl_s
        self.load_limits = load_limits
        self.metrics_url = metrics_url
        self.view = FleetView()  # replaced, never changed, by each refresh
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

    async def refresh(self) -> None:
        try:
            heartbeat = jobs_pb2.GatewayStatus(
                gateway_id=self.queues.gateway_id,
                model=self.models.first.name,
                in_flight=self.load_limits.in_flight,
                metrics_url=self.metrics_url,
                updated_unix_ms=int(time.time() * 1000),
            )
            await self.queues.heartbeat(heartbeat, self.heartbeat_ttl_s)
            statuses = await self.queues.worker_statuses()
            view = {}
            for model in self.models:
                workers = [s for s in statuses if s.model == model.name]
                submitted = self.queues.submitted(model.name)
                view[model.name] = ModelFleet(
                    num_workers=len(workers),
                    # Once known, kept while no worker is up: a restarted fleet has the same limit.
                    max_context=min(s.max_context for s in workers)
                    if workers
                    else self.view.of(model.name).max_context,
                    serving=any(s.accepting for s in workers),
                    queued_jobs=await self.queues.queued_jobs(model.name),
                    submitted_before=submitted,
                    architecture=",".join(sorted({s.architecture for s in workers if s.architecture})),
                    dtype=",".join(sorted({s.dtype for s in workers if s.dtype})),
                    quantization=",".join(sorted({s.quantization for s in workers if s.quantization})),
                )
            self.view = FleetView(MappingProxyType(view))
            serving, reachable = all(m.serving for m in view.values()), True
        except RedisError as error:
            logger.warning("Redis unreachable: %s", error)
            models = self.view.models
            self.view = FleetView(
                MappingProxyType(
                    {n: dataclasses.replace(m, num_workers=0, serving=False) for n, m in models.items()}
                )
            )
            serving = reachable = False
        if self._closing:
            return
        for service in ("", SERVICE_NAME):
            await self.health_servicer.set(service, _SERVING if serving else _NOT_SERVING)
        await self.health_servicer.set(READINESS, _SERVING if reachable else _NOT_SERVING)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.refresh()
