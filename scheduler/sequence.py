"""Sequence: one generation's tokens, status and KV block table, owned and mutated by the scheduler."""

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from scheduler.ngram_proposer import NgramIndex
    from scheduler.output import SampledToken


class SequenceStatus(enum.IntEnum):
    """Where a sequence is."""

    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()


class FinishReason(enum.Enum):
    """Why a sequence ended, as the client sees it."""

    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Per-request sampling; defaults mean plain sampling at temperature 1."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()  # matched where the text is: the gateway, or the in-process LLM
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None  # None: none; n: the sampled token's and the top n
    grammar: str = ""  # a structured-output constraint as an llguidance grammar; "" = none
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    allowed_token_ids: tuple[int, ...] = ()  # when set, nothing else may be sampled
    prompt_logprobs: int | None = None  # None: none; n: each prompt token's and the top n there
    n: int = 1  # completions of the prompt (choices); see Sequence.fork_choices

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


_arrival_counter = itertools.count()


@dataclass(slots=True, eq=False)
class Sequence:
    """One generation. `num_computed_tokens` catches up with `num_tokens`, whatever the phase."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    choice_index: int = 0  # which of the request's n completions this is
    # Choices that fork off this sequence when it samples its first token: each gets its own token
    # from the same logits and shares the prompt's KV blocks, so the prompt is computed once.
    fork_choices: tuple[int, ...] = ()
    priority: int = 0  # higher runs first and is preempted last
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_cached_blocks: int = 0  # leading full blocks already registered in the prefix cache
    num_released_blocks: int = 0  # leading blocks given back as outside the sliding window
    block_hashes: list[bytes] = field(default_factory=list)  # chained hashes of full blocks
    num_preemptions: int = 0
    prompt_logprobs: list["SampledToken"] = field(default_factory=list)  # prompt tokens 1.., when asked
    finish_reason: FinishReason | None = None
    arrival_order: int = field(default_factory=lambda: next(_arrival_counter))
    draft_index: "NgramIndex | None" = None  # built at its first draft, with speculative decoding on

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_seats(self) -> int:
        """Places in the running batch it takes once its choices have forked off."""
        return 1 + len(self.fork_choices)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Asked for, and not yet sent (they go with completion token 0): a resumed or preempted
        sequence that already has output does not score its prompt again."""
        return self.sampling.prompt_logprobs is not None and not self.output_token_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output, without building the whole list."""
        num_prompt = len(self.prompt_token_ids)
        if end <= num_prompt:
            return self.prompt_token_ids[start:end]
        if start >= num_prompt:
            return self.output_token_ids[start - num_prompt : end - num_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - num_prompt]

    @property
    def schedule_key(self) -> tuple[int, float, int, int]:
        """Sort key: higher priority first, then earlier arrival (a request's choices in order)."""
        return (-self.priority, self.arrival_time, self.arrival_order, self.choice_index)
