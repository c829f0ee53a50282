import pytest

from scheduler import FinishReason, SampledToken, SchedulerConfig, SequenceStatus
from tests.scheduler.factories import EOS, make_scheduler, make_sequence, run_step


def test_admits_waiting_sequences_and_decodes_one_token_each_step() -> None:
    scheduler = make_scheduler()
    first, second = make_sequence(6), make_sequence(5)
    scheduler.add(first)
    scheduler.add(second)
    output, chunks = run_step(scheduler)
    assert [item.num_new_tokens for item in output.scheduled] == [6, 5]
    assert [chunk.index for chunk in chunks] == [0, 0]
    output, chunks = run_step(scheduler)
    assert [item.token_ids for item in output.scheduled] == [[7], [7]]
    assert [item.start_pos for item in output.scheduled] == [6, 5]
    assert first.num_computed_tokens == 7 and first.output_token_ids == [7, 7]


def test_token_budget_chunks_a_long_prompt() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=4, max_num_seqs=2)
    seq = make_sequence(10)
    scheduler.add(seq)
    sizes = []
    for _ in range(3):
        output, chunks = run_step(scheduler)
        sizes.append(output.scheduled[0].num_new_tokens)
        assert output.scheduled[0].needs_sample == (seq.num_computed_tokens == 10)
    assert sizes == [4, 4, 2]
    assert seq.output_token_ids == [7]


def test_decodes_keep_running_while_a_long_prompt_is_chunked() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=4, max_num_seqs=3, num_blocks=16)
    short = make_sequence(2)
    scheduler.add(short)
    run_step(scheduler)
    long = make_sequence(20)
    scheduler.add(long)
    for _ in range(4):
        output, _ = run_step(scheduler)
        by_id = {item.request_id: item for item in output.scheduled}
        assert by_id[short.request_id].num_new_tokens == 1
    assert long.num_computed_tokens == 12


def test_running_prefill_leaves_one_token_for_each_later_decode() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=4, max_num_seqs=3, num_blocks=16)
    short = make_sequence(2)
    scheduler.add(short)
    run_step(scheduler)
    long = make_sequence(20, priority=1)  # sorts before short among running sequences
    scheduler.add(long)
    run_step(scheduler)
    output, _ = run_step(scheduler)
    by_id = {item.request_id: item.num_new_tokens for item in output.scheduled}
    assert by_id == {long.request_id: 3, short.request_id: 1}


def test_max_num_seqs_caps_running_sequences() -> None:
    scheduler = make_scheduler(max_num_seqs=2, num_blocks=16)
    seqs = [make_sequence(3) for _ in range(3)]
    for seq in seqs:
        scheduler.add(seq)
    output, _ = run_step(scheduler)
    assert [item.request_id for item in output.scheduled] == [s.request_id for s in seqs[:2]]
    assert seqs[2].status == SequenceStatus.WAITING


def test_waiting_sequences_are_admitted_by_priority_then_arrival() -> None:
    scheduler = make_scheduler(max_num_seqs=1, num_blocks=16)
    low, high_late, high_early = (
        make_sequence(3, priority=0, arrival_time=0.0),
        make_sequence(3, priority=5, arrival_time=2.0),
        make_sequence(3, priority=5, arrival_time=1.0),
    )
    for seq in (low, high_late, high_early):
        scheduler.add(seq)
    output, _ = run_step(scheduler)
    assert output.scheduled[0].request_id == high_early.request_id


def test_preempts_newest_sequence_when_blocks_run_out() -> None:
    scheduler = make_scheduler(num_blocks=8, max_num_seqs=2, max_model_len=32)
    old, new = make_sequence(8, max_tokens=30), make_sequence(8, max_tokens=30)
    scheduler.add(old)
    scheduler.add(new)
    preempted: list[str] = []
    for _ in range(12):
        run_step(scheduler)
        preempted = [seq.request_id for seq in (old, new) if seq.num_preemptions]
        if preempted:
            break
    assert preempted == [new.request_id]
    assert new.status == SequenceStatus.WAITING
    assert new.num_computed_tokens == 0 and new.block_table == []
    assert new.num_preemptions == 1
    assert len(new.output_token_ids) > 0  # kept: recomputed as part of the prompt later


def test_preempts_lowest_priority_before_newer_higher_priority() -> None:
    scheduler = make_scheduler(num_blocks=8, max_num_seqs=2)
    low = make_sequence(8, max_tokens=30, priority=0, arrival_time=0.0)
    high = make_sequence(8, max_tokens=30, priority=1, arrival_time=5.0)
    scheduler.add(low)
    scheduler.add(high)
    for _ in range(12):
        run_step(scheduler)
        preempted = [seq.request_id for seq in (low, high) if seq.num_preemptions]
        if preempted:
            assert preempted == [low.request_id]
            return
    pytest.fail("no preemption happened")


def test_preempted_sequence_resumes_and_finishes_with_all_its_tokens() -> None:
    scheduler = make_scheduler(num_blocks=8, max_num_seqs=2)
    seqs = [make_sequence(8, max_tokens=12), make_sequence(8, max_tokens=12)]
    for seq in seqs:
        scheduler.add(seq)
    indexes: dict[str, list[int]] = {seq.request_id: [] for seq in seqs}
    for _ in range(60):
        if scheduler.is_idle:
            break
        _, chunks = run_step(scheduler)
        for chunk in chunks:
            indexes[chunk.request_id].append(chunk.index)
    assert scheduler.is_idle
    assert sum(seq.num_preemptions for seq in seqs) >= 1
    for seq in seqs:
        assert indexes[seq.request_id] == list(range(12))
        assert seq.finish_reason == FinishReason.LENGTH


def test_preempted_sequence_gets_its_prefix_back_from_the_cache() -> None:
    scheduler = make_scheduler(num_blocks=8, max_num_seqs=1)
    seq = make_sequence(9, max_tokens=20)
    scheduler.add(seq)
    run_step(scheduler)
    scheduler.finish(seq.request_id, FinishReason.CANCELLED)
    again = make_sequence(prompt=seq.prompt_token_ids, max_tokens=2)
    scheduler.add(again)
    output, _ = run_step(scheduler)
    assert output.scheduled[0].start_pos == 8
    assert output.scheduled[0].token_ids == [seq.prompt_token_ids[-1]]


def test_cancel_frees_blocks_of_running_and_waiting_sequences() -> None:
    scheduler = make_scheduler(max_num_seqs=1)
    running, waiting = make_sequence(6), make_sequence(6)
    scheduler.add(running)
    scheduler.add(waiting)
    run_step(scheduler)
    assert scheduler.block_manager.num_used_blocks == 2
    scheduler.finish(running.request_id, FinishReason.CANCELLED)
    scheduler.finish(waiting.request_id, FinishReason.CANCELLED)
    scheduler.check_invariants()
    assert scheduler.block_manager.num_used_blocks == 0
    assert running.status == SequenceStatus.FINISHED_ABORTED
    assert scheduler.is_idle
    assert scheduler.finish("unknown", FinishReason.CANCELLED) == []


def test_sequence_finished_during_a_step_is_skipped_by_update() -> None:
    scheduler = make_scheduler()
    seq = make_sequence(4)
    scheduler.add(seq)
    output = scheduler.schedule()
    scheduler.finish(seq.request_id, FinishReason.CANCELLED)
    assert scheduler.update(output, [(SampledToken(7),)]) == []
    scheduler.check_invariants()


def test_eos_stops_unless_ignored_or_before_min_tokens() -> None:
    scheduler = make_scheduler(num_blocks=16)
    plain = make_sequence(3)
    ignoring = make_sequence(3, ignore_eos=True)
    patient = make_sequence(3, min_tokens=2)
    for seq in (plain, ignoring, patient):
        scheduler.add(seq)
    _, chunks = run_step(scheduler, token_id=EOS)
    reasons = {chunk.request_id: chunk.finish_reason for chunk in chunks}
    assert reasons == {
        plain.request_id: FinishReason.STOP,
        ignoring.request_id: None,
        patient.request_id: None,
    }
    _, chunks = run_step(scheduler, token_id=EOS)
    assert {c.request_id: c.finish_reason for c in chunks}[patient.request_id] == FinishReason.STOP


def test_stop_token_ids_stop_generation() -> None:
    scheduler = make_scheduler()
    seq = make_sequence(3, stop_token_ids=(9,))
    scheduler.add(seq)
    run_step(scheduler)
    _, chunks = run_step(scheduler, token_id=9)
    assert chunks[0].finish_reason == FinishReason.STOP
    assert seq.output_token_ids == [7, 9]


def test_max_tokens_and_context_limit_finish_with_length() -> None:
    scheduler = make_scheduler(max_model_len=8)
    short = make_sequence(3, max_tokens=2)
    edge = make_sequence(6, max_tokens=50)
    scheduler.add(short)
    scheduler.add(edge)
    run_step(scheduler)
    _, chunks = run_step(scheduler)
    assert {c.request_id: c.finish_reason for c in chunks} == {
        short.request_id: FinishReason.LENGTH,
        edge.request_id: FinishReason.LENGTH,
    }
    assert edge.num_tokens == 8
    assert scheduler.is_idle


def test_rejects_prompt_that_fills_the_context_and_duplicate_ids() -> None:
    scheduler = make_scheduler(max_model_len=8)
    with pytest.raises(ValueError, match="context limit of 8"):
        scheduler.add(make_sequence(8))
    seq = make_sequence(3)
    scheduler.add(seq)
    with pytest.raises(ValueError, match="already scheduled"):
        scheduler.add(seq)


def test_config_rejects_a_pool_smaller_than_one_sequence() -> None:
    with pytest.raises(ValueError, match="cannot hold one sequence"):
        SchedulerConfig(num_blocks=2, block_size=4, max_model_len=32)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        SchedulerConfig(num_blocks=8, max_model_len=32, max_num_seqs=8, max_num_batched_tokens=4)


def test_penalized_sequences_carry_their_history() -> None:
    scheduler = make_scheduler()
    plain, penalized = make_sequence(3), make_sequence(3, repetition_penalty=1.3)
    scheduler.add(plain)
    scheduler.add(penalized)
    run_step(scheduler)
    output, _ = run_step(scheduler)
    history = {item.request_id: item.history for item in output.scheduled}
    assert history[plain.request_id] is None
    assert history[penalized.request_id] == penalized.prompt_token_ids + [7]


def test_stop_tokens_are_banned_from_sampling_below_min_tokens() -> None:
    scheduler = make_scheduler()
    plain = make_sequence(3, min_tokens=2, stop_token_ids=(9,))
    ignoring = make_sequence(3, min_tokens=2, stop_token_ids=(9,), ignore_eos=True)
    scheduler.add(plain)
    scheduler.add(ignoring)
    banned = []
    for _ in range(3):
        output, _ = run_step(scheduler)
        banned.append([item.banned_token_ids for item in output.scheduled])
    assert banned == [[(9, EOS), (9,)], [(9, EOS), (9,)], [(), ()]]


def test_is_decode_marks_generated_tokens_not_prompt_chunks_or_recomputes() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=4, max_num_seqs=1)
    seq = make_sequence(5)
    scheduler.add(seq)
    kinds = [run_step(scheduler)[0].scheduled[0].is_decode for _ in range(3)]
    assert kinds == [False, False, True]  # 4 prompt tokens, the 1-token prompt tail, a decode


def test_recompute_after_preemption_is_not_a_decode() -> None:
    scheduler = make_scheduler(num_blocks=8, max_num_seqs=2)
    seqs = [make_sequence(8, max_tokens=12), make_sequence(8, max_tokens=12)]
    for seq in seqs:
        scheduler.add(seq)
    preempted: set[str] = set()
    seen_preemptions = {seq.request_id: 0 for seq in seqs}
    recomputes = []
    while not scheduler.is_idle:
        output, _ = run_step(scheduler)
        recomputes += [item for item in output.scheduled if item.request_id in preempted]
        for seq in seqs:
            if seq.num_preemptions > seen_preemptions[seq.request_id]:
                seen_preemptions[seq.request_id] = seq.num_preemptions
                preempted.add(seq.request_id)
        preempted -= {item.request_id for item in recomputes}
    assert recomputes and all(not item.is_decode and item.num_new_tokens > 1 for item in recomputes)


def test_blocks_behind_a_sliding_window_are_given_back_as_a_sequence_advances() -> None:
    scheduler = make_scheduler(num_blocks=8, block_size=4, max_num_seqs=1, sliding_window=6)
    seq = make_sequence(8, max_tokens=20)
    scheduler.add(seq)
    held = []
    while not scheduler.is_idle:
        run_step(scheduler)
        held.append(scheduler.block_manager.num_used_blocks)
    assert seq.finish_reason == FinishReason.LENGTH and len(seq.output_token_ids) == 20
    assert max(held[1:]) <= 3  # a window of 6 spans at most 3 blocks of 4: 28 tokens in 3 blocks
    assert scheduler.block_manager.num_used_blocks == 0


def test_a_preempted_windowed_sequence_gives_back_only_what_it_still_held() -> None:
    scheduler = make_scheduler(num_blocks=8, block_size=4, max_num_seqs=2, sliding_window=14)
    old = make_sequence(16, max_tokens=24, priority=0, arrival_time=0.0)
    scheduler.add(old)
    for _ in range(3):
        run_step(scheduler)
    assert old.num_released_blocks == 1
    new = make_sequence(20, max_tokens=10, priority=1, arrival_time=5.0)
    scheduler.add(new)
    run_step(scheduler)
    run_step(scheduler)  # the new one's growth preempts the old one, released entry and all
    assert old.num_preemptions == 1 and old.block_table == [] and old.num_released_blocks == 0
    while not scheduler.is_idle:
        run_step(scheduler)  # checks the pool's invariants, released entries included
    assert (len(old.output_token_ids), len(new.output_token_ids)) == (16, 10)  # old: up to the context of 32
    assert scheduler.block_manager.num_used_blocks == 0
