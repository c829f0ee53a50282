"""`python -m worker`: load the model, join the consumer group, serve until SIGTERM."""

import logging
import os
import signal
import socket
import sys

import redis
from prometheus_client import CollectorRegistry

from protos.log_format import configure_logging
from protos.model_kind import ModelKind, model_kind
from protos.otlp_metrics import MetricsOutlets
from protos.redis_options import redis_options
from protos.streams import StreamKeys
from protos.tracing import tracer_provider
from worker.embedding_core import EmbeddingCore
from worker.embedding_runner import EmbeddingRunner
from worker.engine import Engine
from worker.engine_core import EngineCore
from worker.generation_runner import GenerationRunner
from worker.health import LoopHealth, serve_health
from worker.job_runner import JobRunner
from worker.job_stream import JobStream
from worker.metrics import GenerationMetrics, StepMetrics
from worker.settings import WorkerSettings


def main(argv: list[str] | None = None) -> None:
    settings = WorkerSettings(_cli_parse_args=sys.argv[1:] if argv is None else argv)
    configure_logging(settings.log_level, "worker", settings.log_format)
    worker_id = settings.worker_id or f"{socket.gethostname()}-{os.getpid()}"
    logging.getLogger(__name__).info("settings: %s", settings.model_dump(exclude={"redis_url"}))
    client = redis.Redis.from_url(
        settings.redis_url,
        **redis_options(settings.redis_url, settings.redis_timeout_s, settings.redis_ca_file),
    )
    jobs = JobStream(
        client, StreamKeys(settings.namespace), settings.served_model_name, worker_id, settings.progress_ttl_s
    )
    registry = CollectorRegistry()
    runner = _runner(settings, registry)
    outlets = MetricsOutlets.open(
        registry,
        "conveyor-worker",
        settings.metrics_host,
        settings.metrics_port,
        settings.otlp_endpoint,
        settings.otlp_metrics_interval_s,
    )
    logging.getLogger(__name__).info("metrics on %s", outlets.page_url or "no page")
    tracers = tracer_provider("conveyor-worker", settings.otlp_endpoint)
    health = LoopHealth(settings.stall_timeout_s)
    if settings.health_port >= 0:
        _server, health_port = serve_health(health, settings.health_host, settings.health_port)
        logging.getLogger(__name__).info("grpc.health.v1 on %s:%d", settings.health_host, health_port)
    engine = Engine(runner, jobs, settings, tracers.get_tracer("conveyor.worker"), outlets.page_url, health)
    signal.signal(signal.SIGTERM, lambda *_: engine.drain())
    signal.signal(signal.SIGINT, lambda *_: engine.drain())
    engine.run()
    tracers.shutdown()  # flushes spans still batched
    outlets.shutdown()


def _runner(settings: WorkerSettings, registry: CollectorRegistry) -> JobRunner:
    """The engine the checkpoint calls for: a generation scheduler, or an embeddings batcher."""
    if model_kind(settings.model) is ModelKind.EMBED:
        embedder = EmbeddingCore.from_settings(settings)
        return EmbeddingRunner(embedder, StepMetrics(registry, settings.served_model_name))
    core = EngineCore.from_settings(settings)
    return GenerationRunner(core, GenerationMetrics(registry, settings.served_model_name, core.scheduler))


if __name__ == "__main__":
    main()
