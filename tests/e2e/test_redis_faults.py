"""Redis killed and restarted under a live gateway and worker, with AOF persistence as deployed."""

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client.library import ConveyorClient
from client.redis_server import RedisServer
from protos import inference_pb2
from tests.e2e.cluster import (
    FAST_FAILOVER_ARGS,
    start_gateway,
    start_worker,
    stop_process,
    wait_for,
    wait_until_serving,
)
from tests.e2e.recording import RecordedStream

NAMESPACE = "faults"
PROMPTS = [f"Describe the colour number {n} of the rainbow." for n in range(8)]
MAX_TOKENS = 32


@pytest.fixture(scope="module")
def persistent_redis() -> Iterator[RedisServer]:
    with RedisServer(appendonly=True) as server:
        yield server


def start_all(streams: list[RecordedStream], address: str) -> list[threading.Thread]:
    threads = [threading.Thread(target=s.run, args=(address,)) for s in streams]
    for thread in threads:
        thread.start()
    return threads


def join_all(threads: list[threading.Thread], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for thread in threads:
        thread.join(timeout=max(deadline - time.monotonic(), 0))
    assert not any(t.is_alive() for t in threads), f"a call still waits after {timeout_s} s"


def health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        try:
            request = health_pb2.HealthCheckRequest(service="conveyor.v1.Inference")
            return health_pb2_grpc.HealthStub(channel).Check(request, timeout=2).status
        except grpc.RpcError:
            return -1


def assert_whole(stream: RecordedStream) -> None:
    assert stream.indexes == list(range(MAX_TOKENS)), "an index twice or missing"
    assert stream.frames[-1].finish_reason == inference_pb2.FINISH_REASON_LENGTH


def test_redis_restarts_lose_nothing_that_was_queued_and_hang_nothing(
    persistent_redis: RedisServer, model_dir: Path, log_dir: Path
) -> None:
    redis_url = persistent_redis.url
    gateway, address = start_gateway(redis_url, NAMESPACE, model_dir, log_dir)
    worker = None
    try:
        assert wait_for(lambda: health(address) == health_pb2.HealthCheckResponse.NOT_SERVING, timeout_s=60)
        # Queued with no worker yet; Redis crashes and comes back from its AOF; then a worker starts.
        queued = [RecordedStream(p, MAX_TOKENS) for p in PROMPTS[:4]]
        threads = start_all(queued, address)
        time.sleep(1.0)
        persistent_redis.kill()
        time.sleep(2.0)
        persistent_redis.start()
        worker = start_worker(redis_url, NAMESPACE, model_dir, log_dir, *FAST_FAILOVER_ARGS)
        join_all(threads, timeout_s=180)
        for stream in queued:
            assert stream.error is None, stream.error
            assert_whole(stream)

        # Redis crashes under load: while it is down new calls fail fast; every open call ends.
        wait_until_serving(address, [gateway, worker])
        loaded = [RecordedStream(p, MAX_TOKENS) for p in PROMPTS]
        threads = start_all(loaded, address)
        assert wait_for(lambda: all(len(s.token_ids) >= 2 for s in loaded), timeout_s=60), [
            (len(s.token_ids), s.error) for s in loaded
        ]
        persistent_redis.kill()
        killed_at = time.monotonic()
        assert wait_for(lambda: health(address) == health_pb2.HealthCheckResponse.NOT_SERVING, timeout_s=10)
        refused_at = time.monotonic()
        with ConveyorClient(address) as client, pytest.raises(grpc.RpcError) as refused:
            client.generate("hello", max_tokens=4, timeout_s=30)
        refused_s = time.monotonic() - refused_at
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "unreachable" in refused.value.details()
        time.sleep(max(3.0 - (time.monotonic() - killed_at), 0))
        persistent_redis.start()
        restarted_at = time.monotonic()
        join_all(threads, timeout_s=120)
        ended_s = time.monotonic() - restarted_at
        completed = [s for s in loaded if s.error is None]
        unavailable = [s for s in loaded if s.error is not None]
        assert all(s.error.code() == grpc.StatusCode.UNAVAILABLE for s in unavailable)
        for stream in completed:
            assert_whole(stream)
        for before, after in zip(queued, loaded, strict=False):
            if after.error is None:
                assert after.token_ids == before.token_ids
        wait_until_serving(address, [gateway, worker])
        with ConveyorClient(address) as client:
            assert len(client.generate("hello", max_tokens=4, temperature=0.0).token_ids) == 4
        print(
            f"\nRedis killed with {len(loaded)} streams open: {len(completed)} completed whole, "
            f"{len(unavailable)} UNAVAILABLE, 0 hung, 0 duplicated; a new call during the outage "
            f"refused in {refused_s:.2f} s; all open calls ended {ended_s:.1f} s after the restart"
        )
    finally:
        stop_process(gateway)
        if worker is not None:
            stop_process(worker)


def test_a_redis_that_comes_back_empty_ends_open_calls_with_unavailable(
    model_dir: Path, log_dir: Path
) -> None:
    with RedisServer() as volatile:  # no persistence: a restart loses every job
        worker = start_worker(volatile.url, "volatile", model_dir, log_dir, *FAST_FAILOVER_ARGS)
        gateway, address = start_gateway(
            volatile.url, "volatile", model_dir, log_dir, "--job-watch-interval-s", "1"
        )
        try:
            wait_until_serving(address, [worker, gateway])
            streams = [RecordedStream(p, 400) for p in PROMPTS[:4]]
            threads = start_all(streams, address)
            assert wait_for(lambda: all(len(s.token_ids) >= 2 for s in streams), timeout_s=60)
            volatile.kill()
            time.sleep(1.0)
            volatile.start()
            restarted_at = time.monotonic()
            join_all(threads, timeout_s=60)
            ended_s = time.monotonic() - restarted_at
            for stream in streams:
                assert stream.error is not None and stream.error.code() == grpc.StatusCode.UNAVAILABLE
                assert "lost from the queue" in stream.error.details()
            wait_until_serving(address, [worker, gateway])  # the worker rejoined the new, empty Redis
            with ConveyorClient(address) as client:
                assert len(client.generate("hello", max_tokens=4, temperature=0.0).token_ids) == 4
            print(
                f"\nRedis restarted empty under {len(streams)} streams: all UNAVAILABLE {ended_s:.1f} s later"
            )
        finally:
            assert stop_process(gateway) == 0
            assert stop_process(worker) == 0
