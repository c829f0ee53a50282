"""`conveyor serve`: a private Redis, N generation workers, an embeddings worker and a gateway in
front of both, as one process tree that ends together."""

import logging
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from client.redis_server import RedisServer

logger = logging.getLogger(__name__)

_STOP_TIMEOUT_S = 40.0


@dataclass(frozen=True, slots=True)
class ServeOptions:
    host: str
    port: int
    num_workers: int
    model: Path
    redis_url: str | None
    extra_worker_args: tuple[str, ...] = ()  # for the generation workers
    embedding_model: Path | None = None  # served beside `model` by one worker of its own


def _start(module: str, args: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", module, *args])


def _stop_all(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + _STOP_TIMEOUT_S
    for process in processes:
        try:
            process.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def serve(options: ServeOptions) -> int:
    """Run until Ctrl-C or SIGTERM (exit 0) or until a child dies (exit 1); every child is stopped."""
    stopping = False

    def request_stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    redis_server = None if options.redis_url else RedisServer().start()
    redis_url = options.redis_url or redis_server.url  # type: ignore[union-attr]
    common = ["--model", str(options.model), "--redis-url", redis_url]
    processes: list[subprocess.Popen[bytes]] = []
    try:
        embedder = options.embedding_model
        extra_models = [] if embedder is None else ["--extra-models", str(embedder)]
        gateway_args = [*common, *extra_models, "--host", options.host, "--port", str(options.port)]
        processes.append(_start("gateway", gateway_args))
        for index in range(options.num_workers):
            metrics = (
                [] if "--metrics-port" in options.extra_worker_args else ["--metrics-port", str(9401 + index)]
            )
            processes.append(_start("worker", [*common, *metrics, *options.extra_worker_args]))
        if embedder is not None:
            metrics_port = str(9401 + options.num_workers)
            embedder_args = ["--model", str(embedder), "--redis-url", redis_url]
            processes.append(_start("worker", [*embedder_args, "--metrics-port", metrics_port]))
        logger.info(
            "serving on %s:%d with %d generation worker(s)%s; Ctrl-C stops; "
            "watch: conveyor monitor --redis-url %s",
            options.host,
            options.port,
            options.num_workers,
            "" if embedder is None else f" and an embeddings worker ({embedder})",
            redis_url if redis_server is not None else "<the URL given>",  # a given URL may hold a password
        )
        while not stopping:
            dead = [p for p in processes if p.poll() is not None]
            if dead:
                logger.error("a child process exited with %s; stopping", dead[0].returncode)
                return 1
            time.sleep(0.2)
        return 0
    finally:
        _stop_all(processes)
        if redis_server is not None:
            redis_server.close()
        logger.info("stopped")
