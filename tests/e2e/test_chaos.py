"""Faults with real processes: a worker killed mid-generation, a gateway killed mid-request."""

import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import redis

from client.library import ConveyorClient
from client.redis_server import RedisServer
from protos import inference_pb2
from protos.streams import GROUP, StreamKeys
from tests.e2e.cluster import (
    start_gateway,
    start_worker,
    stop_process,
    wait_for,
    wait_until_serving,
    worker_statuses,
)
from tests.e2e.conftest import Cluster

MODEL = "smollm2-135m-instruct"
NUM_STREAMS = 16
MAX_TOKENS = 48
# Short heartbeats so a death is noticed in about two seconds; one thread each, two share two cores.
CHAOS_WORKER_ARGS = ("--heartbeat-ttl-s", "2", "--heartbeat-interval-s", "0.5", "--num-threads", "1")


@dataclass
class Stream:
    """One client's view of its stream: every frame, and when each arrived."""

    prompt: str
    max_tokens: int = MAX_TOKENS
    frames: list[inference_pb2.GenerateResponse] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)
    error: grpc.RpcError | None = None

    @property
    def token_ids(self) -> list[int]:
        return [t for f in self.frames for t in f.token_ids]

    def run(self, address: str) -> None:
        try:
            with ConveyorClient(address) as client:
                for frame in client.stream(
                    self.prompt, max_tokens=self.max_tokens, temperature=0.0, ignore_eos=True, timeout_s=300
                ):
                    self.frames.append(frame)
                    self.arrivals.append(time.monotonic())
        except grpc.RpcError as error:
            self.error = error


def run_streams(address: str, prompts: list[str], while_running: object = None) -> list[Stream]:
    streams = [Stream(p) for p in prompts]
    threads = [threading.Thread(target=s.run, args=(address,)) for s in streams]
    for thread in threads:
        thread.start()
    if while_running is not None:
        while_running(streams)  # type: ignore[operator]
    for thread in threads:
        thread.join(timeout=300)
    return streams


def pending_by_consumer(client: redis.Redis, namespace: str) -> dict[str, int]:
    consumers = client.xinfo_consumers(StreamKeys(namespace).requests(MODEL), GROUP)
    return {c["name"].decode(): int(c["pending"]) for c in consumers}


def test_a_worker_killed_mid_generation_loses_and_repeats_nothing(
    redis_server: RedisServer, model_dir: Path, log_dir: Path
) -> None:
    namespace = "chaos"
    client = redis.Redis.from_url(redis_server.url)
    workers = [
        start_worker(
            redis_server.url, namespace, model_dir, log_dir, *CHAOS_WORKER_ARGS, "--max-num-seqs", "16"
        )
        for _ in range(2)
    ]
    gateway, address = start_gateway(redis_server.url, namespace, model_dir, log_dir)
    prompts = [f"Write a short story about a {n}-legged robot." for n in range(NUM_STREAMS)]
    report: dict[str, object] = {}
    try:
        wait_until_serving(address, [*workers, gateway])
        assert wait_for(lambda: len(worker_statuses(redis_server.url, namespace)) == 2, timeout_s=120)
        undisturbed = run_streams(address, prompts)
        assert all(s.error is None and len(s.token_ids) == MAX_TOKENS for s in undisturbed)

        def kill_the_busier_worker(streams: list[Stream]) -> None:
            assert wait_for(lambda: all(len(s.token_ids) >= 2 for s in streams), timeout_s=120)
            pending = pending_by_consumer(client, namespace)
            victim = max(workers, key=lambda w: _pending_of(pending, w.pid))
            report["in_flight_on_victim"] = _pending_of(pending, victim.pid)
            report["killed_at"] = time.monotonic()
            os.killpg(victim.pid, signal.SIGKILL)
            victim.wait()
            report["victim"] = victim

        disturbed = run_streams(address, prompts, kill_the_busier_worker)
    finally:
        stop_process(gateway)
        for worker in workers:
            stop_process(worker)
    assert isinstance(report["in_flight_on_victim"], int) and report["in_flight_on_victim"] > 0
    for before, after in zip(undisturbed, disturbed, strict=True):
        assert after.error is None, after.error
        indexes = [i for f in after.frames for i in range(f.index, f.index + len(f.token_ids))]
        assert indexes == list(range(MAX_TOKENS)), "an index twice or missing"
        assert after.token_ids == before.token_ids, "greedy text differs from the undisturbed run"
        assert after.frames[-1].finish_reason == inference_pb2.FINISH_REASON_LENGTH
    killed_at = report["killed_at"]
    assert isinstance(killed_at, float)
    resumed = [
        min(t for t in s.arrivals if t > killed_at) - killed_at
        for s in disturbed
        if s.arrivals[-1] > killed_at
    ]
    print(
        f"\nworker killed with {report['in_flight_on_victim']} of {NUM_STREAMS} streams in flight: "
        f"{NUM_STREAMS} completed, 0 duplicated, 0 lost; longest gap after the kill {max(resumed):.1f} s"
    )
    keys = StreamKeys(namespace)
    assert client.xlen(keys.requests(MODEL)) == 0, "every job acknowledged"
    assert not list(client.scan_iter(match=keys.progress("*"))), "no progress left behind"
    client.close()


def _pending_of(pending: dict[str, int], pid: int) -> int:
    prefix = f"{socket.gethostname()}-{pid}-"
    return sum(n for name, n in pending.items() if name.startswith(prefix))


def test_workers_drop_the_jobs_of_a_gateway_that_died(cluster: Cluster) -> None:
    gateway, address = start_gateway(cluster.redis_url, cluster.namespace, cluster.model_dir, cluster.log_dir)
    client = redis.Redis.from_url(cluster.redis_url)
    keys = StreamKeys(cluster.namespace)
    try:
        wait_until_serving(address, [gateway])
        stream = Stream("Count from one to a thousand in words:", max_tokens=1500)
        thread = threading.Thread(target=stream.run, args=(address,))
        thread.start()
        assert wait_for(lambda: len(stream.token_ids) >= 2, timeout_s=60)
        os.killpg(gateway.pid, signal.SIGKILL)
        gateway.wait()
        killed_at = time.monotonic()
        assert wait_for(lambda: client.xlen(keys.requests(MODEL)) == 0, timeout_s=30), "job still held"
        dropped_after_s = time.monotonic() - killed_at
        thread.join(timeout=30)
    finally:
        stop_process(gateway)
    assert wait_for(
        lambda: all(s.num_running == 0 for s in worker_statuses(cluster.redis_url, cluster.namespace))
    )
    assert not list(client.scan_iter(match=keys.progress("*"))), "no progress left behind"
    assert stream.error is not None and stream.error.code() == grpc.StatusCode.UNAVAILABLE
    print(f"\njob of a killed gateway dropped {dropped_after_s:.1f} s after the kill")
    client.close()
