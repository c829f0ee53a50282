"""A checkpoint the engine cannot serve is refused at load with one line naming the file, the tensor
or the field; `python -m worker` then exits with EXIT_CANNOT_SERVE before it joins the group."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import redis
import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

from bootstrap.process import EXIT_CANNOT_SERVE
from client.redis_server import RedisServer
from tests.tiny_checkpoints import build
from worker.llm import LLM
from worker.model_config import CheckpointError
from worker.model_loader import load_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def llama(model_dir: Path, tmp_path: Path) -> Path:
    return build("llama", tmp_path / "llama", model_dir)


def edit_config(path: Path, **changes: object) -> None:
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **changes}))


def refusal_of(path: Path) -> str:
    with pytest.raises(CheckpointError) as refused:
        load_model(path, torch.device("cpu"))
    message = str(refused.value)
    assert "\n" not in message
    return message


def test_an_architecture_we_do_not_implement_names_the_field_and_the_supported_list(tmp_path: Path) -> None:
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path)
    message = refusal_of(tmp_path)
    assert f"{tmp_path}/config.json: model_type 'gpt2' is not supported" in message
    assert (
        "llama, mistral, qwen2, qwen3, phi3, olmo2, gemma2, gemma3_text, mixtral, qwen3_moe, olmoe" in message
    )


def test_a_missing_tensor_is_named(llama: Path) -> None:
    weights = load_file(llama / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, llama / "model.safetensors")
    assert "tensor model.layers.1.mlp.up_proj.weight is missing" in refusal_of(llama)


def test_a_mis_shaped_tensor_is_named_with_both_shapes(llama: Path) -> None:
    edit_config(llama, intermediate_size=96)
    message = refusal_of(llama)
    assert (
        "tensor model.layers.0.mlp.gate_proj.weight + model.layers.0.mlp.up_proj.weight has shape" in message
    )
    assert "[256, 64] where config.json implies [192, 64]" in message


def test_a_quantized_checkpoint_names_its_method(llama: Path) -> None:
    edit_config(llama, quantization_config={"quant_method": "gptq", "bits": 4})
    assert (
        "quantization_config.quant_method 'gptq' is a weight format this engine does not read"
        in refusal_of(llama)
    )


def test_remote_code_is_never_run(llama: Path) -> None:
    edit_config(
        llama, model_type="custom", auto_map={"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    )
    assert (
        "model_type 'custom' needs the checkpoint's own Python code (auto_map, trust_remote_code)"
        in refusal_of(llama)
    )


def test_a_built_in_type_loads_whatever_auto_map_says(llama: Path) -> None:
    """Phi-3's official checkpoints carry an auto_map; transformers ignores it for a type it knows."""
    edit_config(llama, auto_map={"AutoModelForCausalLM": "modeling_phi3.Phi3ForCausalLM"})
    _model, config, _context = load_model(llama, torch.device("cpu"))
    assert config.model_type == "llama"


def test_a_kv_cache_too_small_for_the_asked_context_is_a_refusal(llama: Path) -> None:
    with pytest.raises(CheckpointError, match="fewer than max_model_len 512"):
        LLM(model=llama, kv_cache_bytes=1 << 16, max_model_len=512)


def test_a_shard_the_index_names_must_be_there(llama: Path) -> None:
    index = {"metadata": {}, "weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (llama / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "names shard model-00002-of-00002.safetensors, which is not in the folder" in refusal_of(llama)


def test_the_worker_exits_with_the_one_line_and_never_joins_the_group(
    llama: Path, redis_server: RedisServer, client: redis.Redis
) -> None:
    edit_config(llama, model_type="gpt_oss")
    namespace = "refused"
    worker = subprocess.run(
        [sys.executable, "-m", "worker", "--model", str(llama), "--redis-url", redis_server.url]
        + ["--namespace", namespace],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert worker.returncode == EXIT_CANNOT_SERVE
    errors = [line for line in worker.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "model_type 'gpt_oss' is not supported" in errors[0]
    assert "Traceback" not in worker.stderr
    assert client.keys(f"{namespace}:*") == []
