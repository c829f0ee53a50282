"""The standard workload through llama.cpp, for `conveyor bench --llamacpp`.

Runs under the interpreter of a virtualenv with llama-cpp-python (built from source for this CPU by
`make bench LLAMACPP=1`; never a test dependency), imports nothing from Conveyor, and prints one
JSON object on stdout. Two measurements on the model's GGUF file:
- one stream: requests one after the other, each decoded alone (llama.cpp's figure of merit),
  with the arrival time of every token;
- all at once: every request in one llama.cpp context, a sequence each, as llama.cpp's own
  `batched` example and `llama-server` do: prompts fed in batches of `n_batch` tokens, then one
  batched decode per step over every unfinished sequence; greedy, EOS ignored.
"""

import argparse
import ctypes
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import llama_cpp
import numpy as np


class _Context:
    """One llama.cpp model and context, and a batch to feed it."""

    def __init__(self, model_path: Path, n_ctx: int, n_seq: int, n_batch: int, n_threads: int):
        llama_cpp.llama_backend_init()
        model_params = llama_cpp.llama_model_default_params()
        self.model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), model_params)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = n_batch
        params.n_seq_max = n_seq
        params.n_threads = n_threads
        params.n_threads_batch = n_threads
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.n_batch = n_batch
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, n_seq)

    def decode(self, entries: list[tuple[int, int, int, bool]]) -> list[int]:
        """Feed (token, position, sequence, wants logits) entries, n_batch at a time; the greedy
        next token of every entry that wanted logits, in order."""
        picked = []
        for start in range(0, len(entries), self.n_batch):
            chunk = entries[start : start + self.n_batch]
            batch = self.batch
            batch.n_tokens = len(chunk)
            for i, (token, pos, seq, logits) in enumerate(chunk):
                batch.token[i] = token
                batch.pos[i] = pos
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = logits
            if llama_cpp.llama_decode(self.ctx, batch) != 0:
                raise RuntimeError("llama_decode failed (context full?)")
            for i, (_, _, _, logits) in enumerate(chunk):
                if logits:
                    row = llama_cpp.llama_get_logits_ith(self.ctx, i)
                    values = np.ctypeslib.as_array(
                        ctypes.cast(row, ctypes.POINTER(ctypes.c_float)), (self.n_vocab,)
                    )
                    picked.append(int(values.argmax()))
        return picked

    def clear(self) -> None:
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)


def _generate(context: _Context, rows: list[dict[str, Any]], started: float) -> list[dict[str, Any]]:
    """Every row at once, a sequence each; the tokens and their arrival times."""
    results = [{"id": row["id"], "token_ids": [], "token_times_s": []} for row in rows]
    entries = [
        (token, pos, seq, pos == len(row["prompt_token_ids"]) - 1)
        for seq, row in enumerate(rows)
        for pos, token in enumerate(row["prompt_token_ids"])
    ]
    active = list(range(len(rows)))
    while active:
        picked = context.decode(entries)
        now = time.perf_counter() - started
        for seq, token in zip(active, picked, strict=True):
            results[seq]["token_ids"].append(token)
            results[seq]["token_times_s"].append(now)
        active = [seq for seq in active if len(results[seq]["token_ids"]) < rows[seq]["max_tokens"]]
        entries = [
            (
                results[seq]["token_ids"][-1],
                len(rows[seq]["prompt_token_ids"]) + len(results[seq]["token_ids"]) - 1,
                seq,
                True,
            )
            for seq in active
        ]
    return results


def main() -> NoReturn:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, required=True, help="the GGUF file")
    parser.add_argument("--workload", type=Path, required=True)
    parser.add_argument("--num-requests", type=int, default=0)
    parser.add_argument("--one-stream-requests", type=int, default=3)
    parser.add_argument("--n-batch", type=int, default=512, help="tokens per llama_decode call")
    args = parser.parse_args()
    rows = [json.loads(line) for line in args.workload.read_text().splitlines() if line.strip()]
    rows = rows[: args.num_requests or None]
    threads = len(os.sched_getaffinity(0))
    longest = max(len(row["prompt_token_ids"]) + row["max_tokens"] for row in rows)
    context = _Context(args.model, len(rows) * longest, len(rows), args.n_batch, threads)
    _generate(context, [{**rows[0], "max_tokens": 2}], time.perf_counter())  # warm-up
    context.clear()
    alone = []
    for row in rows[1 : 1 + args.one_stream_requests] or rows[: args.one_stream_requests]:
        alone += _generate(context, [row], time.perf_counter())
        context.clear()
    started = time.perf_counter()
    together = _generate(context, rows, started)
    seconds = time.perf_counter() - started
    report = {"version": llama_cpp.__version__, "one_stream": alone, "seconds": seconds, "requests": together}
    sys.stdout.write("\n" + json.dumps(report) + "\n")
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
