"""`conveyor monitor` against the live stack: frames name the live worker and gateway, count the
requests just served, and keep rendering while workers come and go."""

import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import TypeVar

import redis
from rich.console import Console

from client.fleet_snapshot import FleetReader, Snapshot
from client.library import ConveyorClient
from client.monitor import FleetHistory, render
from protos.redis_layout import StreamKeys
from tests.e2e.cluster import FAST_FAILOVER_ARGS, start_worker, stop_process
from tests.e2e.conftest import Cluster

T = TypeVar("T")


def frame(history: FleetHistory) -> str:
    console = Console(record=True, width=220, file=io.StringIO())
    console.print(render(history, "test"))
    return console.export_text()


def eventually(read: Callable[[], T], holds: Callable[[T], bool], timeout_s: float = 60.0) -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        value = read()
        if holds(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


def test_frame_shows_the_fleet_and_the_requests_just_served(cluster: Cluster) -> None:
    client = redis.Redis.from_url(cluster.redis_url)
    reader = FleetReader(client, StreamKeys(cluster.namespace))
    history = FleetHistory(window_s=600)
    try:
        before = reader.read()
        history.add(before)
        (gateway,) = [g for g in before.gateways if g.status.metrics_url == cluster.gateway_metrics]
        with ConveyorClient(cluster.address) as conveyor:
            for prompt in ("one", "two", "three"):
                conveyor.generate(prompt, max_tokens=4, temperature=0.0, ignore_eos=True)
        served = {w.worker_id: w.generation_tokens for w in before.workers}
        # The next heartbeats carry the tokens just generated.
        after = eventually(
            reader.read,
            lambda s: any(w.generation_tokens > served.get(w.worker_id, 0) for w in s.workers),
        )
        history.add(after)
    finally:
        reader.close()
        client.close()

    assert not after.error
    (live,) = [w for w in after.workers if w.metrics_url == cluster.worker_metrics]
    rate = history.tokens_per_s(live)
    assert rate is not None and rate > 0
    (now,) = [g for g in after.gateways if g.status.gateway_id == gateway.status.gateway_id]
    assert not now.scrape_error
    recent, seconds = history.recent(now, "e2e_request_latency_seconds")
    assert recent is not None and recent.count == 3 and seconds > 0
    ttft, _ = history.recent(now, "time_to_first_token_seconds")
    assert ttft is not None and ttft.quantile(0.5) is not None
    (stream,) = [s for s in after.streams if s.model == live.model]
    assert stream.consumers >= 1 and stream.unclaimed == 0

    text = frame(history)
    assert live.worker_id in text and gateway.status.gateway_id in text
    assert "serving" in text and f"{recent.count / seconds:.2f}" in text


def test_cli_prints_one_frame_naming_the_live_worker(cluster: Cluster) -> None:
    client = redis.Redis.from_url(cluster.redis_url)
    worker_ids = [
        k.decode().rsplit(":", 1)[1] for k in client.scan_iter(match=f"{cluster.namespace}:worker:*")
    ]
    client.close()
    result = subprocess.run(
        [sys.executable, "-m", "client", "monitor", "--once", "--interval", "0.2"]
        + ["--redis-url", cluster.redis_url, "--namespace", cluster.namespace],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "220"},
    )
    assert result.returncode == 0, result.stderr
    assert worker_ids and all(worker_id in result.stdout for worker_id in worker_ids)
    assert "request streams" in result.stdout


def test_frames_follow_workers_that_come_and_go(cluster: Cluster) -> None:
    client = redis.Redis.from_url(cluster.redis_url)
    reader = FleetReader(client, StreamKeys(cluster.namespace))
    history = FleetHistory(window_s=60)
    first = reader.read()
    known = {w.worker_id for w in first.workers}
    extra = start_worker(
        cluster.redis_url, cluster.namespace, cluster.model_dir, cluster.log_dir, *FAST_FAILOVER_ARGS
    )
    try:

        def newcomers(snapshot: Snapshot) -> list[str]:
            return [w.worker_id for w in snapshot.workers if w.worker_id not in known]

        joined = eventually(reader.read, lambda s: bool(newcomers(s)) or extra.poll() is not None, 180)
        (newcomer,) = newcomers(joined)
        history.add(joined)
        assert newcomer in frame(history)

        os.killpg(extra.pid, signal.SIGKILL)  # no goodbye: its heartbeat has to expire
        extra.wait()
        gone = eventually(reader.read, lambda s: not newcomers(s), 30)
        history.add(gone)
        text = frame(history)
        assert newcomer not in text
        assert all(worker_id in text for worker_id in known)
    finally:
        stop_process(extra)
        reader.close()
        client.close()
