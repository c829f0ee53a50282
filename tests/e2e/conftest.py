"""One real Redis, a real generation worker, a real embeddings worker and one real gateway in front
of both, for the whole end-to-end session."""

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from client.redis_server import RedisServer, free_port
from protos import inference_pb2_grpc
from tests.e2e.cluster import start_gateway, start_worker, stop_process, wait_until_serving
from tests.e2e.otlp_collector import OtlpCollector


@dataclass(frozen=True)
class Cluster:
    redis_url: str
    namespace: str
    address: str
    model_dir: Path
    embedder_dir: Path
    log_dir: Path
    gateway_metrics: str  # http://host:port/metrics
    worker_metrics: str
    worker_health: str  # host:port of the worker's grpc.health.v1
    http_url: str  # http://host:port of the gateway's OpenAI-compatible API
    collector: OtlpCollector  # where both send their spans


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def collector() -> Iterator[OtlpCollector]:
    with OtlpCollector() as running:
        yield running


@pytest.fixture(scope="session")
def cluster(
    redis_server: RedisServer, model_dir: Path, embedder_dir: Path, log_dir: Path, collector: OtlpCollector
) -> Iterator[Cluster]:
    namespace = "e2e"
    worker_port, gateway_port, health_port, http_port = free_port(), free_port(), free_port(), free_port()
    otlp = ("--otlp-endpoint", collector.endpoint, "--otlp-metrics-interval-s", "1")
    worker = start_worker(
        redis_server.url,
        namespace,
        model_dir,
        log_dir,
        *("--metrics-port", str(worker_port), "--health-port", str(health_port), *otlp),
    )
    # Small batches that wait to fill: a call of many inputs is split across several of them.
    batching = ("--embed-max-batch-size", "4", "--embed-max-wait-ms", "20")
    embedder = start_worker(redis_server.url, namespace, embedder_dir, log_dir, *batching)
    gateway, address = start_gateway(
        redis_server.url,
        namespace,
        model_dir,
        log_dir,
        *("--metrics-port", str(gateway_port), "--extra-models", str(embedder_dir), *otlp),
        *("--http-port", str(http_port)),
    )
    try:
        wait_until_serving(address, [worker, embedder, gateway])
        yield Cluster(
            redis_server.url,
            namespace,
            address,
            model_dir,
            embedder_dir,
            log_dir,
            f"http://127.0.0.1:{gateway_port}/metrics",
            f"http://127.0.0.1:{worker_port}/metrics",
            f"127.0.0.1:{health_port}",
            f"http://127.0.0.1:{http_port}",
            collector,
        )
    finally:
        assert stop_process(gateway) == 0
        assert stop_process(worker) == 0
        assert stop_process(embedder) == 0


@pytest.fixture()
def stub(cluster: Cluster) -> Iterator[inference_pb2_grpc.InferenceStub]:
    with grpc.insecure_channel(cluster.address) as channel:
        yield inference_pb2_grpc.InferenceStub(channel)
