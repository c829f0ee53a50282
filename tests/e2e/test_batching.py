"""`conveyor serve --worker-args --batching sequential`: a worker told to serve one request at a
time does so under concurrent streams, and each gets the tokens of the batched engine."""

import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from client.library import ConveyorClient
from client.redis_server import free_port
from scheduler import SamplingParams
from tests.e2e.test_metrics import scrape, value
from tests.e2e.test_supervisor import start_serve, wait_for_line
from worker.llm import LLM

PROMPTS = ["Name three rivers.", "Count from one to five.", "What is a prime number?"]
NUM_TOKENS = 10


def test_a_sequential_worker_runs_one_request_a_step_under_concurrent_streams(
    model_dir: Path, tmp_path: Path
) -> None:
    port, metrics_port = free_port(), free_port()
    log = tmp_path / "serve.log"
    worker_args = ["--batching", "sequential", "--metrics-port", str(metrics_port)]
    serve = start_serve(log, "--model", str(model_dir), "--port", str(port), "--worker-args", *worker_args)
    try:
        wait_for_line(log, "serving on")
        metrics = f"http://127.0.0.1:{metrics_port}/metrics"
        before = scrape(metrics)
        with ConveyorClient(f"127.0.0.1:{port}") as client, ThreadPoolExecutor(len(PROMPTS)) as pool:
            served = list(
                pool.map(
                    lambda prompt: (
                        client.generate(
                            prompt, max_tokens=NUM_TOKENS, temperature=0.0, ignore_eos=True
                        ).token_ids
                    ),
                    PROMPTS,
                )
            )
        after = scrape(metrics)
        serve.send_signal(signal.SIGINT)
        assert serve.wait(timeout=60) == 0
    finally:
        if serve.poll() is None:
            serve.kill()

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    steps = grew("conveyor:iteration_batch_size_count")
    assert steps >= len(PROMPTS) * NUM_TOKENS  # a step per token of each request: none shared a step
    assert grew("conveyor:iteration_batch_size_bucket", le="1.0") == steps
    llm = LLM(model=model_dir, kv_cache_bytes=64 << 20)
    greedy = SamplingParams(max_tokens=NUM_TOKENS, temperature=0.0, ignore_eos=True)
    prompts = [llm.tokenizer.encode(prompt) for prompt in PROMPTS]
    assert served == [c.token_ids for c in llm.generate(prompts, greedy)]
