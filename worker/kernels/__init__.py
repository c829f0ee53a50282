"""PagedDecodeKernel: the C decode-attention kernel (built by `worker.kernels.c_library`), on
torch's OpenMP threads. Without a compiler the engine falls back to gathering the context and
calling SDPA."""

import ctypes
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from worker.kernels.c_library import function_address, load_c_library

if TYPE_CHECKING:
    from worker.attention import LayerAttention, QkvLayer
    from worker.model import Rotation


_SOURCE = Path(__file__).with_name("paged_decode_attention.c")
_P = ctypes.c_void_p
_I64 = ctypes.c_int64


class DecodeStep(ctypes.Structure):
    """`struct decode_step`: a step of decodes, as every layer reads it (the tensors it points
    into are the step plan's, which outlives it)."""

    _fields_ = [("slots", _P), ("block_tables", _P), ("context_lens", _P)] + [
        (name, _I64) for name in ("num_seqs", "max_blocks", "block_size")
    ]


class DecodeLayer(ctypes.Structure):
    """`struct decode_layer`: one layer's heads, RoPE and attention, made once."""

    _fields_ = (
        [("rotary", _P)]
        + [
            (name, _I64)
            for name in ("num_heads", "num_kv_heads", "head_dim", "window", "qkv_bf16", "out_bf16")
        ]
        + [("scale", ctypes.c_float), ("softcap", ctypes.c_float)]
    )


class PagedDecodeKernel:
    """Decode attention read in place from the paged cache, which it first writes the new keys and
    values into."""

    def __init__(self, library: ctypes.CDLL):
        self._function = library.paged_decode_attention
        self._function.restype = ctypes.c_int
        self._function.argtypes = [_P] * 9 + [_I64] * 10 + [ctypes.c_float] * 2
        self._layer_function = library.decode_layer_attention
        self._layer_function.restype = ctypes.c_int
        self._layer_function.argtypes = [ctypes.POINTER(DecodeStep), ctypes.POINTER(DecodeLayer), _P, _I64]
        self._layer_function.argtypes += [_P, _P, _I64, _I64, _P, _P, _P]

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

    @staticmethod
    def step(
        slots: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int
    ) -> DecodeStep:
        """A step whose every row is a decode, for `attend_layer` (slots, block tables and context
        lengths as `__call__` takes them)."""
        assert slots.dtype == block_tables.dtype == context_lens.dtype == torch.int64
        return DecodeStep(
            slots.data_ptr(),
            block_tables.data_ptr(),
            context_lens.data_ptr(),
            slots.shape[0],
            block_tables.shape[1],
            block_size,
        )

    @staticmethod
    def layer(heads: "QkvLayer", qkv_bf16: bool) -> DecodeLayer:
        """`heads` as `decode_layer_attention` reads them, q/k/v coming in bfloat16 or float32."""
        assert heads.rotary_address is not None
        return DecodeLayer(
            heads.rotary_address,
            heads.num_heads,
            heads.num_kv_heads,
            heads.head_dim,
            heads.layer.window or 0,
            qkv_bf16,
            heads.out_dtype == torch.bfloat16,
            heads.layer.scale,
            heads.layer.softcap or 0.0,
        )

    @property
    def layer_function_address(self) -> int:
        """`decode_layer_attention`'s address, for a C caller (worker/decode_layers.py)."""
        return function_address(self._layer_function)

    def attend_layer(
        self,
        step: DecodeStep,
        heads: "QkvLayer",
        qkv: torch.Tensor,  # [num_seqs, q | k | v] the projection's output, float32 or bfloat16
        rotation: "Rotation",
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
    ) -> torch.Tensor:  # [num_seqs, num_heads * head_dim] in heads.out_dtype
        """RoPE, the new keys and values stored, and `__call__`'s attention, in one call."""
        assert heads.rotary_address is not None and qkv.stride(1) == 1
        layer = heads.prepared
        if layer is None:
            layer = heads.prepared = self.layer(heads, qkv.dtype == torch.bfloat16)
        assert qkv.dtype == (torch.bfloat16 if layer.qkv_bf16 else torch.float32)
        cos = rotation.cos
        out = torch.empty(qkv.shape[0], heads.num_heads * heads.head_dim, dtype=heads.out_dtype)
        status = self._layer_function(
            step,
            layer,
            qkv.data_ptr(),
            qkv.stride(0),
            cos.data_ptr(),
            rotation.sin.data_ptr(),
            cos.shape[1],
            cos.stride(0),
            key_cache.data_ptr(),
            value_cache.data_ptr(),
            out.data_ptr(),
        )
        if status != 0:
            raise MemoryError("decode_layer_attention could not allocate its scratch space")
        return out
