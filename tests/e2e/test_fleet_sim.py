"""`conveyor bench --fleet-sim` on a small fleet: real gateway and worker loops over one real Redis,
simulated models; every level reports Redis' share per token and the chunk latency."""

from pathlib import Path

from client.fleet_sim import SimOptions, run_fleet_sim


def test_the_fleet_simulation_measures_redis_per_token(model_dir: Path, tmp_path: Path) -> None:
    options = SimOptions(
        model=model_dir,
        steps_per_s=20,
        seqs_per_worker=8,
        max_tokens=30,
        gateways=1,
        max_workers=2,
        seconds_per_level=3,
        redis_cpu_limit=0.9,
        transit_p99_limit_s=10.0,
    )
    levels = run_fleet_sim(options, tmp_path, lambda level: None)
    assert [level.workers for level in levels] == [1, 2] and [level.streams for level in levels] == [8, 16]
    for level in levels:
        assert level.errors == 0 and level.tokens_per_s > 0
        assert level.redis_ops_per_token > 0 and level.redis_bytes_per_token > 0 and level.redis_cpu > 0
        assert level.transit_p50_s is not None and level.transit_p99_s is not None
    assert levels[1].tokens_per_s > levels[0].tokens_per_s, "a second worker carries more"
