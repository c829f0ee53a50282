"""PagedDecodeKernel: the C decode-attention kernel (built by `worker.kernels.c_library`), on
torch's OpenMP threads. Without a compiler the engine falls back to gathering the context and
calling SDPA."""

import ctypes
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from worker.kernels.c_library import load_c_library

if TYPE_CHECKING:
    from worker.attention import LayerAttention


_SOURCE = Path(__file__).with_name("paged_decode_attention.c")
_I64 = ctypes.c_int64


class PagedDecodeKernel:
    """Decode attention read in place from the paged cache, which it first writes the new keys and
    values into."""

    def __init__(self, library: ctypes.CDLL):
        self._function = library.paged_decode_attention
        self._function.restype = ctypes.c_int
        self._function.argtypes = [ctypes.c_void_p] * 9 + [_I64] * 10 + [ctypes.c_float] * 2

    @classmethod
    def load(cls) -> "PagedDecodeKernel | None":
        """The compiled kernel, or None (with a log line) where it cannot be built."""
        library = load_c_library(_SOURCE, "decode attention uses gather + SDPA", ("-ffast-math",))
        return None if library is None else cls(library)

    def __call__(
        self,
        q: torch.Tensor,  # [num_seqs, num_heads, head_dim] float32 on CPU, heads and dims contiguous
        k: torch.Tensor,  # [num_seqs, num_kv_heads * head_dim] new keys, stored before attending
        v: torch.Tensor,  # [num_seqs, num_kv_heads * head_dim] new values
        slots: torch.Tensor,  # [num_seqs] int64, where in the cache they go
        key_cache: torch.Tensor,  # [num_slots, num_kv_heads * head_dim]
        value_cache: torch.Tensor,
        block_tables: torch.Tensor,  # [num_seqs, max_blocks] int64
        context_lens: torch.Tensor,  # [num_seqs] int64
        num_kv_heads: int,
        block_size: int,
        layer: "LayerAttention",
    ) -> torch.Tensor:  # [num_seqs, num_heads, head_dim]
        num_seqs, num_heads, head_dim = q.shape
        assert num_heads % num_kv_heads == 0 and q.stride(2) == 1 and q.stride(1) == head_dim
        assert k.stride(1) == v.stride(1) == 1 and slots.dtype == torch.int64
        out = torch.empty(num_seqs, num_heads, head_dim, dtype=torch.float32)
        status = self._function(
            q.data_ptr(),
            k.data_ptr(),
            v.data_ptr(),
            slots.data_ptr(),
            key_cache.data_ptr(),
            value_cache.data_ptr(),
            block_tables.data_ptr(),
            context_lens.data_ptr(),
            out.data_ptr(),
            num_seqs,
            num_heads,
            q.stride(0),
            k.stride(0),
            v.stride(0),
            num_kv_heads,
            head_dim,
            block_size,
            block_tables.shape[1],
            layer.window or 0,
            layer.scale,
            layer.softcap or 0.0,
        )
        if status != 0:
            raise MemoryError("paged_decode_attention could not allocate its scratch space")
        return out
