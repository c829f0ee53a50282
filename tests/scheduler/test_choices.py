"""n completions of one prompt: computed once, forked into choices that share its KV blocks, each
copying the last partly filled block before it writes there."""

import dataclasses
import random

import pytest

from scheduler import BlockManager, FinishReason, SampledToken, Scheduler, Sequence
from tests.scheduler.factories import make_scheduler, make_sequence, run_step


def _parent(num_prompt_tokens: int, n: int, **sampling: object) -> Sequence:
    seq = make_sequence(num_prompt_tokens, **sampling)
    seq.sampling = dataclasses.replace(seq.sampling, n=n)
    seq.fork_choices = tuple(range(1, n))
    return seq


def _choices(scheduler: Scheduler, request_id: str) -> dict[int, Sequence]:
    return {
        seq.choice_index: seq for seq in scheduler.running + scheduler.waiting if seq.request_id == request_id
    }


def test_fork_shares_every_block_and_copy_on_write_gives_each_writer_its_own_last_block() -> None:
    manager = BlockManager(num_blocks=8, block_size=4)
    parent = make_sequence(6)
    assert manager.allocate_slots(parent, 6)
    parent.num_computed_tokens = 6
    children = [make_sequence(prompt=parent.prompt_token_ids) for _ in range(2)]
    for child in children:
        manager.fork(parent, child)
    everyone = [parent, *children]
    manager.check_invariants(everyone)
    first, last = parent.block_table
    assert [manager.blocks[b].ref_count for b in (first, last)] == [3, 3]
    assert manager.num_used_blocks == 2

    # Each writes position 6, inside the shared partial block: the first two copy it, the last
    # writer holds it alone by then and writes in place. The full block stays shared.
    for seq in everyone:
        assert manager.allocate_slots(seq, 1)
        manager.check_invariants(everyone)
    copies = manager.take_copies()
    assert sorted(source for source, _ in copies) == [last, last]
    assert {seq.block_table[1] for seq in everyone} == {last, *(destination for _, destination in copies)}
    assert children[-1].block_table == [first, last]
    assert all(seq.block_table[0] == first for seq in everyone)
    assert manager.blocks[first].ref_count == 3 and manager.blocks[last].ref_count == 1
    assert manager.take_copies() == ()  # handed out once

    for seq in everyone:
        manager.free(seq)
    manager.check_invariants([])
    assert manager.num_free_blocks == 8


def test_a_prompt_that_fills_its_last_block_forks_without_copies() -> None:
    manager = BlockManager(num_blocks=8, block_size=4)
    parent = make_sequence(8)
    assert manager.allocate_slots(parent, 8)
    parent.num_computed_tokens = 8
    child = make_sequence(prompt=parent.prompt_token_ids)
    manager.fork(parent, child)
    assert manager.allocate_slots(parent, 1) and manager.allocate_slots(child, 1)
    assert manager.take_copies() == ()
    assert parent.block_table[:2] == child.block_table[:2] and parent.block_table[2] != child.block_table[2]
    manager.check_invariants([parent, child])


def test_copy_on_write_counts_the_copy_against_the_free_blocks() -> None:
    manager = BlockManager(num_blocks=2, block_size=4)
    parent = make_sequence(6)
    assert manager.allocate_slots(parent, 6)
    parent.num_computed_tokens = 6
    child = make_sequence(prompt=parent.prompt_token_ids)
    manager.fork(parent, child)
    assert not manager.allocate_slots(child, 1)  # no free block to copy into
    assert manager.take_copies() == ()
    manager.check_invariants([parent, child])


def test_the_prompt_is_computed_once_and_each_choice_samples_from_its_last_row() -> None:
    scheduler = make_scheduler(num_blocks=16, max_num_seqs=4)
    parent = _parent(6, n=3, max_tokens=3)
    scheduler.add(parent)
    output = scheduler.schedule()
    assert [(item.num_new_tokens, item.sample_choices) for item in output.scheduled] == [(6, (0, 1, 2))]
    samples = [(SampledToken(10), SampledToken(11), SampledToken(12))]
    chunks = scheduler.update(output, samples)
    scheduler.check_invariants()
    assert [(chunk.choice_index, chunk.token_ids, chunk.index) for chunk in chunks] == [
        (0, [10], 0),
        (1, [11], 0),
        (2, [12], 0),
    ]
    choices = _choices(scheduler, parent.request_id)
    assert [choices[c].output_token_ids for c in range(3)] == [[10], [11], [12]]
    assert scheduler.block_manager.num_used_blocks == 2  # the prompt's two blocks, shared

    output, _ = run_step(scheduler)
    assert [(item.choice_index, item.token_ids, item.start_pos) for item in output.scheduled] == [
        (0, [10], 6),
        (1, [11], 6),
        (2, [12], 6),
    ]
    assert len(output.block_copies) == 2  # the partial block, for all but its last writer
    assert scheduler.block_manager.num_used_blocks == 4
    while not scheduler.is_idle:
        run_step(scheduler)
    assert [seq.finish_reason for seq in (parent, *choices.values())] == [FinishReason.LENGTH] * 4


def test_choices_take_their_seats_before_they_fork() -> None:
    scheduler = make_scheduler(num_blocks=16, max_num_seqs=4)
    solo = make_sequence(4)
    family = _parent(4, n=4)
    scheduler.add(solo)
    scheduler.add(family)
    output, _ = run_step(scheduler)
    assert [item.request_id for item in output.scheduled] == [solo.request_id]  # 1 + 4 seats > 4
    with pytest.raises(ValueError, match="5 choices exceed max_num_seqs 4"):
        scheduler.add(_parent(4, n=5))


def test_cancel_ends_every_choice_and_a_stop_ends_one() -> None:
    scheduler = make_scheduler(num_blocks=16, max_num_seqs=4)
    parent = _parent(5, n=3)
    scheduler.add(parent)
    run_step(scheduler)
    stopped = scheduler.finish(parent.request_id, FinishReason.STOP, choice_index=1)
    assert [seq.choice_index for seq in stopped] == [1]
    scheduler.check_invariants()
    output, chunks = run_step(scheduler)
    assert sorted(chunk.choice_index for chunk in chunks) == [0, 2]
    ended = scheduler.finish(parent.request_id, FinishReason.CANCELLED)
    assert sorted(seq.choice_index for seq in ended) == [0, 2]
    scheduler.check_invariants()
    assert scheduler.is_idle and scheduler.block_manager.num_used_blocks == 0


def test_a_choice_stopped_before_it_forked_never_starts() -> None:
    scheduler = make_scheduler(num_blocks=16, max_num_seqs=4)
    parent = _parent(5, n=3)
    scheduler.add(parent)
    assert scheduler.finish(parent.request_id, FinishReason.STOP, choice_index=2) == []
    output, chunks = run_step(scheduler)
    assert output.scheduled[0].sample_choices == (0, 1)
    assert [chunk.choice_index for chunk in chunks] == [0, 1]


def test_a_parent_whose_own_choice_ends_before_it_forked_goes_on_as_the_next_choice() -> None:
    scheduler = make_scheduler(num_blocks=16, max_num_seqs=4)
    parent = _parent(5, n=3)
    scheduler.add(parent)
    assert scheduler.finish(parent.request_id, FinishReason.STOP, choice_index=0) == []
    scheduler.check_invariants()
    output, chunks = run_step(scheduler)
    assert output.scheduled[0].sample_choices == (1, 2)
    assert [chunk.choice_index for chunk in chunks] == [1, 2]


def test_one_token_choices_finish_at_the_fork_and_free_the_shared_blocks() -> None:
    scheduler = make_scheduler(num_blocks=16, max_num_seqs=4)
    scheduler.add(_parent(6, n=4, max_tokens=1))
    _, chunks = run_step(scheduler)
    assert [chunk.finish_reason for chunk in chunks] == [FinishReason.LENGTH] * 4
    assert scheduler.is_idle and scheduler.block_manager.num_used_blocks == 0


def test_random_steps_with_choices_preemptions_and_stops_keep_every_invariant() -> None:
    rng = random.Random(7)
    num_preemptions = num_copies = 0
    for _ in range(30):
        scheduler = make_scheduler(num_blocks=12, block_size=4, max_num_seqs=6, max_model_len=40)
        for _ in range(rng.randint(1, 5)):
            n = rng.randint(1, 4)
            prompt = [rng.randint(3, 40) for _ in range(rng.randint(1, 14))]
            seq = make_sequence(prompt=prompt, max_tokens=rng.randint(1, 12))
            seq.sampling = dataclasses.replace(seq.sampling, n=n)
            seq.fork_choices = tuple(range(1, n))
            scheduler.add(seq)
        for _ in range(200):
            if scheduler.is_idle:
                break
            output = scheduler.schedule()
            sampled = [
                tuple(SampledToken(rng.randint(3, 40)) for _ in item.sample_choices)
                for item in output.scheduled
            ]
            scheduler.update(output, sampled)
            scheduler.check_invariants()
            num_copies += len(output.block_copies)
            if scheduler.running and rng.random() < 0.1:
                victim = rng.choice(scheduler.running)
                scheduler.finish(victim.request_id, FinishReason.STOP, victim.choice_index)
                scheduler.check_invariants()
        assert scheduler.is_idle
        assert scheduler.block_manager.num_used_blocks == 0
        num_preemptions += scheduler.num_preemptions
    assert num_preemptions > 0 and num_copies > 0  # the paths this test is for were taken
