"""The GPU check's figures: `python3 -m client.gpu_check` on a machine with CUDA (bench/gpu-check.sh
carries what a bare one lacks, runs the CUDA tests, then this).

The default model's weights cannot travel to a lent machine, so the check builds a checkpoint of its
shape (config, tokenizer) with random weights through transformers' own classes. On it, in
bfloat16, with decode graphs and without: the standard workload in-process (output tok/s, TTFT
p50, the mean decode step and the host's share of it), the decode forward's GPU time at 64
sequences beside weight bytes / measured copy bandwidth, and greedy agreement with transformers.
"""

import argparse
import json
import shutil
import statistics
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from client.engine_comparisons import agreement, run_all_at_once
from scheduler import SamplingParams
from worker.attention import SequenceRows
from worker.llm import LLM

ROOT = Path(__file__).resolve().parent.parent
SHAPE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)
AGREEMENT_PROMPTS = 16
AGREEMENT_TOKENS = 32


def random_checkpoint(shape_of: Path, out: Path) -> Path:
    """The shape of `shape_of` (its config and tokenizer files), random weights, seeded."""
    from transformers import AutoConfig, AutoModelForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(shape_of), dtype=torch.float32)
    model.save_pretrained(out)
    for name in SHAPE_FILES:
        if (shape_of / name).exists():
            shutil.copy(shape_of / name, out / name)
    return out


def copy_bandwidth() -> float:
    """Bytes read and written per second by a device-to-device copy of 2 GiB."""
    source = torch.empty(1 << 31, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    return 2 * source.numel() / (_gpu_ms(lambda: target.copy_(source), 20) / 1000)


def _gpu_ms(run: Callable[[], object], iterations: int) -> float:
    """Mean GPU time of `run`, by CUDA events around `iterations` back-to-back calls."""
    for _ in range(3):
        run()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iterations):
        run()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iterations


def decode_forward_ms(llm: LLM, batch: int, context: int) -> float:
    """One decode forward of `batch` sequences of `context` tokens each: the captured graph's replay
    when there is one, else eager (stores nothing: every slot is a padding slot)."""
    runner = llm.core.runner
    per_seq = -(-context // runner.block_size)
    seqs = [
        SequenceRows(list(range(s * per_seq, (s + 1) * per_seq)), context - 1, 1, s) for s in range(batch)
    ]
    ids, positions, prompt_lens, slots = [0] * batch, [context - 1] * batch, [context] * batch, [-1] * batch
    graphs = runner.graphs
    size = graphs.size_for(batch) if graphs is not None else None
    if graphs is not None and size == batch:
        return _gpu_ms(lambda: graphs.run(batch, seqs, ids, positions, prompt_lens, slots), 50)

    def tensor(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, device="cuda")

    return _gpu_ms(
        lambda: runner.model(
            tensor(ids),
            tensor(positions),
            runner.kv_cache,
            runner.attention.plan(seqs, slots),
            tensor(list(range(batch))),
            tensor(prompt_lens),
        ),
        50,
    )


def workload_figures(llm: LLM, workload: list[dict[str, Any]]) -> dict[str, float]:
    prompts = [row["prompt_token_ids"] for row in workload]
    params = [
        SamplingParams(max_tokens=row["max_tokens"], temperature=0.0, ignore_eos=True) for row in workload
    ]
    run_all_at_once(llm, prompts[:8], params[:8])  # the kernels' first compiles
    llm.core.stats = type(llm.core.stats)()
    run = run_all_at_once(llm, prompts, params)
    stats = llm.core.stats
    decode_steps = stats.num_steps - stats.num_prefill_steps
    decode_s = stats.step_s - stats.prefill_step_s
    decode_model_s = stats.model_s - stats.prefill_model_s
    return {
        "output_tok_s": run.tokens_per_s,
        "ttft_p50_ms": 1000 * statistics.median(run.ttft_s),
        "decode_step_ms": 1000 * decode_s / max(decode_steps, 1),
        "host_ms": 1000 * (decode_s - decode_model_s) / max(decode_steps, 1),
        "mean_decode_batch": (stats.num_tokens - stats.num_prefill_tokens) / max(decode_steps, 1),
    }


def transformers_greedy(
    model_dir: Path, dtype: torch.dtype, prompts: list[list[int]], num_tokens: int
) -> list[list[int]]:
    """transformers' greedy tokens for each prompt, one at a time on the GPU, EOS ignored."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to("cuda").eval()
    model.generation_config.eos_token_id = None
    outputs = []
    for prompt in prompts:
        ids = torch.tensor([prompt], device="cuda")
        generated = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=num_tokens, do_sample=False
        )
        outputs.append(generated[0, len(prompt) :].tolist())
    del model
    torch.cuda.empty_cache()
    return outputs


def greedy_agreement(model_dir: Path, llm: LLM, workload: list[dict[str, Any]]) -> float:
    """Share of transformers' greedy tokens, in the engine's dtype, matched before a first difference."""
    prompts = [row["prompt_token_ids"] for row in workload[:AGREEMENT_PROMPTS]]
    greedy = SamplingParams(max_tokens=AGREEMENT_TOKENS, temperature=0.0, ignore_eos=True)
    ours = [c.token_ids for c in llm.generate(prompts, greedy)]
    theirs = transformers_greedy(model_dir, llm.core.runner.kv_cache.dtype, prompts, AGREEMENT_TOKENS)
    share, _ = agreement(dict(enumerate(theirs)), dict(enumerate(ours)))
    return share


def large_checkpoint(shape_of: Path, out: Path) -> Path:
    """Llama-3.1-8B's layers (32 of 4096 wide, grouped heads 32/8, a 14336 feed-forward) over the
    default model's vocabulary and tokenizer, random bf16 weights made on the GPU: a model whose
    weights, not launches, bound a decode step."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    shape = json.loads((shape_of / "config.json").read_text())
    config = LlamaConfig(
        vocab_size=shape["vocab_size"],
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        bos_token_id=shape.get("bos_token_id"),
        eos_token_id=shape.get("eos_token_id"),
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default_dtype)
    model.save_pretrained(out)
    del model
    torch.cuda.empty_cache()
    for name in SHAPE_FILES[1:]:
        if (shape_of / name).exists():
            shutil.copy(shape_of / name, out / name)
    return out


def decode_profile(llm: LLM, batch: int, context: int) -> dict[str, Any]:
    """The kernels of eager decode forwards, by GPU time per forward: what a step spends where, and
    which kernels index (the RoPE rows and the sampled rows; none gathers a context from the cache)."""
    from torch.profiler import ProfilerActivity, profile

    decode_forward_ms(llm, batch, context)  # warm
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        decode_forward_ms(llm, batch, context)
    runs = 3 + 50  # decode_forward_ms's warm-up and timed calls
    kernels = []
    for event in prof.key_averages():
        us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0)
        if us:
            kernels.append((event.key[:90], event.count / runs, us / runs))
    kernels.sort(key=lambda kernel: -kernel[2])
    return {
        "kernels_per_forward": round(sum(count for _, count, _ in kernels), 1),
        "kernel_us_per_forward": round(sum(us for _, _, us in kernels), 1),
        "top": [(name, round(count, 1), round(us, 1)) for name, count, us in kernels[:12]],
        "indexing": [
            (name, round(count, 1), round(us, 1))
            for name, count, us in kernels
            if "index" in name.lower() or "gather" in name.lower()
        ],
    }


def large_figures(args: argparse.Namespace, bandwidth: float, context: int) -> dict[str, Any]:
    """The 8B-shaped model's decode forward at 64 sequences, replayed and eager, beside its bound."""
    if not (args.large / "config.json").exists():
        large_checkpoint(args.shape_of, args.large)
    llm = LLM(model=args.large, device="cuda", dtype="bfloat16")
    weight_bytes = sum(p.numel() * p.element_size() for p in llm.core.runner.model.parameters())
    graphs_ms = decode_forward_ms(llm, 64, context)
    llm.core.runner.graphs = None
    eager_ms = decode_forward_ms(llm, 64, context)
    bound_ms = 1000 * weight_bytes / bandwidth
    profile = decode_profile(llm, 64, context) if args.profile else {}
    if profile:
        print(json.dumps(profile, indent=1))
    print(
        f"8B-shaped decode forward, 64 sequences of {context} tokens: graph replay {graphs_ms:.3f} ms, "
        f"eager {eager_ms:.3f} ms; weights {weight_bytes / 1e9:.2f} GB / {bandwidth / 1e12:.2f} TB/s = "
        f"{bound_ms:.3f} ms; replay / bound {graphs_ms / bound_ms:.2f}x"
    )
    return {
        "weight_bytes": weight_bytes,
        "graphs_ms": graphs_ms,
        "eager_ms": eager_ms,
        "bound_ms": bound_ms,
        "profile": profile,
    }


def _table_row(row: dict[str, Any]) -> str:
    graphs = "on" if row["cuda_graphs"] else "off"
    return (
        f"| {graphs} | {row['output_tok_s']:.0f} | {row['ttft_p50_ms']:.0f} ms "
        f"| {row['decode_step_ms']:.2f} ms ({row['mean_decode_batch']:.0f} seqs) | {row['host_ms']:.2f} ms "
        f"| {row['forward_64_ms']:.3f} ms ({row['context']} tokens each) | {row['bound_ms']:.3f} ms "
        f"| {row['forward_64_ms'] / row['bound_ms']:.1f}x | {row['agreement']:.1%} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m client.gpu_check", description=__doc__)
    parser.add_argument(
        "--shape-of",
        type=Path,
        default=ROOT / "models" / "smollm2-135m-instruct",
        help="checkpoint whose config and tokenizer give the shape",
    )
    parser.add_argument(
        "--model",
        type=Path,
        default=Path("/tmp/gpu-check-model"),
        help="where the random checkpoint is (built when missing)",
    )
    parser.add_argument(
        "--workload",
        type=Path,
        default=ROOT / "bench" / "standard-workload.jsonl",
        help="requests: prompt_token_ids, max_tokens",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--build-only", action="store_true", help="build the random checkpoint and stop")
    parser.add_argument(
        "--no-workload", action="store_true", help="skip the workload table (graphs on and off)"
    )
    parser.add_argument(
        "--profile", action="store_true", help="kernels of eager 64-sequence decode forwards (each model)"
    )
    parser.add_argument(
        "--large", type=Path, default=None, help="also time decode on an 8B-shaped random model built here"
    )
    args = parser.parse_args(argv)
    if not (args.model / "model.safetensors").exists():
        random_checkpoint(args.shape_of, args.model)
    if args.build_only:
        return 0
    workload = [json.loads(line) for line in args.workload.read_text().splitlines() if line.strip()]
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: device-to-device copy {bandwidth / 1e12:.2f} TB/s (read + write)")
    context = round(statistics.mean(len(r["prompt_token_ids"]) + r["max_tokens"] // 2 for r in workload))
    rows = []
    for graphs in () if args.no_workload else (True, False):
        llm = LLM(model=args.model, device="cuda", dtype="bfloat16", cuda_graphs=graphs)
        weight_bytes = sum(p.numel() * p.element_size() for p in llm.core.runner.model.parameters())
        row: dict[str, Any] = {"cuda_graphs": graphs, **workload_figures(llm, workload)}
        row["forward_64_ms"] = decode_forward_ms(llm, 64, context)
        row["bound_ms"] = 1000 * weight_bytes / bandwidth
        row["context"] = context
        row["weight_bytes"] = weight_bytes
        row["agreement"] = greedy_agreement(args.model, llm, workload)
        rows.append(row)
        del llm
        torch.cuda.empty_cache()
    print(
        "| decode graphs | output tok/s | TTFT p50 | decode step (wall) | host share "
        "| decode forward, 64 seqs | weight bytes / bandwidth | forward / bound | bf16 greedy agreement |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(_table_row(row))
    extra: dict[str, Any] = {}
    for name, wanted, figures in (
        ("profile", args.profile, lambda: _profile_default(args.model, context)),
        ("large", args.large is not None, lambda: large_figures(args, bandwidth, context)),
    ):
        if wanted:
            try:
                extra[name] = figures()
            except Exception:  # one part failing on a lent machine still leaves the others' figures
                traceback.print_exc()
    if args.json is not None:
        figures_all = {"device": torch.cuda.get_device_name(), "bandwidth": bandwidth, "rows": rows, **extra}
        args.json.write_text(json.dumps(figures_all, indent=2))
    return 0


def _profile_default(model: Path, context: int) -> dict[str, Any]:
    llm = LLM(model=model, device="cuda", dtype="bfloat16", cuda_graphs=False, gpu_memory_fraction=0.3)
    figures = decode_profile(llm, 64, context)
    del llm
    torch.cuda.empty_cache()
    print(json.dumps(figures, indent=1))
    return figures


if __name__ == "__main__":
    sys.exit(main())
