"""A quantized model's decode steps through every layer in one C call (worker/decode_layers.py)
give bit for bit the logits of its FusedLayers run from Python, with several sequences of
different lengths at once, over several steps; steps with a prompt chunk and models the loop does
not do run from Python."""

from pathlib import Path

import pytest
import torch

from tests.tiny_checkpoints import build
from worker.attention import SequenceRows
from worker.cpu_attention import CpuAttention
from worker.cpu_fused_ops import CpuFusedOps
from worker.decode_layers import DecodeLayers
from worker.engine_device import decode_layers
from worker.kernels import PagedDecodeKernel
from worker.kv_cache import KVCache
from worker.model import CausalLM
from worker.model_loader import load_model

CPU = torch.device("cpu")
BLOCK_SIZE = 4
PROMPTS = [[(7 * i + 3 * s) % 400 for i in range(length)] for s, length in enumerate((5, 22, 13))]
DECODE_STEPS = 3


def generate(model: CausalLM, attention: CpuAttention) -> list[torch.Tensor]:
    """Each prompt prefilled alone, then every sequence decoded at once for DECODE_STEPS steps
    (greedy); the logits of every step."""
    cache = KVCache(model.config, 64, BLOCK_SIZE, CPU, torch.float32)
    tables = [list(range(20 * s + 19, 20 * s - 1, -1)) for s in range(len(PROMPTS))]  # blocks out of order

    def slot(seq: int, pos: int) -> int:
        return tables[seq][pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE

    logits, tokens = [], []
    for seq, prompt in enumerate(PROMPTS):
        n = len(prompt)
        first = model(
            torch.tensor(prompt),
            torch.arange(n),
            cache,
            attention.plan([SequenceRows(tables[seq], 0, n, 0)], [slot(seq, p) for p in range(n)]),
            torch.tensor([n - 1]),
            torch.tensor([n] * n),
        )
        logits.append(first)
        tokens.append(int(first.argmax(-1)))
    lengths = [len(prompt) for prompt in PROMPTS]
    for _ in range(DECODE_STEPS):
        rows = [SequenceRows(tables[s], lengths[s], 1, s) for s in range(len(PROMPTS))]
        step = model(
            torch.tensor(tokens),
            torch.tensor(lengths),
            cache,
            attention.plan(rows, [slot(s, lengths[s]) for s in range(len(PROMPTS))]),
            torch.arange(len(PROMPTS)),
            torch.tensor([len(prompt) for prompt in PROMPTS]),
        )
        logits.append(step)
        tokens = step.argmax(-1).tolist()
        lengths = [length + 1 for length in lengths]
    return logits


def c_parts() -> tuple[CpuAttention, CpuFusedOps]:
    kernel, ops = PagedDecodeKernel.load(), CpuFusedOps.load()
    if kernel is None or ops is None:
        pytest.skip("no C compiler on this machine")
    return CpuAttention(BLOCK_SIZE, CPU, kernel), ops


@pytest.mark.parametrize("quantization", ["int4", "int8"])
@pytest.mark.parametrize("family", ["llama", "mistral", "phi3", "qwen2"])
def test_one_call_through_every_layer_gives_the_fused_layers_logits(
    quantization: str, family: str, model_dir: Path, tmp_path: Path
) -> None:
    """Llama's plain layers, Mistral's sliding window and Phi-3's fused projections go through
    the loop; Qwen2's q/k/v bias is added in float32 by the layer, so its layers stay in Python."""
    attention, ops = c_parts()
    model, _, _ = load_model(build(family, tmp_path, model_dir), CPU, quantization=quantization)  # type: ignore[arg-type]
    model.use_fused_ops(ops)
    looped = decode_layers(model, ops, attention)
    assert (looped is not None) == (family != "qwen2")
    model.decode_layers = looped
    calls = []
    if looped is not None:
        function = looped._function
        looped._function = lambda *args: calls.append(len(args)) or function(*args)  # type: ignore[method-assign]
    ours = generate(model, attention)
    assert len(calls) == (DECODE_STEPS if looped is not None else 0)  # decode steps only
    model.decode_layers = None
    reference = generate(model, attention)
    for got, expected in zip(ours, reference, strict=True):
        assert torch.equal(got, expected)


def test_a_float32_model_keeps_its_layers_in_python(model_dir: Path, tmp_path: Path) -> None:
    """Unquantized, the norms and the activation are torch's (exact): no FusedLayers, no loop."""
    attention, ops = c_parts()
    model, _, _ = load_model(build("llama", tmp_path, model_dir), CPU)
    model.use_fused_ops(ops, rotary_only=True)
    assert DecodeLayers.of(model, ops, attention.decode_kernel) is None  # type: ignore[arg-type]
