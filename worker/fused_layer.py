"""FusedLayer: a pre-norm decoder layer's step through fused ops, its modules looked up once.

At one stream on a CPU a decode step is mostly Python: each nn.Module call and each submodule or
parameter lookup costs microseconds, and a layer made some thirty of them around nine kernels. A
FusedLayer runs the same kernels in the same order as `DecoderLayer.forward` with deferred
residuals (the logits are bit for bit the same), with every module, weight and flag resolved when
it is built. Layers with anything else (`DecoderLayer.fits_fused_layer`: q/k norms, clipping,
a routed MLP) keep their modules.
"""

from typing import TYPE_CHECKING

import torch
from torch import nn

from worker.attention import LayerAttention, StepAttention
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
        "head_dim",
        "layer",
        "mlp_dtype",
        "mlp_norm",
        "mlp_norm_dtype",
        "num_heads",
        "num_kv_heads",
        "o_proj",
        "ops",
        "qkv",
        "sizes",
    )

    def __init__(self, layer: "DecoderLayer", ops: "FusedOps"):
        attention, mlp = layer.self_attn, layer.mlp
        self.ops = ops
        self.attn_norm: RMSNorm = layer.attn_in  # type: ignore[assignment]
        self.mlp_norm: RMSNorm = layer.mlp_in  # type: ignore[assignment]
        self.attn_norm_dtype = self.attn_norm.out_dtype
        self.mlp_norm_dtype = self.mlp_norm.out_dtype
        self.mlp_dtype: torch.dtype | None = mlp.out_dtype  # type: ignore[assignment]
        self.qkv = _bound(attention.qkv_proj)
        self.o_proj = _bound(attention.o_proj)
        self.gate_up = _bound(mlp.gate_up_proj)  # type: ignore[arg-type]
        self.down = _bound(mlp.down_proj)  # type: ignore[arg-type]
        self.num_heads = attention.num_heads
        self.num_kv_heads = attention.num_kv_heads
        self.head_dim = attention.head_dim
        self.sizes = [attention.q_size, attention.kv_size, attention.kv_size]
        self.layer: LayerAttention = attention.layer

    def __call__(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        rotation: "Rotation",
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        meta: StepAttention,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        ops, num_tokens = self.ops, hidden.shape[0]
        normed, hidden = ops.rms_norm(hidden, residual, self.attn_norm, self.attn_norm_dtype)
        q, k, v = self.qkv(normed).split_with_sizes(self.sizes, dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        ops.rotary_(q, k.view(num_tokens, self.num_kv_heads, self.head_dim), rotation.cos, rotation.sin)
        attn = meta.forward(q, k, v, key_cache, value_cache, self.num_kv_heads, self.layer)
        normed, hidden = ops.rms_norm(self.o_proj(attn), hidden, self.mlp_norm, self.mlp_norm_dtype)
        return self.down(ops.silu_and_mul(self.gate_up(normed), self.mlp_dtype)), hidden


def _bound(linear: nn.Module) -> Linear:
    """The linear's forward without nn.Module's __call__ (hooks, which the model never sets)."""
    return linear.bound() if isinstance(linear, WeightOnlyLinear) else linear.forward
