"""`make bench VLLM=1`'s two HTTP rows: Conveyor through gateway + Redis and vLLM's OpenAI server,
each started here, warmed up and then driven by the one load generator (`conveyor bench --api
openai`) with every request of the workload streamed at once, so the two rows differ only in the
server."""

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx

from client.library import Security
from client.load_generator import RequestResult, load_prompts, quiet_http_logs, run_load
from client.redis_server import free_port

_READY_TIMEOUT_S = 900.0


def conveyor_server(
    model: Path, log: Path, quantization: str = "none"
) -> tuple[subprocess.Popen[bytes], str]:
    """`conveyor serve` (a private Redis, a gateway, one worker), its OpenAI API's URL."""
    http_port = free_port()
    command = [
        sys.executable, "-m", "client", "serve", "--no-embedder", "--model", str(model),
        "--port", str(free_port()), "--http-port", str(http_port), "--quantization", quantization,
    ]  # fmt: skip
    return _start(command, log, os.environ.copy()), f"http://127.0.0.1:{http_port}"


def vllm_server(
    python: str, model: Path, log: Path, env: dict[str, str]
) -> tuple[subprocess.Popen[bytes], str]:
    """vLLM's OpenAI server on the same checkpoint, engine settings as the in-process vLLM row."""
    port = free_port()
    command = [
        python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--port", str(port),
        "--served-model-name", model.name, "--dtype", "float32", "--max-model-len", "2048",
        "--max-num-seqs", "64", "--kv-cache-memory-bytes", str(2 << 30), "--disable-log-stats",
    ]  # fmt: skip
    return _start(command, log, env), f"http://127.0.0.1:{port}"


def measure(
    url: str, model_name: str, workload: Path, num_requests: int | None
) -> tuple[list[RequestResult], float]:
    """Wait for /health, send one warm-up request, then the workload all at once."""
    quiet_http_logs()
    deadline = time.monotonic() + _READY_TIMEOUT_S
    while not _healthy(url):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} not healthy after {_READY_TIMEOUT_S:.0f} s")
        time.sleep(1.0)
    requests = load_prompts(workload, num_requests, 128)
    asyncio.run(run_load(url, requests[:1], 1, None, Security(), api="openai", model_name=model_name))
    return asyncio.run(
        run_load(url, requests, len(requests), None, Security(), api="openai", model_name=model_name)
    )


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _start(command: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False
