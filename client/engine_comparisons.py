"""Side-by-side runs on one in-process engine for `conveyor bench`: the same model, KV cache and
threads, with only the scheduler's strategy changed between runs (a fresh scheduler each time, so
no run finds another's prefixes cached).

- batching: sequential, static and continuous batching over one queue of requests whose output
  lengths differ (a real queue's do; the standard workload's are all 128), with fewer seats than
  requests, so a strategy shows what it does when a seat frees;
- speculative: prompt-lookup drafts off and on, over a workload whose answers repeat their prompts
  (edit this code, fix this text), each request alone (one stream) and several at once.
"""

import dataclasses
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from scheduler import BATCHING_STRATEGIES, SamplingParams, Scheduler

BATCHING_SEATS = 8
SPECULATIVE_SEATS = 8


@dataclass(frozen=True, slots=True)
class Run:
    """One workload through the engine: what a Row is built from, plus the output tokens."""

    seconds: float
    ttft_s: list[float]
    itl_s: list[float]
    outputs: list[list[int]]

    @property
    def output_tokens(self) -> int:
        return sum(len(tokens) for tokens in self.outputs)

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds if self.seconds else 0.0


@contextmanager
def scheduler_with(llm: Any, **changes: Any) -> Iterator[Scheduler]:
    """The engine runs a fresh scheduler with these config changes, then its own again."""
    own = llm.core.scheduler
    llm.core.scheduler = Scheduler(dataclasses.replace(own.config, **changes))
    try:
        yield llm.core.scheduler
    finally:
        llm.core.scheduler = own


def run_all_at_once(llm: Any, prompts: list[list[int]], params: list[SamplingParams]) -> Run:
    """Every request submitted at once; latencies from that moment."""
    started = time.perf_counter()
    completions = llm.generate(prompts, params)
    seconds = time.perf_counter() - started
    return Run(
        seconds,
        [c.token_times_s[0] - started for c in completions],
        [itl(c.token_times_s) for c in completions],
        [c.token_ids for c in completions],
    )


def one_stream_itl_ms(llm: Any, prompts: list[list[int]], params: list[SamplingParams]) -> list[float]:
    """Each request alone, one after the other: its mean time a token after the first, in ms (what
    a user of an idle server sees; llama.cpp's figure of merit). The mean, not the median gap: with
    drafts, several tokens arrive at once and most gaps are zero."""
    return [
        1000 * itl(completion.token_times_s)
        for prompt, sampling in zip(prompts, params, strict=True)
        for completion in llm.generate([prompt], sampling)
        if len(completion.token_times_s) > 1
    ]


def itl(token_times: list[float]) -> float:
    return (token_times[-1] - token_times[0]) / (len(token_times) - 1) if len(token_times) > 1 else 0.0


def varied_lengths(workload: list[dict[str, Any]]) -> list[SamplingParams]:
    """Greedy, EOS ignored, output lengths from 1/8 to twice each row's max_tokens (16 to 256 on the
    standard workload) spread over the queue."""
    return [
        SamplingParams(
            max_tokens=max(1, row["max_tokens"] * (1 + (i * 7) % 16) // 8), temperature=0.0, ignore_eos=True
        )
        for i, row in enumerate(workload)
    ]


def batching_runs(llm: Any, workload: list[dict[str, Any]]) -> dict[str, Run]:
    """Each strategy over the same queue, with BATCHING_SEATS seats."""
    prompts = [row["prompt_token_ids"] for row in workload]
    params = varied_lengths(workload)
    runs = {}
    for strategy in BATCHING_STRATEGIES:
        with scheduler_with(llm, batching=strategy, max_num_seqs=BATCHING_SEATS):
            runs[strategy] = run_all_at_once(llm, prompts, params)
    return runs


@dataclass(frozen=True, slots=True)
class SpeculativeRuns:
    """Drafts off or on: one stream's inter-token latencies and a run with several at once."""

    one_stream_itl_ms: list[float]
    together: Run
    num_draft_tokens: int
    num_accepted_tokens: int


def speculative_runs(
    llm: Any, workload: list[dict[str, Any]], num_speculative_tokens: int, num_alone: int
) -> dict[str, SpeculativeRuns]:
    """Plain decoding and `ngram` drafts: the first `num_alone` requests alone, then every request at
    once in SPECULATIVE_SEATS seats. Greedy, stopping at EOS as a real answer does."""
    prompts = [row["prompt_token_ids"] for row in workload]
    params = [SamplingParams(max_tokens=row["max_tokens"], temperature=0.0) for row in workload]
    runs = {}
    for name, drafts in (("plain", 0), ("ngram", num_speculative_tokens)):
        with scheduler_with(llm, num_speculative_tokens=drafts, max_num_seqs=SPECULATIVE_SEATS) as scheduler:
            alone = one_stream_itl_ms(llm, prompts[:num_alone], params[:num_alone])
            together = run_all_at_once(llm, prompts, params)
            runs[name] = SpeculativeRuns(
                alone, together, scheduler.num_draft_tokens, scheduler.num_accepted_tokens
            )
    return runs


def spread(values: list[float], spec: str) -> str:
    """The median, and the range when there is more than one value: "12.3 (11.0..14.1)"."""
    ordered = sorted(values)
    middle = format(statistics.median(ordered), spec)
    if len(ordered) < 2:
        return middle
    return f"{middle} ({format(ordered[0], spec)}..{format(ordered[-1], spec)})"


def format_batching(attempts: list[dict[str, Run]], seats: int) -> str:
    """The strategies' lines: tok/s, TTFT p50 and mean ITL, each over the attempts."""
    lines = [
        f"batching strategies, same engine: {len(attempts[0]['continuous'].outputs)} requests at once "
        f"(outputs of 1/8 to twice max_tokens, EOS ignored) into {seats} seats; median (min-max) over "
        f"{len(attempts)} attempt(s):"
    ]
    for strategy in BATCHING_STRATEGIES:
        runs = [attempt[strategy] for attempt in attempts]
        speedup = [
            run.tokens_per_s / attempt["sequential"].tokens_per_s
            for run, attempt in zip(runs, attempts, strict=True)
        ]
        lines.append(
            f"  {strategy:<11} {spread([r.tokens_per_s for r in runs], '.1f')} tok/s "
            f"({spread(speedup, '.2f')}x sequential), TTFT p50 "
            f"{spread([statistics.median(r.ttft_s) for r in runs], '.2f')} s, mean ITL "
            f"{spread([1000 * statistics.fmean(r.itl_s) for r in runs], '.1f')} ms"
        )
    return "\n".join(lines)


def format_speculative(
    attempts: list[dict[str, SpeculativeRuns]], workload_name: str, num_speculative_tokens: int, seats: int
) -> str:
    """Drafts against plain decoding, as ratios within each attempt, then over the attempts."""
    attempts = [a for a in attempts if all(min(a[mode].one_stream_itl_ms, default=0) > 0 for mode in a)]
    if not attempts:
        return "speculative decoding: no request of the workload took two steps alone"
    last = attempts[-1]
    one_stream = [
        statistics.median(a["plain"].one_stream_itl_ms) / statistics.median(a["ngram"].one_stream_itl_ms)
        for a in attempts
    ]
    together = [a["ngram"].together.tokens_per_s / a["plain"].together.tokens_per_s for a in attempts]
    identical = all(a["plain"].together.outputs == a["ngram"].together.outputs for a in attempts)
    drafts = last["ngram"]
    return (
        f"speculative decoding, ngram, {num_speculative_tokens} drafts, same engine, on {workload_name} "
        f"(greedy, to EOS): one stream, ITL plain "
        f"{spread([statistics.median(a['plain'].one_stream_itl_ms) for a in attempts], '.1f')} ms, ngram "
        f"{spread([statistics.median(a['ngram'].one_stream_itl_ms) for a in attempts], '.1f')} ms: "
        f"{spread(one_stream, '.2f')}x; {len(drafts.together.outputs)} requests in {seats} seats: plain "
        f"{spread([a['plain'].together.tokens_per_s for a in attempts], '.1f')} "
        f"tok/s, ngram "
        f"{spread([a['ngram'].together.tokens_per_s for a in attempts], '.1f')} "
        f"tok/s: {spread(together, '.2f')}x; {drafts.num_accepted_tokens}/{drafts.num_draft_tokens} drafted "
        f"tokens accepted; outputs {'identical' if identical else 'DIFFERENT'} with and without drafts"
    )


def first_difference(left: list[int], right: list[int]) -> int:
    shared = min(len(left), len(right))
    return next((i for i in range(shared) if left[i] != right[i]), shared)


def agreement(theirs: dict[str, list[int]], ours: dict[str, list[int]]) -> tuple[float, dict[str, int]]:
    """The share of their greedy tokens that we match before our first divergence, and where each
    differing output first diverges."""
    firsts = {rid: first_difference(tokens, ours[rid]) for rid, tokens in theirs.items()}
    total = sum(len(tokens) for tokens in theirs.values())
    differing = {rid: index for rid, index in firsts.items() if theirs[rid] != ours[rid]}
    return (sum(firsts.values()) / total if total else 1.0), differing
