"""Batching strategies: which waiting sequences may join the running batch this step.

The scheduler's budgets, preemption and KV pager are the same under every strategy; a strategy
only says who may be admitted, so the three can be compared on one engine (`conveyor bench`):

- continuous: a waiting sequence joins as soon as a seat, budget and blocks allow (vLLM, TGI);
- static: a batch is formed from the head of the queue when the previous one has wholly finished,
  and nothing joins it while it runs; seats its finished members leave stay empty until its longest
  member ends (padding by length, without computing the pad tokens: static batching's best case);
- sequential: one request at a time (with its `n` choices), as a plain queue in front of `generate`.
"""

from collections.abc import Callable
from typing import Literal, Protocol

from scheduler.sequence import Sequence

Batching = Literal["sequential", "static", "continuous"]
BATCHING_STRATEGIES: tuple[Batching, ...] = ("sequential", "static", "continuous")


class BatchingStrategy(Protocol):
    def admissible(
        self, waiting: list[Sequence], running: list[Sequence], is_live: Callable[[str], bool]
    ) -> list[Sequence]:
        """The waiting sequences that may join `running` now, in the queue's order; the scheduler
        admits them while seats, budget and blocks allow. `is_live` tells whether a request still
        has a sequence in the scheduler."""
        ...


class ContinuousBatching:
    def admissible(
        self, waiting: list[Sequence], running: list[Sequence], is_live: Callable[[str], bool]
    ) -> list[Sequence]:
        return waiting


class SequentialBatching:
    def admissible(
        self, waiting: list[Sequence], running: list[Sequence], is_live: Callable[[str], bool]
    ) -> list[Sequence]:
        """The head's request, every choice of it (a resumed job waits as one sequence a choice)."""
        if running or not waiting:
            return []
        return [seq for seq in waiting if seq.request_id == waiting[0].request_id]


class StaticBatching:
    """Remembers the requests of the batch that runs; the next batch is cut from the head of the
    queue once none of them is live."""

    def __init__(self, max_num_seqs: int):
        self._max_num_seqs = max_num_seqs
        self._batch: set[str] = set()

    def admissible(
        self, waiting: list[Sequence], running: list[Sequence], is_live: Callable[[str], bool]
    ) -> list[Sequence]:
        if not any(is_live(request_id) for request_id in self._batch):
            self._batch.clear()
            seats = 0
            for seq in waiting:
                if seats + seq.num_seats > self._max_num_seqs:
                    break
                self._batch.add(seq.request_id)
                seats += seq.num_seats
        # Members not admitted yet (budget, blocks) or preempted wait their turn; nobody else joins.
        return [seq for seq in waiting if seq.request_id in self._batch]


def batching_strategy(name: Batching, max_num_seqs: int) -> BatchingStrategy:
    """The strategy of that name (SchedulerConfig has checked it is one)."""
    strategies: dict[str, Callable[[], BatchingStrategy]] = {
        "continuous": ContinuousBatching,
        "static": lambda: StaticBatching(max_num_seqs),
        "sequential": SequentialBatching,
    }
    return strategies[name]()
