"""The grpc.health.v1 services that Kubernetes' native gRPC probes ask (deploy/kubernetes)."""

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.e2e.conftest import Cluster

SERVING = health_pb2.HealthCheckResponse.SERVING


def check(address: str, service: str) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


@pytest.mark.parametrize("service", ["liveness", "readiness", "", "conveyor.v1.Inference"])
def test_a_serving_gateway_is_live_and_ready(cluster: Cluster, service: str) -> None:
    assert check(cluster.address, service) == SERVING


@pytest.mark.parametrize("service", ["liveness", "readiness", ""])
def test_a_serving_worker_is_live_and_ready(cluster: Cluster, service: str) -> None:
    assert check(cluster.worker_health, service) == SERVING


def test_the_worker_does_not_know_other_services(cluster: Cluster) -> None:
    with pytest.raises(grpc.RpcError) as error:
        check(cluster.worker_health, "conveyor.v1.Inference")
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
