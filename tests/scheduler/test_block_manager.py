from scheduler import BlockManager, Sequence
from tests.scheduler.factories import make_sequence


def _blocks(num_blocks: int = 6) -> BlockManager:
    return BlockManager(num_blocks=num_blocks, block_size=4)


def _compute(manager: BlockManager, seq: Sequence, num_tokens: int) -> None:
    assert manager.allocate_slots(seq, num_tokens)
    seq.num_computed_tokens += num_tokens
    manager.cache_full_blocks(seq)


def test_allocates_blocks_to_cover_tokens_and_frees_them() -> None:
    manager = _blocks()
    seq = make_sequence(num_prompt_tokens=9)
    assert manager.allocate_slots(seq, 9)
    assert len(seq.block_table) == 3
    assert manager.num_free_blocks == 3
    manager.check_invariants([seq])
    manager.free(seq)
    assert manager.num_free_blocks == 6
    manager.check_invariants([])


def test_refuses_allocation_beyond_the_pool_without_partial_grants() -> None:
    manager = _blocks(num_blocks=2)
    seq = make_sequence(num_prompt_tokens=9)
    assert not manager.allocate_slots(seq, 9)
    assert seq.block_table == []
    manager.check_invariants([seq])


def test_shared_prefix_reuses_computed_blocks_with_reference_counts() -> None:
    manager = _blocks()
    first = make_sequence(prompt=list(range(10)))
    _compute(manager, first, 10)
    second = make_sequence(prompt=list(range(8)) + [90, 91, 92])
    assert manager.match_prefix(second) == 8
    assert second.block_table == first.block_table[:2]
    assert manager.blocks[first.block_table[0]].ref_count == 2
    manager.check_invariants([first, second])
    assert (manager.num_queried_tokens, manager.num_hit_tokens) == (11, 8), "tokens looked up, and found"


def test_prefix_match_leaves_the_last_token_to_compute() -> None:
    manager = _blocks()
    first = make_sequence(prompt=list(range(8)))
    _compute(manager, first, 8)
    twin = make_sequence(prompt=list(range(8)))
    assert manager.match_prefix(twin) == 4  # the second block holds the last token: recomputed
    manager.check_invariants([first, twin])


def test_prefix_hash_chains_over_earlier_blocks() -> None:
    manager = _blocks()
    first = make_sequence(prompt=[1, 2, 3, 4, 5, 6, 7, 8, 9])
    _compute(manager, first, 9)
    other = make_sequence(prompt=[0, 2, 3, 4, 5, 6, 7, 8, 9])  # same second block, other first
    assert manager.match_prefix(other) == 0


def test_freed_cached_blocks_stay_reusable_until_evicted() -> None:
    manager = _blocks(num_blocks=4)
    first = make_sequence(prompt=list(range(9)))
    _compute(manager, first, 9)
    manager.free(first)
    manager.check_invariants([])
    again = make_sequence(prompt=list(range(9)))
    assert manager.match_prefix(again) == 8
    manager.check_invariants([again])


def test_eviction_takes_uncached_blocks_first_then_least_recently_freed() -> None:
    manager = _blocks(num_blocks=4)
    old = make_sequence(prompt=[1, 1, 1, 1, 9])
    _compute(manager, old, 5)  # block 0 cached, block 1 partial
    manager.free(old)
    new = make_sequence(prompt=[2, 2, 2, 2, 9])
    _compute(manager, new, 5)
    manager.free(new)
    # Four blocks free: two uncached partial ones first, then old's block, then new's.
    filler = make_sequence(num_prompt_tokens=12)
    assert manager.allocate_slots(filler, 12)
    manager.check_invariants([filler])
    assert manager.match_prefix(make_sequence(prompt=[1, 1, 1, 1, 5])) == 0
    probe = make_sequence(prompt=[2, 2, 2, 2, 5])
    assert manager.match_prefix(probe) == 4
    manager.check_invariants([filler, probe])


def test_same_contents_computed_twice_keep_one_cache_entry() -> None:
    manager = _blocks()
    first = make_sequence(prompt=list(range(5)))
    second = make_sequence(prompt=list(range(5)))
    _compute(manager, first, 5)
    _compute(manager, second, 5)
    assert manager.num_cached_blocks == 1
    manager.free(first)
    manager.free(second)
    manager.check_invariants([])


def test_prefix_caching_off_never_matches() -> None:
    manager = BlockManager(num_blocks=6, block_size=4, enable_prefix_caching=False)
    first = make_sequence(prompt=list(range(9)))
    _compute(manager, first, 9)
    assert manager.match_prefix(make_sequence(prompt=list(range(9)))) == 0


def test_prompts_past_the_long_rope_limit_are_cached_apart_from_shorter_ones() -> None:
    manager = BlockManager(num_blocks=12, block_size=4, long_prompt_from=8)
    _compute(manager, make_sequence(prompt=list(range(12))), 12)
    assert manager.match_prefix(make_sequence(prompt=list(range(8)))) == 0  # same tokens, other KV
    assert manager.match_prefix(make_sequence(prompt=list(range(12)) + [99])) == 12
