"""A gateway and workers on a real three-master Redis Cluster: each model's keys share one slot, the
fleet serves token-exactly, and when the master of that slot is killed with streams in flight its
replica takes over: every call ends (complete and exact, or UNAVAILABLE, never with a gap) and the
fleet serves on."""

from pathlib import Path

import grpc
from redis.crc import key_slot

from bootstrap.redis import connect
from bootstrap.settings import RedisSettings
from client.fleet_snapshot import FleetReader
from protos import inference_pb2
from protos.redis_layout import StreamKeys
from tests.e2e import cluster as e2e
from tests.e2e.recording import RecordedStream
from tests.e2e.redis_cluster import LocalRedisCluster
from tests.e2e.test_chaos import MAX_TOKENS, run_streams

MODEL = "smollm2-135m-instruct"
NAMESPACE = "cluster"


def test_every_key_of_a_model_hashes_to_one_slot() -> None:
    keys = StreamKeys(NAMESPACE)
    slots = {
        key_slot(key.encode())
        for key in (
            keys.requests(MODEL),
            keys.responses(MODEL, "gw-1"),
            keys.cancel(MODEL),
            keys.worker(MODEL, "w-1"),
            keys.progress(MODEL, "r-1"),
            keys.dead(MODEL),
        )
    }
    assert len(slots) == 1


def test_a_fleet_on_a_redis_cluster_serves_and_survives_a_master_failover(
    model_dir: Path, log_dir: Path
) -> None:
    with LocalRedisCluster() as redis_cluster:
        workers = [
            e2e.start_worker(redis_cluster.url, NAMESPACE, model_dir, log_dir, *e2e.FAST_FAILOVER_ARGS)
            for _ in range(2)
        ]
        gateway, address = e2e.start_gateway(redis_cluster.url, NAMESPACE, model_dir, log_dir)
        try:
            e2e.wait_until_serving(address, [*workers, gateway], timeout_s=180)
            prompts = [f"Describe a city built on {n} islands." for n in range(8)]
            undisturbed = run_streams(address, prompts)
            assert all(s.error is None and len(s.token_ids) == MAX_TOKENS for s in undisturbed)
            master = redis_cluster.master_of(StreamKeys(NAMESPACE).requests(MODEL))

            def kill_the_models_master(streams: list[RecordedStream]) -> None:
                assert e2e.wait_for(lambda: all(len(s.token_ids) >= 2 for s in streams), timeout_s=120)
                master.kill()

            disturbed = run_streams(address, prompts, kill_the_models_master)
            redis_cluster.wait_until_ok()
            for before, after in zip(undisturbed, disturbed, strict=True):
                if after.error is not None:  # a job or its tokens lost with unreplicated writes
                    assert after.error.code() == grpc.StatusCode.UNAVAILABLE, after.error
                    continue
                assert after.indexes == list(range(MAX_TOKENS)), "an index twice or missing"
                assert after.token_ids == before.token_ids
                assert after.frames[-1].finish_reason == inference_pb2.FINISH_REASON_LENGTH
            completed = sum(s.error is None for s in disturbed)
            assert completed > 0, "a failover may end a call, not every call"
            print(
                f"\nmaster of the model's slot killed with 8 streams in flight: {completed} completed exactly"
            )
            again = run_streams(address, prompts[:2])
            assert [s.token_ids for s in again] == [s.token_ids for s in undisturbed[:2]], "serves on"
            assert e2e.wait_for(
                lambda: all(
                    s.num_running == 0 for s in e2e.worker_statuses(redis_cluster.live_url(), NAMESPACE)
                )
            )
            reader = FleetReader(
                connect(RedisSettings(redis_url=redis_cluster.live_url())), StreamKeys(NAMESPACE)
            )

            def monitor_sees_the_fleet() -> bool:  # what `conveyor monitor` shows, from a cluster
                snapshot = reader.read()
                streams = [(s.model, s.consumers) for s in snapshot.streams]
                fleet = (len(snapshot.workers), len(snapshot.gateways))
                return not snapshot.error and fleet == (2, 1) and streams == [(MODEL, 2)]

            # A worker whose heartbeat was lost with the old master rejoins as a new consumer (on a
            # loaded machine that can take a while: the cluster's failover settles first).
            assert e2e.wait_for(monitor_sees_the_fleet, timeout_s=90), (
                reader.read(),
                [w.poll() for w in workers],
            )
            reader.close()
        finally:
            e2e.stop_process(gateway)
            for worker in workers:
                e2e.stop_process(worker)
