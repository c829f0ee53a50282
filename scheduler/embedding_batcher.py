"""EmbeddingBatcher: batches encode requests for an embeddings worker.

An encoder runs each input once, with no KV cache, so batching is about filling the device and
wasting little on padding: a batch costs (inputs x longest input) tokens. The batcher waits at most
`max_wait_s` after the oldest queued input arrived for a batch to fill, always includes that oldest
input (nothing starves), and fills the rest with the queued inputs nearest to it in length. A call
with many inputs may be split across batches; its vectors are handed back whole and in order.
"""

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

Vector = TypeVar("Vector")


@dataclass(frozen=True, slots=True)
class EmbeddingBatcherConfig:
    max_batch_tokens: int  # padded tokens per batch: inputs x the longest one
    max_batch_size: int  # inputs per batch
    max_wait_s: float  # how long the oldest input may wait for a batch to fill
    max_padding: float = 0.2  # share of a group's padded tokens that may be padding (see EmbedBatch)

    def __post_init__(self) -> None:
        invalid = self.max_batch_tokens < 1 or self.max_batch_size < 1 or self.max_wait_s < 0
        if invalid or not 0 <= self.max_padding < 1:
            raise ValueError(f"invalid batcher config {self}")


@dataclass(frozen=True, slots=True)
class EmbedInput:
    """One text of one call, tokenized."""

    request_id: str
    index: int  # its place among the call's inputs
    token_ids: tuple[int, ...]
    arrival: int  # order of arrival across all calls (ties in time keep this order)


@dataclass(frozen=True, slots=True)
class EmbedBatch:
    """One step's inputs, shortest first, in groups the encoder runs (and pads) one at a time: a
    short input batched with a long one would otherwise cost as much as the long one."""

    groups: tuple[tuple[EmbedInput, ...], ...]

    @classmethod
    def of(cls, inputs: Sequence[EmbedInput], max_padding: float) -> "EmbedBatch":
        """Cut the inputs (shortest first) wherever adding the next one would make more than
        `max_padding` of its group's padded tokens padding."""
        groups: list[tuple[EmbedInput, ...]] = []
        current: list[EmbedInput] = []
        real_tokens = 0
        for item in inputs:
            length = len(item.token_ids)  # the longest so far: the group pads to it
            if current and real_tokens + length < (1 - max_padding) * (len(current) + 1) * length:
                groups.append(tuple(current))
                current, real_tokens = [], 0
            current.append(item)
            real_tokens += length
        groups.append(tuple(current))
        return cls(tuple(groups))

    @property
    def inputs(self) -> tuple[EmbedInput, ...]:
        return tuple(item for group in self.groups for item in group)

    @property
    def padded_tokens(self) -> int:
        return sum(len(group) * len(group[-1].token_ids) for group in self.groups)


@dataclass(slots=True)
class EmbedCall(Generic[Vector]):
    """A call whose inputs are all embedded: its vectors in the order of its inputs."""

    request_id: str
    vectors: list[Vector]
    prompt_tokens: int


@dataclass(slots=True)
class _Pending(Generic[Vector]):
    num_inputs: int
    arrived_s: float
    prompt_tokens: int
    vectors: dict[int, Vector] = field(default_factory=dict)


class EmbeddingBatcher(Generic[Vector]):
    def __init__(self, config: EmbeddingBatcherConfig):
        self.config = config
        self._queue: list[EmbedInput] = []  # waiting inputs, by arrival
        self._calls: dict[str, _Pending[Vector]] = {}
        self._arrivals = 0

    def add(self, request_id: str, inputs: Sequence[Sequence[int]], now_s: float) -> None:
        """Queue a call's tokenized inputs (at least one, none empty)."""
        if request_id in self._calls:
            raise ValueError(f"request {request_id} is already queued")
        if not inputs or any(not ids for ids in inputs):
            raise ValueError("a call needs at least one input, and no input may be empty")
        self._calls[request_id] = _Pending(len(inputs), now_s, sum(len(ids) for ids in inputs))
        for index, ids in enumerate(inputs):
            self._queue.append(EmbedInput(request_id, index, tuple(ids), self._arrivals))
            self._arrivals += 1

    def cancel(self, request_id: str) -> bool:
        """Forget a call: its queued inputs go, vectors of a batch already running are dropped."""
        if self._calls.pop(request_id, None) is None:
            return False
        self._queue = [i for i in self._queue if i.request_id != request_id]
        return True

    @property
    def num_queued_inputs(self) -> int:
        return len(self._queue)

    @property
    def num_calls(self) -> int:
        return len(self._calls)

    def wait_s(self, now_s: float) -> float | None:
        """How long until a batch is due (0: now); None when nothing is queued."""
        if not self._queue:
            return None
        if self._full():
            return 0.0
        oldest = self._calls[self._queue[0].request_id].arrived_s
        return max(oldest + self.config.max_wait_s - now_s, 0.0)

    def next_batch(self, now_s: float) -> EmbedBatch | None:
        """The batch to run now, or None when none is due yet."""
        wait = self.wait_s(now_s)
        if wait is None or wait > 0:
            return None
        batch = self._select()
        taken = {(i.request_id, i.index) for i in batch}
        self._queue = [i for i in self._queue if (i.request_id, i.index) not in taken]
        return EmbedBatch.of(batch, self.config.max_padding)

    def complete(self, batch: EmbedBatch, vectors: Sequence[Vector]) -> list[EmbedCall[Vector]]:
        """Record a batch's vectors (in the batch's order); returns the calls now whole."""
        if len(vectors) != len(batch.inputs):
            raise ValueError(f"{len(vectors)} vectors for {len(batch.inputs)} inputs")
        done: list[EmbedCall[Vector]] = []
        for item, vector in zip(batch.inputs, vectors, strict=True):
            call = self._calls.get(item.request_id)
            if call is None:  # cancelled while its batch ran
                continue
            call.vectors[item.index] = vector
            if len(call.vectors) == call.num_inputs:
                del self._calls[item.request_id]
                ordered = [call.vectors[i] for i in range(call.num_inputs)]
                done.append(EmbedCall(item.request_id, ordered, call.prompt_tokens))
        return done

    def _full(self) -> bool:
        """Whether the queue already holds more than one batch can take."""
        if len(self._queue) >= self.config.max_batch_size:
            return True
        longest = max(len(i.token_ids) for i in self._queue)
        return len(self._queue) * longest >= self.config.max_batch_tokens

    def _select(self) -> list[EmbedInput]:
        """The oldest input, then its nearest neighbours by length while the batch fits."""
        by_length = sorted(self._queue, key=lambda i: (len(i.token_ids), i.arrival))
        lengths = [len(i.token_ids) for i in by_length]
        oldest = self._queue[0]
        low = bisect.bisect_left(lengths, len(oldest.token_ids))
        while by_length[low] is not oldest:
            low += 1
        high = low + 1  # the batch is by_length[low:high]
        target = lengths[low]
        while high - low < self.config.max_batch_size:
            # Neighbours by closeness in length, then by arrival: (distance, arrival, grows upward).
            options = []
            if low > 0:
                options.append((target - lengths[low - 1], by_length[low - 1].arrival, False))
            if high < len(by_length):
                options.append((lengths[high] - target, by_length[high].arrival, True))
            for _distance, _arrival, upward in sorted(options):
                longest = lengths[high] if upward else lengths[high - 1]
                if (high - low + 1) * longest <= self.config.max_batch_tokens:
                    low, high = (low, high + 1) if upward else (low - 1, high)
                    break
            else:
                break
        return by_length[low:high]
