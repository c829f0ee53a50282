"""Health says NOT_SERVING without a live worker (yet ready for Kubernetes: jobs may queue for a
fleet scaling up from zero), and a lost Redis turns requests into UNAVAILABLE and readiness off."""

from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client.library import ConveyorClient
from client.redis_server import RedisServer
from tests.e2e.cluster import start_gateway, stop_process, wait_for


def test_no_worker_then_no_redis(model_dir: Path, log_dir: Path) -> None:
    redis_server = RedisServer().start()
    gateway, address = start_gateway(redis_server.url, "lonely", model_dir, log_dir)
    try:
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)

            def status(service: str = "conveyor.v1.Inference") -> int:
                try:
                    return health.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status
                except grpc.RpcError:
                    return -1

            assert wait_for(lambda: status() == health_pb2.HealthCheckResponse.NOT_SERVING, timeout_s=60)
            assert status("readiness") == status("liveness") == health_pb2.HealthCheckResponse.SERVING
            client = ConveyorClient(channel=channel)  # the channel outlives it
            assert client.list_models()[0].num_workers == 0
            redis_server.stop()
            with pytest.raises(grpc.RpcError) as error:
                client.generate("hello", max_tokens=4, timeout_s=30)
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "unreachable" in error.value.details()
            assert status() == health_pb2.HealthCheckResponse.NOT_SERVING
            assert wait_for(lambda: status("readiness") == health_pb2.HealthCheckResponse.NOT_SERVING, 30)
            assert status("liveness") == health_pb2.HealthCheckResponse.SERVING
    finally:
        assert stop_process(gateway) == 0
        redis_server.close()
