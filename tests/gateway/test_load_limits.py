"""LoadLimits: capacity, per-caller caps and rates, each refusal with a retry hint."""

import pytest

from gateway.errors import Overloaded
from gateway.load_limits import LimitSettings, LoadLimits


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def limits(clock: Clock | None = None, **overrides: float) -> LoadLimits:
    values: dict[str, float] = dict(
        max_queued_jobs=10,
        max_in_flight=3,
        max_in_flight_per_caller=0,
        requests_per_s_per_caller=0,
        retry_after_ms=500,
    )
    values.update(overrides)
    return LoadLimits(LimitSettings(**values), clock or Clock())  # type: ignore[arg-type]


def test_capacity_refuses_with_the_hint_and_frees_on_release() -> None:
    load = limits()
    leases = [load.admit(f"c{n}", queued_jobs=0) for n in range(3)]
    with pytest.raises(Overloaded) as refused:
        load.admit("c9", queued_jobs=0)
    assert refused.value.retry_after_ms == 500 and "limit 3" in refused.value.message
    leases[0].release()
    leases[0].release()  # twice is once
    assert load.in_flight == 2
    load.admit("c9", queued_jobs=0)


def test_a_deep_queue_refuses_new_work() -> None:
    with pytest.raises(Overloaded) as refused:
        limits().admit("c", queued_jobs=10)
    assert "10 jobs are queued (limit 10)" in refused.value.message


def test_one_caller_cannot_take_everything() -> None:
    load = limits(max_in_flight_per_caller=2)
    first = load.admit("greedy", 0)
    load.admit("greedy", 0)
    with pytest.raises(Overloaded, match="caller greedy has 2 generations open"):
        load.admit("greedy", 0)
    load.admit("polite", 0)
    first.release()
    load.admit("greedy", 0)


def test_rate_limit_says_when_the_next_request_fits() -> None:
    clock = Clock()
    load = limits(clock, max_in_flight=100, requests_per_s_per_caller=2)
    for _ in range(2):  # a burst of one second's worth
        load.admit("fast", 0).release()
    with pytest.raises(Overloaded) as refused:
        load.admit("fast", 0)
    assert refused.value.retry_after_ms == 501
    load.admit("other", 0)
    clock.now += 0.5
    load.admit("fast", 0)
