"""PagedPrefillKernel: the C attention of a step's prompt chunks (built by
`worker.kernels.c_library`), on torch's OpenMP threads. Without a compiler the engine keeps SDPA,
one call a chunk."""

import ctypes
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from worker.kernels.c_library import load_c_library

if TYPE_CHECKING:
    from worker.attention import LayerAttention

_SOURCE = Path(__file__).with_name("paged_prefill_attention.c")
_P = ctypes.c_void_p
_I64 = ctypes.c_int64


@dataclass(frozen=True, slots=True)
class PrefillChunks:
    """A step's prompt chunks as the kernel reads them, made once for every layer."""

    chunks: torch.Tensor  # [num_chunks, 4] int64: row_start, num_new, start_pos, first_key_pos
    block_tables: torch.Tensor  # [num_chunks, max_blocks] int64


class PagedPrefillKernel:
    """Every prompt chunk of a step attended in one call, each query over its own sequence's cache
    (its chunk's keys and values stored there first) and causal within the chunk."""

    def __init__(self, library: ctypes.CDLL):
        self._function = library.paged_prefill_attention
        self._function.restype = ctypes.c_int
        self._function.argtypes = [_P, _I64, _P, _P, _P, _P, _P] + [_I64] * 7 + [ctypes.c_float] * 2

    @classmethod
    def load(cls) -> "PagedPrefillKernel | None":
        """The compiled kernel, or None (with a log line) where it cannot be built."""
        library = load_c_library(_SOURCE, "prefill attention uses SDPA", ("-ffast-math",))
        return None if library is None else cls(library)

    def __call__(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim] float32, heads and dims contiguous
        key_cache: torch.Tensor,  # [num_slots, num_kv_heads * head_dim] float32
        value_cache: torch.Tensor,
        plan: PrefillChunks,
        out: torch.Tensor,  # [num_tokens, num_heads, head_dim] float32, contiguous: the chunks' rows written
        num_kv_heads: int,
        block_size: int,
        layer: "LayerAttention",
    ) -> None:
        _, num_heads, head_dim = q.shape
        assert num_heads % num_kv_heads == 0 and q.stride(2) == 1 and q.stride(1) == head_dim
        assert q.dtype == key_cache.dtype == out.dtype == torch.float32 and out.is_contiguous()
        status = self._function(
            q.data_ptr(),
            q.stride(0),
            key_cache.data_ptr(),
            value_cache.data_ptr(),
            plan.chunks.data_ptr(),
            plan.block_tables.data_ptr(),
            out.data_ptr(),
            plan.chunks.shape[0],
            plan.block_tables.shape[1],
            num_heads,
            num_kv_heads,
            head_dim,
            block_size,
            layer.window or 0,
            layer.scale,
            layer.softcap or 0.0,
        )
        if status != 0:
            raise MemoryError("paged_prefill_attention could not allocate its scratch space")
