"""Faults with real processes: a worker killed mid-generation or holding an embedding call, a gateway
killed mid-request."""

import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import grpc
import jsonschema
import redis

from client.library import ConveyorClient, vectors_of
from client.redis_server import RedisServer
from protos import inference_pb2
from protos.redis_layout import GROUP, StreamKeys
from tests.e2e.cluster import (
    FAST_FAILOVER_ARGS,
    start_gateway,
    start_worker,
    stop_process,
    wait_for,
    wait_until_serving,
    worker_statuses,
)
from tests.e2e.conftest import Cluster
from tests.e2e.recording import RecordedStream

MODEL = "smollm2-135m-instruct"
ROBOT = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "legs": {"type": "integer"}},
    "required": ["name", "legs"],
    "additionalProperties": False,
}
NUM_STREAMS = 16
MAX_TOKENS = 48
NUM_CHOICES = 3  # of the streams that ask for several completions


def run_streams(
    address: str,
    prompts: list[str],
    while_running: object = None,
    sampling: list[dict[str, object]] | None = None,
) -> list[RecordedStream]:
    """One stream per prompt, each with its own sampling (default: greedy, EOS ignored)."""
    streams = [
        RecordedStream(p, MAX_TOKENS) if sampling is None else RecordedStream(p, MAX_TOKENS, sampling=s)
        for p, s in zip(prompts, sampling or [{}] * len(prompts), strict=True)
    ]
    threads = [threading.Thread(target=s.run, args=(address,)) for s in streams]
    for thread in threads:
        thread.start()
    if while_running is not None:
        while_running(streams)  # type: ignore[operator]
    for thread in threads:
        thread.join(timeout=300)
    return streams


def two_workers_and_a_gateway(
    redis_url: str, namespace: str, model_dir: Path, log_dir: Path, *worker_args: str
) -> tuple[list[subprocess.Popen[bytes]], subprocess.Popen[bytes], str]:
    """Started, not yet serving: the caller waits, inside its own try/finally."""
    workers = [
        start_worker(redis_url, namespace, model_dir, log_dir, *FAST_FAILOVER_ARGS, *worker_args)
        for _ in range(2)
    ]
    gateway, address = start_gateway(redis_url, namespace, model_dir, log_dir)
    return workers, gateway, address


def stream_on_one_of(
    workers: list[subprocess.Popen[bytes]],
    gateway: subprocess.Popen[bytes],
    address: str,
    redis_url: str,
    namespace: str,
    stream: RecordedStream,
) -> tuple[threading.Thread, subprocess.Popen[bytes]]:
    """Once both workers serve, run `stream` in a thread until it has tokens; the worker running it."""
    wait_until_serving(address, [*workers, gateway])
    assert wait_for(lambda: len(worker_statuses(redis_url, namespace)) == 2, timeout_s=120)
    thread = threading.Thread(target=stream.run, args=(address,))
    thread.start()
    assert wait_for(lambda: len(stream.token_ids) >= 2, timeout_s=60)
    client = redis.Redis.from_url(redis_url)
    pending = pending_by_consumer(client, namespace)
    client.close()
    (holder,) = [w for w in workers if _pending_of(pending, w.pid)]
    return thread, holder


def pending_by_consumer(client: redis.Redis, namespace: str) -> dict[str, int]:
    consumers = client.xinfo_consumers(StreamKeys(namespace).requests(MODEL), GROUP)
    return {c["name"].decode(): int(c["pending"]) for c in consumers}


def test_a_worker_killed_mid_generation_loses_and_repeats_nothing(
    redis_server: RedisServer, model_dir: Path, log_dir: Path
) -> None:
    namespace = "chaos"
    client = redis.Redis.from_url(redis_server.url)
    workers, gateway, address = two_workers_and_a_gateway(
        redis_server.url, namespace, model_dir, log_dir, "--max-num-seqs", "24"
    )
    prompts = [f"Write a short story about a {n}-legged robot." for n in range(NUM_STREAMS + 2)]
    # Half of the streams are constrained to a JSON schema: their matchers are rebuilt on the worker
    # that resumes them by replaying the tokens already delivered. Two more sample n completions,
    # seeded: each choice resumes from its own progress and its own seeded stream.
    constrained = {"temperature": 0.0, "json": json.dumps(ROBOT)}
    several = {"temperature": 1.0, "seed": 9, "ignore_eos": True, "n": NUM_CHOICES}
    sampling = (
        [constrained] * (NUM_STREAMS // 2)
        + [{"temperature": 0.0, "ignore_eos": True}] * (NUM_STREAMS // 2)
        + [several] * 2
    )
    report: dict[str, object] = {}
    try:
        wait_until_serving(address, [*workers, gateway])
        assert wait_for(lambda: len(worker_statuses(redis_server.url, namespace)) == 2, timeout_s=120)
        undisturbed = run_streams(address, prompts, sampling=sampling)
        assert all(s.error is None for s in undisturbed)
        assert all(len(s.token_ids) == MAX_TOKENS for s in undisturbed[NUM_STREAMS // 2 : NUM_STREAMS])
        assert all(len(s.token_ids) == NUM_CHOICES * MAX_TOKENS for s in undisturbed[NUM_STREAMS:])

        def kill_the_busier_worker(streams: list[RecordedStream]) -> None:
            assert wait_for(lambda: all(len(s.token_ids) >= 2 for s in streams), timeout_s=120)
            pending = pending_by_consumer(client, namespace)
            victim = max(workers, key=lambda w: _pending_of(pending, w.pid))
            report["in_flight_on_victim"] = _pending_of(pending, victim.pid)
            report["killed_at"] = time.monotonic()
            os.killpg(victim.pid, signal.SIGKILL)
            victim.wait()
            report["victim"] = victim

        disturbed = run_streams(address, prompts, kill_the_busier_worker, sampling)
    finally:
        stop_process(gateway)
        for worker in workers:
            stop_process(worker)
    assert isinstance(report["in_flight_on_victim"], int) and report["in_flight_on_victim"] > 0
    single = list(zip(undisturbed[:NUM_STREAMS], disturbed[:NUM_STREAMS], strict=True))
    chosen = [
        (before.choice(c), after.choice(c))
        for before, after in zip(undisturbed[NUM_STREAMS:], disturbed[NUM_STREAMS:], strict=True)
        for c in range(NUM_CHOICES)
    ]
    for before, after in single + chosen:
        assert after.error is None, after.error
        assert after.indexes == list(range(len(before.token_ids))), "an index twice or missing"
        assert after.token_ids == before.token_ids, "the text differs from the undisturbed run"
        assert after.frames[-1].finish_reason == before.frames[-1].finish_reason
    for stream in disturbed[: NUM_STREAMS // 2]:
        assert stream.frames[-1].finish_reason == inference_pb2.FINISH_REASON_STOP, stream.text
        jsonschema.validate(json.loads(stream.text), ROBOT)
    assert all(
        s.frames[-1].finish_reason == inference_pb2.FINISH_REASON_LENGTH
        for s in disturbed[NUM_STREAMS // 2 : NUM_STREAMS] + [after for _, after in chosen]
    )
    killed_at = report["killed_at"]
    assert isinstance(killed_at, float)
    assert any(s.arrivals[-1] > killed_at for s in disturbed[: NUM_STREAMS // 2]), (
        "a constrained stream resumed"
    )
    resumed = [
        min(t for t in s.arrivals if t > killed_at) - killed_at
        for s in disturbed
        if s.arrivals[-1] > killed_at
    ]
    print(
        f"\nworker killed with {report['in_flight_on_victim']} of {len(prompts)} streams in flight: "
        f"{len(prompts)} completed, 0 duplicated, 0 lost; longest gap after the kill {max(resumed):.1f} s"
    )
    keys = StreamKeys(namespace)
    assert client.xlen(keys.requests(MODEL)) == 0, "every job acknowledged"
    assert not list(client.scan_iter(match=keys.progress(MODEL, "*"))), "no progress left behind"
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
        stream = RecordedStream("Count from one to a thousand in words:", 1500)
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
    assert not list(client.scan_iter(match=keys.progress(MODEL, "*"))), "no progress left behind"
    assert stream.error is not None and stream.error.code() == grpc.StatusCode.UNAVAILABLE
    print(f"\njob of a killed gateway dropped {dropped_after_s:.1f} s after the kill")
    client.close()


def test_sigterm_past_the_grace_period_hands_the_job_to_another_worker(
    redis_server: RedisServer, model_dir: Path, log_dir: Path
) -> None:
    namespace = "handback"
    workers, gateway, address = two_workers_and_a_gateway(
        redis_server.url, namespace, model_dir, log_dir, "--drain-timeout-s", "1"
    )
    try:
        long = RecordedStream("Tell me everything about the history of bread.", 160)
        thread, leaving = stream_on_one_of(workers, gateway, address, redis_server.url, namespace, long)
        handed_at_token = len(long.token_ids)
        leaving.send_signal(signal.SIGTERM)
        assert leaving.wait(timeout=30) == 0
        thread.join(timeout=300)
        again = RecordedStream(long.prompt, long.max_tokens)
        again.run(address)  # undisturbed, on the worker that stayed
    finally:
        stop_process(gateway)
        for worker in workers:
            stop_process(worker)
    assert handed_at_token < long.max_tokens, "the job should still have been running at SIGTERM"
    assert long.error is None and again.error is None
    assert long.indexes == list(range(long.max_tokens)) and long.token_ids == again.token_ids


def test_sigterm_on_a_gateway_refuses_new_calls_and_lets_open_streams_finish(cluster: Cluster) -> None:
    gateway, address = start_gateway(
        cluster.redis_url, cluster.namespace, cluster.model_dir, cluster.log_dir, "--grace-s", "30"
    )
    try:
        wait_until_serving(address, [gateway])
        open_stream = RecordedStream("Name the planets of the solar system, one per line.", 60)
        thread = threading.Thread(target=open_stream.run, args=(address,))
        thread.start()
        assert wait_for(lambda: len(open_stream.token_ids) >= 2, timeout_s=60)
        gateway.send_signal(signal.SIGTERM)
        probes: list[RecordedStream] = []

        def new_call_refused() -> bool:
            probes.append(RecordedStream("Hello", 4))
            probes[-1].run(address)
            return probes[-1].error is not None

        assert wait_for(new_call_refused, timeout_s=10)
        refused = probes[-1].error
        assert refused is not None and refused.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in refused.details()
        thread.join(timeout=60)
        assert gateway.wait(timeout=30) == 0
    finally:
        stop_process(gateway)
    assert open_stream.error is None and open_stream.indexes == list(range(60))


def test_a_job_whose_workers_keep_dying_is_buried_and_the_fleet_serves_on(
    redis_server: RedisServer, model_dir: Path, log_dir: Path
) -> None:
    namespace = "poison"
    client = redis.Redis.from_url(redis_server.url)
    # One death is enough here; the default, three, is the same path with more workers to kill.
    workers, gateway, address = two_workers_and_a_gateway(
        redis_server.url, namespace, model_dir, log_dir, "--max-job-attempts", "1"
    )
    try:
        poison = RecordedStream("Recite a very long poem.", 400)
        thread, holder = stream_on_one_of(workers, gateway, address, redis_server.url, namespace, poison)
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
        thread.join(timeout=60)
        after = RecordedStream("Say hi.", 4)
        after.run(address)
    finally:
        stop_process(gateway)
        for worker in workers:
            stop_process(worker)
    keys = StreamKeys(namespace)
    ((_, dead),) = client.xrange(keys.dead(MODEL))
    client.close()
    assert dead[b"reason"] == b"1 worker died running it"
    assert poison.error is not None and poison.error.code() == grpc.StatusCode.INTERNAL
    assert "1 worker died running it" in poison.error.details()
    assert after.error is None and len(after.token_ids) == 4, "the fleet keeps serving"


def test_an_embedding_call_survives_the_death_of_the_worker_holding_it(
    redis_server: RedisServer, embedder_dir: Path, log_dir: Path
) -> None:
    namespace = "embed-failover"
    stream = StreamKeys(namespace).requests(embedder_dir.name)
    texts = ["Retrieval next to chat.", "One gateway for both.", "A man is eating food."]
    # This worker takes the call, then holds it: its batch waits a minute to fill.
    holder = start_worker(
        redis_server.url,
        namespace,
        embedder_dir,
        log_dir,
        *FAST_FAILOVER_ARGS,
        "--embed-max-wait-ms",
        "60000",
    )
    gateway, address = start_gateway(redis_server.url, namespace, embedder_dir, log_dir)
    rescuer = None
    result: dict[str, inference_pb2.EmbedResponse] = {}

    def call() -> None:
        with ConveyorClient(address) as conveyor:
            result["held"] = conveyor.embed(texts, timeout_s=180)

    try:
        wait_until_serving(address, [holder, gateway])
        caller = threading.Thread(target=call)
        caller.start()
        client = redis.Redis.from_url(redis_server.url)
        assert wait_for(lambda: client.xpending(stream, GROUP)["pending"] == 1, timeout_s=60)
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
        rescuer = start_worker(redis_server.url, namespace, embedder_dir, log_dir, *FAST_FAILOVER_ARGS)
        caller.join(timeout=180)
        assert "held" in result, "the call did not come back"
        with ConveyorClient(address) as conveyor:
            fresh = conveyor.embed(texts, timeout_s=60)
    finally:
        stop_process(gateway)
        stop_process(holder)
        if rescuer is not None:
            stop_process(rescuer)
    held, again = vectors_of(result["held"]), vectors_of(fresh)
    assert len(held) == len(texts)
    for left, right in zip(held, again, strict=True):
        assert sum(a * b for a, b in zip(left, right, strict=True)) > 0.9999  # unit vectors: the cosine
