"""The whole decoder on the CUDA path (Triton attention and the fused norm, RoPE and SiLU kernels)
gives the logits of the CPU path, a prompt and then a decode, on tiny checkpoints of families whose
norms, RoPE and attention differ. On CUDA where there is one, else in Triton's interpreter."""

from pathlib import Path

import pytest
import torch

from tests.tiny_checkpoints import build
from worker.attention import AttentionBackend, SequenceRows
from worker.cpu_attention import CpuAttention
from worker.kv_cache import KVCache
from worker.model import CausalLM
from worker.model_loader import load_model

pytest.importorskip("triton")

from worker.fused_ops import FusedOps  # noqa: E402
from worker.triton_attention import TritonAttention  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BLOCK_SIZE = 4
PROMPT = [(7 * i + 3) % 400 for i in range(22)]


def prompt_then_decode(model: CausalLM, attention: AttentionBackend) -> tuple[torch.Tensor, torch.Tensor]:
    config = model.config
    cache = KVCache(config, 8, BLOCK_SIZE, DEVICE, torch.float32)
    blocks = [5, 0, 7, 2, 6, 1, 3]

    def slot(pos: int) -> int:
        return blocks[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE

    def tensor(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, device=DEVICE)

    n = len(PROMPT)
    first = model(
        tensor(PROMPT),
        tensor(list(range(n))),
        cache,
        attention.plan([SequenceRows(blocks, 0, n, 0)], [slot(p) for p in range(n)]),
        tensor([n - 1]),
        tensor([n] * n),
    )
    token = int(first.argmax(-1))
    second = model(
        tensor([token]),
        tensor([n]),
        cache,
        attention.plan([SequenceRows(blocks, n, 1, 0)], [slot(n)]),
        tensor([0]),
        tensor([n]),
    )
    return first, second


@pytest.mark.parametrize("family", ["llama", "phi3", "olmo2", "gemma2", "qwen3", "olmoe"])
def test_cuda_path_gives_the_cpu_path_logits(family: str, model_dir: Path, tmp_path: Path) -> None:
    model, _, _ = load_model(build(family, tmp_path, model_dir), DEVICE)
    expected = prompt_then_decode(model, CpuAttention(BLOCK_SIZE, DEVICE))
    model.use_fused_ops(FusedOps())
    got = prompt_then_decode(model, TritonAttention(BLOCK_SIZE, DEVICE))
    for ours, reference in zip(got, expected, strict=True):
        torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)
