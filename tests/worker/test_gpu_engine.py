"""On CUDA: the engine's greedy output against transformers' on the same GPU. float32 is
token-identical, replaying decode graphs or not (a step padded to a captured size changes no real
row); bfloat16 agreement is measured (rounding differs between any two bf16 implementations, so
a near-tie can go either way)."""

import gc
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from client.engine_comparisons import agreement
from client.gpu_check import transformers_greedy
from scheduler import SamplingParams
from worker.llm import LLM

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

NUM_TOKENS = 16
FRACTION = 0.3  # of the GPU for each engine
GREEDY = SamplingParams(max_tokens=NUM_TOKENS, temperature=0.0, ignore_eos=True)


@pytest.fixture(autouse=True)
def _release_gpu_memory() -> Iterator[None]:
    """Each test's engine gone before the next sizes its own from what is free."""
    yield
    gc.collect()
    torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def prompts(workload: list[dict[str, object]]) -> list[list[int]]:
    rows = sorted(workload, key=lambda row: len(row["prompt_token_ids"]))  # type: ignore[arg-type]
    return [list(row["prompt_token_ids"]) for row in rows[::5]]  # type: ignore[call-overload]


@pytest.fixture(scope="module")
def float32_expected(model_dir: Path, prompts: list[list[int]]) -> list[list[int]]:
    return transformers_greedy(model_dir, torch.float32, prompts, NUM_TOKENS)


@pytest.mark.parametrize("cuda_graphs", [True, False], ids=["graphs", "eager"])
def test_float32_matches_transformers_on_cuda(
    model_dir: Path, prompts: list[list[int]], float32_expected: list[list[int]], cuda_graphs: bool
) -> None:
    llm = LLM(
        model=model_dir,
        device="cuda",
        dtype="float32",
        cuda_graphs=cuda_graphs,
        max_num_seqs=16,
        gpu_memory_fraction=FRACTION,
    )
    assert (llm.core.runner.graphs is not None) == cuda_graphs
    assert llm.core.runner.attention.name == "triton"
    assert [c.token_ids for c in llm.generate(prompts, GREEDY)] == float32_expected


def test_bfloat16_agrees_with_transformers_on_cuda(model_dir: Path, prompts: list[list[int]]) -> None:
    expected = transformers_greedy(model_dir, torch.bfloat16, prompts, NUM_TOKENS)
    llm = LLM(model=model_dir, device="cuda", dtype="bfloat16", max_num_seqs=16, gpu_memory_fraction=FRACTION)
    assert llm.core.runner.kv_cache.dtype == torch.bfloat16
    assert next(llm.core.runner.model.parameters()).dtype == torch.bfloat16
    ours = [c.token_ids for c in llm.generate(prompts, GREEDY)]
    share, _ = agreement(dict(enumerate(expected)), dict(enumerate(ours)))
    print(f"bfloat16 greedy agreement with transformers: {share:.1%} of tokens before a difference")
    assert share >= 0.5
