"""`conveyor bench`: the standard workload through our engine and through transformers, side by side.

Rows, all measured in one run on one machine:
- conveyor: our engine in-process, every request submitted at once;
- model forward only: the same run's output tokens over the time spent inside the model's forward
  alone (what the engine would reach with zero overhead around the model);
- transformers sequential: Hugging Face `generate`, one request at a time, greedy, on the same prompts
  (about 12 minutes on two cores; `--baseline-requests N` runs it on the first N only). Its latencies
  are those of a queue served one request at a time.
"""

import argparse
import json
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from scheduler import SamplingParams


@dataclass(frozen=True, slots=True)
class Row:
    name: str
    num_requests: int
    output_tokens: int
    seconds: float
    ttft_s: list[float]  # per request, from the moment all were submitted
    itl_s: list[float]  # mean inter-token latency per request

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds if self.seconds else 0.0

    def figures(self) -> dict[str, float | int | str]:
        return {
            "name": self.name,
            "requests": self.num_requests,
            "output_tokens": self.output_tokens,
            "seconds": round(self.seconds, 3),
            "output_tokens_per_s": round(self.tokens_per_s, 2),
            "ttft_p50_s": round(_percentile(self.ttft_s, 50), 3),
            "ttft_p99_s": round(_percentile(self.ttft_s, 99), 3),
            "mean_itl_ms": round(1000 * statistics.fmean(self.itl_s), 1) if self.itl_s else 0.0,
        }


def _percentile(values: list[float], pct: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
    return ordered[rank]


def _itl(token_times: list[float]) -> float:
    return (token_times[-1] - token_times[0]) / (len(token_times) - 1) if len(token_times) > 1 else 0.0


def _first_difference(left: list[int], right: list[int]) -> int:
    shared = min(len(left), len(right))
    return next((i for i in range(shared) if left[i] != right[i]), shared)


def load_workload(path: Path, limit: int | None) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows[:limit] if limit else rows


def run_conveyor(
    model: Path, workload: list[dict[str, Any]], engine_args: dict[str, Any]
) -> tuple[Row, Row, dict[str, Any]]:
    from worker.llm import LLM

    llm = LLM(model=model, **engine_args)
    prompts = [row["prompt_token_ids"] for row in workload]
    params = [
        SamplingParams(max_tokens=row["max_tokens"], temperature=0.0, ignore_eos=True) for row in workload
    ]
    llm.generate([prompts[0]], SamplingParams(max_tokens=2, temperature=0.0))  # warm-up
    stats_before = (llm.engine.stats.step_s, llm.engine.stats.num_steps, llm.engine.runner.model_s)
    started = time.perf_counter()
    completions = llm.generate(prompts, params)
    seconds = time.perf_counter() - started
    stats = llm.engine.stats
    step_s = stats.step_s - stats_before[0]
    model_s = llm.engine.runner.model_s - stats_before[2]
    output_tokens = sum(len(c.token_ids) for c in completions)
    ttft = [c.token_times_s[0] - started for c in completions]
    itl = [_itl(c.token_times_s) for c in completions]
    ours = Row("conveyor (in-process)", len(workload), output_tokens, seconds, ttft, itl)
    ceiling = Row("model forward only", len(workload), output_tokens, model_s, [], [])
    scheduler = llm.engine.scheduler
    batch_sizes = stats.batch_sizes
    details = {
        "kv_blocks": scheduler.block_manager.num_blocks,
        "block_size": scheduler.config.block_size,
        "steps": stats.num_steps - stats_before[1],
        "engine_overhead_pct": round(100 * (1 - model_s / seconds), 1),
        "step_overhead_pct": round(100 * (1 - model_s / step_s), 1),
        "preemptions": scheduler.num_preemptions,
        "mean_batch_size": round(
            sum(k * v for k, v in batch_sizes.items()) / max(sum(batch_sizes.values()), 1), 1
        ),
        "outputs": {row["id"]: c.token_ids for row, c in zip(workload, completions, strict=True)},
    }
    return ours, ceiling, details


class _FirstTokenTimer:
    """A transformers streamer that notes when the first generated token arrives."""

    def __init__(self) -> None:
        self.num_puts = 0
        self.first_token_at = 0.0

    def put(self, value: Any) -> None:
        self.num_puts += 1
        if self.num_puts == 2:  # the first put is the prompt
            self.first_token_at = time.perf_counter()

    def end(self) -> None:
        pass


def run_transformers_sequential(
    model: Path, workload: list[dict[str, Any]]
) -> tuple[Row, dict[str, list[int]]]:
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    # ignore_eos as vLLM and we mean it: EOS may be generated, it just does not stop generation
    # (min_new_tokens would mask it instead). The mask is explicit: with no EOS set, transformers
    # would infer one from pad_token_id and hide the prompt's <|im_end|> tokens.
    hf_model.generation_config.eos_token_id = None
    warm_up = torch.tensor([workload[0]["prompt_token_ids"]])
    hf_model.generate(warm_up, attention_mask=torch.ones_like(warm_up), max_new_tokens=2, do_sample=False)
    ttft, itl, outputs = [], [], {}
    output_tokens = 0
    started = time.perf_counter()
    for row in workload:
        prompt = torch.tensor([row["prompt_token_ids"]])
        timer = _FirstTokenTimer()
        with torch.inference_mode():
            generated = hf_model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=row["max_tokens"],
                do_sample=False,
                streamer=timer,
            )
        finished = time.perf_counter()
        new_tokens = generated[0, prompt.shape[1] :].tolist()
        outputs[row["id"]] = new_tokens
        output_tokens += len(new_tokens)
        ttft.append(timer.first_token_at - started)
        itl.append((finished - timer.first_token_at) / max(len(new_tokens) - 1, 1))
    seconds = time.perf_counter() - started
    return Row("transformers sequential", len(workload), output_tokens, seconds, ttft, itl), outputs


_COLUMNS = ("reqs", "out tok", "tok/s", "vs seq", "TTFT p50", "TTFT p99", "ITL ms")


def format_table(rows: list[Row], baseline: Row | None) -> str:
    header = f"{'':26}" + "".join(f"{name:>10}" for name in _COLUMNS)
    lines = [header, "-" * len(header)]
    for row in rows:
        cells = [f"{row.num_requests}", f"{row.output_tokens}", f"{row.tokens_per_s:.1f}"]
        cells.append(
            f"{row.tokens_per_s / baseline.tokens_per_s:.1f}x" if baseline and baseline.tokens_per_s else "-"
        )
        if row.ttft_s:
            p50, p99 = _percentile(row.ttft_s, 50), _percentile(row.ttft_s, 99)
            cells += [f"{p50:.2f}s", f"{p99:.2f}s", f"{1000 * statistics.fmean(row.itl_s):.1f}"]
        else:
            cells += ["-", "-", "-"]
        lines.append(f"{row.name:26}" + "".join(f"{cell:>10}" for cell in cells))
    return "\n".join(lines)


def run_bench(args: argparse.Namespace) -> int:
    workload = load_workload(args.workload, args.num_requests)
    engine_args: dict[str, Any] = {}
    if args.max_num_batched_tokens:
        engine_args["max_num_batched_tokens"] = args.max_num_batched_tokens
    ours, ceiling, details = run_conveyor(args.model, workload, engine_args)
    rows = [ours, ceiling]
    baseline = None
    baseline_outputs: dict[str, list[int]] = {}
    if args.baseline_requests != 0:
        baseline, baseline_outputs = run_transformers_sequential(
            args.model, workload[: args.baseline_requests or None]
        )
        rows.append(baseline)
    print(
        f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, device {'cuda' if torch.cuda.is_available() else 'cpu'}"
    )
    print(
        f"workload: {args.workload.name}, {len(workload)} requests, "
        "all submitted at once, greedy, EOS ignored"
    )
    print(format_table(rows, baseline))
    print(
        f"kv blocks: {details['kv_blocks']} x {details['block_size']} tokens; steps: {details['steps']}; "
        f"mean batch: {details['mean_batch_size']} sequences; preemptions: {details['preemptions']}; "
        f"time outside the model forward: {details['engine_overhead_pct']}% of wall time "
        f"({details['step_overhead_pct']}% of step time)"
    )
    if baseline_outputs:
        differing = {
            rid: _first_difference(tokens, details["outputs"][rid])
            for rid, tokens in baseline_outputs.items()
            if tokens != details["outputs"][rid]
        }
        num_same = len(baseline_outputs) - len(differing)
        print(f"greedy outputs identical to transformers: {num_same}/{len(baseline_outputs)}")
        for rid, index in differing.items():
            print(f"  {rid} first differs at completion token {index}")
    if args.json:
        report = {
            "rows": [row.figures() for row in rows],
            **{k: v for k, v in details.items() if k != "outputs"},
            "outputs": details["outputs"],
            "transformers_outputs": baseline_outputs,
        }
        args.json.write_text(json.dumps(report, indent=1))
    return 0
