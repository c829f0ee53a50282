"""`conveyor serve --model DIR` serves a checkpoint of every family, as users run it: greedy tokens
through the gateway, Redis and the worker are those of transformers `generate`, ListModels names
the architecture and dtype, and the checkpoint's generation_config.json sampling defaults apply to
requests that leave them unset."""

import json
import signal
from pathlib import Path

import pytest

from client.library import ConveyorClient
from client.redis_server import free_port
from tests.e2e.test_supervisor import serve_until_it_exits, start_serve, wait_for_line
from tests.tiny_checkpoints import WINDOW, build
from tests.worker.test_families import hf_greedy

SERVED_FAMILIES = [
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "phi3",
    "olmo2",
    "gemma2",
    "gemma3",
    "gemma3-multimodal",
    "mixtral",
    "qwen3_moe",
    "olmoe",
]
NUM_TOKENS = 12


@pytest.mark.parametrize("family", SERVED_FAMILIES)
def test_conveyor_serve_answers_with_the_tokens_of_transformers(
    family: str, model_dir: Path, tmp_path: Path, workload: list[dict[str, object]]
) -> None:
    path = build(family, tmp_path / family, model_dir)
    prompts = [list(row["prompt_token_ids"]) for row in workload[:2]]  # type: ignore[call-overload]
    assert all(len(prompt) > WINDOW for prompt in prompts)
    expected = hf_greedy(path, prompts)
    generation_config = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**generation_config, "top_k": 1}))
    port = free_port()
    log = tmp_path / "serve.log"
    serve = start_serve(
        log, "--model", str(path), "--port", str(port), "--worker-args", "--kv-cache-bytes", str(32 << 20)
    )
    try:
        wait_for_line(log, "serving on")
        with ConveyorClient(f"127.0.0.1:{port}") as client:
            (info,) = client.list_models()
            # No temperature: sampling at 1.0 under the checkpoint's top_k of 1 is greedy.
            outputs = [
                client.generate(token_ids=prompt, max_tokens=NUM_TOKENS, ignore_eos=True).token_ids
                for prompt in prompts
            ]
        config = json.loads((path / "config.json").read_text())
        text_config = config.get("text_config") or config  # a multimodal checkpoint serves its text model
        assert (info.architecture, info.dtype) == (text_config["model_type"], "float32")
        assert outputs == expected
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=60) == 0
    finally:
        if serve.poll() is None:
            serve.kill()


def test_conveyor_serve_runs_a_family_in_bfloat16(model_dir: Path, tmp_path: Path) -> None:
    path = build("qwen3", tmp_path / "qwen3", model_dir)
    port = free_port()
    log = tmp_path / "serve.log"
    serve = start_serve(
        log, "--model", str(path), "--port", str(port), "--worker-args", "--dtype", "bfloat16"
    )
    try:
        wait_for_line(log, "serving on")
        with ConveyorClient(f"127.0.0.1:{port}") as client:
            (info,) = client.list_models()
            completion = client.generate(
                "Hello there", max_tokens=NUM_TOKENS, temperature=0.0, ignore_eos=True
            )
        assert (info.architecture, info.dtype) == ("qwen3", "bfloat16")
        assert len(completion.token_ids) == NUM_TOKENS
    finally:
        if serve.poll() is None:
            serve.kill()


def test_conveyor_serve_stops_at_once_on_a_checkpoint_it_cannot_serve(
    model_dir: Path, tmp_path: Path
) -> None:
    path = build("llama", tmp_path / "custom", model_dir)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": "gpt_oss"}))
    returncode, text = serve_until_it_exits(
        tmp_path / "serve.log", "--model", str(path), "--port", str(free_port())
    )
    assert returncode == 1
    assert (
        f"cannot serve {path}: {path}/config.json: model_type 'gpt_oss' is not supported (supported: llama"
        in text
    )
    assert "worker 1 cannot serve what it was given (exit code 78); giving up" in text
    assert "restarting" not in text and "serving on" not in text
