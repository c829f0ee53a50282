"""The CPU attention backend: C kernels reading the paged cache in place (or SDPA) for prefill
chunks and for decodes.

Sequences feeding one token this step (decodes, and each draft row after one) are batched into one
call over the cache. Sequences feeding a chunk, causal within the chunk and over everything before
it, run all in one call of the prefill kernel, or one SDPA call each over a gathered copy of their
context. Without the kernels, soft-capped layers run eager (SDPA cannot put scores through tanh).
"""

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from scheduler import RELEASED
from worker.attention import AttentionBackend, LayerAttention, QkvLayer, SequenceRows, StepAttention
from worker.kernels import DecodeStep, PagedDecodeKernel
from worker.kernels.prefill import PagedPrefillKernel, PrefillChunks

if TYPE_CHECKING:
    from worker.model import Rotation


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
    # Where start_pos > 0, the causal mask as SDPA adds it (0 or -inf, float32): made once a step
    # for every layer, where SDPA would make it from a bool mask in each
    causal_mask: torch.Tensor | None = None


@dataclass(frozen=True, slots=True)
class CpuStepAttention(StepAttention):
    """Decodes occupy rows [0, num_decodes) of the packed batch, prefill chunks follow."""

    slot_mapping: torch.Tensor  # [num_tokens] cache slot of each new token
    num_decodes: int
    prefills: list[PrefillChunk]
    decode_context_lens: torch.Tensor | None = None  # [num_decodes] int64
    # Decodes through the C kernel, reading the cache in place:
    decode_kernel: PagedDecodeKernel | None = None
    decode_block_tables: torch.Tensor | None = None  # [num_decodes, max_blocks] int64, padded
    block_size: int = 0
    decode_step: DecodeStep | None = None  # every row a decode: the kernel's view of the step
    # Decodes through SDPA, over a gathered copy of their contexts:
    decode_slots: torch.Tensor | None = None  # [num_decodes, max_context] slots, padded
    decode_mask: torch.Tensor | None = None  # [num_decodes, 1, 1, max_context] True where a key is visible
    # Prefill chunks through the C kernel, all in one call (prefills is then empty):
    prefill_kernel: PagedPrefillKernel | None = None
    prefill_chunks: PrefillChunks | None = None

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        num_kv_heads: int,
        layer: LayerAttention,
    ) -> torch.Tensor:
        num_tokens, num_heads, head_dim = q.shape
        if self.num_decodes == num_tokens and self.decode_kernel is not None:  # nothing to assemble
            return self._kernel_decodes(q, k, v, key_cache, value_cache, num_kv_heads, layer).view(
                num_tokens, -1
            )
        stored = self.num_decodes if self.decode_kernel is not None else 0  # the kernel stores its own
        key_cache.index_copy_(0, self.slot_mapping[stored:], k[stored:])
        value_cache.index_copy_(0, self.slot_mapping[stored:], v[stored:])
        out = torch.empty(num_tokens, num_heads, head_dim, dtype=q.dtype, device=q.device)
        if self.num_decodes and self.decode_kernel is not None:
            decodes = slice(0, self.num_decodes)
            out[decodes] = self._kernel_decodes(
                q[decodes], k[decodes], v[decodes], key_cache, value_cache, num_kv_heads, layer
            )
        elif self.num_decodes:
            out[: self.num_decodes] = _decode_attention(
                q[: self.num_decodes], key_cache, value_cache, self, num_kv_heads, layer
            )
        if self.prefill_chunks is not None:
            assert self.prefill_kernel is not None
            self.prefill_kernel(
                q, key_cache, value_cache, self.prefill_chunks, out, num_kv_heads, self.block_size, layer
            )
        for chunk in self.prefills:  # SDPA's fast path wants whole rows (q/k/v may be views of one)
            rows = slice(chunk.row_start, chunk.row_start + chunk.num_new)
            out[rows] = _prefill_attention(
                *(t[rows].contiguous() for t in (q, k, v)), key_cache, value_cache, chunk, num_kv_heads, layer
            )
        return out.view(num_tokens, num_heads * head_dim)

    def attend_qkv(
        self,
        qkv: torch.Tensor,
        rotation: "Rotation",
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        heads: QkvLayer,
    ) -> torch.Tensor:
        """Every row a decode, with RoPE in C: the kernel does it all in one call. (A slots
        dataclass has no zero-argument super().)"""
        if self.decode_step is None or heads.rotary_address is None:
            return StepAttention.attend_qkv(self, qkv, rotation, key_cache, value_cache, heads)
        assert self.decode_kernel is not None
        return self.decode_kernel.attend_layer(self.decode_step, heads, qkv, rotation, key_cache, value_cache)

    def _kernel_decodes(
        self,
        q: torch.Tensor,  # [num_decodes, num_heads, head_dim]
        k: torch.Tensor,  # [num_decodes, num_kv_heads * head_dim]
        v: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        num_kv_heads: int,
        layer: LayerAttention,
    ) -> torch.Tensor:
        assert self.decode_kernel is not None
        assert self.decode_block_tables is not None and self.decode_context_lens is not None
        return self.decode_kernel(
            q,
            k,
            v,
            self.slot_mapping[: self.num_decodes],
            key_cache,
            value_cache,
            self.decode_block_tables,
            self.decode_context_lens,
            num_kv_heads,
            self.block_size,
            layer,
        )


class CpuAttention(AttentionBackend):
    """Decodes first in the packed batch (the runner orders them so), then prefill chunks."""

    name = "cpu"

    def __init__(
        self,
        block_size: int,
        device: torch.device,
        decode_kernel: PagedDecodeKernel | None = None,
        prefill_kernel: PagedPrefillKernel | None = None,
    ):
        super().__init__(block_size, device)
        self.decode_kernel = decode_kernel
        self.prefill_kernel = prefill_kernel
        self._offsets = torch.arange(block_size, device=device)

    def describe(self) -> str:
        """Which attention runs in C: a kernel left out for want of a compiler or for the dtype shows
        in the log of what users run, not only in tests."""
        prefill = "sdpa" if self.prefill_kernel is None else "c"
        decode = "sdpa" if self.decode_kernel is None else "c"
        return f"{self.name}(prefill={prefill},decode={decode})"

    def plan(self, seqs: list[SequenceRows], slot_mapping: list[int]) -> CpuStepAttention:
        decode_rows = [
            (seq.block_ids, pos + 1)
            for seq in seqs
            if seq.is_decode
            for pos in range(seq.start_pos, seq.context_len)
        ]
        chunk_seqs = [seq for seq in seqs if not seq.is_decode]
        assert all(seq.row_start >= len(decode_rows) for seq in chunk_seqs), "decodes come first"
        step = CpuStepAttention(self.tensor(slot_mapping), len(decode_rows), [], block_size=self.block_size)
        if chunk_seqs and self.prefill_kernel is not None:
            step = dataclasses.replace(
                step, prefill_kernel=self.prefill_kernel, prefill_chunks=self._prefill_chunks(chunk_seqs)
            )
        elif chunk_seqs:
            step = dataclasses.replace(step, prefills=[self._prefill_chunk(seq) for seq in chunk_seqs])
        return self._with_decode_context(step, decode_rows) if decode_rows else step

    def _prefill_chunks(self, seqs: list[SequenceRows]) -> PrefillChunks:
        """The chunks as the kernel reads them: each one's rows and first visible key, and its blocks
        up to its context (a block released behind the window lies before that key: never read)."""
        tables = [self._context_blocks(seq.block_ids, seq.context_len) for seq in seqs]
        chunks = [
            [seq.row_start, seq.num_new, seq.start_pos, _first_held(table) * self.block_size]
            for seq, table in zip(seqs, tables, strict=True)
        ]
        return PrefillChunks(self.tensor(chunks), self._padded(tables))

    def _context_blocks(self, block_ids: list[int], context_len: int) -> list[int]:
        """The sequence's blocks up to its context's end."""
        return block_ids[: -(-context_len // self.block_size)]

    def _padded(self, tables: list[list[int]]) -> torch.Tensor:
        """Block tables as one [num_seqs, max_blocks] tensor; the padding is never read."""
        width = max(len(table) for table in tables)
        return self.tensor([table + [0] * (width - len(table)) for table in tables])

    def _context_slots(self, block_ids: list[int], context_len: int) -> tuple[torch.Tensor, int]:
        """Slots of the context from its first block still held (the ones before it were released
        behind the sliding window), and the position of the first of them."""
        held = self._context_blocks(block_ids, context_len)
        first = _first_held(held)
        blocks = self.tensor(held[first:])
        first_pos = first * self.block_size
        return (blocks[:, None] * self.block_size + self._offsets).view(-1)[
            : context_len - first_pos
        ], first_pos

    def _prefill_chunk(self, seq: SequenceRows) -> PrefillChunk:
        if not seq.start_pos:
            return PrefillChunk(seq.row_start, seq.num_new, 0, None)
        slots, first_pos = self._context_slots(seq.block_ids, seq.context_len)
        query_pos, key_pos = _positions(seq.start_pos, seq.num_new, first_pos, self.device)
        causal = torch.zeros(seq.num_new, seq.context_len - first_pos, device=self.device)
        causal.masked_fill_(key_pos > query_pos, float("-inf"))
        return PrefillChunk(seq.row_start, seq.num_new, seq.start_pos, slots, first_pos, causal)

    def _with_decode_context(
        self, step: CpuStepAttention, decodes: list[tuple[list[int], int]]
    ) -> CpuStepAttention:
        """Block tables and context lengths of the decode rows (a block table and the keys its
        query sees, each), for the kernel or for SDPA."""
        context_lens = [context_len for _, context_len in decodes]
        table = self._padded(
            [self._context_blocks(block_ids, context_len) for block_ids, context_len in decodes]
        )
        if self.decode_kernel is not None:
            lens = self.tensor(context_lens)
            only_decodes = step.num_decodes == len(step.slot_mapping)
            return dataclasses.replace(
                step,
                decode_kernel=self.decode_kernel,
                decode_block_tables=table,
                decode_context_lens=lens,
                decode_step=self.decode_kernel.step(step.slot_mapping, table, lens, self.block_size)
                if only_decodes
                else None,
            )
        max_context = max(context_lens)
        held = table.clamp(min=0)  # a released block is outside every window: masked, any block will do
        slots = (held[:, :, None] * self.block_size + self._offsets).view(len(decodes), -1)[:, :max_context]
        visible = torch.arange(max_context, device=self.device)[None, :] < self.tensor(context_lens)[:, None]
        return dataclasses.replace(
            step,
            decode_slots=slots.contiguous(),
            decode_mask=visible[:, None, None, :],
            decode_context_lens=self.tensor(context_lens),
        )


def _decode_attention(
    q: torch.Tensor,  # [num_decodes, num_heads, head_dim]
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    meta: CpuStepAttention,
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
    plain = layer.window is None and layer.softcap is None
    if plain and chunk.causal_mask is not None and chunk.causal_mask.dtype == q.dtype:
        mask = chunk.causal_mask
    elif chunk.context_slots is not None or not plain:
        query_pos, key_pos = _positions(chunk.start_pos, chunk.num_new, chunk.first_key_pos, q.device)
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


def _positions(
    start_pos: int, num_new: int, first_key_pos: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """A chunk's query positions [num_new, 1] and the positions of the keys it reads [1, context]."""
    end = start_pos + num_new
    return torch.arange(start_pos, end, device=device)[:, None], torch.arange(
        first_key_pos, end, device=device
    )[None, :]


def _attend(
    q: torch.Tensor,  # [batch, num_heads, num_queries, head_dim]
    k: torch.Tensor,  # [batch, num_kv_heads, num_keys, head_dim]
    v: torch.Tensor,
    mask: torch.Tensor | None,  # [.., num_queries, num_keys] bool, or added (SDPA only); None: causal
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


def _first_held(blocks: list[int]) -> int:
    """Index of the first block still held: the ones before it were released behind the window."""
    return next((i for i, block in enumerate(blocks) if block != RELEASED), len(blocks))
