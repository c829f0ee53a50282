"""The Triton attention backend: a step's K/V stored and every query attended in place, two launches
per layer whatever the mix of decodes and prefill chunks (worker/kernels/triton_paged.py).

Built for CUDA; on a CPU the kernels run in Triton's interpreter, when TRITON_INTERPRET=1 was set
before triton was imported (tests only: slow)."""

from dataclasses import dataclass

import torch
import triton

from worker.attention import (
    AttentionBackend,
    LayerAttention,
    SequenceRows,
    StepAttention,
    padded_block_tables,
)
from worker.kernels import triton_paged

_DECODE_TILE = 16  # rows of a decode tile: its query heads, padded (a product needs 16)
_PREFILL_TILE = 64
_DECODE_KEYS = 32
_PREFILL_KEYS = 64
# Heads of 512 bytes or more (256 dims in 16 bits, 128 in float32) take 32-row tiles: the K and V
# tiles of a few pipeline stages must fit in shared memory, and the accumulator in registers.
_WIDE_HEAD_BYTES = 512
_WIDE_TILE = 32


@dataclass(frozen=True, slots=True)
class TritonStepAttention(StepAttention):
    """Sequence s owns rows [query_start[s], query_start[s+1]), its last at position seq_lens[s] - 1."""

    block_size: int
    slot_mapping: torch.Tensor  # [num_tokens] int64; -1: a padding row, stored nowhere
    query_start: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    max_q_len: int

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
        width = key_cache.shape[1]
        assert k.stride(1) == 1 and v.stride(1) == 1 and q.stride(2) == 1
        triton_paged.store_kv[(num_tokens,)](
            k,
            v,
            key_cache,
            value_cache,
            self.slot_mapping,
            k.stride(0),
            v.stride(0),
            key_cache.stride(0),
            WIDTH=width,
            WIDTH_PAD=triton.next_power_of_2(width),
        )
        group = num_heads // num_kv_heads
        decode_only = self.max_q_len == 1
        head_pad = max(16, triton.next_power_of_2(head_dim))
        wide = head_pad * q.element_size() >= _WIDE_HEAD_BYTES
        tile = _DECODE_TILE if decode_only else _WIDE_TILE if wide else _PREFILL_TILE
        block_m = max(tile, triton.next_power_of_2(group))
        block_n = _WIDE_TILE if wide else _DECODE_KEYS if decode_only else _PREFILL_KEYS
        block_q = block_m // group
        out = torch.empty_like(q)
        grid = (self.seq_lens.shape[0], triton.cdiv(self.max_q_len, block_q), num_kv_heads)
        triton_paged.paged_attention[grid](
            q,
            out,
            key_cache,
            value_cache,
            self.block_tables,
            self.query_start,
            self.seq_lens,
            q.stride(0),
            q.stride(1),
            out.stride(0),
            out.stride(1),
            key_cache.stride(0),
            self.block_tables.stride(0),
            layer.scale,
            layer.softcap or 0.0,
            layer.window or 0,
            GROUP=group,
            HEAD_DIM=head_dim,
            HEAD_PAD=head_pad,
            BLOCK_SIZE=self.block_size,
            BLOCK_M=block_m,
            BLOCK_Q=block_q,
            BLOCK_N=block_n,
            HAS_SOFTCAP=layer.softcap is not None,
            HAS_WINDOW=layer.window is not None,
            PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # tf32: the default, unused in 16 bits
        )
        return out.view(num_tokens, num_heads * head_dim)


class TritonAttention(AttentionBackend):
    """Any order of sequences; a step's metadata is four small tensors."""

    name = "triton"

    def __init__(self, block_size: int, device: torch.device):
        if device.type != "cuda" and not triton.knobs.runtime.interpret:
            raise ValueError("the Triton attention backend runs on CUDA, or in Triton's interpreter")
        super().__init__(block_size, device)

    def plan(self, seqs: list[SequenceRows], slot_mapping: list[int]) -> TritonStepAttention:
        query_start = [0]
        for seq in seqs:
            assert seq.row_start == query_start[-1], "a sequence's rows follow the one before"
            query_start.append(seq.row_start + seq.num_new)
        return self.step(
            slot_mapping,
            query_start,
            [seq.context_len for seq in seqs],
            padded_block_tables(seqs, self.block_size),
            max(seq.num_new for seq in seqs),
        )

    def step(
        self,
        slot_mapping: list[int] | torch.Tensor,
        query_start: list[int] | torch.Tensor,
        seq_lens: list[int] | torch.Tensor,
        block_tables: list[list[int]] | torch.Tensor,
        max_q_len: int,
    ) -> TritonStepAttention:
        """A plan from host lists, or over tensors that stay put (a CUDA graph's inputs)."""

        def on_device(values: list[int] | list[list[int]] | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
            return values if isinstance(values, torch.Tensor) else self.tensor(values, dtype)

        return TritonStepAttention(
            self.block_size,
            on_device(slot_mapping, torch.long),
            on_device(query_start, torch.int32),
            on_device(seq_lens, torch.int32),
            on_device(block_tables, torch.int32),
            max_q_len,
        )
