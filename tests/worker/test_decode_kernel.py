"""The C decode-attention kernel agrees with eager attention over a gathered context, with and
without a sliding window and a soft-cap."""

import pytest
import torch

from worker.attention import LayerAttention
from worker.cpu_fused_ops import CpuFusedOps
from worker.kernels import PagedDecodeKernel


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
@pytest.mark.parametrize("lens", [[1, 4, 5, 17, 30, 2, 9], [23]])  # partial and full last blocks; one
def test_kernel_matches_eager_attention_over_gathered_blocks(
    num_threads: int,
    num_heads: int,
    num_kv_heads: int,
    window: int | None,
    softcap: float | None,
    lens: list[int],
) -> None:
    """Fewer sequences than threads (one stream) split by KV head; q, k and v are strided views,
    as the q/k/v projection's output is, and each new key and value lands in its slot (the last
    visible position) before the query reads it."""
    kernel = PagedDecodeKernel.load()
    if kernel is None:
        pytest.skip("no C compiler on this machine")
    torch.manual_seed(num_threads)
    block_size, num_blocks, head_dim = 4, 64, 16
    key_cache = torch.randn(num_blocks * block_size, num_kv_heads * head_dim)
    value_cache = torch.randn(num_blocks * block_size, num_kv_heads * head_dim)
    tables = torch.stack([torch.randperm(num_blocks)[:8] for _ in lens])
    qkv = torch.randn(len(lens), num_heads + 2 * num_kv_heads, head_dim)
    q = qkv[:, :num_heads]
    k, v = (t.reshape(len(lens), -1) for t in qkv[:, num_heads:].split(num_kv_heads, dim=1))
    context_lens = torch.tensor(lens)
    slots = tables[torch.arange(len(lens)), (context_lens - 1) // block_size] * block_size
    slots += (context_lens - 1) % block_size
    layer = LayerAttention(scale=0.3, window=window, softcap=softcap)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        out = kernel(
            q, k, v, slots, key_cache, value_cache, tables, context_lens, num_kv_heads, block_size, layer
        )
    finally:
        torch.set_num_threads(threads_before)
    assert torch.equal(key_cache[slots], k) and torch.equal(value_cache[slots], v)
    expected = reference(q, key_cache, value_cache, tables, context_lens, num_kv_heads, block_size, layer)
    torch.testing.assert_close(out, expected)


def test_loading_the_c_kernels_keeps_subnormal_floats() -> None:
    """The decode kernel is compiled with -ffast-math; linked with it, its library would flush
    subnormals to zero in the whole process (torch's float32 too) once loaded."""
    if PagedDecodeKernel.load() is None or CpuFusedOps.load() is None:
        pytest.skip("no C compiler on this machine")
    tiny = torch.tensor([1e-40])
    assert float(tiny * 1.0) != 0.0
