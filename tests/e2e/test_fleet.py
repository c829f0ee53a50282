"""Several gateways and workers on one Redis, SIGTERM drain, and `make run`'s process tree."""

import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import openai
import pytest
import redis

from client.library import ConveyorClient
from client.redis_server import RedisServer, free_port
from protos import inference_pb2, jobs_pb2
from protos.redis_layout import FIELD, StreamKeys
from tests.e2e.cluster import (
    TEST_WORKER_ARGS,
    start_gateway,
    start_worker,
    stop_process,
    wait_for,
    wait_until_serving,
    worker_statuses,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def fleet(redis_server: RedisServer, model_dir: Path, log_dir: Path) -> Iterator[list[str]]:
    """Two workers that run two sequences each, and two gateways, in their own namespace."""
    workers = [
        start_worker(redis_server.url, "fleet", model_dir, log_dir, "--max-num-seqs", "2") for _ in range(2)
    ]
    gateways = [start_gateway(redis_server.url, "fleet", model_dir, log_dir) for _ in range(2)]
    addresses = [address for _, address in gateways]
    try:
        for address in addresses:
            wait_until_serving(address, workers + [g for g, _ in gateways])
        assert wait_for(lambda: len(worker_statuses(redis_server.url, "fleet")) == 2, timeout_s=120)
        yield addresses
    finally:
        for process in [g for g, _ in gateways] + workers:
            assert stop_process(process) == 0


def test_two_gateways_and_two_workers_share_one_redis(fleet: list[str], redis_server: RedisServer) -> None:
    prompts = [f"List {n} colors:" for n in range(3, 9)]
    results: dict[tuple[int, str], list[int]] = {}

    def run(gateway: int, prompt: str) -> None:
        with ConveyorClient(fleet[gateway]) as client:
            completion = client.generate(prompt, max_tokens=10, temperature=0.0, ignore_eos=True)
            results[(gateway, prompt)] = completion.token_ids

    threads = [threading.Thread(target=run, args=(i % 2, p)) for i, p in enumerate(prompts)]
    threads += [threading.Thread(target=run, args=(1 - i % 2, p)) for i, p in enumerate(prompts)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert len(results) == 12
    for prompt in prompts:  # the same greedy answer whichever gateway and worker served it
        assert results[(0, prompt)] == results[(1, prompt)] and len(results[(0, prompt)]) == 10
    statuses = worker_statuses(redis_server.url, "fleet")
    assert sorted(s.num_finished > 0 for s in statuses) == [True, True], (
        "jobs should spread over both workers"
    )
    with ConveyorClient(fleet[0]) as client:
        assert client.list_models()[0].num_workers == 2
    client_redis = redis.Redis.from_url(redis_server.url)
    seen: list[set[str]] = []
    for key in client_redis.scan_iter(match="fleet:responses:*"):
        ids = {
            c.request_id
            for _, f in client_redis.xrange(key)
            for c in jobs_pb2.TokenBatch.FromString(f[FIELD]).chunks
        }
        seen.append(ids)
    assert len(seen) == 2 and all(len(ids) == 6 for ids in seen) and not seen[0] & seen[1]


def test_sigterm_drains_running_jobs_then_exits_zero(
    redis_server: RedisServer, model_dir: Path, log_dir: Path
) -> None:
    keys = StreamKeys("drain")
    client = redis.Redis.from_url(redis_server.url)
    worker = start_worker(redis_server.url, "drain", model_dir, log_dir)
    try:
        assert wait_for(lambda: worker_statuses(redis_server.url, "drain"), timeout_s=120)
        job = jobs_pb2.Job(
            request_id="drain-job",
            gateway_id="test-gateway",
            prompt_token_ids=[1, 4093, 198, 19556, 260, 1194, 47, 2, 198],
            sampling=jobs_pb2.Sampling(
                max_tokens=40,
                temperature=0.0,
                top_p=1.0,
                repetition_penalty=1.0,
                ignore_eos=True,
                logprobs=-1,
            ),
        )
        client.set(keys.gateway("test-gateway"), b"1", ex=600)  # workers drop the jobs of absent gateways
        client.xadd(keys.requests("smollm2-135m-instruct"), {FIELD: job.SerializeToString()})
        responses = keys.responses("smollm2-135m-instruct", "test-gateway")
        assert wait_for(lambda: client.xlen(responses) > 0, timeout_s=60)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0
    finally:
        stop_process(worker)
    chunks = [c for _, f in client.xrange(responses) for c in jobs_pb2.TokenBatch.FromString(f[FIELD]).chunks]
    assert [c.index for c in chunks] == list(range(40))
    assert chunks[-1].finish_reason == inference_pb2.FINISH_REASON_LENGTH
    assert client.xlen(keys.requests("smollm2-135m-instruct")) == 0  # acknowledged and deleted
    assert not worker_statuses(redis_server.url, "drain"), "the heartbeat key should be removed on exit"


def _descendants(pid: int) -> set[int]:
    found: set[int] = set()
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except FileNotFoundError:
            continue
        for child in map(int, children):
            found.add(child)
            pending.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ")[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_make_run_serves_and_ctrl_c_ends_every_process(model_dir: Path) -> None:
    port, http_port = free_port(), free_port()
    run_args = f"--port {port} --http-port {http_port} --worker-args {' '.join(TEST_WORKER_ARGS)}"
    make = subprocess.Popen(
        ["make", "--no-print-directory", "run", f"RUN_ARGS={run_args}"],
        cwd=ROOT,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        address = f"127.0.0.1:{port}"
        wait_until_serving(address, [make], timeout_s=180)
        with ConveyorClient(address) as client:
            reply = client.generate(
                messages=[{"role": "user", "content": "What is the capital of France?"}],
                max_tokens=20,
                temperature=0.0,
            )
        assert "Paris" in reply.text
        # The README's OpenAI SDK call, against the same `make run`.
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="none")
        chat = api.chat.completions.create(
            model="smollm2-135m-instruct",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=20,
            temperature=0,
        )
        assert chat.choices[0].message.content == reply.text
        tree = _descendants(make.pid)
        assert len(tree) >= 4  # conveyor serve, redis-server, gateway, worker
        os.killpg(make.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
        make.wait(timeout=90)
        assert wait_for(lambda: not any(_alive(pid) for pid in tree), timeout_s=30), "processes left behind"
    finally:
        if make.poll() is None:
            os.killpg(make.pid, signal.SIGKILL)
            make.wait()
    with pytest.raises(grpc.RpcError), ConveyorClient(address) as client:
        client.generate("hi", max_tokens=1, timeout_s=2)
