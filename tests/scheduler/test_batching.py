"""Batching strategies: who joins the running batch, under the same budgets and pager."""

import pytest

from scheduler import SchedulerConfig
from tests.scheduler.factories import make_scheduler, make_sequence, run_step


def _running_ids(scheduler: object) -> set[str]:
    return {seq.request_id for seq in scheduler.running}  # type: ignore[attr-defined]


def test_continuous_batching_fills_a_seat_as_soon_as_it_frees() -> None:
    scheduler = make_scheduler(max_num_seqs=2, num_blocks=16)
    short, long, late = make_sequence(2, max_tokens=1), make_sequence(2, max_tokens=6), make_sequence(2)
    for seq in (short, long, late):
        scheduler.add(seq)
    run_step(scheduler)  # short finishes with its first token
    output, _ = run_step(scheduler)
    assert {item.request_id for item in output.scheduled} == {long.request_id, late.request_id}


def test_static_batching_admits_nobody_until_the_whole_batch_has_finished() -> None:
    scheduler = make_scheduler(max_num_seqs=2, num_blocks=16, batching="static")
    short, long, late = make_sequence(2, max_tokens=1), make_sequence(2, max_tokens=4), make_sequence(2)
    for seq in (short, long, late):
        scheduler.add(seq)
    run_step(scheduler)
    steps = 0
    while long.finish_reason is None:
        output, _ = run_step(scheduler)
        assert {item.request_id for item in output.scheduled} == {long.request_id}  # the seat stays empty
        steps += 1
    assert steps == 3
    output, _ = run_step(scheduler)
    assert {item.request_id for item in output.scheduled} == {late.request_id}


def test_a_static_batch_is_cut_at_once_and_its_members_admitted_as_the_budget_allows() -> None:
    scheduler = make_scheduler(
        max_num_seqs=3, num_blocks=32, max_num_batched_tokens=8, max_model_len=32, batching="static"
    )
    members = [make_sequence(6, max_tokens=8) for _ in range(3)]
    later, outsider = make_sequence(2, priority=5), make_sequence(2)
    for seq in members:
        scheduler.add(seq)
    output, _ = run_step(scheduler)  # 8 tokens: the first prompt and part of the second
    assert _running_ids(scheduler) == {members[0].request_id, members[1].request_id}
    scheduler.add(later)  # sorts first in the queue, but the batch is already cut
    scheduler.add(outsider)
    for _ in range(3):
        run_step(scheduler)
    assert _running_ids(scheduler) == {seq.request_id for seq in members}
    while any(seq.finish_reason is None for seq in members):
        run_step(scheduler)
        assert later.request_id not in _running_ids(scheduler)
    run_step(scheduler)
    assert _running_ids(scheduler) == {later.request_id, outsider.request_id}


def test_a_preempted_member_of_a_static_batch_rejoins_it() -> None:
    scheduler = make_scheduler(
        num_blocks=6,
        block_size=4,
        max_num_seqs=3,
        max_num_batched_tokens=16,
        max_model_len=16,
        batching="static",
    )
    members = [make_sequence(4, max_tokens=8) for _ in range(3)]
    outsider = make_sequence(4)
    for seq in members:
        scheduler.add(seq)
    scheduler.add(outsider)
    while any(seq.finish_reason is None for seq in members):
        run_step(scheduler)
        assert outsider.request_id not in _running_ids(scheduler)
    assert scheduler.num_preemptions > 0
    assert all(len(seq.output_token_ids) == 8 for seq in members)


def test_sequential_batching_runs_one_request_at_a_time_with_all_its_choices() -> None:
    scheduler = make_scheduler(max_num_seqs=4, num_blocks=16, batching="sequential")
    first = make_sequence(3, max_tokens=2, n=2)
    first.fork_choices = (1,)
    second = make_sequence(3, max_tokens=2)
    scheduler.add(first)
    scheduler.add(second)
    seen = []
    while not scheduler.is_idle:
        output, _ = run_step(scheduler)
        seen.append({(item.request_id, item.choice_index) for item in output.scheduled})
    assert seen == [
        {(first.request_id, 0)},
        {(first.request_id, 0), (first.request_id, 1)},
        {(second.request_id, 0)},
        {(second.request_id, 0)},
    ]


def test_an_unknown_strategy_is_refused() -> None:
    with pytest.raises(ValueError, match="batching must be one of sequential, static, continuous"):
        SchedulerConfig(num_blocks=8, max_model_len=16, batching="greedy")  # type: ignore[arg-type]
