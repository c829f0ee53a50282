"""The worker's probe server: liveness follows the loop's turns, readiness also needs `ready`."""

import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from telemetry.probes import LIVENESS, READINESS
from worker.health import LoopHealth, serve_health

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def test_a_stalled_loop_fails_liveness_until_it_turns_again() -> None:
    health = LoopHealth(stall_timeout_s=0.2)
    server, port = serve_health(health, "127.0.0.1", 0)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)

            def status(service: str) -> int:
                return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

            assert status(LIVENESS) == SERVING
            assert status(READINESS) == NOT_SERVING, "not ready before the loop says so"
            health.ready = True
            assert status(READINESS) == SERVING
            time.sleep(0.3)
            assert status(LIVENESS) == status(READINESS) == NOT_SERVING
            health.turned()
            assert status(LIVENESS) == status(READINESS) == SERVING
    finally:
        server.stop(0)
