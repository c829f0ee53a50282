"""The attention backend seam: store a step's new K/V in the paged cache and attend every query.

A step packs the rows of all its sequences into one batch for the linear layers; each sequence
brings its rows, its block table and how many of its tokens the cache already holds. A backend
plans the step once (`plan`, shared by every layer) and the plan runs each layer's attention.
Backends: `cpu` (SDPA, and the C decode kernel reading the cache in place) and `triton` (one
kernel for the whole step, in place, on CUDA).
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from worker.fused_ops import FusedOps
    from worker.model import Rotation


@dataclass(frozen=True, slots=True)
class LayerAttention:
    """What differs between the attention of two layers over the same cache."""

    scale: float
    window: int | None = None  # keys a query sees, itself included, as transformers counts it
    softcap: float | None = None  # scores through tanh


@dataclass(slots=True, eq=False)
class QkvLayer:
    """A layer's q/k/v projection output as its attention takes it: [tokens, q | k | v], RoPE by
    `ops`, the output in `out_dtype` (what the output projection takes)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    layer: LayerAttention
    ops: "FusedOps"
    out_dtype: torch.dtype
    # q/k/v as RoPE and the cache take them where the projection hands over another dtype (a
    # weight-only kernel's bfloat16 in a float32 model); None: as they come
    qkv_dtype: torch.dtype | None = None
    prepared: Any = None  # a backend's own form of the above, made on its first use

    @property
    def sizes(self) -> list[int]:
        kv_size = self.num_kv_heads * self.head_dim
        return [self.num_heads * self.head_dim, kv_size, kv_size]

    @property
    def rotary_address(self) -> int | None:
        return self.ops.rotary_address


@dataclass(frozen=True, slots=True)
class SequenceRows:
    """One sequence's rows of the packed batch, in order: rows [row_start, row_start + num_new)."""

    block_ids: list[int]  # its block table (RELEASED behind a sliding window)
    start_pos: int  # tokens already in the cache; its rows are positions start_pos..context_len-1
    num_new: int
    row_start: int
    checks_drafts: bool = False  # a decode and the drafts after it

    @property
    def context_len(self) -> int:
        return self.start_pos + self.num_new

    @property
    def is_decode(self) -> bool:
        """Every row a query of its own over the cache: a decode, or one with its drafts."""
        return self.num_new == 1 or self.checks_drafts


def padded_block_tables(seqs: list[SequenceRows], block_size: int) -> list[list[int]]:
    """Each sequence's blocks up to its context, padded with block 0 to the widest (padding is
    never read: a sequence's length bounds its keys)."""
    tables = [seq.block_ids[: -(-seq.context_len // block_size)] for seq in seqs]
    width = max(len(table) for table in tables)
    return [table + [0] * (width - len(table)) for table in tables]


class StepAttention(ABC):
    """One step's plan: where its K/V go and which cached keys each query sees."""

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim], RoPE applied
        k: torch.Tensor,  # [num_tokens, num_kv_heads * head_dim], RoPE applied
        v: torch.Tensor,  # [num_tokens, num_kv_heads * head_dim]
        key_cache: torch.Tensor,  # [num_slots, num_kv_heads * head_dim]
        value_cache: torch.Tensor,
        num_kv_heads: int,
        layer: LayerAttention,
    ) -> torch.Tensor:  # [num_tokens, num_heads * head_dim]
        """Store this step's K/V in the cache, then attend every query to its sequence's context."""

    def attend_qkv(
        self,
        qkv: torch.Tensor,  # [num_tokens, q | k | v], float32 or bfloat16
        rotation: "Rotation",
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        heads: QkvLayer,
    ) -> torch.Tensor:  # [num_tokens, num_heads * head_dim]
        """`forward` from the q/k/v projection's output, RoPE first (a backend may do all of it in
        one call)."""
        num_tokens = qkv.shape[0]
        if heads.qkv_dtype is not None:
            qkv = qkv.to(heads.qkv_dtype)
        q, k, v = qkv.split_with_sizes(heads.sizes, dim=-1)
        q = q.view(num_tokens, heads.num_heads, heads.head_dim)
        heads.ops.rotary_(
            q, k.view(num_tokens, heads.num_kv_heads, heads.head_dim), rotation.cos, rotation.sin
        )
        return self.forward(q, k, v, key_cache, value_cache, heads.num_kv_heads, heads.layer)


class AttentionBackend(ABC):
    """Turns a step's sequences into the plan every layer runs."""

    name: str

    def __init__(self, block_size: int, device: torch.device):
        self.block_size = block_size
        self.device = device

    def describe(self) -> str:
        """The backend as the worker's engine-ready line names it."""
        return self.name

    @abstractmethod
    def plan(self, seqs: list[SequenceRows], slot_mapping: list[int]) -> StepAttention:
        """`seqs` in row order, covering every row; `slot_mapping`: each row's cache slot."""

    def tensor(self, values: list[int] | list[list[int]], dtype: torch.dtype = torch.long) -> torch.Tensor:
        """Host lists onto the backend's device, one copy each."""
        return torch.tensor(values, dtype=dtype, device=self.device)
