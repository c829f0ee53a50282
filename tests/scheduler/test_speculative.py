"""Prompt-lookup speculative decoding in the scheduler: what is drafted, and what is kept."""

from typing import Any

from scheduler import FinishReason, SampledToken, Scheduler, SchedulerOutput, TokenChunk
from scheduler.block_manager import chain_hash
from scheduler.ngram_proposer import NgramIndex
from tests.scheduler.factories import EOS, make_scheduler, make_sequence, run_step


def _index_proposal(tokens: list[int], num_tokens: int = 3, min_n: int = 1, max_n: int = 3) -> list[int]:
    return NgramIndex(min_n, max_n).propose(make_sequence(prompt=tokens), num_tokens)


def test_the_longest_recurring_suffix_proposes_what_followed_its_latest_occurrence() -> None:
    assert _index_proposal([7, 2, 3, 4, 9, 2, 3, 5, 6, 1, 2, 3]) == [5, 6, 1]  # "2 3", latest first
    assert _index_proposal([1, 2, 3, 4, 9, 2, 3, 5, 6, 1, 2, 3]) == [4, 9, 2]  # "1 2 3" beats "2 3"
    assert _index_proposal([5, 6, 7, 8, 5, 6, 7], num_tokens=8) == [8, 5, 6, 7]  # cut at the end


def test_no_draft_without_a_recurring_suffix_of_min_n_tokens() -> None:
    assert _index_proposal([1, 2, 3, 4, 5]) == []
    assert _index_proposal([1, 2, 3, 9, 3], min_n=2) == []
    assert _index_proposal([1, 2, 3, 9, 3], min_n=1) == [9, 3]


def test_the_index_grows_with_the_sequence() -> None:
    seq = make_sequence(prompt=[1, 2, 3, 4, 5])
    index = NgramIndex(1, 2)
    assert index.propose(seq, 2) == []
    seq.output_token_ids += [1, 2]
    assert index.propose(seq, 2) == [3, 4]
    seq.output_token_ids += [8, 1]
    assert index.propose(seq, 2) == [2, 8]  # "1" last followed by "2 8"


def _speculating(**config: Any) -> Scheduler:
    defaults: dict[str, Any] = {"num_blocks": 32, "max_model_len": 64, "max_num_batched_tokens": 32}
    return make_scheduler(**{**defaults, **config}, num_speculative_tokens=3, prompt_lookup_min=1)


def _step(scheduler: Scheduler, tokens: dict[str, list[int]]) -> tuple[SchedulerOutput, list[TokenChunk]]:
    """Schedule; each item 'samples' the given tokens, one per row it samples."""
    output = scheduler.schedule()
    sampled = []
    for item in output.scheduled:
        rows = 1 + item.num_draft_tokens if item.needs_sample else 0
        sampled.append(tuple(SampledToken(t) for t in tokens[item.request_id][:rows]))
    chunks = scheduler.update(output, sampled)
    scheduler.check_invariants()
    return output, chunks


def test_drafts_the_model_agrees_with_are_kept_with_its_token_after_them() -> None:
    scheduler = _speculating()
    seq = make_sequence(prompt=[10, 11, 12, 13, 14, 10], max_tokens=20)
    scheduler.add(seq)
    _step(scheduler, {seq.request_id: [11]})
    output, chunks = _step(scheduler, {seq.request_id: [12, 13, 14, 99]})  # "10 11" -> 12 13 14
    (item,) = output.scheduled
    assert item.token_ids == [11, 12, 13, 14] and item.num_draft_tokens == 3 and item.is_decode
    assert chunks[0].index == 1 and chunks[0].token_ids == [12, 13, 14, 99]
    assert seq.output_token_ids == [11, 12, 13, 14, 99]
    assert seq.num_computed_tokens == seq.num_tokens - 1
    assert (scheduler.num_draft_tokens, scheduler.num_accepted_tokens) == (3, 3)


def test_at_the_first_disagreement_the_model_s_token_is_kept_and_the_rest_dropped() -> None:
    scheduler = _speculating()
    seq = make_sequence(prompt=[10, 11, 12, 13, 14, 10], max_tokens=20)
    scheduler.add(seq)
    _step(scheduler, {seq.request_id: [11]})
    _, chunks = _step(scheduler, {seq.request_id: [12, 50, 14, 15]})
    assert chunks[0].token_ids == [12, 50]
    assert seq.num_computed_tokens == seq.num_tokens - 1 == 8
    assert (scheduler.num_draft_tokens, scheduler.num_accepted_tokens) == (3, 1)
    output, _ = _step(scheduler, {seq.request_id: [7, 7, 7, 7]})
    assert output.scheduled[0].start_pos == 8  # the rejected positions are written again


def test_a_stop_token_among_the_accepted_ends_the_sequence_there() -> None:
    scheduler = _speculating()
    seq = make_sequence(prompt=[10, 11, 12, EOS, 14, 10], max_tokens=20)
    scheduler.add(seq)
    _step(scheduler, {seq.request_id: [11]})
    _, chunks = _step(scheduler, {seq.request_id: [12, EOS, 14, 15]})
    assert chunks[0].token_ids == [12, EOS] and chunks[0].finish_reason == FinishReason.STOP
    assert scheduler.is_idle


def test_drafts_stay_within_max_tokens_and_the_budget() -> None:
    scheduler = _speculating(max_num_batched_tokens=4, max_num_seqs=2)
    capped = make_sequence(prompt=[10, 11, 12, 13, 14, 10], max_tokens=3)
    other = make_sequence(prompt=[20, 21, 22, 23], max_tokens=8)
    scheduler.add(capped)
    scheduler.add(other)
    _step(scheduler, {capped.request_id: [11], other.request_id: [5]})
    _step(scheduler, {capped.request_id: [11], other.request_id: [5]})
    # capped decodes (1 token), other's last prompt chunk (2): one token of budget is left, and
    # capped has room for two more tokens, so one draft ("10 11" was followed by 12).
    output, chunks = _step(scheduler, {capped.request_id: [12, 13], other.request_id: [5]})
    by_id = {item.request_id: item for item in output.scheduled}
    assert by_id[capped.request_id].token_ids == [11, 12] and by_id[other.request_id].num_new_tokens == 2
    assert output.num_batched_tokens == 4
    assert capped.output_token_ids == [11, 12, 13] and capped.finish_reason == FinishReason.LENGTH


def test_sampled_penalized_and_constrained_sequences_are_not_drafted() -> None:
    for sampling in (
        {"temperature": 0.7},
        {"repetition_penalty": 1.2},
        {"grammar": "start: x"},
        {"min_tokens": 5},
    ):
        scheduler = _speculating()
        seq = make_sequence(prompt=[10, 11, 12, 13, 14, 10], max_tokens=20)
        seq.sampling = seq.sampling.__class__(**{**_fields(seq.sampling), **sampling})
        scheduler.add(seq)
        _step(scheduler, {seq.request_id: [11]})
        output, _ = _step(scheduler, {seq.request_id: [12]})
        assert output.scheduled[0].num_draft_tokens == 0, sampling


def test_drafts_never_take_the_block_a_later_sequence_needs_nor_preempt() -> None:
    scheduler = _speculating(num_blocks=4, block_size=4, max_model_len=16, max_num_seqs=2)
    drafting = make_sequence(prompt=[10, 11, 10], max_tokens=8)
    other = make_sequence(prompt=list(range(20, 28)), max_tokens=4)
    scheduler.add(drafting)
    scheduler.add(other)
    _step(scheduler, {drafting.request_id: [11], other.request_id: [5]})  # 1 + 3 blocks: one free
    output, _ = _step(scheduler, {drafting.request_id: [12], other.request_id: [5]})
    assert scheduler.num_preemptions == 0
    by_id = {item.request_id: item for item in output.scheduled}
    assert by_id[drafting.request_id].num_draft_tokens == 0 and by_id[other.request_id].num_new_tokens == 1


def test_blocks_filled_by_accepted_drafts_are_cached_under_their_tokens() -> None:
    scheduler = _speculating(block_size=4)
    seq = make_sequence(prompt=[10, 11, 12, 13, 14, 10], max_tokens=20)
    scheduler.add(seq)
    _step(scheduler, {seq.request_id: [11]})
    _step(scheduler, {seq.request_id: [12, 13, 14, 15]})  # positions 7-9 accepted: block 1 fills
    _step(scheduler, {seq.request_id: [16]})
    tokens = seq.token_slice(0, seq.num_tokens)
    expected, parent = [], b""
    for index in range(seq.num_computed_tokens // 4):
        parent = chain_hash(parent, tokens[index * 4 : index * 4 + 4])
        expected.append(parent)
    assert seq.block_hashes == expected and len(expected) == 2


def test_speculation_off_drafts_nothing() -> None:
    scheduler = make_scheduler(num_blocks=32, max_model_len=64)
    seq = make_sequence(prompt=[10, 11, 12, 10], max_tokens=6)
    scheduler.add(seq)
    for _ in range(3):
        output, _ = run_step(scheduler, token_id=11)
        assert output.scheduled[0].num_draft_tokens == 0


def _fields(params: object) -> dict[str, object]:
    return {name: getattr(params, name) for name in params.__slots__}  # type: ignore[attr-defined]
