"""Prompt logprobs: every prompt token's logprob from the second on, as transformers' forward gives
them, across chunked prefill; a request asking for them never skips its prompt through the cache."""

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from scheduler import SamplingParams
from worker.llm import LLM


def test_prompt_logprobs_match_transformers_across_chunks_and_skip_the_prefix_cache(model_dir: Path) -> None:
    llm = LLM(model=model_dir, kv_cache_bytes=64 << 20, max_num_batched_tokens=16, max_num_seqs=4)
    prompt = llm.tokenizer.encode(
        "The capital of France is Paris. The capital of Italy is Rome, and of Spain"
    )
    assert len(prompt) > 16  # more than one chunk
    llm.generate([prompt], SamplingParams(max_tokens=2, temperature=0.0))  # now cached
    hits_before = llm.core.scheduler.block_manager.num_hit_tokens
    busy = llm.tokenizer.encode("Count to ten:")  # decodes share the steps that score the prompt
    completion, beside = llm.generate(
        [prompt, busy],
        [
            SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=3),
            SamplingParams(max_tokens=12, temperature=0.0),
        ],
    )
    assert llm.core.scheduler.block_manager.num_hit_tokens == hits_before
    assert (
        beside.token_ids == llm.generate([busy], SamplingParams(max_tokens=12, temperature=0.0))[0].token_ids
    )
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        reference = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), dim=-1)
    scored = completion.prompt_logprobs
    assert [token.token_id for token in scored] == prompt[1:]
    for position, token in enumerate(scored):
        assert abs(token.logprob - reference[position, prompt[position + 1]].item()) < 1e-3  # type: ignore[operator]
        values, ids = reference[position].topk(3)
        assert [t for t, _ in token.top_logprobs] == ids.tolist()
    again = llm.generate([prompt], SamplingParams(max_tokens=2, temperature=0.0))[0]
    assert again.prompt_logprobs == [] and again.token_ids == completion.token_ids
