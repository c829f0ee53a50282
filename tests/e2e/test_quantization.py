"""`conveyor serve --quantization`: each mode loads, reports itself in ListModels and answers
through gateway + Redis + worker with the tokens the in-process engine gives in the same mode. The
weight-only modes' workers run a decode step's layers in one C call (worker/decode_layers.py), and
answer with the tokens of the engine whose layers run from Python."""

import signal
from pathlib import Path

import pytest

from client.library import ConveyorClient
from client.redis_server import free_port
from scheduler import SamplingParams
from tests.e2e.test_supervisor import start_serve, wait_for_line
from worker.llm import LLM

PROMPTS = ["Write a haiku about the sea.", "List three uses of copper."]
NUM_TOKENS = 12


@pytest.mark.parametrize("quantization", ["int8", "int4", "w8a8"])
def test_conveyor_serve_answers_in_each_quantized_mode_as_the_engine_does(
    model_dir: Path, tmp_path: Path, quantization: str
) -> None:
    port = free_port()
    log = tmp_path / "serve.log"
    serve = start_serve(log, "--model", str(model_dir), "--port", str(port), "--quantization", quantization)
    try:
        wait_for_line(log, "serving on")
        with ConveyorClient(f"127.0.0.1:{port}") as client:
            (info,) = client.list_models()
            served = [
                client.generate(prompt, max_tokens=NUM_TOKENS, temperature=0.0, ignore_eos=True).token_ids
                for prompt in PROMPTS
            ]
        serve.send_signal(signal.SIGINT)
        assert serve.wait(timeout=60) == 0
    finally:
        if serve.poll() is None:
            serve.kill()
    assert (info.dtype, info.quantization) == ("float32", quantization)
    weight_only = quantization in ("int8", "int4")
    assert f"decode_layers={'c' if weight_only else 'python'}" in log.read_text()
    assert "attention=cpu(prefill=c,decode=c)" in log.read_text()  # float32 attention: both C kernels
    llm = LLM(model=model_dir, kv_cache_bytes=64 << 20, quantization=quantization)
    assert (llm.core.runner.model.decode_layers is not None) == weight_only
    llm.core.runner.model.decode_layers = None  # the reference: every layer from Python
    prompts = [llm.tokenizer.encode(prompt) for prompt in PROMPTS]
    greedy = SamplingParams(max_tokens=NUM_TOKENS, temperature=0.0, ignore_eos=True)
    assert served == [c.token_ids for c in llm.generate(prompts, greedy)]
