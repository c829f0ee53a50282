"""Greedy float32 output is token-identical to Hugging Face `generate`, whatever the batch does."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from scheduler import SamplingParams
from worker.llm import LLM

NUM_TOKENS = 16
GREEDY = SamplingParams(max_tokens=NUM_TOKENS, temperature=0.0, ignore_eos=True)
SMALL_KV = 64 << 20


@pytest.fixture(scope="module")
def hf_model(model_dir: Path) -> AutoModelForCausalLM:
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # ignore_eos: EOS may be generated and does not stop
    return model


def hf_greedy(hf_model: AutoModelForCausalLM, prompts: list[list[int]]) -> list[list[int]]:
    outputs = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        generated = hf_model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=NUM_TOKENS, do_sample=False
        )
        outputs.append(generated[0, len(prompt) :].tolist())
    return outputs


@pytest.fixture(scope="module")
def mixed_prompts(workload: list[dict[str, object]]) -> list[list[int]]:
    rows = sorted(workload, key=lambda row: len(row["prompt_token_ids"]))  # type: ignore[arg-type]
    picked = rows[:: len(rows) // 16][:16]  # 35 to ~290 tokens
    return [list(row["prompt_token_ids"]) for row in picked]  # type: ignore[call-overload]


@pytest.fixture(scope="module")
def expected(hf_model: AutoModelForCausalLM, mixed_prompts: list[list[int]]) -> list[list[int]]:
    return hf_greedy(hf_model, mixed_prompts)


@pytest.mark.parametrize(
    "engine_args",
    [
        pytest.param({}, id="one-batch"),
        pytest.param({"max_num_batched_tokens": 32, "max_num_seqs": 16}, id="every-prompt-chunked"),
        pytest.param({"kv_cache_bytes": 40 * 16 * 46080, "max_model_len": 512}, id="preempted"),
        pytest.param({"cpu_decode_kernel": False, "cpu_prefill_kernel": False}, id="sdpa"),
        pytest.param({"batching": "static", "max_num_seqs": 5}, id="static-batches"),
        pytest.param({"speculative": "ngram", "prompt_lookup_min": 1}, id="speculative"),
    ],
)
def test_greedy_matches_transformers(
    model_dir: Path, mixed_prompts: list[list[int]], expected: list[list[int]], engine_args: dict[str, int]
) -> None:
    llm = LLM(model=model_dir, **{"kv_cache_bytes": SMALL_KV, **engine_args})
    completions = llm.generate(mixed_prompts, GREEDY)
    assert [c.token_ids for c in completions] == expected
    llm.core.scheduler.check_invariants()
    if "kv_cache_bytes" in engine_args:
        assert llm.core.scheduler.num_preemptions > 0


def test_one_request_at_a_time_matches_transformers(
    model_dir: Path, mixed_prompts: list[list[int]], expected: list[list[int]]
) -> None:
    """Sequential batching: every third prompt, each alone in turn."""
    llm = LLM(model=model_dir, kv_cache_bytes=SMALL_KV, batching="sequential")
    assert [c.token_ids for c in llm.generate(mixed_prompts[::3], GREEDY)] == expected[::3]
    assert max(llm.core.stats.batch_sizes) == 1


def test_greedy_matches_transformers_with_prefix_cache_hits(
    model_dir: Path, hf_model: AutoModelForCausalLM, workload: list[dict[str, object]]
) -> None:
    longest = max((list(row["prompt_token_ids"]) for row in workload), key=len)  # type: ignore[call-overload]
    shared = longest[:200]
    prompts = [shared + list(row["prompt_token_ids"])[-12 - i :] for i, row in enumerate(workload[:6])]  # type: ignore[call-overload]
    llm = LLM(model=model_dir, kv_cache_bytes=SMALL_KV)
    first = llm.generate(prompts[:1], GREEDY)
    rest = llm.generate(prompts[1:], GREEDY)
    assert llm.core.scheduler.block_manager.num_hit_tokens >= 5 * 192
    assert [c.token_ids for c in first + rest] == hf_greedy(hf_model, prompts)


@pytest.mark.parametrize(("quantization", "floor"), [("int8", 0.25), ("int4", 0.25), ("w8a8", 0.125)])
def test_quantized_greedy_output_agrees_with_float32_and_not_with_the_batch(
    model_dir: Path,
    mixed_prompts: list[list[int]],
    expected: list[list[int]],
    quantization: str,
    floor: float,
) -> None:
    """Weights rounded to int8 or int4 change some argmaxes; how many is the floor. Whatever they
    change, a prompt alone gets what it gets in a batch."""
    llm = LLM(model=model_dir, kv_cache_bytes=SMALL_KV, quantization=quantization)
    outputs = [c.token_ids for c in llm.generate(mixed_prompts, GREEDY)]
    identical = sum(ours == theirs for ours, theirs in zip(outputs, expected, strict=True))
    print(f"\n{quantization}: {identical}/{len(expected)} greedy outputs identical to float32")
    assert identical >= floor * len(expected)
    assert llm.generate([mixed_prompts[7]], GREEDY)[0].token_ids == outputs[7]


def test_seeded_sampling_gives_the_same_tokens_alone_and_in_a_batch(
    model_dir: Path, mixed_prompts: list[list[int]]
) -> None:
    llm = LLM(model=model_dir, kv_cache_bytes=SMALL_KV)
    seeded = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, top_k=40, seed=1234, ignore_eos=True)
    other = SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True)
    alone = llm.generate([mixed_prompts[3]], seeded)[0].token_ids
    batch = llm.generate(mixed_prompts[:6], [other, other, other, seeded, other, other])
    assert batch[3].token_ids == alone
    again = llm.generate([mixed_prompts[3]], SamplingParams(**{**_fields(seeded), "seed": 99}))[0].token_ids
    assert again != alone


def _fields(params: SamplingParams) -> dict[str, object]:
    return {name: getattr(params, name) for name in params.__slots__}  # type: ignore[attr-defined]
