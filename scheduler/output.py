"""Values that leave the scheduler: what to run this step, and what came of it."""

from dataclasses import dataclass

from scheduler.sequence import FinishReason, SamplingParams


@dataclass(frozen=True, slots=True)
class ScheduledSeq:
    """One sequence's share of a step: everything the model runner needs, nothing it may change."""

    request_id: str
    # tokens to feed this step: a prefill chunk, or the last sampled token (and its drafts)
    token_ids: list[int]
    start_pos: int  # position of token_ids[0] in the sequence
    block_ids: list[int]  # the block table covering positions [0, start_pos + len(token_ids))
    needs_sample: bool  # True when this step reaches the end of the sequence
    sampling: SamplingParams
    num_output_tokens: int  # index in the completion of the token sampled this step
    history: list[int] | None  # prompt + output ids, only with penalties, a grammar or prompt logprobs due
    num_prompt_tokens: int  # to split `history` into prompt and output
    banned_token_ids: tuple[int, ...] = ()  # stop tokens the sampler must not pick (below min_tokens)
    choice_index: int = 0
    # Choices forking off at this step's sample: one more token each from the same logits row.
    fork_choices: tuple[int, ...] = ()
    # Speculative decoding: token_ids ends with this many drafted tokens, and every row is sampled
    # (a token for each, in order) so the scheduler keeps the drafts the model agrees with.
    num_draft_tokens: int = 0

    @property
    def sample_choices(self) -> tuple[int, ...]:
        """The choices that get a token from this item's last row, in the order they are sampled."""
        return (self.choice_index, *self.fork_choices) if self.needs_sample else ()

    @property
    def num_new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def context_len(self) -> int:
        return self.start_pos + len(self.token_ids)

    @property
    def is_decode(self) -> bool:
        """One generated token fed back (and the drafts after it); anything else (a prompt chunk,
        a recompute) is prefill."""
        return len(self.token_ids) == 1 + self.num_draft_tokens and self.start_pos >= self.num_prompt_tokens

    @property
    def draft_token_ids(self) -> list[int]:
        return self.token_ids[len(self.token_ids) - self.num_draft_tokens :]


@dataclass(frozen=True, slots=True)
class SchedulerOutput:
    """One step's batch; `scheduled` is ordered and the runner answers in the same order."""

    scheduled: list[ScheduledSeq]
    num_batched_tokens: int
    # (source, destination) KV blocks to copy before the forward: copy on write of a shared block.
    block_copies: tuple[tuple[int, int], ...] = ()

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass(frozen=True, slots=True)
class SampledToken:
    """What the sampler picked for one sequence, with logprobs when they were asked for."""

    token_id: int
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True, slots=True)
class TokenChunk:
    """New tokens of one request from one step; `finish_reason` is set on its last chunk."""

    request_id: str
    index: int  # position in the completion of tokens[0]
    tokens: tuple[SampledToken, ...]
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    prompt_logprobs: tuple[SampledToken, ...] = ()  # on completion token 0, when asked for
    choice_index: int = 0

    @property
    def token_ids(self) -> list[int]:
        return [token.token_id for token in self.tokens]
