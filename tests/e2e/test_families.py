"""A checkpoint of every family served as users run it: greedy tokens through the gateway, Redis and
a worker of each are those of transformers `generate`, ListModels names the architecture and dtype,
and the checkpoint's generation_config.json sampling defaults apply to requests that leave them
unset. One gateway fronts every family (each with its own worker, as a fleet of several models
runs), so the processes start once and together; `conveyor serve` itself runs one family in
bfloat16 and refuses a checkpoint it cannot serve."""

import json
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from client.library import ConveyorClient
from client.redis_server import RedisServer, free_port
from tests.e2e.cluster import start_gateway, start_process, stop_process, wait_until_serving
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


@dataclass(frozen=True, slots=True)
class Fleet:
    address: str
    checkpoints: dict[str, Path]  # model id (the folder's name) -> checkpoint


@pytest.fixture(scope="module")
def fleet(
    redis_server: RedisServer, model_dir: Path, log_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("families")
    namespace = "families"
    common = ["--redis-url", redis_server.url, "--namespace", namespace, "--metrics-port", "-1"]
    checkpoints: dict[str, Path] = {}
    workers = []
    try:
        for family in SERVED_FAMILIES:  # each worker starts while the next checkpoint is built
            path = checkpoints[family] = build(family, root / family, model_dir)
            generation_config = json.loads((path / "generation_config.json").read_text())
            # Sampling at 1.0 under the checkpoint's top_k of 1 is greedy.
            (path / "generation_config.json").write_text(json.dumps({**generation_config, "top_k": 1}))
            workers.append(
                start_process(
                    "worker",
                    ["--model", str(path), *common, "--kv-cache-bytes", str(32 << 20), "--num-threads", "1"],
                    log_dir / f"worker-{namespace}-{family}.log",
                )
            )
        paths = list(checkpoints.values())
        extra = [argument for path in paths[1:] for argument in ("--extra-models", str(path))]
        gateway, address = start_gateway(redis_server.url, namespace, paths[0], log_dir, *extra)
        try:
            wait_until_serving(address, [*workers, gateway], timeout_s=300)  # a live worker for each
            yield Fleet(address, checkpoints)
        finally:
            assert stop_process(gateway) == 0
    finally:
        # All told once, at once, so they drain together (a second SIGTERM could land while one
        # is exiting, when Python has put the default handler back, and kill it).
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        codes = []
        for worker in workers:
            try:
                codes.append(worker.wait(timeout=60))
            except subprocess.TimeoutExpired:
                codes.append(stop_process(worker))
        assert codes == [0] * len(workers), codes


@pytest.mark.parametrize("family", SERVED_FAMILIES)
def test_every_family_answers_with_the_tokens_of_transformers(
    family: str, fleet: Fleet, workload: list[dict[str, object]]
) -> None:
    path = fleet.checkpoints[family]
    prompts = [list(row["prompt_token_ids"]) for row in workload[:2]]  # type: ignore[call-overload]
    assert all(len(prompt) > WINDOW for prompt in prompts)
    with ConveyorClient(fleet.address) as client:
        (info,) = [model for model in client.list_models() if model.id == family]
        # No temperature: the checkpoint's generation_config.json makes it greedy.
        outputs = [
            client.generate(token_ids=prompt, model=family, max_tokens=NUM_TOKENS, ignore_eos=True).token_ids
            for prompt in prompts
        ]
    config = json.loads((path / "config.json").read_text())
    text_config = config.get("text_config") or config  # a multimodal checkpoint serves its text model
    assert (info.architecture, info.dtype) == (text_config["model_type"], "float32")
    assert outputs == hf_greedy(path, prompts)


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
        assert "attention=cpu(prefill=sdpa,decode=sdpa)" in log.read_text()  # the C kernels: float32 only
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
