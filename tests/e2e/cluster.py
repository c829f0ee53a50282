"""Real processes for end-to-end tests: workers and gateways started as `python -m ...` on a real Redis."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bootstrap.redis import connect
from bootstrap.settings import RedisSettings
from client.redis_server import free_port
from protos import jobs_pb2
from protos.redis_layout import WORKER_STATUS_FIELD, StreamKeys

# A small KV pool and context keep worker start-up and memory low on CI's two cores.
TEST_WORKER_ARGS = ("--kv-cache-bytes", str(256 << 20), "--max-model-len", "2048")
# Fault tests: a death is noticed in about two seconds; one thread each, as two workers share two cores.
FAST_FAILOVER_ARGS = ("--heartbeat-ttl-s", "2", "--heartbeat-interval-s", "0.5", "--num-threads", "1")


def start_process(module: str, args: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    log = log_path.open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", module, *args], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def _common_args(redis_url: str, namespace: str, model_dir: Path) -> list[str]:
    return ["--model", str(model_dir), "--redis-url", redis_url, "--namespace", namespace]


def _metrics_args(extra: tuple[str, ...]) -> list[str]:
    """Any free port for /metrics, unless the test names one: many processes share this machine."""
    return [] if "--metrics-port" in extra else ["--metrics-port", "0"]


def start_worker(
    redis_url: str, namespace: str, model_dir: Path, log_dir: Path, *extra: str
) -> subprocess.Popen[bytes]:
    args = [*_common_args(redis_url, namespace, model_dir), *TEST_WORKER_ARGS, *_metrics_args(extra), *extra]
    return start_process("worker", args, log_dir / f"worker-{namespace}-{time.monotonic_ns()}.log")


def start_gateway(
    redis_url: str, namespace: str, model_dir: Path, log_dir: Path, *extra: str
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    args = [
        *_common_args(redis_url, namespace, model_dir),
        "--port",
        str(port),
        *_metrics_args(extra),
        *extra,
    ]
    process = start_process("gateway", args, log_dir / f"gateway-{namespace}-{port}.log")
    return process, f"127.0.0.1:{port}"


def stop_process(process: subprocess.Popen[bytes], timeout_s: float = 30.0) -> int:
    """SIGTERM, then the exit status. One still running after `timeout_s` writes every thread's stack
    to its log (SIGUSR1), is killed, and the end of that log goes to stderr, where a failing test's
    report shows it."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        log_path = Path(os.readlink(f"/proc/{process.pid}/fd/1"))
        process.send_signal(signal.SIGUSR1)
        time.sleep(2)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        tail = log_path.read_text(errors="replace")[-12000:]
        print(f"{process.args} still ran {timeout_s} s after SIGTERM; its log ends:\n{tail}", file=sys.stderr)
        return process.returncode


def wait_until_serving(
    address: str, processes: list[subprocess.Popen[bytes]], timeout_s: float = 120.0
) -> None:
    """Poll gRPC health until SERVING (a live worker and Redis); fail early if a process died."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            for process in processes:
                if process.poll() is not None:
                    raise RuntimeError(f"{process.args} exited with {process.returncode}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service="conveyor.v1.Inference"), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.3)
    raise TimeoutError(f"{address} not SERVING after {timeout_s}s")


def worker_statuses(redis_url: str, namespace: str) -> list[jobs_pb2.WorkerStatus]:
    client = connect(RedisSettings(redis_url=redis_url))  # a cluster URL too
    keys = StreamKeys(namespace)
    statuses = [
        jobs_pb2.WorkerStatus.FromString(client.hget(key, WORKER_STATUS_FIELD) or b"")
        for key in client.scan_iter(match=keys.worker_pattern)
    ]
    client.close()
    return statuses


def wait_for(predicate: object, timeout_s: float = 20.0, interval_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(interval_s)
    return False


def conveyor_generate(address: str, *args: str) -> str:
    """`conveyor generate` against a gateway, as a user runs it: its stdout."""
    command = [sys.executable, "-m", "client", "generate", "--address", address, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout
