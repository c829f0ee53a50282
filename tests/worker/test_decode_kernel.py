"""The C decode-attention kernel agrees with SDPA over a gathered context."""

import pytest
import torch
import torch.nn.functional as F

from worker.kernels import PagedDecodeKernel


def reference(q, key_cache, value_cache, tables, lens, num_kv_heads, block_size):  # type: ignore[no-untyped-def]
    num_seqs, _, head_dim = q.shape
    max_len = int(lens.max())
    slots = (tables[:, :, None] * block_size + torch.arange(block_size)).view(num_seqs, -1)[:, :max_len]
    keys = key_cache.index_select(0, slots.reshape(-1)).view(num_seqs, max_len, num_kv_heads, head_dim)
    values = value_cache.index_select(0, slots.reshape(-1)).view(num_seqs, max_len, num_kv_heads, head_dim)
    mask = (torch.arange(max_len)[None, :] < lens[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask, enable_gqa=True
    )
    return out.squeeze(2)


@pytest.mark.parametrize(
    ("num_threads", "num_heads", "num_kv_heads"), [(1, 9, 3), (2, 9, 3), (2, 8, 8), (2, 4, 1)]
)
def test_kernel_matches_sdpa_over_gathered_blocks(
    num_threads: int, num_heads: int, num_kv_heads: int
) -> None:
    kernel = PagedDecodeKernel.load()
    if kernel is None:
        pytest.skip("no C compiler on this machine")
    torch.manual_seed(num_threads)
    block_size, num_blocks, head_dim = 4, 64, 16
    key_cache = torch.randn(num_blocks * block_size, num_kv_heads * head_dim)
    value_cache = torch.randn(num_blocks * block_size, num_kv_heads * head_dim)
    lens = torch.tensor([1, 4, 5, 17, 30, 2, 9])  # partial and full last blocks
    tables = torch.stack([torch.randperm(num_blocks)[:8] for _ in lens])
    q = torch.randn(len(lens), num_heads, head_dim)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        out = kernel(q, key_cache, value_cache, tables, lens, num_kv_heads, block_size)
    finally:
        torch.set_num_threads(threads_before)
    expected = reference(q, key_cache, value_cache, tables, lens, num_kv_heads, block_size)
    torch.testing.assert_close(out, expected)
