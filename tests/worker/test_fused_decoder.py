"""The whole decoder with a device's fused kernels gives the logits of the plain torch path, a
prompt and then a decode, on tiny checkpoints of families whose norms, RoPE and attention differ:
the CUDA path (Triton attention and the fused norm, RoPE and SiLU kernels; on CUDA where there is
one, else in Triton's interpreter), and the CPU's C kernels (decode attention, and every fused op,
as float32 and quantized models use them)."""

from pathlib import Path

import pytest
import torch

from tests.tiny_checkpoints import build
from worker.attention import AttentionBackend, SequenceRows
from worker.cpu_attention import CpuAttention
from worker.cpu_fused_ops import CpuFusedOps
from worker.fused_layer import FusedLayer
from worker.fused_ops import FusedOps
from worker.kernels import PagedDecodeKernel
from worker.kv_cache import KVCache
from worker.model import CausalLM
from worker.model_loader import load_model

CUDA = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # or Triton's interpreter
CPU = torch.device("cpu")
BLOCK_SIZE = 4
PROMPT = [(7 * i + 3) % 400 for i in range(22)]


def prompt_then_decode(model: CausalLM, attention: AttentionBackend) -> tuple[torch.Tensor, torch.Tensor]:
    config = model.config
    cache = KVCache(config, 8, BLOCK_SIZE, attention.device, torch.float32)
    blocks = [5, 0, 7, 2, 6, 1, 3]

    def slot(pos: int) -> int:
        return blocks[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE

    def tensor(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, device=attention.device)

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


def fused(backend: str) -> tuple[AttentionBackend, FusedOps]:
    if backend == "triton":
        pytest.importorskip("triton")
        from worker.triton_attention import TritonAttention
        from worker.triton_fused_ops import TritonFusedOps

        return TritonAttention(BLOCK_SIZE, CUDA), TritonFusedOps()
    kernel, ops = PagedDecodeKernel.load(), CpuFusedOps.load()
    if kernel is None or ops is None:
        pytest.skip("no C compiler on this machine")
    return CpuAttention(BLOCK_SIZE, CPU, kernel), ops


@pytest.mark.parametrize("backend", ["triton", "cpu"])
@pytest.mark.parametrize("family", ["llama", "phi3", "olmo2", "gemma2", "qwen3", "olmoe"])
def test_fused_path_gives_the_torch_path_logits(
    backend: str, family: str, model_dir: Path, tmp_path: Path
) -> None:
    attention, ops = fused(backend)
    model, _, _ = load_model(build(family, tmp_path, model_dir), attention.device)
    expected = prompt_then_decode(model, CpuAttention(BLOCK_SIZE, attention.device))
    model.use_fused_ops(ops)
    got = prompt_then_decode(model, attention)
    for ours, reference in zip(got, expected, strict=True):
        torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("quantization", ["int4", "int8"])
@pytest.mark.parametrize("family", ["llama", "olmo2", "olmoe"])
def test_bfloat16_between_c_ops_and_quantized_linears_changes_no_logit(
    quantization: str, family: str, model_dir: Path, tmp_path: Path
) -> None:
    """Quantized weights compute in bfloat16; the fused ops around them hand it over as it is
    rather than through torch's casts, and the logits stay bit for bit those of the casts; the
    layers that fit run as FusedLayers, and give bit for bit what their modules give (in the decode
    step, q/k/v go to the C kernel as bfloat16 and its output to o_proj as bfloat16, with RoPE,
    the cache stores and the attention in one call).
    (OLMo 2's norms follow their sublayer and OLMoE routes its feed-forward: both keep float32
    where the next op needs it, and their modules.)"""
    attention, ops = fused("cpu")
    path = build(family, tmp_path, model_dir)
    model, _, _ = load_model(path, CPU, quantization=quantization)  # type: ignore[arg-type]
    model.use_fused_ops(ops)
    handed_over = prompt_then_decode(model, attention)
    bfloat16_outs = [module for module in model.modules() if getattr(module, "bfloat16_out", False)]
    assert bool(bfloat16_outs) == (family != "olmo2")  # only layers that defer their residual add
    fused_layers = [step for step in model.steps if isinstance(step, FusedLayer)]
    assert len(fused_layers) == (len(model.layers) if family == "llama" else 0)
    # the decode went through the kernel's one call a layer (RoPE, stores, attention)
    assert all(layer.heads.prepared is not None for layer in fused_layers)
    for module in model.modules():
        if hasattr(module, "out_dtype"):
            module.out_dtype = None
        if hasattr(module, "bfloat16_out"):
            module.bfloat16_out = False
    model.steps = list(model.layers)
    cast = prompt_then_decode(model, attention)
    for ours, reference in zip(handed_over, cast, strict=True):
        assert torch.equal(ours, reference)
