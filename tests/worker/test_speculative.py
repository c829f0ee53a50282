"""Prompt-lookup speculative decoding gives exactly what plain greedy decoding gives, however the
batch runs, on prompts whose answers repeat them (so most steps carry drafts)."""

import json
from pathlib import Path

import pytest

from scheduler import SamplingParams
from tests.conftest import ROOT
from tokenization import Tokenizer
from worker.llm import LLM

GREEDY = SamplingParams(max_tokens=32, temperature=0.0)
SMALL_KV = 64 << 20
SPECULATIVE = {"speculative": "ngram", "num_speculative_tokens": 4}


@pytest.fixture(scope="module")
def repeat_prompts(model_dir: Path) -> list[list[int]]:
    tokenizer = Tokenizer(model_dir)
    lines = (ROOT / "bench" / "repeat-workload.jsonl").read_text().splitlines()
    return [tokenizer.encode_chat(json.loads(line)["messages"]) for line in lines[::2]]  # text and code


@pytest.fixture(scope="module")
def plain(model_dir: Path, repeat_prompts: list[list[int]]) -> list[list[int]]:
    llm = LLM(model=model_dir, kv_cache_bytes=SMALL_KV)
    return [c.token_ids for c in llm.generate(repeat_prompts, GREEDY)]


@pytest.mark.parametrize(
    "engine_args",
    [
        pytest.param({}, id="one-batch"),
        pytest.param({"kv_cache_bytes": 32 * 16 * 46080, "max_model_len": 384}, id="preempted"),
        pytest.param({"cpu_decode_kernel": False, "cpu_prefill_kernel": False}, id="sdpa"),
        pytest.param({"batching": "sequential", "num_speculative_tokens": 8}, id="one-at-a-time"),
    ],
)
def test_speculative_greedy_output_is_plain_greedy_output(
    model_dir: Path, repeat_prompts: list[list[int]], plain: list[list[int]], engine_args: dict[str, object]
) -> None:
    llm = LLM(model=model_dir, **{"kv_cache_bytes": SMALL_KV, **SPECULATIVE, **engine_args})
    assert [c.token_ids for c in llm.generate(repeat_prompts, GREEDY)] == plain
    scheduler = llm.core.scheduler
    scheduler.check_invariants()
    print(f"\n{scheduler.num_accepted_tokens}/{scheduler.num_draft_tokens} drafted tokens accepted")
    assert scheduler.num_accepted_tokens > 0.2 * sum(len(tokens) for tokens in plain)
    if "kv_cache_bytes" in engine_args:
        assert scheduler.num_preemptions > 0


def test_speculative_greedy_output_is_plain_greedy_output_over_cached_prefixes(
    model_dir: Path, repeat_prompts: list[list[int]], plain: list[list[int]]
) -> None:
    llm = LLM(model=model_dir, kv_cache_bytes=SMALL_KV, **SPECULATIVE)
    llm.generate(repeat_prompts, SamplingParams(max_tokens=4, temperature=0.0))
    hits = llm.core.scheduler.block_manager.num_hit_tokens
    assert [c.token_ids for c in llm.generate(repeat_prompts, GREEDY)] == plain
    assert llm.core.scheduler.block_manager.num_hit_tokens - hits >= len(repeat_prompts) * 64


def test_requests_that_sample_or_penalize_decode_beside_drafted_ones(
    model_dir: Path, repeat_prompts: list[list[int]], plain: list[list[int]]
) -> None:
    """A seeded sampled request and a penalized one get what they get without speculation."""
    seeded = SamplingParams(max_tokens=16, temperature=0.8, seed=7)
    penalized = SamplingParams(max_tokens=16, temperature=0.0, repetition_penalty=1.3)
    prompts = repeat_prompts[:4]
    params = [GREEDY, seeded, penalized, GREEDY]
    with_drafts = LLM(model=model_dir, kv_cache_bytes=SMALL_KV, **SPECULATIVE).generate(prompts, params)
    without = LLM(model=model_dir, kv_cache_bytes=SMALL_KV).generate(prompts, params)
    assert [c.token_ids for c in with_drafts] == [c.token_ids for c in without]
    assert with_drafts[0].token_ids == plain[0]
