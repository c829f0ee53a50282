"""The C decode-attention kernel agrees with eager attention over a gathered context, with and
without a sliding window and a soft-cap, and gives a sequence the same output in any batch."""

import copy

import pytest
import torch

from worker.attention import LayerAttention, QkvLayer
from worker.cpu_fused_ops import CpuFusedOps
from worker.kernels import PagedDecodeKernel
from worker.model import Rotation

BLOCK_SIZE = 4


def reference(q, key_cache, value_cache, tables, lens, num_kv_heads, block_size, layer):  # type: ignore[no-untyped-def]
    num_seqs, num_heads, head_dim = q.shape
    max_len = int(lens.max())
    slots = (tables[:, :, None] * block_size + torch.arange(block_size)).view(num_seqs, -1)[:, :max_len]
    keys = key_cache.index_select(0, slots.reshape(-1)).view(num_seqs, max_len, num_kv_heads, head_dim)
    values = value_cache.index_select(0, slots.reshape(-1)).view(num_seqs, max_len, num_kv_heads, head_dim)
    group = num_heads // num_kv_heads
    keys = keys.repeat_interleave(group, dim=2).transpose(1, 2)  # [seqs, heads, len, head_dim]
    values = values.repeat_interleave(group, dim=2).transpose(1, 2)
    scores = torch.einsum("shd,shld->shl", q, keys) * layer.scale
    if layer.softcap is not None:
        scores = torch.tanh(scores / layer.softcap) * layer.softcap
    positions = torch.arange(max_len)[None, :]
    visible = positions < lens[:, None]
    if layer.window is not None:
        visible &= positions >= (lens - layer.window)[:, None]
    scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
    return torch.einsum("shl,shld->shd", torch.softmax(scores, dim=-1), values)


@pytest.mark.parametrize(
    ("num_threads", "num_heads", "num_kv_heads"), [(1, 9, 3), (2, 9, 3), (2, 8, 8), (2, 4, 1)]
)
@pytest.mark.parametrize(("window", "softcap"), [(None, None), (5, None), (None, 2.0), (7, 2.0)])
# partial and full last blocks; one; contexts of several partitions (of 64 keys)
@pytest.mark.parametrize("lens", [[1, 4, 5, 17, 30, 2, 9], [23], [150, 3, 70], [200]])
def test_kernel_matches_eager_attention_over_gathered_blocks(
    num_threads: int,
    num_heads: int,
    num_kv_heads: int,
    window: int | None,
    softcap: float | None,
    lens: list[int],
) -> None:
    """Fewer partitions than threads (one short stream) split by KV head; q, k and v are strided
    views, as the q/k/v projection's output is, and each new key and value lands in its slot (the
    last visible position) before the query reads it."""
    case = Case(lens, num_heads, num_kv_heads, seed=num_threads)
    layer = LayerAttention(scale=0.3, window=window, softcap=softcap)
    out = case.run(layer, num_threads)
    assert torch.equal(case.key_cache[case.slots], case.k) and torch.equal(
        case.value_cache[case.slots], case.v
    )
    expected = reference(
        case.q,
        case.key_cache,
        case.value_cache,
        case.tables,
        case.context_lens,
        num_kv_heads,
        BLOCK_SIZE,
        layer,
    )
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("window", [None, 50])
def test_a_sequence_gets_the_same_output_in_any_batch_and_on_any_threads(window: int | None) -> None:
    """A context's partitions are cut by its own length only, and splitting them by KV head changes
    no sum: alone on one thread or two, or among others, each sequence's output is bit for bit the
    same (the engine's outputs never depend on what else runs)."""
    lens = [150, 3, 70, 64, 65, 129]
    batch = Case(lens, 9, 3, seed=0)
    layer = LayerAttention(scale=0.3, window=window)
    together = batch.run(layer, 2)
    for i in range(len(lens)):
        for num_threads in (1, 2):  # alone on two threads, a short context is split by KV head
            alone = batch.row(i).run(layer, num_threads)
            assert torch.equal(alone[0], together[i])


@pytest.mark.parametrize("qkv_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rotary_dim", [16, 8])  # whole heads, and partial rotary
def test_one_call_from_qkv_is_rope_then_the_kernel(
    qkv_dtype: torch.dtype, out_dtype: torch.dtype, rotary_dim: int
) -> None:
    """`attend_layer` from the q/k/v projection's output (as a weight-only kernel gives it, or in
    float32) gives bit for bit what RoPE through CpuFusedOps and then the kernel give, and stores
    the same keys and values."""
    ops = CpuFusedOps.load()
    if ops is None:
        pytest.skip("no C compiler on this machine")
    case = Case([150, 3, 70, 9], 9, 3, seed=3)
    layer = LayerAttention(scale=0.3, window=None, softcap=None)
    num_seqs, num_heads, head_dim = case.q.shape
    qkv = torch.randn(num_seqs, (num_heads + 2 * case.num_kv_heads) * head_dim).to(qkv_dtype)
    positions = case.context_lens - 1
    angles = positions[:, None] * torch.rand(rotary_dim // 2)[None, :]
    emb = torch.cat((angles, angles), dim=-1)
    rotation = Rotation(emb.cos(), emb.sin(), rotary_dim)

    expected_case = copy.copy(case)
    expected_case.key_cache, expected_case.value_cache = case.key_cache.clone(), case.value_cache.clone()
    q, k, v = (
        qkv.float()
        .clone()
        .split_with_sizes([num_heads * head_dim, *[case.num_kv_heads * head_dim] * 2], dim=-1)
    )
    q = q.reshape(num_seqs, num_heads, head_dim)
    k = k.contiguous()
    ops.rotary_(q, k.view(num_seqs, case.num_kv_heads, head_dim), rotation.cos, rotation.sin)
    expected_case.q, expected_case.k, expected_case.v = q, k, v
    expected = expected_case.run(layer, 2).view(num_seqs, -1).to(out_dtype)

    heads = QkvLayer(num_heads, case.num_kv_heads, head_dim, layer, ops, out_dtype)
    step = case.kernel.step(case.slots, case.tables, case.context_lens, BLOCK_SIZE)
    got = case.kernel.attend_layer(step, heads, qkv, rotation, case.key_cache, case.value_cache)
    assert got.dtype == out_dtype and torch.equal(got, expected)
    assert torch.equal(case.key_cache, expected_case.key_cache)
    assert torch.equal(case.value_cache, expected_case.value_cache)


class Case:
    """Sequences of the given lengths over a random paged cache, and their new q/k/v."""

    def __init__(self, lens: list[int], num_heads: int, num_kv_heads: int, seed: int, head_dim: int = 16):
        if (kernel := PagedDecodeKernel.load()) is None:
            pytest.skip("no C compiler on this machine")
        self.kernel, self.num_kv_heads = kernel, num_kv_heads
        torch.manual_seed(seed)
        num_blocks = 64
        max_blocks = -(-max(lens) // BLOCK_SIZE)
        self.key_cache = torch.randn(num_blocks * BLOCK_SIZE, num_kv_heads * head_dim)
        self.value_cache = torch.randn(num_blocks * BLOCK_SIZE, num_kv_heads * head_dim)
        self.tables = torch.stack([torch.randperm(num_blocks)[:max_blocks] for _ in lens])
        qkv = torch.randn(len(lens), num_heads + 2 * num_kv_heads, head_dim)
        self.q = qkv[:, :num_heads]
        self.k, self.v = (t.reshape(len(lens), -1) for t in qkv[:, num_heads:].split(num_kv_heads, dim=1))
        self.context_lens = torch.tensor(lens)
        last = self.context_lens - 1
        self.slots = self.tables[torch.arange(len(lens)), last // BLOCK_SIZE] * BLOCK_SIZE + last % BLOCK_SIZE

    def row(self, i: int) -> "Case":
        """Sequence i alone, over a copy of the same cache."""
        alone = copy.copy(self)
        alone.key_cache, alone.value_cache = self.key_cache.clone(), self.value_cache.clone()
        alone.tables, alone.context_lens, alone.slots = (
            self.tables[i : i + 1],
            self.context_lens[i : i + 1],
            self.slots[i : i + 1],
        )
        alone.q, alone.k, alone.v = self.q[i : i + 1], self.k[i : i + 1], self.v[i : i + 1]
        return alone

    def run(self, layer: LayerAttention, num_threads: int) -> torch.Tensor:
        threads_before = torch.get_num_threads()
        torch.set_num_threads(num_threads)
        try:
            return self.kernel(
                self.q,
                self.k,
                self.v,
                self.slots,
                self.key_cache,
                self.value_cache,
                self.tables,
                self.context_lens,
                self.num_kv_heads,
                BLOCK_SIZE,
                layer,
            )
        finally:
            torch.set_num_threads(threads_before)


def test_loading_the_c_kernels_keeps_subnormal_floats() -> None:
    """The decode kernel is compiled with -ffast-math; linked with it, its library would flush
    subnormals to zero in the whole process (torch's float32 too) once loaded."""
    if PagedDecodeKernel.load() is None or CpuFusedOps.load() is None:
        pytest.skip("no C compiler on this machine")
    tiny = torch.tensor([1e-40])
    assert float(tiny * 1.0) != 0.0
