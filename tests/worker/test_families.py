"""Every family we serve is token-identical to transformers `generate` in float32, on tiny random
checkpoints (tests/tiny_checkpoints.py), under mixed batches, chunked prefill, preemption, SDPA in
place of the C attention kernels and prefix-cache hits. Prompts are longer than the sliding windows."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from scheduler import SamplingParams
from tests.tiny_checkpoints import FAMILIES, build
from worker.llm import LLM

NUM_TOKENS = 12
GREEDY = SamplingParams(max_tokens=NUM_TOKENS, temperature=0.0, ignore_eos=True)
BLOCK = 16


@pytest.fixture(scope="module")
def prompts(workload: list[dict[str, object]]) -> list[list[int]]:
    rows = sorted(workload, key=lambda row: len(row["prompt_token_ids"]))  # type: ignore[arg-type]
    picked = [list(row["prompt_token_ids"]) for row in rows[:: len(rows) // 6][:6]]  # type: ignore[call-overload]
    shared = picked[-1][:100]
    return picked + [
        shared + p[-10 - i :] for i, p in enumerate(picked[:3])
    ]  # the last three share 100 tokens


def hf_greedy(path: Path, prompts: list[list[int]], dtype: torch.dtype = torch.float32) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()
    outputs = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        generated = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NUM_TOKENS,
            do_sample=False,
            eos_token_id=None,
        )
        outputs.append(generated[0, len(prompt) :].tolist())
    return outputs


def kv_bytes_per_token(path: Path) -> int:
    model = AutoModelForCausalLM.from_pretrained(str(path))
    config = getattr(model.config, "text_config", None) or model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 4


ENGINE_ARGS = {
    "one-batch": {},
    "every-prompt-chunked": {"max_num_batched_tokens": 32, "max_num_seqs": 16},
    # Steps of 128 tokens keep several prompts in flight, so even the families that give blocks
    # back behind their window run out of them and preempt.
    "preempted": {"blocks": 20, "max_model_len": 320, "max_num_batched_tokens": 128, "max_num_seqs": 16},
    "sdpa": {"cpu_decode_kernel": False, "cpu_prefill_kernel": False},
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_matches_transformers(
    family: str, prompts: list[list[int]], model_dir: Path, tmp_path: Path
) -> None:
    path = build(family, tmp_path / family, model_dir)
    expected = hf_greedy(path, prompts)
    assert len({tuple(tokens) for tokens in expected}) > 1, "the random weights give every prompt one output"
    per_token = kv_bytes_per_token(path)
    for name, args in ENGINE_ARGS.items():
        args = dict(args)
        blocks = int(args.pop("blocks", 400))
        llm = LLM(model=path, kv_cache_bytes=blocks * BLOCK * per_token, block_size=BLOCK, **args)
        outputs = [c.token_ids for c in llm.generate(prompts, GREEDY)]
        assert outputs == expected, f"{family} {name}"
        llm.core.scheduler.check_invariants()
        if name == "preempted":
            assert llm.core.scheduler.num_preemptions > 0
    again = llm.generate(prompts[-3:], GREEDY)  # the shared prefix is cached by now
    assert llm.core.scheduler.block_manager.num_hit_tokens >= 3 * 96
    assert [c.token_ids for c in again] == expected[-3:]


def test_a_sharded_checkpoint_loads_from_its_index(
    prompts: list[list[int]], model_dir: Path, tmp_path: Path
) -> None:
    path = build("qwen3", tmp_path / "sharded", model_dir, max_shard_size="1MB")
    assert (path / "model.safetensors.index.json").exists() and len(list(path.glob("*.safetensors"))) >= 2
    llm = LLM(model=path, kv_cache_bytes=400 * BLOCK * kv_bytes_per_token(path))
    assert [c.token_ids for c in llm.generate(prompts, GREEDY)] == hf_greedy(path, prompts)
