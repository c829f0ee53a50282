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

from gateway.admission import Admission, configured_max_context
from gateway.fleet import SERVICE_NAME, FleetMonitor
from gateway.job_queue import JobQueue
from gateway.response_router import ResponseRouter
from gateway.service import InferenceService
from gateway.settings import GatewaySettings
from protos import inference_pb2, inference_pb2_grpc
from protos.streams import StreamKeys
from tokenization import Tokenizer

logger = logging.getLogger(__name__)


async def serve(settings: GatewaySettings) -> None:
    """Serve until SIGTERM or SIGINT, then stop accepting and give open calls `grace_s` to finish."""
    # A random incarnation: a restarted gateway never receives the chunks meant for the one before.
    name = settings.gateway_id or f"{socket.gethostname()}-{os.getpid()}"
    gateway_id = f"{name}-{secrets.token_hex(3)}"
    keys = StreamKeys(settings.namespace)
    client = aioredis.Redis.from_url(settings.redis_url)
    executor = ThreadPoolExecutor(settings.tokenizer_threads, thread_name_prefix="tokenizer")
    tokenizer = Tokenizer(settings.model)
    model_name = settings.served_model_name
    jobs = JobQueue(client, keys, model_name, settings.max_queued_jobs)
    router = ResponseRouter(client, keys.responses(gateway_id))
    health_servicer = health.aio.HealthServicer()
    fleet = FleetMonitor(
        jobs,
        health_servicer,
        model_name,
        configured_max_context(settings.model, settings.max_model_len),
        gateway_id,
        settings.health_interval_s,
        settings.heartbeat_ttl_s,
    )
    admission = Admission(
        tokenizer, executor, jobs, router, fleet, gateway_id, model_name, settings.default_max_tokens
    )
    server = grpc.aio.server()
    inference_pb2_grpc.add_InferenceServicer_to_server(
        InferenceService(admission, settings.max_open_requests_per_stream), server
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
    port = server.add_insecure_port(f"{settings.host}:{settings.port}")
    await router.start()
    await fleet.start()
    await server.start()
    logger.info("gateway %s serving %s on %s:%d", gateway_id, model_name, settings.host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logger.info("gateway %s stopping", gateway_id)
    for service in ("", SERVICE_NAME):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.stop(settings.grace_s)
    await fleet.stop()
    await router.stop()
    await client.aclose()
    executor.shutdown(wait=False, cancel_futures=True)
