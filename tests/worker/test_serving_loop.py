"""The serving loop over the simulated backend and a real redis-server: what it answers for each job it
reads (a run, a refusal, a cancel, a deadline, a duplicate), what it acknowledges and buries, and
how it drains. The real backends are tested on their own and, with real models, end to end."""

import itertools
import time
from collections.abc import Callable

import pytest
import redis
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry

from protos import inference_pb2, jobs_pb2
from protos.redis_layout import FIELD, GROUP, WORKER_STATUS_FIELD, ChoiceProgress, StreamKeys
from worker.health import LoopHealth
from worker.job_stream import JobStream
from worker.metrics import StepMetrics
from worker.outbox import Outbox
from worker.serving_loop import ServingLoop
from worker.settings import WorkerSettings
from worker.simulated_backend import SimulatedBackend

MODEL = "fake"
_namespaces = itertools.count()


class FakeBackend(SimulatedBackend):
    """The simulated model at full speed, remembering which jobs it was given and which it dropped."""

    def __init__(self) -> None:
        super().__init__(100, 64, 4, 1e6, StepMetrics(CollectorRegistry(), MODEL))
        self.started: list[tuple[str, tuple[int, ...]]] = []  # with choice 0's delivered tokens
        self.aborted: list[str] = []

    def start(self, job: jobs_pb2.Job, progress: tuple[ChoiceProgress, ...]) -> None:
        self.started.append((job.request_id, progress[0].token_ids if progress else ()))
        super().start(job, progress)

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        super().abort(request_id)


@pytest.fixture()
def keys() -> StreamKeys:
    return StreamKeys(f"loop{next(_namespaces)}")


@pytest.fixture()
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture()
def loop(client: redis.Redis, keys: StreamKeys, backend: FakeBackend) -> ServingLoop:
    settings = WorkerSettings(namespace=keys.namespace, idle_block_ms=10, heartbeat_interval_s=0.05)
    jobs = JobStream(client, keys, MODEL, "w", progress_ttl_s=60)
    tracer = TracerProvider().get_tracer("test")
    loop = ServingLoop(backend, jobs, settings, tracer, "", LoopHealth(60))
    jobs.join_group()
    loop.step()  # the first heartbeat: a consumer without one is an orphan
    client.set(keys.gateway("gw"), b"", px=60_000)  # a live gateway: its jobs are not dropped
    return loop


def job(request_id: str, max_tokens: int = 3, **fields: object) -> jobs_pb2.Job:
    sampling = jobs_pb2.Sampling(max_tokens=max_tokens, temperature=0.0, top_p=1.0, repetition_penalty=1.0)
    return jobs_pb2.Job(
        request_id=request_id,
        gateway_id="gw",
        prompt_token_ids=[1, 2, 3],
        sampling=sampling,
        **fields,  # type: ignore[arg-type]
    )


def submit(client: redis.Redis, keys: StreamKeys, *jobs: jobs_pb2.Job) -> None:
    for item in jobs:
        client.xadd(keys.requests(MODEL), {FIELD: item.SerializeToString()})


def responses(client: redis.Redis, keys: StreamKeys) -> list[jobs_pb2.TokenChunk]:
    return [
        c
        for _, f in client.xrange(keys.responses(MODEL, "gw"))
        for c in jobs_pb2.TokenBatch.FromString(f[FIELD]).chunks
    ]


def step_until(loop: ServingLoop, done: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        loop.step()
        if done():
            return
    pytest.fail("the loop never got there")


def finished(client: redis.Redis, keys: StreamKeys, request_id: str) -> list[jobs_pb2.TokenChunk]:
    return [c for c in responses(client, keys) if c.request_id == request_id and c.finish_reason]


def test_a_job_streams_its_tokens_and_leaves_the_stream_when_done(
    loop: ServingLoop, client: redis.Redis, keys: StreamKeys
) -> None:
    submit(client, keys, job("r1", max_tokens=3))
    step_until(loop, lambda: bool(finished(client, keys, "r1")))
    chunks = responses(client, keys)
    assert [(c.index, len(c.token_ids)) for c in chunks] == [(0, 1), (1, 1), (2, 1)]
    assert chunks[0].started_unix_ms > 0, "the first chunk says when the job began"
    assert chunks[-1].finish_reason == inference_pb2.FINISH_REASON_LENGTH
    assert client.xlen(keys.requests(MODEL)) == 0 and client.get(keys.progress(MODEL, "r1")) is None
    assert client.xpending(keys.requests(MODEL), GROUP)["pending"] == 0


def test_a_job_of_n_choices_ends_when_its_last_choice_does(
    loop: ServingLoop, client: redis.Redis, keys: StreamKeys
) -> None:
    sampled = job("r1", max_tokens=4)
    sampled.sampling.n = 3  # the fake stops choice c c tokens early
    submit(client, keys, sampled)
    step_until(loop, lambda: client.xlen(keys.requests(MODEL)) == 0)
    chunks = responses(client, keys)
    ends = [(c.choice_index, c.index) for c in chunks if c.finish_reason]
    assert ends == [(2, 1), (1, 2), (0, 3)]
    for choice in range(3):
        assert [c.index for c in chunks if c.choice_index == choice] == list(range(4 - choice))
    assert not list(client.scan_iter(match=keys.progress(MODEL, "*")))


def test_a_stop_of_one_choice_ends_it_and_the_job_runs_on(
    loop: ServingLoop, client: redis.Redis, keys: StreamKeys, backend: FakeBackend
) -> None:
    sampled = job("r1", max_tokens=30)
    sampled.sampling.n = 2
    submit(client, keys, sampled)
    step_until(loop, lambda: len(responses(client, keys)) >= 2)
    stop = jobs_pb2.Cancel(request_id="r1", stopped=True, choice_index=1)
    client.xadd(keys.cancel(MODEL), {FIELD: stop.SerializeToString()})
    # Said in its progress, so that a resume does not run it again.
    step_until(loop, lambda: ChoiceProgress.unpack(client.get(keys.progress(MODEL, "r1", 1))).finished)
    step_until(loop, lambda: client.xlen(keys.requests(MODEL)) == 0)
    chunks = responses(client, keys)
    assert [c.choice_index for c in chunks if c.finish_reason] == [0], "choice 1 ends without a word"
    assert max(c.index for c in chunks if c.choice_index == 1) < 29 and backend.aborted == []
    assert not list(client.scan_iter(match=keys.progress(MODEL, "*")))


def test_a_job_it_can_never_run_is_buried_and_its_gateway_told(
    loop: ServingLoop, client: redis.Redis, keys: StreamKeys, backend: FakeBackend
) -> None:
    bad = job("bad")
    bad.prompt_token_ids.append(100)  # outside the fake's vocabulary
    submit(client, keys, bad)
    step_until(loop, lambda: bool(finished(client, keys, "bad")))
    (chunk,) = responses(client, keys)
    assert chunk.finish_reason == inference_pb2.FINISH_REASON_ERROR
    assert chunk.failure == jobs_pb2.JOB_FAILURE_INVALID and "token id 100" in chunk.failure_message
    ((_, dead),) = client.xrange(keys.dead(MODEL))
    assert dead[b"reason"].startswith(b"token id 100") and backend.started == []
    assert client.xlen(keys.requests(MODEL)) == 0


def test_a_cancel_stops_a_running_job_and_frees_it(
    loop: ServingLoop, client: redis.Redis, keys: StreamKeys, backend: FakeBackend
) -> None:
    submit(client, keys, job("long", max_tokens=40))
    step_until(loop, lambda: len(responses(client, keys)) >= 2)
    client.xadd(keys.cancel(MODEL), {FIELD: jobs_pb2.Cancel(request_id="long").SerializeToString()})
    step_until(loop, lambda: bool(finished(client, keys, "long")))
    (last,) = finished(client, keys, "long")
    assert last.failure == jobs_pb2.JOB_FAILURE_CANCELLED and backend.aborted == ["long"]
    assert client.xlen(keys.requests(MODEL)) == 0 and client.get(keys.progress(MODEL, "long")) is None


def test_a_job_its_gateway_stopped_is_done_and_acknowledged_without_a_word(
    loop: ServingLoop, client: redis.Redis, keys: StreamKeys, backend: FakeBackend
) -> None:
    submit(client, keys, job("stop", max_tokens=40))
    step_until(loop, lambda: len(responses(client, keys)) >= 2)
    client.xadd(
        keys.cancel(MODEL), {FIELD: jobs_pb2.Cancel(request_id="stop", stopped=True).SerializeToString()}
    )
    step_until(loop, lambda: client.xlen(keys.requests(MODEL)) == 0)
    assert backend.aborted == ["stop"] and finished(client, keys, "stop") == []
    assert client.get(keys.progress(MODEL, "stop")) is None

    def heartbeat() -> jobs_pb2.WorkerStatus:
        return jobs_pb2.WorkerStatus.FromString(
            client.hget(keys.worker(MODEL, loop.jobs.worker_id), WORKER_STATUS_FIELD)
        )

    step_until(loop, lambda: heartbeat().num_finished == 1)  # it counts as finished


def test_a_cancel_that_came_first_means_the_job_never_starts(
    loop: ServingLoop, client: redis.Redis, keys: StreamKeys, backend: FakeBackend
) -> None:
    client.xadd(keys.cancel(MODEL), {FIELD: jobs_pb2.Cancel(request_id="early").SerializeToString()})
    loop.step()
    submit(client, keys, job("early"))
    step_until(loop, lambda: bool(finished(client, keys, "early")))
    (chunk,) = responses(client, keys)
    assert (
        chunk.failure == jobs_pb2.JOB_FAILURE_CANCELLED
        and chunk.failure_message == "cancelled before it started"
    )
    assert backend.started == []


def test_deadlines_end_jobs_queued_or_running(
    loop: ServingLoop, client: redis.Redis, keys: StreamKeys, backend: FakeBackend
) -> None:
    now_ms = int(time.time() * 1000)
    submit(
        client,
        keys,
        job("late", deadline_unix_ms=now_ms - 1),
        job("soon", 10**6, deadline_unix_ms=now_ms + 2000),
    )
    step_until(loop, lambda: bool(finished(client, keys, "late")) and bool(finished(client, keys, "soon")))
    (late,) = finished(client, keys, "late")
    (soon,) = finished(client, keys, "soon")
    assert late.failure == soon.failure == jobs_pb2.JOB_FAILURE_DEADLINE
    assert (late.failure_message, soon.failure_message) == (
        "deadline passed while queued",
        "deadline exceeded",
    )
    assert [request_id for request_id, _ in backend.started] == ["soon"] and backend.aborted == ["soon"]


def test_a_job_queued_twice_runs_once(
    loop: ServingLoop, client: redis.Redis, keys: StreamKeys, backend: FakeBackend
) -> None:
    submit(client, keys, job("twice", max_tokens=5), job("twice", max_tokens=5))
    step_until(loop, lambda: bool(finished(client, keys, "twice")))
    assert backend.started == [("twice", ())]
    assert [c.index for c in responses(client, keys)] == [0, 1, 2, 3, 4]
    assert client.xlen(keys.requests(MODEL)) == 0, "the copy is acknowledged too"


def test_a_job_resumed_from_its_progress_starts_where_its_client_stands(
    loop: ServingLoop, client: redis.Redis, keys: StreamKeys, backend: FakeBackend
) -> None:
    dead = JobStream(client, keys, MODEL, "dead", progress_ttl_s=60)
    dead.heartbeat(jobs_pb2.WorkerStatus(), 60)
    submit(client, keys, job("orphan", max_tokens=4))
    dead.read(1, None, Outbox())
    dead.publish({"gw": [jobs_pb2.TokenChunk(request_id="orphan", index=0, token_ids=[0, 1])]})
    client.delete(keys.worker(MODEL, dead.worker_id))  # its heartbeat expires
    time.sleep(loop.settings.claim_min_idle_ms / 1000)
    step_until(loop, lambda: bool(finished(client, keys, "orphan")))
    assert backend.started == [("orphan", (0, 1))]
    assert [c.index for c in responses(client, keys)] == [0, 2, 3]


def test_drain_finishes_what_runs_and_takes_nothing_new(
    loop: ServingLoop, client: redis.Redis, keys: StreamKeys, backend: FakeBackend
) -> None:
    submit(client, keys, job("running", max_tokens=3))
    step_until(loop, lambda: bool(backend.started))
    loop.drain()
    submit(client, keys, job("later"))
    loop.run()  # returns once "running" is done
    assert [request_id for request_id, _ in backend.started] == ["running"]
    assert finished(client, keys, "running") and not client.exists(keys.worker(MODEL, loop.jobs.worker_id))
    assert client.xlen(keys.requests(MODEL)) == 1, "the new job is left for another worker"


@pytest.mark.parametrize("redis_fails_at_the_rejoin", [False, True])
def test_a_worker_presumed_dead_drops_its_jobs_and_rejoins_as_a_new_consumer(
    loop: ServingLoop,
    client: redis.Redis,
    keys: StreamKeys,
    backend: FakeBackend,
    monkeypatch: pytest.MonkeyPatch,
    redis_fails_at_the_rejoin: bool,
) -> None:
    submit(client, keys, job("held", max_tokens=400))
    step_until(loop, lambda: bool(backend.started))
    presumed_dead = loop.jobs.worker_id
    client.delete(keys.worker(MODEL, presumed_dead))  # its heartbeat expired, as in a failover
    if redis_fails_at_the_rejoin:  # the first heartbeat of the new consumer meets a Redis still failing
        heartbeat = loop.jobs.heartbeat
        calls = itertools.count()

        def flaky(status: jobs_pb2.WorkerStatus, ttl_s: float) -> None:
            if loop.jobs.worker_id != presumed_dead and next(calls) == 0:
                raise redis.ConnectionError("failover in progress")
            heartbeat(status, ttl_s)

        monkeypatch.setattr(loop.jobs, "heartbeat", flaky)
    step_until(
        loop, lambda: backend.aborted == ["held"] and client.exists(keys.worker(MODEL, loop.jobs.worker_id))
    )
    assert loop.jobs.worker_id != presumed_dead
    step_until(loop, lambda: bool(finished(client, keys, "held")))  # claimed back once idle, as any orphan
    assert [request_id for request_id, _ in backend.started] == ["held", "held"]
