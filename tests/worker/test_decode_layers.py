"""A quantized model's decode steps through every layer in one C call (worker/decode_layers.py)
give bit for bit the logits of its FusedLayers run from Python: one, several and many sequences of
different lengths at once, over several steps and a second KV cache; steps with a prompt chunk and
models the loop does not do run from Python."""

from pathlib import Path

import pytest
import torch

from tests.tiny_checkpoints import build
from worker.attention import SequenceRows
from worker.cpu_attention import CpuAttention
from worker.cpu_fused_ops import CpuFusedOps
from worker.decode_layers import DecodeLayers
from worker.engine_device import decode_layers
from worker.fused_layer import FusedLayer
from worker.kernels import PagedDecodeKernel
from worker.kv_cache import KVCache
from worker.model import CausalLM
from worker.model_loader import load_model

CPU = torch.device("cpu")
BLOCK_SIZE = 4
DECODE_STEPS = 3
MAX_BLOCKS = 12  # a sequence's blocks: its prompt (up to 30 tokens) and its decodes


def prompts(count: int) -> list[list[int]]:
    """`count` prompts of 5 to 30 tokens."""
    return [[(7 * i + 3 * s) % 400 for i in range(5 + (s * 9) % 26)] for s in range(count)]


def generate(model: CausalLM, attention: CpuAttention, count: int) -> list[torch.Tensor]:
    """The first count - 1 prompts prefilled one at a time, then DECODE_STEPS steps decoding all of
    them at once (greedy), then a step decoding them while the last prompt is prefilled: the logits
    of every step, on a fresh KV cache whose blocks each sequence takes out of order."""
    texts = prompts(count)
    cache = KVCache(model.config, count * MAX_BLOCKS, BLOCK_SIZE, CPU, torch.float32)
    tables = [list(range(MAX_BLOCKS * (s + 1) - 1, MAX_BLOCKS * s - 1, -1)) for s in range(count)]

    def slot(seq: int, pos: int) -> int:
        return tables[seq][pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE

    def step(
        rows: list[SequenceRows], tokens: list[int], positions: list[int], sampled: list[int]
    ) -> torch.Tensor:
        seqs = [s for s, row in enumerate(rows) for _ in range(row.num_new)]
        return model(
            torch.tensor(tokens),
            torch.tensor(positions),
            cache,
            attention.plan(rows, [slot(s, p) for s, p in zip(seqs, positions, strict=True)]),
            torch.tensor(sampled),
            torch.tensor([len(texts[s]) for s in seqs]),
        )

    logits, tokens = [], []
    for seq, prompt in enumerate(texts[:-1]):
        n = len(prompt)
        logits.append(step([SequenceRows(tables[seq], 0, n, 0)], prompt, list(range(n)), [n - 1]))
        tokens.append(int(logits[-1].argmax(-1)))
    lengths = [len(prompt) for prompt in texts[:-1]]
    decoding = range(count - 1)
    for _ in range(DECODE_STEPS + 1):
        rows = [SequenceRows(tables[s], lengths[s], 1, s) for s in decoding]
        if len(logits) == count - 1 + DECODE_STEPS:  # the last step: the last prompt joins
            rows.append(SequenceRows(tables[count - 1], 0, len(texts[-1]), count - 1))
        fed = tokens + (texts[-1] if len(rows) > len(decoding) else [])
        positions = lengths + (list(range(len(texts[-1]))) if len(rows) > len(decoding) else [])
        logits.append(step(rows, fed, positions, list(decoding)))
        tokens = logits[-1].argmax(-1).tolist()
        lengths = [length + 1 for length in lengths]
    return logits


def c_parts() -> tuple[CpuAttention, CpuFusedOps]:
    kernel, ops = PagedDecodeKernel.load(), CpuFusedOps.load()
    if kernel is None or ops is None:
        pytest.skip("no C compiler on this machine")
    return CpuAttention(BLOCK_SIZE, CPU, kernel), ops


def quantized(family: str, quantization: str, model_dir: Path, tmp_path: Path) -> CausalLM:
    """The checkpoint with each norm's weight and eps its own (so that one norm read for another
    shows), its C ops on."""
    model, _, _ = load_model(build(family, tmp_path, model_dir), CPU, quantization=quantization)  # type: ignore[arg-type]
    generator = torch.Generator().manual_seed(0)
    for index, layer in enumerate(model.layers):
        for offset, norm in enumerate((layer.attn_in, layer.mlp_in)):
            norm.weight.data.copy_(torch.rand(norm.weight.shape, generator=generator) + 0.5)
            norm.eps = 10.0 ** -(2 + 2 * offset + index)
    return model


def assert_loop_matches_python(model: CausalLM, attention: CpuAttention, counts: list[int]) -> None:
    looped = model.decode_layers
    assert looped is not None
    function, calls = looped._function, []
    looped._function = lambda *args: calls.append(True) or function(*args)  # type: ignore[method-assign]
    ours = [generate(model, attention, count) for count in counts]  # a fresh KV cache each
    assert len(calls) == DECODE_STEPS * len(counts)  # the steps of decodes only
    model.decode_layers = None
    for count, got in zip(counts, ours, strict=True):
        for step, expected in zip(got, generate(model, attention, count), strict=True):
            assert torch.equal(step, expected)


@pytest.mark.parametrize("quantization", ["int4", "int8"])
@pytest.mark.parametrize("family", ["llama", "mistral", "phi3", "qwen2"])
def test_one_call_through_every_layer_gives_the_fused_layers_logits(
    quantization: str, family: str, model_dir: Path, tmp_path: Path
) -> None:
    """Llama's plain layers, Mistral's sliding window and Phi-3's fused projections go through
    the loop; Qwen2's q/k/v bias is added in float32 by the layer, so its layers stay in Python."""
    attention, ops = c_parts()
    model = quantized(family, quantization, model_dir, tmp_path)
    model.use_fused_ops(ops)
    model.decode_layers = decode_layers(model, ops, attention)
    if family == "qwen2":
        assert model.decode_layers is None
        return
    assert_loop_matches_python(model, attention, [4])


def test_one_stream_many_streams_and_heads_wider_than_the_model(model_dir: Path, tmp_path: Path) -> None:
    """One decode a step (the one-stream case), 17 (rows spread over threads), and attention
    wider than the hidden size and the MLP (o_proj's input the widest), each on its own KV cache."""
    attention, ops = c_parts()
    model = quantized("llama-wide-heads", "int4", model_dir, tmp_path)
    model.use_fused_ops(ops)
    model.decode_layers = decode_layers(model, ops, attention)
    assert model.config.num_heads * model.config.head_dim > model.config.hidden_size
    assert_loop_matches_python(model, attention, [2, 18])


def test_a_float32_model_keeps_its_layers_in_python(model_dir: Path, tmp_path: Path) -> None:
    """Unquantized, the FusedLayers' linears are float32 ones, which the loop does not call: no
    loop."""
    attention, ops = c_parts()
    model, _, _ = load_model(build("llama", tmp_path, model_dir), CPU)
    model.use_fused_ops(ops)
    assert attention.decode_kernel is not None
    assert all(isinstance(step, FusedLayer) for step in model.steps)
    assert DecodeLayers.of(model, ops, attention.decode_kernel) is None
