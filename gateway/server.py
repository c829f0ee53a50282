"""The gateway process: grpc.aio server with the Inference service, health and reflection."""

import asyncio
import logging
import os
import secrets
import signal
import socket
from concurrent.futures import ThreadPoolExecutor

import grpc
import redis.asyncio as aioredis
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway.admission import Admission
from gateway.auth import ApiKeys
from gateway.fleet import FleetMonitor
from gateway.job_queue import JobQueue
from gateway.job_watch import WatchPolicy
from gateway.load_limits import LimitSettings, LoadLimits
from gateway.metrics import GatewayMetrics
from gateway.presence import Presence
from gateway.response_router import ResponseRouter
from gateway.served_models import ServedModel, ServedModels, checkpoint_max_context, embedding_dimension
from gateway.service import InferenceService
from gateway.settings import GatewaySettings
from protos import inference_pb2, inference_pb2_grpc
from protos.model_kind import ModelKind, model_kind
from protos.otlp_metrics import MetricsOutlets
from protos.redis_options import redis_options
from protos.streams import StreamKeys
from protos.tracing import tracer_provider
from tokenization import Tokenizer

logger = logging.getLogger(__name__)


async def serve(settings: GatewaySettings) -> None:
    """Serve until SIGTERM or SIGINT, then stop accepting and give open calls `grace_s` to finish."""
    # A random incarnation: a restarted gateway never receives the chunks meant for the one before.
    name = settings.gateway_id or f"{socket.gethostname()}-{os.getpid()}"
    gateway_id = f"{name}-{secrets.token_hex(3)}"
    keys = StreamKeys(settings.namespace)
    api_keys = ApiKeys.load(settings.api_keys_file, settings.api_keys.get_secret_value())
    client = aioredis.Redis.from_url(
        settings.redis_url,
        # A pooled connection that died (Redis restarted) fails its next command: retry that once on a
        # fresh one. (A retried XADD whose reply was lost may queue a job twice; workers drop the
        # second copy. Workers do not retry this way: their loop recovers from errors itself.)
        retry_on_error=[RedisConnectionError],
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=1),
        **redis_options(settings.redis_url, settings.redis_timeout_s, settings.redis_ca_file),
    )
    executor = ThreadPoolExecutor(settings.tokenizer_threads, thread_name_prefix="tokenizer")
    router = ResponseRouter(client, keys.responses(gateway_id))
    health_servicer = health.aio.HealthServicer()
    registry = CollectorRegistry()
    tracers = tracer_provider("conveyor-gateway", settings.otlp_endpoint)
    outlets = MetricsOutlets.open(
        registry,
        "conveyor-gateway",
        settings.metrics_host,
        settings.metrics_port,
        settings.otlp_endpoint,
        settings.otlp_metrics_interval_s,
    )
    logger.info("metrics on %s", outlets.page_url or "no page")
    models = served_models(settings, client, keys, registry)
    load_limits = LoadLimits(
        LimitSettings(
            max_queued_jobs=settings.max_queued_jobs,
            max_in_flight=settings.max_in_flight,
            max_in_flight_per_caller=settings.max_in_flight_per_caller,
            requests_per_s_per_caller=settings.requests_per_s_per_caller,
            retry_after_ms=settings.retry_after_ms,
        )
    )
    fleet = FleetMonitor(
        Presence(client, keys),
        models,
        health_servicer,
        gateway_id,
        settings.health_interval_s,
        settings.heartbeat_ttl_s,
        load_limits,
        outlets.page_url,
    )
    admission = Admission(
        models,
        executor,
        router,
        gateway_id,
        settings.default_max_tokens,
        WatchPolicy(settings.job_watch_interval_s, settings.max_redis_outage_s),
        load_limits,
        tracers.get_tracer("conveyor.gateway"),
    )
    server = grpc.aio.server()
    inference_pb2_grpc.add_InferenceServicer_to_server(
        InferenceService(admission, settings.max_open_requests_per_stream, api_keys), server
    )
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    address = f"{settings.host}:{settings.port}"
    credentials = server_credentials(settings)
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    await router.start()
    await fleet.start()
    await server.start()
    logger.info(
        "gateway %s serving %s on %s:%d (%s, %s)",
        gateway_id,
        ", ".join(f"{model.name} ({model.kind.value})" for model in models),
        settings.host,
        port,
        "plaintext" if credentials is None else "mutual TLS" if settings.tls_client_ca_file else "TLS",
        f"{len(api_keys)} API keys" if api_keys else "no API keys: open to every caller",
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logger.info("gateway %s stopping: %d generations open", gateway_id, load_limits.in_flight)
    stopping_at = loop.time()
    await fleet.close()
    load_limits.closed = True  # new generations get UNAVAILABLE; open ones may finish
    deadline = loop.time() + settings.grace_s
    while load_limits.in_flight and loop.time() < deadline:
        await asyncio.sleep(0.05)
    if load_limits.in_flight:
        logger.warning("grace period over: cancelling %d open generations", load_limits.in_flight)
    await server.stop(0)
    await fleet.stop()
    await router.stop()
    await client.aclose()
    tracers.shutdown()  # flushes spans still batched
    outlets.shutdown()
    executor.shutdown(wait=False, cancel_futures=True)
    logger.info("gateway %s stopped after %.2f s", gateway_id, loop.time() - stopping_at)


def served_models(
    settings: GatewaySettings, client: aioredis.Redis, keys: StreamKeys, registry: CollectorRegistry
) -> ServedModels:
    """Each configured checkpoint with its kind, tokenizer, request stream and metric series."""
    kinds = [(name, path, model_kind(path)) for name, path in settings.served_models]
    limits = {
        name: checkpoint_max_context(path, kind, settings.max_model_len if index == 0 else None)
        for index, (name, path, kind) in enumerate(kinds)
    }
    metrics = GatewayMetrics(registry, max(limits.values()))
    return ServedModels(
        [
            ServedModel(
                name=name,
                kind=kind,
                tokenizer=Tokenizer(path),
                jobs=JobQueue(client, keys, name),
                metrics=metrics.model(name),
                max_context=limits[name],
                dimension=embedding_dimension(path) if kind is ModelKind.EMBED else 0,
            )
            for name, path, kind in kinds
        ]
    )


def server_credentials(settings: GatewaySettings) -> grpc.ServerCredentials | None:
    """TLS when a certificate is configured; mutual TLS (client certificates required and checked
    against that CA) when a client CA is too."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        if settings.tls_cert_file or settings.tls_key_file or settings.tls_client_ca_file:
            raise ValueError("TLS needs both tls_cert_file and tls_key_file")
        return None
    client_ca = settings.tls_client_ca_file.read_bytes() if settings.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )
