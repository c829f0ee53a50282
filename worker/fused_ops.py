"""FusedOps: what a device's fused kernels do for the decoder (`CausalLM.use_fused_ops`), each
in one call where torch takes several operations: Triton's on CUDA (worker/triton_fused_ops.py),
C's on a CPU (worker/cpu_fused_ops.py)."""

from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from worker.model import RMSNorm


class FusedOps(Protocol):
    # The address of a C function that does `rotary_` (on float32 pointers, as
    # worker/kernels/cpu_fused_ops.c's rotary_in_place), for a C kernel to call; None elsewhere.
    rotary_address: int | None

    def rms_norm(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        norm: "RMSNorm",
        out_dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + x), residual + x) for x, residual: [rows, hidden] (any row stride);
        without a residual, (norm(x), x). The norm comes out in `out_dtype` where given (bfloat16
        for a weight-only quantized linear on a CPU, which takes nothing else)."""
        ...

    def rotary_(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Rotate q [tokens, heads, head_dim] and k [tokens, kv_heads, head_dim] in place over the
        first cos.shape[-1] dims of each head; cos, sin: [tokens, rotary_dim] rows (halves equal)."""
        ...

    def silu_and_mul(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """x: [rows, 2 * width] = [gate | up]; silu(gate) * up, in `out_dtype` where given."""
        ...
