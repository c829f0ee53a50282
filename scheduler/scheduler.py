"""The continuous-batching scheduler: which tokens of which sequences run in the next step."""

import bisect
import dataclasses

from scheduler.batching import batching_strategy
from scheduler.block_manager import BlockManager
from scheduler.config import SchedulerConfig
from scheduler.ngram_proposer import NgramIndex
from scheduler.output import SampledToken, ScheduledSeq, SchedulerOutput, TokenChunk
from scheduler.sequence import FinishReason, Sequence, SequenceStatus

_FINISHED_STATUS = {
    FinishReason.STOP: SequenceStatus.FINISHED_STOPPED,
    FinishReason.LENGTH: SequenceStatus.FINISHED_LENGTH,
    FinishReason.CANCELLED: SequenceStatus.FINISHED_ABORTED,
}


class Scheduler:
    """Waiting and running queues over one KV pool; `schedule()` then `update()`, once per step."""

    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.block_manager = BlockManager(
            config.num_blocks, config.block_size, config.enable_prefix_caching, config.long_prompt_from
        )
        self.waiting: list[Sequence] = []  # sorted by Sequence.schedule_key; they hold no blocks
        self.running: list[Sequence] = []
        self._live: dict[str, dict[int, Sequence]] = {}  # request id -> choice -> sequence
        self._batching = batching_strategy(config.batching, config.max_num_seqs)
        self.num_preemptions = 0
        self.num_draft_tokens = 0  # speculative decoding: tokens drafted, and those the model agreed with
        self.num_accepted_tokens = 0

    @property
    def is_idle(self) -> bool:
        return not self._live

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence; its prompt must leave room for at least one generated token."""
        choices = self._live.get(seq.request_id, {})
        if set(_choices_of(seq)) & {c for s in choices.values() for c in _choices_of(s)}:
            raise ValueError(f"request {seq.request_id} choice {seq.choice_index} is already scheduled")
        if seq.num_tokens >= self.config.max_model_len:
            raise ValueError(
                f"{seq.num_tokens} tokens leave no room to generate within the context "
                f"limit of {self.config.max_model_len}"
            )
        if seq.num_seats > self.config.max_num_seqs:
            raise ValueError(f"{seq.num_seats} choices exceed max_num_seqs {self.config.max_num_seqs}")
        seq.status = SequenceStatus.WAITING
        bisect.insort(self.waiting, seq, key=_schedule_key)
        self._live.setdefault(seq.request_id, {})[seq.choice_index] = seq

    def finish(
        self, request_id: str, reason: FinishReason, choice_index: int | None = None
    ) -> list[Sequence]:
        """End a request's sequences now (a cancel), or one choice of it (a stop string its front
        matched), and free their blocks; the sequences ended, none if unknown."""
        choices = self._live.get(request_id, {})
        ended = [seq for seq in choices.values() if choice_index is None or seq.choice_index == choice_index]
        for seq in ended:
            del choices[seq.choice_index]
            if choice_index is not None and seq.fork_choices:
                self._pass_on(seq, choices)
                continue
            if seq.status == SequenceStatus.RUNNING:
                self.running.remove(seq)
            else:
                self.waiting.remove(seq)
            self.block_manager.free(seq)
            seq.status = _FINISHED_STATUS[reason]
            seq.finish_reason = reason
        if choice_index is not None:  # a choice that has not forked off yet never will
            for seq in choices.values():
                seq.fork_choices = tuple(c for c in seq.fork_choices if c != choice_index)
        if not choices:
            self._live.pop(request_id, None)
        return [seq for seq in ended if seq.finish_reason is not None]

    def _pass_on(self, seq: Sequence, choices: dict[int, Sequence]) -> None:
        """A choice ends before its sequence sampled a token: the first choice due to fork off it
        becomes that sequence (the prompt computed so far is its prompt too)."""
        if seq.status == SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.choice_index, seq.fork_choices = seq.fork_choices[0], seq.fork_choices[1:]
        if seq.status == SequenceStatus.WAITING:
            bisect.insort(self.waiting, seq, key=_schedule_key)  # its key names its choice
        choices[seq.choice_index] = seq

    def schedule(self) -> SchedulerOutput:
        """Pick this step's tokens.

        There is no prefill or decode phase: each sequence has `num_computed_tokens` catching up
        with `num_tokens`, and a step gives it up to that many tokens within the token budget.
        Running sequences go first, highest priority and oldest first; a prompt chunk never takes
        the one token each later running sequence needs to decode, so decodes never stall behind
        a long prefill. When the pool runs out of blocks, the lowest-priority, newest running
        sequence is preempted: its blocks are freed and it goes back to waiting, to be recomputed
        later (cheaply, from whatever the prefix cache still holds). Waiting sequences the
        batching strategy lets in are admitted by priority and arrival while budget, blocks and
        `max_num_seqs` allow, and not at all in a step that had to preempt; with speculative
        decoding, decodes then get drafts from what budget and free blocks are left.
        A sequence whose choices fork off at its first sample takes a running place for each.
        """
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preempted: list[str] = []
        self.running.sort(key=_schedule_key)
        index = 0
        while index < len(self.running):
            seq = self.running[index]
            num_later = len(self.running) - index - 1
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget - num_later)
            if num_new <= 0:
                index += 1  # no budget left for its prefill chunk; later ones still decode
                continue
            if not self._make_room(seq, num_new, preempted):
                break  # seq itself was preempted; it was the last running one
            scheduled.append(self._schedule_seq(seq, num_new))
            budget -= num_new
            index += 1
        if not preempted:
            budget = self._admit_waiting(scheduled, budget)
            if self.config.num_speculative_tokens:
                budget = self._add_drafts(scheduled, budget)
        return SchedulerOutput(
            scheduled=scheduled,
            num_batched_tokens=self.config.max_num_batched_tokens - budget,
            block_copies=self.block_manager.take_copies(),
        )

    def update(
        self,
        output: SchedulerOutput,
        sampled: list[tuple[SampledToken, ...]],
        prompt_logprobs: dict[int, list[SampledToken]] | None = None,
    ) -> list[TokenChunk]:
        """Record what the step computed and sampled (by item, a token for each of its
        `sample_choices`, or with drafts, for each of its rows; and the prompt logprobs of chunks
        that asked, by item); keep the drafts the model agreed with, fork the choices off their
        parent and finish sequences that reached a stop."""
        chunks: list[TokenChunk] = []
        for index, (item, samples) in enumerate(zip(output.scheduled, sampled, strict=True)):
            seq = self._live.get(item.request_id, {}).get(item.choice_index)
            if seq is None:
                continue  # finished while the step ran
            if prompt_logprobs and index in prompt_logprobs:
                if item.start_pos == 0:  # computed afresh after a preemption: the same values again
                    seq.prompt_logprobs.clear()
                seq.prompt_logprobs.extend(prompt_logprobs[index])
            if item.num_draft_tokens:
                chunks.append(self._update_drafted(seq, item, samples))
                continue
            self._computed(seq, item.num_new_tokens)
            if not item.needs_sample:
                continue
            by_choice = dict(zip(item.sample_choices, samples, strict=True))
            family = [seq, *(self._fork(seq, c) for c in seq.fork_choices if c in by_choice)]
            seq.fork_choices = ()
            for member in family:
                chunks.append(self._append(member, (by_choice[member.choice_index],)))
        return chunks

    def _computed(self, seq: Sequence, num_tokens: int) -> None:
        """`num_tokens` more of the sequence's tokens have their K/V in the cache: register the
        blocks they fill and give back those behind the sliding window."""
        seq.num_computed_tokens += num_tokens
        self.block_manager.cache_full_blocks(seq)
        if self.config.sliding_window is not None:
            self.block_manager.release_outside_window(seq, self.config.sliding_window)

    def _update_drafted(
        self, seq: Sequence, item: ScheduledSeq, samples: tuple[SampledToken, ...]
    ) -> TokenChunk:
        """The fed token is computed; the accepted drafts are too, once they are the sequence's
        tokens (unless a stop among them ended it). Rejected drafts were computed at positions the
        sequence has not reached: the next step writes them again."""
        kept = self._verify(item, samples)
        self._computed(seq, item.num_new_tokens - item.num_draft_tokens)
        chunk = self._append(seq, kept)
        if chunk.finish_reason is None:
            self._computed(seq, len(kept) - 1)
        return chunk

    def _verify(self, item: ScheduledSeq, samples: tuple[SampledToken, ...]) -> tuple[SampledToken, ...]:
        """The tokens a speculative step gave: the model's own at every row up to and including the
        first where it disagrees with the draft fed there (all of them when it never does), which is
        what decoding one token at a time would have given."""
        drafts = item.draft_token_ids
        accepted = next(
            (
                i
                for i, (sample, draft) in enumerate(zip(samples, drafts, strict=False))
                if sample.token_id != draft
            ),
            len(drafts),
        )
        self.num_draft_tokens += len(drafts)
        self.num_accepted_tokens += accepted
        return samples[: accepted + 1]

    def _add_drafts(self, scheduled: list[ScheduledSeq], budget: int) -> int:
        """Give decodes prompt-lookup drafts from what is left once every running sequence has its
        token and waiting ones were admitted, in free blocks only: drafts never preempt or delay
        anyone. Returns the budget left."""
        for position, item in enumerate(scheduled):
            if budget <= 0:
                break
            seq = self._live[item.request_id][item.choice_index]
            drafts = self._drafts(seq, budget) if item.num_new_tokens == 1 and item.needs_sample else []
            if drafts and self.block_manager.allocate_slots(seq, 1 + len(drafts)):
                scheduled[position] = dataclasses.replace(
                    item, token_ids=item.token_ids + drafts, num_draft_tokens=len(drafts)
                )
                budget -= len(drafts)
        return budget

    def _drafts(self, seq: Sequence, budget: int) -> list[int]:
        """Prompt-lookup drafts for a sequence about to decode, when it may have them: greedy, its
        rows independent of one another (no penalties, grammar or stop tokens held back by
        min_tokens), room left under max_tokens and the context limit."""
        sampling = seq.sampling
        limit = min(
            self.config.num_speculative_tokens,
            budget,
            sampling.max_tokens - len(seq.output_token_ids) - 1,
            self.config.max_model_len - seq.num_tokens - 1,
        )
        if (
            limit <= 0
            or not sampling.is_greedy
            or sampling.has_penalties
            or sampling.grammar
            or not seq.output_token_ids  # choices may fork off, prompt logprobs may be due
            or len(seq.output_token_ids) < sampling.min_tokens
            or seq.num_computed_tokens != seq.num_tokens - 1
        ):
            return []
        if seq.draft_index is None:
            seq.draft_index = NgramIndex(self.config.prompt_lookup_min, self.config.prompt_lookup_max)
        return seq.draft_index.propose(seq, limit)

    def check_invariants(self) -> None:
        """Assert queue and pool consistency; tests call it after every step."""
        assert self._num_seats() <= self.config.max_num_seqs
        assert all(not seq.block_table for seq in self.waiting), "a waiting sequence holds blocks"
        live = [seq for choices in self._live.values() for seq in choices.values()]
        assert len(self.running) + len(self.waiting) == len(live)
        assert all(choices for choices in self._live.values()), "a request with no sequence is live"
        self.block_manager.check_invariants(live)

    def _fork(self, parent: Sequence, choice_index: int) -> Sequence:
        """A running choice sharing the parent's prompt and its KV blocks, at the parent's first sample."""
        child = Sequence(
            request_id=parent.request_id,
            prompt_token_ids=parent.prompt_token_ids,
            sampling=parent.sampling,
            choice_index=choice_index,
            priority=parent.priority,
            arrival_time=parent.arrival_time,
            status=SequenceStatus.RUNNING,
            arrival_order=parent.arrival_order,
        )
        self.block_manager.fork(parent, child)
        self.running.append(child)
        self._live[parent.request_id][choice_index] = child
        return child

    def _append(self, seq: Sequence, samples: tuple[SampledToken, ...]) -> TokenChunk:
        """Add sampled tokens to the sequence, up to the first stop, where it finishes; its chunk."""
        first = len(seq.output_token_ids)
        reason = None
        for count, sample in enumerate(samples, 1):
            seq.output_token_ids.append(sample.token_id)
            reason = self._stop_reason(seq, sample.token_id)
            if reason is not None:
                samples = samples[:count]
                self.finish(seq.request_id, reason, seq.choice_index)
                break
        return TokenChunk(
            request_id=seq.request_id,
            index=first,
            tokens=samples,
            finish_reason=reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            prompt_logprobs=tuple(seq.prompt_logprobs) if first == 0 else (),
            choice_index=seq.choice_index,
        )

    def _num_seats(self) -> int:
        """Running places taken, counting the choices still to fork off."""
        return sum(seq.num_seats for seq in self.running)

    def _make_room(self, seq: Sequence, num_new: int, preempted: list[str]) -> bool:
        """Preempt from the tail of `running` until `seq` gets its blocks; False if it went itself."""
        while not self.block_manager.allocate_slots(seq, num_new):
            victim = self.running.pop()
            self._preempt(victim)
            preempted.append(victim.request_id)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        bisect.insort(self.waiting, seq, key=_schedule_key)

    def _admit_waiting(self, scheduled: list[ScheduledSeq], budget: int) -> int:
        seats = self._num_seats()
        for seq in self._batching.admissible(list(self.waiting), self.running, self._live.__contains__):
            if budget <= 0 or seats + seq.num_seats > self.config.max_num_seqs:
                break
            self.block_manager.match_prefix(seq)
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self.block_manager.allocate_slots(seq, num_new):
                self.block_manager.free(seq)  # waiting sequences hold no blocks
                seq.num_computed_tokens = 0
                break
            self.waiting.remove(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(self._schedule_seq(seq, num_new))
            budget -= num_new
            seats += seq.num_seats
        return budget

    def _schedule_seq(self, seq: Sequence, num_new: int) -> ScheduledSeq:
        start = seq.num_computed_tokens
        # The whole history when penalties count it, a grammar replays it or prompt logprobs score it.
        in_prompt = seq.wants_prompt_logprobs and start < seq.num_prompt_tokens
        penalized = seq.sampling.has_penalties or bool(seq.sampling.grammar) or in_prompt
        return ScheduledSeq(
            request_id=seq.request_id,
            token_ids=seq.token_slice(start, start + num_new),
            start_pos=start,
            block_ids=seq.block_table,
            needs_sample=start + num_new == seq.num_tokens,
            sampling=seq.sampling,
            num_output_tokens=len(seq.output_token_ids),
            history=seq.prompt_token_ids + seq.output_token_ids if penalized else None,
            num_prompt_tokens=seq.num_prompt_tokens,
            banned_token_ids=self._banned_token_ids(seq),
            choice_index=seq.choice_index,
            fork_choices=seq.fork_choices,
        )

    def _banned_token_ids(self, seq: Sequence) -> tuple[int, ...]:
        """Below min_tokens, stop tokens (and EOS unless ignored) may not be sampled at all."""
        sampling = seq.sampling
        if len(seq.output_token_ids) >= sampling.min_tokens:
            return ()
        eos = () if sampling.ignore_eos else self.config.eos_token_ids
        return sampling.stop_token_ids + eos

    def _stop_reason(self, seq: Sequence, token_id: int) -> FinishReason | None:
        sampling = seq.sampling
        num_output = len(seq.output_token_ids)
        if num_output >= sampling.min_tokens and (
            token_id in sampling.stop_token_ids
            or (not sampling.ignore_eos and token_id in self.config.eos_token_ids)
        ):
            return FinishReason.STOP
        if num_output >= sampling.max_tokens or seq.num_tokens >= self.config.max_model_len:
            return FinishReason.LENGTH
        return None


def _schedule_key(seq: Sequence) -> tuple[int, float, int, int]:
    return seq.schedule_key


def _choices_of(seq: Sequence) -> tuple[int, ...]:
    """The choices a sequence stands for: its own and those to fork off it."""
    return (seq.choice_index, *seq.fork_choices)
