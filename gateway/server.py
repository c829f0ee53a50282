"""The gateway process: grpc.aio server with the Inference service, health and reflection."""

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from bootstrap.process import Process, incarnation, on_stop_signals
from bootstrap.redis import connect_async
from checkpoints import model_kind
from gateway.admission import Admission
from gateway.auth import ApiKeys
from gateway.call_context import CallContext
from gateway.fleet import FleetMonitor
from gateway.http_front import OpenAIFront
from gateway.http_server import HttpServer
from gateway.job_watch import WatchPolicy
from gateway.load_limits import LimitSettings, LoadLimits
from gateway.metrics import GatewayMetrics
from gateway.queues import GatewayQueues
from gateway.served_models import ServedModel, ServedModels, checkpoint_max_context
from gateway.service import InferenceService
from gateway.settings import GatewaySettings
from protos import inference_pb2, inference_pb2_grpc
from protos.redis_layout import StreamKeys

logger = logging.getLogger(__name__)


async def serve(settings: GatewaySettings, process: Process) -> None:
    """Serve until SIGTERM or SIGINT, then stop accepting and give open calls `grace_s` to finish."""
    gateway_id = incarnation(process.name)
    telemetry = process.telemetry
    api_keys = ApiKeys.load(settings.api_keys_file, settings.api_keys.get_secret_value())
    client = connect_async(settings)
    executor = ThreadPoolExecutor(settings.tokenizer_threads, thread_name_prefix="tokenizer")
    models, metrics = served_models(settings, telemetry.registry)
    names = [model.name for model in models]
    queues = GatewayQueues(
        client, StreamKeys(settings.namespace), gateway_id, names, metrics.response_transit
    )
    health_servicer = health.aio.HealthServicer()
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
        queues,
        models,
        health_servicer,
        settings.health_interval_s,
        settings.heartbeat_ttl_s,
        load_limits,
        telemetry.page_url,
    )
    context = CallContext(
        models,
        queues,
        fleet,
        load_limits,
        executor,
        telemetry.tracer,
        WatchPolicy(settings.job_watch_interval_s, settings.max_redis_outage_s),
        settings.default_max_tokens,
    )
    admission = Admission(context)
    http: HttpServer | None = None
    if settings.http_port >= 0:  # bound first: a port in use stops the gateway before it starts

        def is_serving() -> bool:
            return all(fleet.view.of(model.name).serving for model in models)

        http = HttpServer(OpenAIFront(admission, api_keys, telemetry.registry, is_serving).app(), settings)
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
    await queues.start()
    await fleet.start()
    await server.start()
    http_line = ""
    if http is not None:
        await http.start()
        scheme = "http" if credentials is None else "https"
        http_line = f"; the OpenAI API on {scheme}://{settings.host}:{http.port}/v1"
    logger.info(
        "gateway %s serving %s on %s:%d (%s, %s)%s",
        gateway_id,
        ", ".join(f"{model.name} ({model.kind.value})" for model in models),
        settings.host,
        port,
        "plaintext" if credentials is None else "mutual TLS" if settings.tls_client_ca_file else "TLS",
        f"{len(api_keys)} API keys" if api_keys else "no API keys: open to every caller",
        http_line,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    on_stop_signals(stop.set, loop)
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
    if http is not None:
        await http.stop()
    await server.stop(0)
    await fleet.stop()
    await queues.stop()
    await client.aclose()
    telemetry.shutdown()
    executor.shutdown(wait=False, cancel_futures=True)
    logger.info("gateway %s stopped after %.2f s", gateway_id, loop.time() - stopping_at)


def served_models(
    settings: GatewaySettings, registry: CollectorRegistry
) -> tuple[ServedModels, GatewayMetrics]:
    """Each configured checkpoint with its kind, tokenizer and metric series; and the metrics."""
    kinds = [(name, path, model_kind(path)) for name, path in settings.served_models]
    overrides = [settings.max_model_len] + [None] * (len(kinds) - 1)  # --max-model-len is the main model's
    limits = [
        checkpoint_max_context(path, kind, o) for (_, path, kind), o in zip(kinds, overrides, strict=True)
    ]
    metrics = GatewayMetrics(registry, max(limits))
    models = [
        ServedModel.of(name, path, kind, metrics.model(name), limit, settings.generation_config == "auto")
        for (name, path, kind), limit in zip(kinds, limits, strict=True)
    ]
    return ServedModels(models), metrics


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
