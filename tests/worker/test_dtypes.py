"""--dtype: weights, activations and the KV cache follow it. float32 is token-exact (test_parity,
test_families); in bfloat16 and float16 greedy agreement with transformers in the same dtype is
measured and printed, with a floor far below what it is (a wrong cast gives near zero)."""

from pathlib import Path

import pytest
import torch

from client.engine_comparisons import agreement
from scheduler import SamplingParams
from tests.tiny_checkpoints import build
from tests.worker.test_families import hf_greedy
from worker.engine_device import resolve_dtype
from worker.llm import LLM

NUM_TOKENS = 12


def test_auto_is_float32_on_the_cpu() -> None:
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16


@pytest.mark.parametrize("family", ["llama", "gemma2", "mixtral"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_runs_in_that_dtype_and_agrees_with_transformers(
    family: str, dtype: str, model_dir: Path, tmp_path: Path, workload: list[dict[str, object]]
) -> None:
    path = build(family, tmp_path / family, model_dir)
    prompts = [list(row["prompt_token_ids"]) for row in workload[:6]]  # type: ignore[call-overload]
    theirs = hf_greedy(path, prompts, getattr(torch, dtype))
    llm = LLM(model=path, dtype=dtype, kv_cache_bytes=16 << 20)
    assert {p.dtype for p in llm.core.runner.model.parameters()} == {getattr(torch, dtype)}
    assert llm.core.runner.kv_cache.dtype == getattr(torch, dtype)
    ours = llm.generate(prompts, SamplingParams(max_tokens=NUM_TOKENS, temperature=0.0, ignore_eos=True))
    share, differing = agreement(
        {str(i): tokens for i, tokens in enumerate(theirs)}, {str(i): c.token_ids for i, c in enumerate(ours)}
    )
    print(f"{family} {dtype}: {100 * share:.0f}% of greedy tokens before the first divergence; {differing}")
    assert share >= 0.5
