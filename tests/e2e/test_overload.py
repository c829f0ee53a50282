"""A flood at ten times a gateway's capacity: the excess is refused at once, the rest finishes."""

import asyncio
import time
from pathlib import Path

import grpc
import httpx2 as httpx

from client.library import build_request
from client.redis_server import free_port
from protos import inference_pb2_grpc
from tests.e2e.cluster import start_gateway, stop_process, wait_until_serving
from tests.e2e.conftest import Cluster

CAPACITY = 6
FLOOD = 10 * CAPACITY


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def one_call(stub: inference_pb2_grpc.InferenceStub, n: int) -> tuple[str, float, str]:
    """(status name, seconds until the answer or the refusal, the retry hint)"""
    started = time.monotonic()
    call = stub.Generate(build_request(f"Count to {n}:", max_tokens=16, temperature=0.0, ignore_eos=True))
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as error:
        trailers = dict(error.trailing_metadata() or ())
        return error.code().name, time.monotonic() - started, str(trailers.get("grpc-retry-pushback-ms", ""))
    return "OK", time.monotonic() - started, ""


async def flood(address: str) -> list[tuple[str, float, str]]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        return await asyncio.gather(*(one_call(stub, n) for n in range(FLOOD)))


def test_a_flood_gets_resource_exhausted_quickly_and_the_admitted_finish(cluster: Cluster) -> None:
    gateway, address = start_gateway(
        cluster.redis_url,
        cluster.namespace,
        cluster.model_dir,
        cluster.log_dir,
        "--max-in-flight",
        str(CAPACITY),
        "--retry-after-ms",
        "250",
    )
    try:
        wait_until_serving(address, [gateway])
        rss_before = rss_kib(gateway.pid)
        results = asyncio.run(flood(address))
        second = asyncio.run(flood(address))
        rss_after = rss_kib(gateway.pid)
    finally:
        assert stop_process(gateway) == 0
    for outcome in (results, second):
        admitted = [r for r in outcome if r[0] == "OK"]
        refused = [r for r in outcome if r[0] != "OK"]
        assert len(admitted) >= CAPACITY and len(admitted) + len(refused) == FLOOD
        assert {r[0] for r in refused} == {"RESOURCE_EXHAUSTED"} and {r[2] for r in refused} == {"250"}
    refusal_s = sorted(r[1] for r in results if r[0] != "OK")
    print(
        f"\nflood of {FLOOD} at capacity {CAPACITY}: {sum(r[0] == 'OK' for r in results)} completed, "
        f"{len(refusal_s)} refused, refusal p50 {refusal_s[len(refusal_s) // 2] * 1000:.0f} ms, "
        f"max {refusal_s[-1] * 1000:.0f} ms; gateway RSS {rss_before // 1024} -> {rss_after // 1024} MiB"
    )
    assert rss_after - rss_before < 100 * 1024, "the gateway's memory should not grow with a flood"


async def concurrent(address: str, count: int) -> list[tuple[str, float, str]]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        return await asyncio.gather(*(one_call(stub, n) for n in range(count)))


async def http_calls(url: str, count: int) -> list[tuple[int, str]]:
    """(status, Retry-After) of `count` OpenAI completion calls at once."""
    body = {"model": "smollm2-135m-instruct", "prompt": "Count to ten:", "max_tokens": 16, "ignore_eos": True}
    async with httpx.AsyncClient(timeout=60) as client:
        replies = await asyncio.gather(*(client.post(url, json=body) for _ in range(count)))
    return [(reply.status_code, reply.headers.get("retry-after", "")) for reply in replies]


def test_per_caller_limits_on_open_calls_and_on_rate(cluster: Cluster) -> None:
    args = (cluster.redis_url, cluster.namespace, cluster.model_dir, cluster.log_dir)
    http_port = free_port()
    capped, capped_address = start_gateway(
        *args, "--max-in-flight-per-caller", "2", "--http-port", str(http_port)
    )
    rated, rated_address = start_gateway(*args, "--requests-per-s-per-caller", "3")
    try:
        wait_until_serving(capped_address, [capped, rated])
        wait_until_serving(rated_address, [capped, rated])
        by_cap = [r[0] for r in asyncio.run(concurrent(capped_address, 5))]
        assert sorted(by_cap) == ["OK", "OK"] + ["RESOURCE_EXHAUSTED"] * 3
        over_http = asyncio.run(http_calls(f"http://127.0.0.1:{http_port}/v1/completions", 5))
        assert sorted(status for status, _ in over_http) == [200, 200, 429, 429, 429]
        assert {retry for status, retry in over_http if status == 429} == {"1"}  # seconds, rounded up
        by_rate = asyncio.run(concurrent(rated_address, 5))
        assert sorted(r[0] for r in by_rate) == ["OK"] * 3 + ["RESOURCE_EXHAUSTED"] * 2
        assert all(0 < int(r[2]) <= 334 for r in by_rate if r[0] != "OK"), "the wait for the next token"
    finally:
        assert stop_process(capped) == 0
        assert stop_process(rated) == 0
