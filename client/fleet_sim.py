"""`conveyor bench --fleet-sim`: how far one Redis carries a fleet.

Real gateways and real worker serving loops run against one real Redis; each worker's model is a
`SimulatedBackend` that gives every running job one token per step at a GPU-like rate (by default
64 sequences at 50 steps/s: 3,200 tokens/s a worker). Clients keep `--sim-seqs` streams per worker
open through the gateways. The fleet grows one worker at a time until Redis' CPU, the chunk
latency (worker publish to gateway read, p99) or this machine's own CPU (the throughput stops
growing) ends it. Each level reports what Redis did per generated token, so the figures carry to a
bigger machine: Redis is one thread, and its share of a core per token is what sets its ceiling.
"""

import asyncio
import contextlib
import itertools
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import redis

from client.fleet_snapshot import Histogram, parse_histograms
from client.library import build_request
from client.redis_server import RedisServer, free_port
from client.serve import health_probe
from client.supervisor import orphan_guard
from protos import inference_pb2_grpc
from protos.redis_layout import StreamKeys

_NAMESPACE = "fleet-sim"
_TRANSIT = "response_transit_seconds"


@dataclass(frozen=True, slots=True)
class SimOptions:
    model: Path  # only its tokenizer and config are read
    steps_per_s: float
    seqs_per_worker: int
    max_tokens: int
    gateways: int
    max_workers: int
    seconds_per_level: float
    redis_cpu_limit: float  # share of one core
    transit_p99_limit_s: float


@dataclass(frozen=True, slots=True)
class Level:
    workers: int
    streams: int
    tokens_per_s: float
    redis_cpu: float  # share of one core over the window
    redis_ops_per_token: float
    redis_bytes_per_token: float  # in and out
    transit_p50_s: float | None
    transit_p99_s: float | None
    errors: int

    def figures(self) -> dict[str, Any]:
        return {
            "workers": self.workers,
            "streams": self.streams,
            "tokens_per_s": round(self.tokens_per_s, 1),
            "redis_cpu_share_of_a_core": round(self.redis_cpu, 3),
            "redis_ops_per_token": round(self.redis_ops_per_token, 3),
            "redis_bytes_per_token": round(self.redis_bytes_per_token, 1),
            "transit_p50_ms": None if self.transit_p50_s is None else round(1000 * self.transit_p50_s, 2),
            "transit_p99_ms": None if self.transit_p99_s is None else round(1000 * self.transit_p99_s, 2),
            "errors": self.errors,
        }


def _start(module: str, args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        command = [*orphan_guard(), sys.executable, "-m", module, *args]
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)


def _redis_counters(client: redis.Redis) -> tuple[float, int, int]:
    """(CPU seconds, commands processed, network bytes in and out) of the server so far."""
    info = client.info()
    cpu = float(info["used_cpu_sys"]) + float(info["used_cpu_user"])
    return (
        cpu,
        int(info["total_commands_processed"]),
        int(info["total_net_input_bytes"]) + int(info["total_net_output_bytes"]),
    )


def _transit(pages: list[str]) -> Histogram:
    """The gateways' response-transit histograms, summed."""
    total = Histogram((), 0.0)
    for page in pages:
        with urllib.request.urlopen(page, timeout=5) as reply:
            found = parse_histograms(reply.read().decode(), (_TRANSIT,)).get(_TRANSIT)
        if found is not None:
            total = total.plus(found)
    return total


async def _keep_streams(
    addresses: list[str], streams: int, max_tokens: int, seconds: float
) -> tuple[int, int]:
    """`streams` generations kept open for `seconds` (a new one as each ends), spread over the
    gateways; returns (tokens received within the window, failed calls)."""
    channels = [grpc.aio.insecure_channel(address) for address in addresses]
    stubs = [inference_pb2_grpc.InferenceStub(channel) for channel in channels]
    request = build_request("Tell me about the sea.", max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    deadline = time.monotonic() + seconds
    counts = {"tokens": 0, "errors": 0}

    async def one_slot(stub: inference_pb2_grpc.InferenceStub) -> None:
        while time.monotonic() < deadline:
            try:
                async for frame in stub.Generate(request):
                    if time.monotonic() >= deadline:
                        return
                    counts["tokens"] += len(frame.token_ids)
            except grpc.aio.AioRpcError:
                counts["errors"] += 1
                await asyncio.sleep(0.1)

    slots = [
        asyncio.create_task(one_slot(stub))
        for stub, _ in zip(itertools.cycle(stubs), range(streams), strict=False)
    ]
    await asyncio.gather(*slots)
    for channel in channels:
        await channel.close()
    return counts["tokens"], counts["errors"]


def _wait_for_workers(client: redis.Redis, count: int, timeout_s: float = 120.0) -> None:
    keys = StreamKeys(_NAMESPACE)
    deadline = time.monotonic() + timeout_s
    while len(list(client.scan_iter(match=keys.worker_pattern))) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{count} simulated workers did not join within {timeout_s:g} s")
        time.sleep(0.2)


def _wait_for_gateways(addresses: list[str], timeout_s: float = 60.0) -> None:
    """Every gateway says a worker serves its model."""
    probes = [health_probe(address, "") for address in addresses]
    deadline = time.monotonic() + timeout_s
    while not all(probe() for probe in probes):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the gateways did not serve within {timeout_s:g} s")
        time.sleep(0.2)


def run_fleet_sim(options: SimOptions, log_dir: Path, report: Any = print) -> list[Level]:
    """Grow the fleet level by level; returns every level measured."""
    log_dir.mkdir(parents=True, exist_ok=True)
    processes: list[subprocess.Popen[bytes]] = []
    levels: list[Level] = []
    with RedisServer() as server:
        client = redis.Redis.from_url(server.url)
        common = ["--redis-url", server.url, "--namespace", _NAMESPACE, "--model", str(options.model)]
        try:
            addresses, pages = [], []
            for index in range(options.gateways):
                port, metrics_port = free_port(), free_port()
                gateway_args = [*common, "--port", str(port), "--metrics-port", str(metrics_port)]
                gateway_args += ["--max-in-flight", str(options.max_workers * options.seqs_per_worker * 2)]
                processes.append(_start("gateway", gateway_args, log_dir / f"gateway-{index}.log"))
                addresses.append(f"127.0.0.1:{port}")
                pages.append(f"http://127.0.0.1:{metrics_port}/metrics")
            simulated = ["--simulate-steps-per-s", str(options.steps_per_s)]
            simulated += ["--max-num-seqs", str(options.seqs_per_worker), "--metrics-port", "-1"]
            for workers in range(1, options.max_workers + 1):
                processes.append(_start("worker", [*common, *simulated], log_dir / f"worker-{workers}.log"))
                _wait_for_workers(client, workers)
                _wait_for_gateways(addresses)
                level = _measure(options, workers, client, addresses, pages)
                levels.append(level)
                report(level)
                saturated = len(levels) > 1 and level.tokens_per_s < 1.1 * levels[-2].tokens_per_s
                p99 = level.transit_p99_s or 0.0
                if (
                    level.redis_cpu >= options.redis_cpu_limit
                    or p99 >= options.transit_p99_limit_s
                    or saturated
                ):
                    break
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=30)
                if process.poll() is None:
                    process.kill()
            client.close()
    return levels


def _measure(
    options: SimOptions, workers: int, client: redis.Redis, addresses: list[str], pages: list[str]
) -> Level:
    streams = workers * options.seqs_per_worker
    # A short warm-up at this level, so the window sees steady traffic, then the window itself.
    asyncio.run(_keep_streams(addresses, streams, options.max_tokens, 2.0))
    cpu0, ops0, bytes0 = _redis_counters(client)
    transit0 = _transit(pages)
    started = time.monotonic()
    tokens, errors = asyncio.run(
        _keep_streams(addresses, streams, options.max_tokens, options.seconds_per_level)
    )
    elapsed = time.monotonic() - started
    cpu1, ops1, bytes1 = _redis_counters(client)
    transit = _transit(pages).minus(transit0)
    per_token = max(tokens, 1)
    return Level(
        workers=workers,
        streams=streams,
        tokens_per_s=tokens / elapsed,
        redis_cpu=(cpu1 - cpu0) / elapsed,
        redis_ops_per_token=(ops1 - ops0) / per_token,
        redis_bytes_per_token=(bytes1 - bytes0) / per_token,
        transit_p50_s=transit.quantile(0.5),
        transit_p99_s=transit.quantile(0.99),
        errors=errors,
    )


def format_level(level: Level) -> str:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{1000 * value:.1f}"

    return (
        f"{level.workers:>7} {level.streams:>8} {level.tokens_per_s:>10.0f} {100 * level.redis_cpu:>9.1f}% "
        f"{level.redis_ops_per_token:>10.3f} {level.redis_bytes_per_token:>10.0f} "
        f"{ms(level.transit_p50_s):>9} {ms(level.transit_p99_s):>9} {level.errors:>6}"
    )


HEADER = (
    f"{'workers':>7} {'streams':>8} {'tokens/s':>10} {'redis cpu':>10} {'ops/token':>10} "
    f"{'bytes/tok':>10} {'p50 ms':>9} {'p99 ms':>9} {'errors':>6}"
)
