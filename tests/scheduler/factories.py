"""Small explicit schedulers and sequences, so edge cases are reachable by hand."""

import itertools

from scheduler import Batching, SampledToken, SamplingParams, Scheduler, SchedulerConfig, Sequence

EOS = 2
_ids = itertools.count()


def make_scheduler(
    num_blocks: int = 8,
    block_size: int = 4,
    max_num_seqs: int = 4,
    max_num_batched_tokens: int = 16,
    max_model_len: int = 32,
    enable_prefix_caching: bool = True,
    sliding_window: int | None = None,
    batching: Batching = "continuous",
    num_speculative_tokens: int = 0,
    prompt_lookup_min: int = 2,
) -> Scheduler:
    return Scheduler(
        SchedulerConfig(
            num_blocks=num_blocks,
            block_size=block_size,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=max_model_len,
            enable_prefix_caching=enable_prefix_caching,
            eos_token_ids=(EOS,),
            sliding_window=sliding_window,
            batching=batching,
            num_speculative_tokens=num_speculative_tokens,
            prompt_lookup_min=prompt_lookup_min,
        )
    )


def make_sequence(
    num_prompt_tokens: int = 6,
    prompt: list[int] | None = None,
    max_tokens: int = 8,
    priority: int = 0,
    arrival_time: float | None = None,
    **sampling: object,
) -> Sequence:
    number = next(_ids)
    prompt_ids = prompt if prompt is not None else [100 + number * 50 + i for i in range(num_prompt_tokens)]
    return Sequence(
        request_id=f"req-{number}",
        prompt_token_ids=list(prompt_ids),
        sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0, **sampling),  # type: ignore[arg-type]
        priority=priority,
        arrival_time=float(number) if arrival_time is None else arrival_time,
    )


def run_step(scheduler: Scheduler, token_id: int = 7) -> tuple[object, list[object]]:
    """Schedule, 'sample' `token_id` for every sequence that needs it, update, check invariants."""
    output = scheduler.schedule()
    sampled = [tuple(SampledToken(token_id) for _ in item.sample_choices) for item in output.scheduled]
    chunks = scheduler.update(output, sampled)
    scheduler.check_invariants()
    return output, chunks
