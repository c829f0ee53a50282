"""`conveyor serve` with prompt-lookup speculative decoding: several tokens a step travel through
Redis and the gateway in one chunk, and the client gets exactly the tokens of plain decoding."""

import json
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from client.library import ConveyorClient
from client.redis_server import free_port
from scheduler import SamplingParams
from tests.conftest import ROOT
from tests.e2e.test_metrics import scrape, value
from tests.e2e.test_supervisor import start_serve, wait_for_line
from worker.llm import LLM

NUM_TOKENS = 40


def test_conveyor_serve_with_ngram_drafts_streams_the_tokens_of_plain_decoding(
    model_dir: Path, tmp_path: Path
) -> None:
    lines = (ROOT / "bench" / "repeat-workload.jsonl").read_text().splitlines()[:6]
    conversations = [json.loads(line)["messages"] for line in lines]
    port, metrics_port = free_port(), free_port()
    log = tmp_path / "serve.log"
    serve = start_serve(
        log,
        "--model",
        str(model_dir),
        "--port",
        str(port),
        "--worker-args",
        "--speculative",
        "ngram",
        "--num-speculative-tokens",
        "5",
        "--metrics-port",
        str(metrics_port),
    )
    try:
        wait_for_line(log, "serving on")
        with ConveyorClient(f"127.0.0.1:{port}") as client, ThreadPoolExecutor(len(conversations)) as pool:
            served = list(
                pool.map(
                    lambda messages: client.generate(
                        messages=messages, max_tokens=NUM_TOKENS, temperature=0.0, ignore_eos=True
                    ),
                    conversations,
                )
            )
        samples = scrape(f"http://127.0.0.1:{metrics_port}/metrics")
        accepted = value(samples, "conveyor:spec_decode_num_accepted_tokens_total")
        drafted = value(samples, "conveyor:spec_decode_num_draft_tokens_total")
        serve.send_signal(signal.SIGINT)
        assert serve.wait(timeout=60) == 0
    finally:
        if serve.poll() is None:
            serve.kill()
    assert all(
        c.completion_tokens == NUM_TOKENS and c.finish_reason == "FINISH_REASON_LENGTH" for c in served
    )
    assert 0.25 * NUM_TOKENS * len(conversations) < accepted <= drafted
    llm = LLM(model=model_dir, kv_cache_bytes=64 << 20)
    prompts = [llm.tokenizer.encode_chat(messages) for messages in conversations]
    greedy = SamplingParams(max_tokens=NUM_TOKENS, temperature=0.0, ignore_eos=True)
    plain = llm.generate(prompts, greedy)
    assert [c.token_ids for c in served] == [c.token_ids for c in plain]
    assert [c.text for c in served] == [c.text for c in plain]
