"""`python -m worker`: load the model, join the consumer group, serve until SIGTERM."""

import logging
import os
import signal
import socket
import sys

import redis
from prometheus_client import CollectorRegistry

from protos.metrics import serve_metrics
from protos.redis_options import redis_options
from protos.streams import StreamKeys
from protos.tracing import tracer_provider
from worker.engine import Engine
from worker.engine_core import EngineCore
from worker.job_stream import JobStream
from worker.metrics import WorkerMetrics
from worker.settings import WorkerSettings


def main(argv: list[str] | None = None) -> None:
    settings = WorkerSettings(_cli_parse_args=sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s worker %(name)s: %(message)s"
    )
    worker_id = settings.worker_id or f"{socket.gethostname()}-{os.getpid()}"
    logging.getLogger(__name__).info("settings: %s", settings.model_dump(exclude={"redis_url"}))
    core = EngineCore.from_settings(settings)
    client = redis.Redis.from_url(
        settings.redis_url,
        **redis_options(settings.redis_url, settings.redis_timeout_s, settings.redis_ca_file),
    )
    jobs = JobStream(
        client, StreamKeys(settings.namespace), settings.served_model_name, worker_id, settings.progress_ttl_s
    )
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry, settings.served_model_name, core.scheduler)
    if settings.metrics_port >= 0:
        port = serve_metrics(registry, settings.metrics_host, settings.metrics_port)
        logging.getLogger(__name__).info("metrics on http://%s:%d/metrics", settings.metrics_host, port)
    tracers = tracer_provider("conveyor-worker", settings.otlp_endpoint)
    engine = Engine(core, jobs, settings, metrics, tracers.get_tracer("conveyor.worker"))
    signal.signal(signal.SIGTERM, lambda *_: engine.drain())
    signal.signal(signal.SIGINT, lambda *_: engine.drain())
    engine.run()
    tracers.shutdown()  # flushes spans still batched


if __name__ == "__main__":
    main()
