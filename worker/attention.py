"""Attention over block tables for one step that mixes prefill chunks and decodes.

Tokens of all sequences are packed into one [num_tokens, ...] batch for the linear layers. For
attention they split in two groups: sequences feeding one token this step (decodes) are batched
into a single SDPA call over their gathered, padded contexts; sequences feeding a chunk run one
SDPA call each, causal within the chunk and over everything before it. Each layer brings its own
`LayerAttention`: its scale, its sliding window (keys a query sees, itself included, as transformers
counts it) and its soft-cap (scores through tanh, which SDPA cannot do, so those layers run eager).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from worker.kernels import PagedDecodeKernel


@dataclass(frozen=True, slots=True)
class LayerAttention:
    """What differs between the attention of two layers over the same cache."""

    scale: float
    window: int | None = None
    softcap: float | None = None


@dataclass(frozen=True, slots=True)
class PrefillChunk:
    """One sequence feeding more than one token: rows [row_start, row_start + num_new) of the batch."""

    row_start: int
    num_new: int
    start_pos: int  # tokens already in the cache before this chunk
    context_slots: (
        torch.Tensor | None
    )  # slots of positions [first_key_pos, start_pos + num_new); None when start_pos == 0
    first_key_pos: int = 0  # blocks before it were released behind the sliding window


@dataclass(frozen=True, slots=True)
class AttentionMetadata:
    """Where this step's K/V go and which cached K/V each query sees; shared by every layer.

    Decodes occupy rows [0, num_decodes) of the packed batch, prefill chunks follow.
    """

    slot_mapping: torch.Tensor  # [num_tokens] cache slot of each new token
    num_decodes: int
    prefills: list[PrefillChunk]
    # Decodes through the C kernel, reading the cache in place:
    decode_kernel: PagedDecodeKernel | None = None
    decode_block_tables: torch.Tensor | None = None  # [num_decodes, max_blocks] int64, padded
    decode_context_lens: torch.Tensor | None = None  # [num_decodes] int64
    block_size: int = 0
    # Decodes through SDPA, over a gathered copy of their contexts:
    decode_slots: torch.Tensor | None = None  # [num_decodes, max_context] slots, padded
    decode_mask: torch.Tensor | None = None  # [num_decodes, 1, 1, max_context] True where a key is visible


def paged_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim], RoPE applied
    k: torch.Tensor,  # [num_tokens, num_kv_heads * head_dim], RoPE applied
    v: torch.Tensor,  # [num_tokens, num_kv_heads * head_dim]
    key_cache: torch.Tensor,  # [num_slots, num_kv_heads * head_dim]
    value_cache: torch.Tensor,
    meta: AttentionMetadata,
    num_kv_heads: int,
    layer: LayerAttention,
) -> torch.Tensor:  # [num_tokens, num_heads * head_dim]
    """Store this step's K/V in the cache, then attend every query to its sequence's context."""
    key_cache.index_copy_(0, meta.slot_mapping, k)
    value_cache.index_copy_(0, meta.slot_mapping, v)
    num_tokens, num_heads, head_dim = q.shape
    out = torch.empty(num_tokens, num_heads, head_dim, dtype=q.dtype, device=q.device)
    if meta.num_decodes and meta.decode_kernel is not None:
        assert meta.decode_block_tables is not None and meta.decode_context_lens is not None
        out[: meta.num_decodes] = meta.decode_kernel(
            q[: meta.num_decodes].contiguous(),
            key_cache,
            value_cache,
            meta.decode_block_tables,
            meta.decode_context_lens,
            num_kv_heads,
            meta.block_size,
            layer,
        )
    elif meta.num_decodes:
        out[: meta.num_decodes] = _decode_attention(
            q[: meta.num_decodes], key_cache, value_cache, meta, num_kv_heads, layer
        )
    for chunk in meta.prefills:
        rows = slice(chunk.row_start, chunk.row_start + chunk.num_new)
        out[rows] = _prefill_attention(
            q[rows], k[rows], v[rows], key_cache, value_cache, chunk, num_kv_heads, layer
        )
    return out.view(num_tokens, num_heads * head_dim)


def _decode_attention(
    q: torch.Tensor,  # [num_decodes, num_heads, head_dim]
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    meta: AttentionMetadata,
    num_kv_heads: int,
    layer: LayerAttention,
) -> torch.Tensor:  # [num_decodes, num_heads, head_dim]
    assert meta.decode_slots is not None and meta.decode_mask is not None
    num_decodes, max_context = meta.decode_slots.shape
    flat = meta.decode_slots.view(-1)
    head_dim = q.shape[-1]
    keys = key_cache.index_select(0, flat).view(num_decodes, max_context, num_kv_heads, head_dim)
    values = value_cache.index_select(0, flat).view(num_decodes, max_context, num_kv_heads, head_dim)
    mask = meta.decode_mask
    if layer.window is not None:
        assert meta.decode_context_lens is not None
        first = (meta.decode_context_lens - layer.window)[:, None, None, None]
        mask = mask & (torch.arange(max_context, device=q.device) >= first)
    out = _attend(
        q.unsqueeze(2),  # [num_decodes, num_heads, 1, head_dim]
        keys.transpose(1, 2),  # [num_decodes, num_kv_heads, max_context, head_dim]
        values.transpose(1, 2),
        mask,
        layer,
    )
    return out.squeeze(2)


def _prefill_attention(
    q: torch.Tensor,  # [num_new, num_heads, head_dim]
    k: torch.Tensor,  # [num_new, num_kv_heads * head_dim]
    v: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    chunk: PrefillChunk,
    num_kv_heads: int,
    layer: LayerAttention,
) -> torch.Tensor:  # [num_new, num_heads, head_dim]
    head_dim = q.shape[-1]
    if chunk.context_slots is None:  # the whole context is this chunk
        keys, values = k, v
    else:
        keys = key_cache.index_select(0, chunk.context_slots)
        values = value_cache.index_select(0, chunk.context_slots)
    mask = None
    if chunk.context_slots is not None or layer.window is not None or layer.softcap is not None:
        query_pos = torch.arange(chunk.start_pos, chunk.start_pos + chunk.num_new, device=q.device)[:, None]
        key_pos = torch.arange(chunk.first_key_pos, chunk.start_pos + chunk.num_new, device=q.device)[None, :]
        mask = key_pos <= query_pos  # [num_new, context]
        if layer.window is not None:
            mask = mask & (key_pos > query_pos - layer.window)
    out = _attend(
        q.transpose(0, 1).unsqueeze(0),  # [1, num_heads, num_new, head_dim]
        keys.view(1, -1, num_kv_heads, head_dim).transpose(1, 2),  # [1, num_kv_heads, context, head_dim]
        values.view(1, -1, num_kv_heads, head_dim).transpose(1, 2),
        mask,
        layer,
    )
    return out[0].transpose(0, 1)


def _attend(
    q: torch.Tensor,  # [batch, num_heads, num_queries, head_dim]
    k: torch.Tensor,  # [batch, num_kv_heads, num_keys, head_dim]
    v: torch.Tensor,
    mask: torch.Tensor | None,  # broadcastable to [batch, num_heads, num_queries, num_keys]; None: causal
    layer: LayerAttention,
) -> torch.Tensor:  # [batch, num_heads, num_queries, head_dim]
    """SDPA, or transformers' eager attention where scores are soft-capped."""
    if layer.softcap is None:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, scale=layer.scale, enable_gqa=True
        )
    assert mask is not None
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) * layer.scale
    scores = torch.tanh(scores / layer.softcap) * layer.softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)
