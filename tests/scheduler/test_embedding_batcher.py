"""EmbeddingBatcher: token budget, batch size, the wait for a batch to fill, order restored."""

import pytest

from scheduler.embedding_batcher import EmbeddingBatcher, EmbeddingBatcherConfig


def ids(n: int) -> list[int]:
    return list(range(1, n + 1))


def batcher(tokens: int = 64, size: int = 8, wait_s: float = 0.01) -> EmbeddingBatcher[str]:
    return EmbeddingBatcher(EmbeddingBatcherConfig(tokens, size, wait_s))


def test_a_lone_input_waits_for_company_then_runs() -> None:
    queue = batcher(wait_s=0.05)
    queue.add("a", [ids(3)], now_s=10.0)
    assert queue.next_batch(10.01) is None
    assert queue.wait_s(10.01) == pytest.approx(0.04)
    batch = queue.next_batch(10.05)
    assert batch is not None and [(i.request_id, i.index) for i in batch.inputs] == [("a", 0)]
    assert queue.wait_s(10.05) is None


def test_a_full_batch_runs_without_waiting() -> None:
    queue = batcher(size=4, wait_s=60)
    queue.add("a", [ids(2)] * 4, now_s=0.0)
    batch = queue.next_batch(0.0)
    assert batch is not None and len(batch.inputs) == 4


def test_batches_respect_the_size_and_the_padded_token_budget() -> None:
    queue = batcher(tokens=40, size=3, wait_s=0)
    queue.add("a", [ids(n) for n in (10, 10, 10, 10, 20, 20, 40)], now_s=0.0)
    sizes = []
    while (batch := queue.next_batch(1.0)) is not None:
        assert len(batch.inputs) <= 3
        assert batch.padded_tokens <= 40 or len(batch.inputs) == 1
        sizes.append(sorted(len(i.token_ids) for i in batch.inputs))
        queue.complete(batch, ["v"] * len(batch.inputs))
    assert sizes == [[10, 10, 10], [10, 20], [20], [40]]


def test_an_input_over_the_budget_runs_alone() -> None:
    queue = batcher(tokens=16, size=8, wait_s=0)
    queue.add("big", [ids(50)], now_s=0.0)
    queue.add("small", [ids(2)], now_s=0.0)
    first = queue.next_batch(0.0)
    assert first is not None and [i.request_id for i in first.inputs] == ["big"]


def test_the_oldest_input_is_always_in_the_batch_with_its_nearest_lengths() -> None:
    queue = batcher(tokens=1000, size=3, wait_s=0)
    queue.add("old", [ids(30)], now_s=0.0)
    queue.add("new", [ids(n) for n in (2, 3, 29, 31, 60)], now_s=0.001)
    batch = queue.next_batch(1.0)
    assert batch is not None
    assert [len(i.token_ids) for i in batch.inputs] == [29, 30, 31], "sorted by length, little padding"


def test_a_split_call_comes_back_whole_and_in_order() -> None:
    queue = batcher(tokens=1000, size=2, wait_s=0)
    lengths = [5, 1, 9, 3, 7]
    queue.add("split", [ids(n) for n in lengths], now_s=0.0)
    finished = []
    while (batch := queue.next_batch(1.0)) is not None:
        assert len(batch.inputs) <= 2
        finished += queue.complete(batch, [f"vector-{len(i.token_ids)}" for i in batch.inputs])
    (call,) = finished
    assert call.request_id == "split"
    assert call.vectors == [f"vector-{n}" for n in lengths]
    assert call.prompt_tokens == sum(lengths)
    assert queue.num_calls == 0


def test_calls_finish_separately_when_batched_together() -> None:
    queue = batcher(wait_s=0)
    queue.add("a", [ids(4)], now_s=0.0)
    queue.add("b", [ids(4), ids(5)], now_s=0.0)
    batch = queue.next_batch(0.0)
    assert batch is not None and len(batch.inputs) == 3
    done = queue.complete(batch, [f"{i.request_id}{i.index}" for i in batch.inputs])
    assert {c.request_id: c.vectors for c in done} == {"a": ["a0"], "b": ["b0", "b1"]}


def test_a_cancelled_call_leaves_the_queue_and_its_running_vectors_are_dropped() -> None:
    queue = batcher(size=1, wait_s=0)
    queue.add("gone", [ids(3), ids(3)], now_s=0.0)
    batch = queue.next_batch(0.0)
    assert batch is not None
    assert queue.cancel("gone")
    assert queue.num_queued_inputs == 0
    assert queue.complete(batch, ["v"]) == []
    assert not queue.cancel("gone")


def test_bad_calls_are_refused() -> None:
    queue = batcher()
    with pytest.raises(ValueError):
        queue.add("empty", [], now_s=0.0)
    with pytest.raises(ValueError):
        queue.add("blank", [[]], now_s=0.0)
    queue.add("a", [ids(1)], now_s=0.0)
    with pytest.raises(ValueError):
        queue.add("a", [ids(1)], now_s=0.0)
    with pytest.raises(ValueError):
        EmbeddingBatcherConfig(0, 1, 0.0)


def test_short_and_long_inputs_of_one_batch_are_padded_in_separate_groups() -> None:
    queue: EmbeddingBatcher[str] = EmbeddingBatcher(EmbeddingBatcherConfig(10_000, 8, 0.0, max_padding=0.2))
    for n, length in enumerate([8, 9, 10, 100, 110, 250]):
        queue.add(f"r{n}", [[1] * length], now_s=0.0)
    batch = queue.next_batch(now_s=1.0)
    assert batch is not None
    assert [[len(i.token_ids) for i in group] for group in batch.groups] == [[8, 9, 10], [100, 110], [250]]
    assert batch.padded_tokens == 3 * 10 + 2 * 110 + 250  # not 6 x 250
    assert [len(i.token_ids) for i in batch.inputs] == [8, 9, 10, 100, 110, 250]
    done = queue.complete(batch, [str(len(i.token_ids)) for i in batch.inputs])
    assert [(c.request_id, c.vectors) for c in done][:2] == [("r0", ["8"]), ("r1", ["9"])]
    one_group = EmbeddingBatcher[str](EmbeddingBatcherConfig(10_000, 8, 0.0, max_padding=0.99))
    for n, length in enumerate([8, 250]):
        one_group.add(f"r{n}", [[1] * length], now_s=0.0)
    grouped = one_group.next_batch(now_s=1.0)
    assert grouped is not None and len(grouped.groups) == 1
