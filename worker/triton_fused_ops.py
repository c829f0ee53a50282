"""TritonFusedOps: the launches of worker/kernels/triton_fused.py, for a model whose 16-bit steps
run on CUDA (`CausalLM.use_fused_ops`); the decoder's torch ops stay the reference."""

from typing import TYPE_CHECKING

import torch
import triton

from worker.kernels import triton_fused

if TYPE_CHECKING:
    from worker.model import RMSNorm

_SILU_BLOCK = 1024


class TritonFusedOps:
    """Norms, RoPE and SiLU-and-multiply each as one kernel."""

    rotary_address = None

    def rms_norm(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        norm: "RMSNorm",
        out_dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + x), residual + x) for x, residual: [rows, hidden] (any row stride);
        without a residual, (norm(x), x). Outputs stay in x's dtype."""
        assert out_dtype in (None, x.dtype), "the CUDA model has no weight-only quantized linears"
        rows, width = x.shape
        assert x.stride(1) == 1 and (residual is None or residual.stride(1) == 1)
        if norm.gemma:
            mode = triton_fused.NORM_GEMMA
        elif norm.weight_in_float32:
            mode = triton_fused.NORM_WEIGHT_IN_FLOAT32
        else:
            mode = triton_fused.NORM_LLAMA
        out = torch.empty(rows, width, dtype=x.dtype, device=x.device)
        total = x if residual is None else torch.empty_like(out)
        triton_fused.rms_norm[(rows,)](
            x,
            x if residual is None else residual,
            norm.weight,
            out,
            total,
            x.stride(0),
            x.stride(0) if residual is None else residual.stride(0),
            out.stride(0),
            width,
            norm.eps,
            MODE=mode,
            HAS_RESIDUAL=residual is not None,
            BLOCK=triton.next_power_of_2(width),
        )
        return out, total

    def rotary_(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Rotate q [tokens, heads, head_dim] and k [tokens, kv_heads, head_dim] in place over the
        first cos.shape[-1] dims of each head; cos, sin: [tokens, rotary_dim] rows (halves equal)."""
        tokens, num_q_heads, _ = q.shape
        num_k_heads = k.shape[1]
        assert q.stride(2) == 1 and k.stride(2) == 1 and cos.stride(1) == 1 and cos.stride() == sin.stride()
        half = cos.shape[-1] // 2
        triton_fused.rotary_in_place[(tokens,)](
            q,
            k,
            cos,
            sin,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            cos.stride(0),
            NUM_Q_HEADS=num_q_heads,
            NUM_K_HEADS=num_k_heads,
            HEADS_PAD=triton.next_power_of_2(max(num_q_heads, num_k_heads)),
            HALF=half,
            HALF_PAD=triton.next_power_of_2(half),
        )

    def silu_and_mul(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """x: [rows, 2 * width] = [gate | up]; silu(gate) * up, in x's dtype."""
        assert out_dtype in (None, x.dtype), "the CUDA model has no weight-only quantized linears"
        rows, double = x.shape
        width = double // 2
        assert x.stride(1) == 1
        out = torch.empty(rows, width, dtype=x.dtype, device=x.device)
        grid = (rows, triton.cdiv(width, _SILU_BLOCK))
        triton_fused.silu_and_mul[grid](x, out, x.stride(0), out.stride(0), width, BLOCK=_SILU_BLOCK)
        return out
