"""JobStream and OrphanClaimer against a real redis-server: fenced writes, progress, claims, poison."""

import itertools
import time

import pytest
import redis

from protos import inference_pb2, jobs_pb2
from protos.redis_layout import FIELD, GROUP, ChoiceProgress, StreamKeys, unpack_tokens
from worker.job_stream import FencedOut, JobStream, ReceivedJob
from worker.orphan_claimer import OrphanClaimer
from worker.outbox import Ack, Outbox

MODEL = "m"
TTL_S = 30.0
_namespaces = itertools.count()


@pytest.fixture()
def keys() -> StreamKeys:
    return StreamKeys(f"js{next(_namespaces)}")


def worker(client: redis.Redis, keys: StreamKeys, name: str) -> JobStream:
    """A joined, registered worker."""
    stream = JobStream(client, keys, MODEL, name, progress_ttl_s=60)
    stream.join_group()
    stream.heartbeat(jobs_pb2.WorkerStatus(model=MODEL), TTL_S)
    return stream


def submit(client: redis.Redis, keys: StreamKeys, request_id: str, gateway: str = "gw", n: int = 0) -> None:
    job = jobs_pb2.Job(
        request_id=request_id, gateway_id=gateway, prompt_token_ids=[1, 2, 3], sampling=jobs_pb2.Sampling(n=n)
    )
    client.xadd(keys.requests(MODEL), {FIELD: job.SerializeToString()})


def read(stream: JobStream, max_jobs: int) -> tuple[list[ReceivedJob], list[str]]:
    """A read whose burials and acknowledgements are flushed at once, as the serving loop does."""
    outbox = Outbox()
    received = stream.read(max_jobs, None, outbox)
    stream.flush(outbox)
    return received


def claim(claimer: OrphanClaimer, max_jobs: int) -> list[ReceivedJob]:
    outbox = Outbox()
    claimed = claimer.claim(max_jobs, outbox)
    claimer.jobs.flush(outbox)
    return claimed


def chunk(
    request_id: str, index: int, token_ids: list[int], finish: int = 0, choice: int = 0
) -> jobs_pb2.TokenChunk:
    return jobs_pb2.TokenChunk(
        request_id=request_id, index=index, token_ids=token_ids, finish_reason=finish, choice_index=choice
    )


def die(client: redis.Redis, keys: StreamKeys, stream: JobStream) -> None:
    """What a SIGKILL leaves behind: the heartbeat expires, the pending entries stay."""
    client.delete(keys.worker(MODEL, stream.worker_id))


def responses(client: redis.Redis, keys: StreamKeys, gateway: str = "gw") -> list[jobs_pb2.TokenChunk]:
    return [
        c
        for _, f in client.xrange(keys.responses(MODEL, gateway))
        for c in jobs_pb2.TokenBatch.FromString(f[FIELD]).chunks
    ]


def test_progress_follows_what_is_published_and_goes_with_the_ack(
    client: redis.Redis, keys: StreamKeys
) -> None:
    stream = worker(client, keys, "a")
    submit(client, keys, "r1")
    ((job,), _) = read(stream, 4)
    stream.publish({"gw": [chunk("r1", 0, [7])]})
    stream.publish({"gw": [chunk("r1", 1, [8, 9])]})
    stream.publish({"gw": [chunk("r1", 1, [8, 9])]})  # retried after a lost reply
    assert unpack_tokens(client.get(keys.progress(MODEL, "r1"))) == [7, 8, 9]
    assert 0 < client.pttl(keys.progress(MODEL, "r1")) <= 60_000
    stream.publish(
        {"gw": [chunk("r1", 3, [10], inference_pb2.FINISH_REASON_LENGTH)]}, [Ack("r1", job.entry_id)]
    )
    assert client.get(keys.progress(MODEL, "r1")) is None
    assert (
        client.xlen(keys.requests(MODEL)) == 0
        and client.xpending(keys.requests(MODEL), GROUP)["pending"] == 0
    )
    assert [c.index for c in responses(client, keys)] == [0, 1, 1, 3]


def test_each_choice_resumes_from_its_own_progress_and_a_finished_one_not_at_all(
    client: redis.Redis, keys: StreamKeys
) -> None:
    dead = worker(client, keys, "dead")
    submit(client, keys, "r1", n=3)
    read(dead, 1)
    length = inference_pb2.FINISH_REASON_LENGTH
    dead.publish(
        {"gw": [chunk("r1", 0, [5], choice=0), chunk("r1", 0, [6], choice=1), chunk("r1", 0, [7], choice=2)]}
    )
    dead.publish({"gw": [chunk("r1", 1, [8], choice=0), chunk("r1", 1, [9], length, choice=1)]})
    die(client, keys, dead)
    claimer = worker(client, keys, "claimer")
    time.sleep(0.02)
    (resumed,) = claim(OrphanClaimer(claimer, min_idle_ms=10, max_attempts=3), 8)
    assert resumed.progress == (
        ChoiceProgress((5, 8)),
        ChoiceProgress((6, 9), finished=True),
        ChoiceProgress((7,)),
    )
    assert resumed.num_delivered == 2
    claimer.publish(
        {"gw": [chunk("r1", 2, [1], length, choice=0), chunk("r1", 1, [2], length, choice=2)]},
        [Ack("r1", resumed.entry_id, 3)],
    )
    assert not list(client.scan_iter(match=keys.progress(MODEL, "*"))), "every choice's progress is gone"


def test_a_worker_whose_heartbeat_expired_writes_nothing_and_is_not_revived(
    client: redis.Redis, keys: StreamKeys
) -> None:
    stream = worker(client, keys, "a")
    submit(client, keys, "r1")
    ((job,), _) = read(stream, 4)
    die(client, keys, stream)
    with pytest.raises(FencedOut):
        stream.publish({"gw": [chunk("r1", 0, [7])]}, [Ack("r1", job.entry_id)])
    assert responses(client, keys) == [] and client.get(keys.progress(MODEL, "r1")) is None
    assert client.xpending(keys.requests(MODEL), GROUP)["pending"] == 1
    with pytest.raises(FencedOut):
        stream.heartbeat(jobs_pb2.WorkerStatus(model=MODEL), TTL_S)
    assert not client.exists(keys.worker(MODEL, stream.worker_id))
    old_id = stream.worker_id
    stream.new_incarnation()
    stream.heartbeat(jobs_pb2.WorkerStatus(model=MODEL), TTL_S)
    assert stream.worker_id != old_id and client.exists(keys.worker(MODEL, stream.worker_id))


def test_orphans_of_a_dead_worker_are_resumed_from_their_progress(
    client: redis.Redis, keys: StreamKeys
) -> None:
    dead, alive = worker(client, keys, "dead"), worker(client, keys, "alive")
    for request_id in ("r1", "r2"):
        submit(client, keys, request_id)
    read(dead, 2)
    submit(client, keys, "r3")
    read(alive, 1)
    dead.publish({"gw": [chunk("r1", 0, [5]), chunk("r1", 1, [6])]})
    die(client, keys, dead)
    claimer_stream = worker(client, keys, "claimer")
    time.sleep(0.02)
    claimed = claim(OrphanClaimer(claimer_stream, min_idle_ms=10, max_attempts=3), 8)
    assert sorted((j.job.request_id, j.progress) for j in claimed) == [
        ("r1", (ChoiceProgress((5, 6)),)),
        ("r2", (ChoiceProgress(),)),
    ]
    owners = {
        p["consumer"].decode() for p in client.xpending_range(keys.requests(MODEL), GROUP, "-", "+", 10)
    }
    assert owners == {claimer_stream.worker_id, alive.worker_id}, "the live worker keeps its job"
    rival = OrphanClaimer(worker(client, keys, "rival"), min_idle_ms=10_000, max_attempts=3)
    assert claim(rival, 8) == [], "a job just claimed is not claimed again"


def test_a_dead_consumer_with_nothing_pending_is_forgotten(client: redis.Redis, keys: StreamKeys) -> None:
    dead, live = worker(client, keys, "dead"), worker(client, keys, "live")
    submit(client, keys, "done")
    ((job,), _) = read(dead, 1)
    dead.publish({}, [Ack("done", job.entry_id)])
    die(client, keys, dead)
    submit(client, keys, "running")
    read(live, 1)
    assert claim(OrphanClaimer(live, min_idle_ms=10, max_attempts=3), 8) == []
    names = {c["name"].decode() for c in client.xinfo_consumers(keys.requests(MODEL), GROUP)}
    assert names == {live.worker_id}


def test_a_job_that_outlived_its_workers_is_buried_and_its_client_told(
    client: redis.Redis, keys: StreamKeys
) -> None:
    submit(client, keys, "poison")
    holder = worker(client, keys, "w0")
    read(holder, 1)
    holder.publish({"gw": [chunk("poison", 0, [5])]})
    for attempt in range(1, 3):  # two more workers claim it and die too
        die(client, keys, holder)
        holder = worker(client, keys, f"w{attempt}")
        time.sleep(0.02)
        assert len(claim(OrphanClaimer(holder, min_idle_ms=10, max_attempts=3), 8)) == 1
    die(client, keys, holder)
    survivor = worker(client, keys, "survivor")
    time.sleep(0.02)
    assert claim(OrphanClaimer(survivor, min_idle_ms=10, max_attempts=3), 8) == []
    ((_, fields),) = client.xrange(keys.dead(MODEL))
    assert (
        fields[b"reason"] == b"3 workers died running it" and fields[b"worker"] == survivor.worker_id.encode()
    )
    last = responses(client, keys)[-1]
    assert last.finish_reason == inference_pb2.FINISH_REASON_ERROR
    assert last.failure == jobs_pb2.JOB_FAILURE_WORKERS_DIED and "3 workers died" in last.failure_message
    assert client.xlen(keys.requests(MODEL)) == 0 and client.get(keys.progress(MODEL, "poison")) is None


def test_a_claimed_entry_deleted_from_the_stream_is_acknowledged(
    client: redis.Redis, keys: StreamKeys
) -> None:
    dead = worker(client, keys, "dead")
    submit(client, keys, "gone")
    ((job,), _) = read(dead, 1)
    client.xdel(keys.requests(MODEL), job.entry_id)
    die(client, keys, dead)
    live = worker(client, keys, "live")
    time.sleep(0.02)
    assert claim(OrphanClaimer(live, min_idle_ms=10, max_attempts=3), 8) == []
    assert client.xpending(keys.requests(MODEL), GROUP)["pending"] == 0


def test_lost_gateways_are_named(client: redis.Redis, keys: StreamKeys) -> None:
    stream = worker(client, keys, "a")
    client.set(keys.gateway("up"), 1, px=10_000)
    assert stream.missing_gateways({"up", "down"}) == {"down"}
    assert stream.missing_gateways(set()) == set()


def test_own_pending_lists_what_was_handed_over_with_its_progress(
    client: redis.Redis, keys: StreamKeys
) -> None:
    stream = worker(client, keys, "a")
    for request_id in ("r1", "r2"):
        submit(client, keys, request_id)
    read(stream, 2)  # as if the reply had been lost on the way
    stream.publish({"gw": [chunk("r2", 0, [4, 2])]})
    pending = stream.own_pending(Outbox())
    assert [(j.job.request_id, j.progress) for j in pending] == [
        ("r1", (ChoiceProgress(),)),
        ("r2", (ChoiceProgress((4, 2)),)),
    ]


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({FIELD: b"\xff\xfe"}, b"unreadable Job"),
        ({b"other": b"x"}, b"no 'm' field in the entry"),
        (
            {FIELD: jobs_pb2.Job(request_id="r").SerializeToString()},
            b"malformed Job: no request_id or gateway_id",
        ),
    ],
)
def test_malformed_entries_are_buried_with_the_reason(
    client: redis.Redis, keys: StreamKeys, fields: dict[bytes, bytes], reason: bytes
) -> None:
    stream = worker(client, keys, "a")
    client.xadd(keys.requests(MODEL), fields)
    submit(client, keys, "good")
    jobs, _ = read(stream, 4)
    assert [j.job.request_id for j in jobs] == ["good"]
    ((_, dead),) = client.xrange(keys.dead(MODEL))
    assert dead[b"reason"].startswith(reason)
    assert client.xlen(keys.requests(MODEL)) == 1


def test_claiming_nothing_is_no_redis_call(client: redis.Redis, keys: StreamKeys) -> None:
    """Another worker may take a dead consumer's entries between listing and claiming them."""
    assert worker(client, keys, "a").claim([], 10) == []


def test_progress_ttl_is_renewed_once_a_page_of_64_tokens(client: redis.Redis, keys: StreamKeys) -> None:
    stream = worker(client, keys, "a")
    submit(client, keys, "long")
    read(stream, 1)
    key = keys.progress(MODEL, "long")
    stream.publish({"gw": [chunk("long", 0, [1])]})
    assert client.pttl(key) > 50_000, "set with the first token"
    client.pexpire(key, 20_000)
    stream.publish({"gw": [chunk("long", i, [1]) for i in range(1, 63)]})
    assert client.pttl(key) <= 20_000, "not renewed within the page"
    stream.publish({"gw": [chunk("long", 63, [1, 1])]})  # tokens 63 and 64: into the next page
    assert client.pttl(key) > 50_000
    assert unpack_tokens(client.get(key)) == [1] * 65
