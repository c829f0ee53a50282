"""The worker's grpc.health.v1 service, for Kubernetes' native gRPC probes.

A worker serves no gRPC otherwise; this small server answers two services:
- `liveness`: the serving loop turned within the stall timeout (a hung forward pass or a deadlock
  fails it, and the kubelet restarts the pod; its jobs are resumed elsewhere);
- `readiness`: the worker is in the consumer group, Redis answers, and it takes jobs (not draining).
"""

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from telemetry.probes import LIVENESS, READINESS

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class LoopHealth:
    """Written by the serving loop, read by probe threads (plain attribute writes: atomic)."""

    def __init__(self, stall_timeout_s: float):
        self.stall_timeout_s = stall_timeout_s
        self.last_turn = time.monotonic()
        self.ready = False

    def turned(self) -> None:
        self.last_turn = time.monotonic()

    def alive(self) -> bool:
        return time.monotonic() - self.last_turn < self.stall_timeout_s


class HealthService(health_pb2_grpc.HealthServicer):
    def __init__(self, health: LoopHealth):
        self.health = health

    def Check(  # noqa: N802 - gRPC method name
        self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        alive = self.health.alive()
        if request.service in ("", LIVENESS):
            serving = alive
        elif request.service == READINESS:
            serving = alive and self.health.ready
        else:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=_SERVING if serving else _NOT_SERVING)


def serve_health(health: LoopHealth, host: str, port: int) -> tuple[grpc.Server, int]:
    """Start the server on its own threads; returns it and its port (useful when asked for port 0)."""
    server = grpc.server(ThreadPoolExecutor(2, thread_name_prefix="health"))
    health_pb2_grpc.add_HealthServicer_to_server(HealthService(health), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    server.start()
    return server, bound
