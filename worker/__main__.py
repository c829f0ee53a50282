"""`python -m worker`: load the model, join the consumer group, serve until SIGTERM."""

import logging
import sys
import time

from prometheus_client import CollectorRegistry

from bootstrap.process import EXIT_CANNOT_SERVE, Process, on_stop_signals
from bootstrap.redis import connect
from checkpoints import ModelKind, generation_max_context, model_kind, vocab_size
from protos.redis_layout import StreamKeys
from worker.backend import Backend
from worker.embedding_backend import EmbeddingBackend
from worker.embedding_core import EmbeddingCore
from worker.generation_backend import GenerationBackend
from worker.generation_core import GenerationCore
from worker.health import LoopHealth, serve_health
from worker.job_stream import JobStream
from worker.metrics import GenerationMetrics, StepMetrics
from worker.model_config import CheckpointError
from worker.serving_loop import ServingLoop
from worker.settings import WorkerSettings
from worker.simulated_backend import SimulatedBackend

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> None:
    settings = WorkerSettings(_cli_parse_args=sys.argv[1:] if argv is None else argv)
    process = Process.start("worker", settings, settings.worker_id, {"redis_url"})
    telemetry = process.telemetry
    jobs = JobStream(
        connect(settings),
        StreamKeys(settings.namespace),
        settings.served_model_name,
        process.name,
        settings.progress_ttl_s,
    )
    try:
        backend = _backend(settings, telemetry.registry)
    except CheckpointError as error:  # before the loop joins the group: no job was taken
        logger.error("cannot serve %s: %s", settings.model, error)
        raise SystemExit(EXIT_CANNOT_SERVE) from None
    health = LoopHealth(settings.stall_timeout_s)
    if settings.health_port >= 0:
        _server, health_port = serve_health(health, settings.health_host, settings.health_port)
        logger.info("grpc.health.v1 on %s:%d", settings.health_host, health_port)
    loop = ServingLoop(backend, jobs, settings, telemetry.tracer, telemetry.page_url, health)
    on_stop_signals(loop.drain)
    loop.run()
    telemetry.shutdown()


def _backend(settings: WorkerSettings, registry: CollectorRegistry) -> Backend:
    """What the checkpoint calls for: a generation scheduler, or an embeddings batcher; warmed up
    before the loop joins the group, so the first job runs at full speed."""
    if settings.simulate_steps_per_s:
        return SimulatedBackend(
            vocab_size(settings.model),
            generation_max_context(settings.model, settings.max_model_len),
            settings.max_num_seqs,
            settings.simulate_steps_per_s,
            StepMetrics(registry, settings.served_model_name),
        )
    if model_kind(settings.model) is ModelKind.EMBED:
        embedder = EmbeddingCore.from_settings(settings)
        embedder.warm_up()
        return EmbeddingBackend(embedder, StepMetrics(registry, settings.served_model_name))
    core = GenerationCore.from_settings(settings)
    started = time.monotonic()
    core.warm_up()
    logger.info("warmed up in %.1f s", time.monotonic() - started)
    return GenerationBackend(core, GenerationMetrics(registry, settings.served_model_name, core.scheduler))


if __name__ == "__main__":
    main()
