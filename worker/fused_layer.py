"""FusedLayer: a pre-norm decoder layer's step through fused ops, its modules looked up once.

At one stream on a CPU a decode step is mostly Python: each nn.Module call and each submodule or
parameter lookup costs microseconds, and a layer made some thirty of them around nine kernels. A
FusedLayer runs the same kernels in the same order as `DecoderLayer.forward` with deferred
residuals (the logits are bit for bit the same), with every module, weight and flag resolved when
it is built. The attention takes the q/k/v projection's output as it comes (`attend_qkv`): in a
step of decodes on a CPU, RoPE, the cache stores and the attention are one C call. Layers with
anything else (`DecoderLayer.fits_fused_layer`: q/k norms, clipping, a routed MLP) keep their
modules.
"""

from typing import TYPE_CHECKING

import torch
from torch import nn

from worker.attention import QkvLayer, StepAttention
from worker.quantized_linear import Linear, WeightOnlyLinear

if TYPE_CHECKING:
    from worker.fused_ops import FusedOps
    from worker.model import DecoderLayer, RMSNorm, Rotation


class FusedLayer:
    """`DecoderLayer.forward` for a layer whose norms, RoPE and activation are fused ops."""

    __slots__ = (
        "attn_norm",
        "attn_norm_dtype",
        "down",
        "gate_up",
        "heads",
        "mlp_dtype",
        "mlp_norm",
        "mlp_norm_dtype",
        "o_proj",
        "ops",
        "qkv",
    )

    def __init__(self, layer: "DecoderLayer", ops: "FusedOps"):
        attention, mlp = layer.self_attn, layer.mlp
        self.ops = ops
        self.attn_norm: RMSNorm = layer.attn_in  # type: ignore[assignment]
        self.mlp_norm: RMSNorm = layer.mlp_in  # type: ignore[assignment]
        self.attn_norm_dtype = self.attn_norm.out_dtype
        self.mlp_norm_dtype = self.mlp_norm.out_dtype
        self.mlp_dtype: torch.dtype | None = mlp.out_dtype  # type: ignore[assignment]
        # q/k/v as a weight-only kernel gives them (bfloat16, converted exactly where they are
        # read), the attention's output as o_proj takes it.
        self.qkv = _bound(attention.qkv_proj, bfloat16_out=True)
        self.o_proj = _bound(attention.o_proj)
        self.gate_up = _bound(mlp.gate_up_proj)  # type: ignore[arg-type]
        self.down = _bound(mlp.down_proj)  # type: ignore[arg-type]
        weight_only = isinstance(attention.qkv_proj, WeightOnlyLinear)
        self.heads = QkvLayer(
            attention.num_heads,
            attention.num_kv_heads,
            attention.head_dim,
            attention.layer,
            ops,
            torch.bfloat16 if isinstance(attention.o_proj, WeightOnlyLinear) else torch.float32,
            torch.float32 if weight_only else None,
        )

    def __call__(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        rotation: "Rotation",
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        meta: StepAttention,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        ops = self.ops
        normed, hidden = ops.rms_norm(hidden, residual, self.attn_norm, self.attn_norm_dtype)
        attn = meta.attend_qkv(self.qkv(normed), rotation, key_cache, value_cache, self.heads)
        normed, hidden = ops.rms_norm(self.o_proj(attn), hidden, self.mlp_norm, self.mlp_norm_dtype)
        return self.down(ops.silu_and_mul(self.gate_up(normed), self.mlp_dtype)), hidden


def _bound(linear: nn.Module, bfloat16_out: bool = False) -> Linear:
    """The linear's forward without nn.Module's __call__ (hooks, which the model never sets); a
    weight-only one gives bfloat16 where `bfloat16_out` (or its own flag) says."""
    if isinstance(linear, WeightOnlyLinear):
        return linear.bound(bfloat16_out or linear.bfloat16_out)
    return linear.forward
