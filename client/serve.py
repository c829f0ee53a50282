"""`conveyor serve`: a private Redis, N generation workers, an embeddings worker and a gateway in
front of both, as one supervised process tree: a child that dies is restarted, the tree says
"serving" once every worker serves, and nothing outlives it."""

import logging
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client.redis_server import RedisServer, free_port
from client.supervisor import Child, RestartPolicy, Supervisor, orphan_guard
from telemetry.probes import READINESS

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ServeOptions:
    host: str
    port: int  # the gateway's gRPC port
    http_port: int  # its OpenAI-compatible HTTP port; -1 = none
    num_workers: int
    model: Path
    redis_url: str | None
    extra_worker_args: tuple[str, ...] = ()  # for the generation workers
    embedding_model: Path | None = None  # served beside `model` by one worker of its own
    policy: RestartPolicy = field(default_factory=RestartPolicy)


def health_probe(address: str, service: str) -> Callable[[], bool]:
    """True while the grpc.health.v1 server at `address` says `service` is SERVING."""
    # Reconnect quickly: the probe is asked every 0.2 s while the child starts.
    options = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 200)]
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(address, options=options))

    def ready() -> bool:
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=0.5)
        except grpc.RpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    return ready


_GATEWAY_STAGE, _WORKER_STAGE, _REDIS_STAGE = 0, 1, 2  # the order a shutdown stops them in


def _python_child(name: str, module: str, args: list[str], ready: Callable[[], bool], stage: int) -> Child:
    command = [*orphan_guard(), sys.executable, "-m", module, *args]
    return Child(name, lambda: subprocess.Popen(command, start_new_session=True), ready, stage)


def _worker(name: str, model: Path, redis_url: str, metrics_port: int, extra: tuple[str, ...]) -> Child:
    """A worker with a health port (its own, unless `extra` names one): it is ready once it has
    joined the group."""
    args = ["--model", str(model), "--redis-url", redis_url]
    if "--metrics-port" not in extra:
        args += ["--metrics-port", str(metrics_port)]
    if "--health-port" in extra:
        health_port = int(extra[extra.index("--health-port") + 1])
    else:
        health_port = free_port()
        args += ["--health-port", str(health_port)]
    probe = health_probe(f"127.0.0.1:{health_port}", READINESS)
    return _python_child(name, "worker", [*args, *extra], probe, _WORKER_STAGE)


def children(options: ServeOptions, redis_url: str) -> list[Child]:
    """The gateway and the workers, in start order."""
    embedder = options.embedding_model
    gateway_args = ["--model", str(options.model), "--redis-url", redis_url]
    gateway_args += [] if embedder is None else ["--extra-models", str(embedder)]
    gateway_args += [
        "--host",
        options.host,
        "--port",
        str(options.port),
        "--http-port",
        str(options.http_port),
    ]
    probe_host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "[::1]"}.get(options.host, options.host)
    probe_host = f"[{probe_host}]" if ":" in probe_host and not probe_host.startswith("[") else probe_host
    # "" is SERVING once every served model has a live worker.
    tree = [
        _python_child(
            "gateway",
            "gateway",
            gateway_args,
            health_probe(f"{probe_host}:{options.port}", ""),
            _GATEWAY_STAGE,
        )
    ]
    for index in range(options.num_workers):
        name = f"worker {index + 1}"
        tree.append(_worker(name, options.model, redis_url, 9401 + index, options.extra_worker_args))
    if embedder is not None:
        tree.append(_worker("embedder", embedder, redis_url, 9401 + options.num_workers, ()))
    return tree


def _start_redis(server: RedisServer) -> "subprocess.Popen[bytes]":
    """Start (or restart, on the same port) the private Redis; returns once it answers."""
    process = server.start().process
    assert process is not None
    return process


def serve(options: ServeOptions) -> int:
    """Run until Ctrl-C or SIGTERM (exit 0) or until a child dies too often (exit 1)."""
    stopping = False

    def request_stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    tree: list[Child] = []
    # The private Redis keeps an AOF (fsynced every second), so one restarted after a crash comes
    # back with the queued and running jobs.
    redis_server = (
        None
        if options.redis_url
        else RedisServer(appendonly=True, fsync="everysec", launcher=orphan_guard(), new_session=True)
    )
    redis_url = options.redis_url or redis_server.url  # type: ignore[union-attr]
    if redis_server is not None:
        tree.append(Child("redis", lambda: _start_redis(redis_server), lambda: True, _REDIS_STAGE))
    tree += children(options, redis_url)

    def ready() -> None:
        logger.info(
            "serving on %s:%d%s with %d generation worker(s)%s; Ctrl-C stops; "
            "watch: conveyor monitor --redis-url %s",
            options.host,
            options.port,
            f" (gRPC), the OpenAI API on http://{options.host}:{options.http_port}/v1"
            if options.http_port >= 0
            else "",
            options.num_workers,
            ""
            if options.embedding_model is None
            else f" and an embeddings worker ({options.embedding_model})",
            redis_url if not options.redis_url else "<the URL given>",  # a given URL may hold a password
        )

    logger.info("starting %s", ", ".join(child.name for child in tree))
    supervisor = Supervisor(tree, options.policy, ready)
    try:
        code = supervisor.run(lambda: stopping)
    finally:
        if redis_server is not None:
            redis_server.close()
    logger.info("stopped%s", f": {supervisor.give_up_reason}" if supervisor.give_up_reason else "")
    return code
