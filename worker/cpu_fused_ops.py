"""CpuFusedOps: the functions of worker/kernels/cpu_fused_ops.c, for a model on a CPU in float32
(`CausalLM.use_fused_ops`). At one stream a step is mostly the dispatch of small torch operations;
these do a norm, RoPE or the activation in one call each, on torch's OpenMP threads."""

import ctypes
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from worker.kernels.c_library import function_address, load_c_library

if TYPE_CHECKING:
    from worker.model import RMSNorm

_SOURCE = Path(__file__).with_name("kernels") / "cpu_fused_ops.c"
_P = ctypes.c_void_p
_I64 = ctypes.c_int64
NORM_PLAIN, NORM_GEMMA = 0, 1  # rms_norm's modes


class CpuFusedOps:
    """`FusedOps` in float32 (the norm and the activation also in and out of bfloat16), one C call
    each. RoPE rounds as torch does; the norm and the activation do not (another summation order,
    libm's exp)."""

    def __init__(self, library: ctypes.CDLL):
        self._rotary = library.rotary_in_place
        self.rotary_address: int | None = function_address(self._rotary)
        self._rotary.restype = None
        self._rotary.argtypes = [_P] * 4 + [_I64] * 8
        self._rms_norm = library.rms_norm
        self._rms_norm.restype = None
        self._rms_norm.argtypes = [_P, _I64, _P, _P, _P, _I64, _P] + [_I64] * 5 + [ctypes.c_float, _I64]
        self._silu_and_mul = library.silu_and_mul
        self._silu_and_mul.restype = None
        self._silu_and_mul.argtypes = [_P, _I64, _P] + [_I64] * 4
        # for a C caller that runs whole layers (worker/decode_layers.py)
        self.rms_norm_address = function_address(self._rms_norm)
        self.silu_and_mul_address = function_address(self._silu_and_mul)

    @classmethod
    def load(cls) -> "CpuFusedOps | None":
        """The compiled functions, or None (with a log line) where they cannot be built."""
        library = load_c_library(
            _SOURCE, "norms, RoPE and activations stay torch operations", ("-ffp-contract=off",)
        )
        return None if library is None else cls(library)

    def rms_norm(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        norm: "RMSNorm",
        out_dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows, width = x.shape
        x_bf16 = _is_bf16(x)
        assert x.stride(1) == 1 and (residual is None or residual.stride(1) == 1)
        out = torch.empty(rows, width, dtype=out_dtype or torch.float32)
        total = x if residual is None and not x_bf16 else torch.empty(rows, width)
        self._rms_norm(
            x.data_ptr(),
            x_bf16,
            None if residual is None else residual.data_ptr(),
            norm.weight.data_ptr(),
            out.data_ptr(),
            _is_bf16(out),
            total.data_ptr(),
            rows,
            width,
            x.stride(0),
            0 if residual is None else residual.stride(0),
            width,
            norm.eps,
            NORM_GEMMA if norm.gemma else NORM_PLAIN,
        )
        return out, total

    def rotary_(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        tokens, num_q_heads, head_dim = q.shape
        assert q.dtype == k.dtype == cos.dtype == torch.float32
        assert q.stride()[1:] == k.stride()[1:] == (head_dim, 1)
        assert cos.stride(1) == 1 and cos.stride() == sin.stride()
        self._rotary(
            q.data_ptr(),
            k.data_ptr(),
            cos.data_ptr(),
            sin.data_ptr(),
            tokens,
            num_q_heads,
            k.shape[1],
            q.stride(0),
            k.stride(0),
            head_dim,
            cos.shape[-1],
            cos.stride(0),
        )

    def silu_and_mul(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        rows, double = x.shape
        assert x.stride(1) == 1
        out = torch.empty(rows, double // 2, dtype=out_dtype or torch.float32)
        self._silu_and_mul(
            x.data_ptr(), _is_bf16(x), out.data_ptr(), _is_bf16(out), rows, double // 2, x.stride(0)
        )
        return out


def _is_bf16(t: torch.Tensor) -> bool:
    """Whether the C functions read or write `t` as bfloat16 (else float32, asserted)."""
    if t.dtype == torch.bfloat16:
        return True
    assert t.dtype == torch.float32, t.dtype
    return False
