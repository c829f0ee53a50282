"""One decoder over packed tokens and a paged KV cache, for every family in worker/families.py.

Follows the Hugging Face implementations operation for operation (RMSNorm in float32, RoPE tables
computed the same way, attention through the backend of worker/attention.py), so greedy float32
output matches `generate`; a device's fused kernels (`use_fused_ops`) replace some of those
operations, and the parity tests hold the output token-identical.
"""

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from worker.attention import LayerAttention, StepAttention
from worker.families import Family
from worker.fused_layer import FusedLayer
from worker.kv_cache import KVCache
from worker.model_config import ModelConfig
from worker.moe import MixtureOfExperts
from worker.quantized_linear import WeightOnlyLinear

if TYPE_CHECKING:
    from worker.decode_layers import DecodeLayers
    from worker.fused_ops import FusedOps

# Our four norm slots around attention and feed-forward, and the checkpoint's name for each, by
# where the family puts its norms. A slot a family lacks is an identity.
NORM_NAMES: dict[str, dict[str, str]] = {
    "pre": {"attn_in": "input_layernorm", "mlp_in": "post_attention_layernorm"},
    "post": {"attn_out": "post_attention_layernorm", "mlp_out": "post_feedforward_layernorm"},
    "sandwich": {
        "attn_in": "input_layernorm",
        "attn_out": "post_attention_layernorm",
        "mlp_in": "pre_feedforward_layernorm",
        "mlp_out": "post_feedforward_layernorm",
    },
}


class RMSNorm(nn.Module):
    """Root-mean-square norm in float32, as Hugging Face does. Llama casts back before scaling by
    the weight, OLMo 2 after; Gemma scales by (1 + weight) in float32."""

    def __init__(self, size: int, eps: float, family: Family):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.gemma = family.gemma
        self.weight_in_float32 = family.norm_weight_in_float32
        self.fused: FusedOps | None = None  # one kernel instead (worker/fused_ops.py)
        self.out_dtype: torch.dtype | None = None  # the fused kernel's output dtype (None: its default)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None and x.dim() == 2:
            return self.fused.rms_norm(x, None, self, self.out_dtype)[0]
        dtype = x.dtype
        x = x.to(torch.float32)
        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.gemma:
            return (normed * (1.0 + self.weight.float())).to(dtype)
        if self.weight_in_float32:
            return (self.weight * normed).to(dtype)
        return self.weight * normed.to(dtype)

    def add_and_norm(
        self, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + x), residual + x) in one kernel: the add rounded as torch rounds it."""
        assert self.fused is not None
        return self.fused.rms_norm(x, residual, self, self.out_dtype)


class RotaryTables(nn.Module):
    """cos/sin for every position up to the context limit, looked up by row each step.

    Rotates the first `partial_rotary_factor` of each head. LongRoPE (Phi-3) keeps a second table
    with its long factors and, as transformers' `generate` does, uses it for every token of a
    sequence whose prompt is longer than `original_max_position_embeddings`, and past that
    position for the others.
    """

    def __init__(self, config: ModelConfig, max_positions: int, layer_type: str | None = None):
        super().__init__()
        hf = config.hf_config
        parameters = hf.rope_parameters if layer_type is None else hf.rope_parameters[layer_type]
        rope_type = parameters.get("rope_type", "default")
        self.rotary_dim = int(config.head_dim * parameters.get("partial_rotary_factor", 1.0))
        self.max_positions = max_positions
        self.long_from: int | None = None
        if rope_type == "default":
            exponents = torch.arange(0, self.rotary_dim, 2, dtype=torch.float) / self.rotary_dim
            inv_freqs, scaling = [1.0 / (parameters["rope_theta"] ** exponents)], 1.0
        else:
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf, None, layer_type=layer_type)
            inv_freqs = [inv_freq]
        if rope_type == "longrope":
            self.long_from = parameters["original_max_position_embeddings"]
            long_inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](
                hf, None, seq_len=self.long_from + 1, layer_type=layer_type
            )
            inv_freqs.append(long_inv_freq)
        positions = torch.arange(max_positions, dtype=torch.float)
        freqs = torch.cat([positions[:, None] * inv[None, :] for inv in inv_freqs])  # [rows, rotary_dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos() * scaling, persistent=False)
        self.register_buffer("sin", emb.sin() * scaling, persistent=False)

    def rows(self, positions: torch.Tensor, prompt_lens: torch.Tensor) -> torch.Tensor:
        """The table row of each token: its position, in the long table where LongRoPE says so."""
        if self.long_from is None:
            return positions
        long = (prompt_lens > self.long_from) | (positions >= self.long_from)
        return positions + long * self.max_positions

    def lookup(self, positions: torch.Tensor, prompt_lens: torch.Tensor, dtype: torch.dtype) -> "Rotation":
        """This step's cos/sin rows, looked up once for every layer that shares the table."""
        rows = self.rows(positions, prompt_lens)
        return Rotation(self.cos[rows].to(dtype), self.sin[rows].to(dtype), self.rotary_dim)


@dataclass(frozen=True, slots=True)
class Rotation:
    """One step's RoPE: cos and sin for each token, over the first `rotary_dim` of each head."""

    cos: torch.Tensor  # [num_tokens, rotary_dim]
    sin: torch.Tensor
    rotary_dim: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate x: [num_tokens, num_heads, head_dim]."""
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        half = self.rotary_dim // 2
        rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
        out = (rot * self.cos[:, None]) + (rotated * self.sin[:, None])
        return out if rest.shape[-1] == 0 else torch.cat((out, rest), dim=-1)


class Attention(nn.Module):
    """q/k/v fused into one matrix; q/k norms, clamping, window, scale and soft-cap per config."""

    def __init__(self, config: ModelConfig, index: int):
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=config.o_bias)
        self.qk_norm = config.family.qk_norm
        if self.qk_norm != "none":
            per_head = self.qk_norm == "head"
            family = config.family
            self.q_norm = RMSNorm(config.head_dim if per_head else self.q_size, config.rms_norm_eps, family)
            self.k_norm = RMSNorm(config.head_dim if per_head else self.kv_size, config.rms_norm_eps, family)
        self.clip_qkv = config.clip_qkv
        self.rope_key = config.rope_key(index) or "default"
        self.layer = LayerAttention(config.attention_scale, config.layer_window(index), config.attn_softcap)
        self.fused: FusedOps | None = None  # RoPE as one kernel, in place

    def forward(
        self,
        hidden: torch.Tensor,  # [num_tokens, hidden_size]
        rotation: Rotation,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        meta: StepAttention,
    ) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.qk_norm == "projection":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q = q.reshape(num_tokens, self.num_heads, self.head_dim)
        k = k.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.fused is not None:  # the backend takes strided views: nothing is copied
            self.fused.rotary_(q, k, rotation.cos, rotation.sin)
        else:
            q, k, v = rotation(q), rotation(k), v.contiguous()
        attn = meta.forward(
            q, k.reshape(num_tokens, self.kv_size), v, key_cache, value_cache, self.num_kv_heads, self.layer
        )
        return self.o_proj(attn)


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)), with gate and up fused into one matrix."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str):
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act = ACT2FN[activation]
        self.activation = activation
        self.fused: FusedOps | None = None  # SiLU-and-multiply as one kernel
        self.out_dtype: torch.dtype | None = None  # the kernel's output dtype (None: its default)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None:
            return self.down_proj(self.fused.silu_and_mul(self.gate_up_proj(x), self.out_dtype))
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class DecoderLayer(nn.Module):
    """Attention and feed-forward, each with a residual and the norms its family places around it."""

    def __init__(self, config: ModelConfig, index: int):
        super().__init__()
        self.self_attn = Attention(config, index)
        if config.moe is not None and index in config.moe.layers:
            self.mlp: nn.Module = MixtureOfExperts(config.hidden_size, config.moe, config.activation)
        else:
            self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.activation)
        present = NORM_NAMES[config.family.norms]
        for slot in ("attn_in", "attn_out", "mlp_in", "mlp_out"):
            norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.family)
            setattr(self, slot, norm if slot in present else nn.Identity())
        self.pre_norms = config.family.norms == "pre"
        self.defers_residual = False  # set with fused ops: each residual add goes into the next norm

    def fits_fused_layer(self) -> bool:
        """Whether a FusedLayer does all this layer does (worker/fused_layer.py)."""
        attention, mlp = self.self_attn, self.mlp
        return (
            self.defers_residual
            and attention.fused is not None
            and attention.qk_norm == "none"
            and attention.clip_qkv is None
            and isinstance(mlp, GatedMLP)
            and mlp.fused is not None
        )

    def forward(
        self,
        hidden: torch.Tensor,  # [num_tokens, hidden_size]
        residual: torch.Tensor | None,  # the layer's input is hidden + residual (None: hidden)
        rotation: Rotation,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        meta: StepAttention,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layer's output as (hidden, residual), their sum still to take, or (output, None)."""
        if self.defers_residual:
            assert isinstance(self.attn_in, RMSNorm) and isinstance(self.mlp_in, RMSNorm)
            normed, hidden = self.attn_in.add_and_norm(hidden, residual)
            attn = self.self_attn(normed, rotation, key_cache, value_cache, meta)
            normed, hidden = self.mlp_in.add_and_norm(attn, hidden)
            return self.mlp(normed), hidden
        assert residual is None, "a model's layers all defer their residual add, or none does"
        attn = self.self_attn(self.attn_in(hidden), rotation, key_cache, value_cache, meta)
        hidden = hidden + self.attn_out(attn)
        return hidden + self.mlp_out(self.mlp(self.mlp_in(hidden))), None


class CausalLM(nn.Module):
    """Embedding, decoder layers, final norm and LM head; logits only for the rows asked for."""

    def __init__(self, config: ModelConfig, max_positions: int):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_scale = math.sqrt(config.hidden_size) if config.family.gemma else None
        self.layers = nn.ModuleList(DecoderLayer(config, index) for index in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.family)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = rotary_tables(config, max_positions)
        self.steps: list[DecoderLayer | FusedLayer] = list(self.layers)  # what `forward` runs, in order
        self.rope_keys = [layer.self_attn.rope_key for layer in self.layers]
        # every layer in one C call for steps of decodes, where the model fits it (set by the engine)
        self.decode_layers: DecodeLayers | None = None

    def use_fused_ops(self, ops: "FusedOps") -> None:
        """RoPE, norms (with the residual add before them where the family's norms come first)
        and SiLU-and-multiply (a routed MLP keeps its own) through `ops` from now on. Layers that
        fit run as FusedLayers, which hold the modules as they are now: call this last."""
        for module in self.modules():
            if isinstance(module, Attention | RMSNorm) or (
                isinstance(module, GatedMLP) and module.activation in ("silu", "swish")
            ):
                module.fused = ops
        for layer in self.layers:
            layer.defers_residual = layer.pre_norms
        self._pass_bfloat16_to_quantized_linears()
        self.steps = [FusedLayer(layer, ops) if layer.fits_fused_layer() else layer for layer in self.layers]

    def _pass_bfloat16_to_quantized_linears(self) -> None:
        """Between a fused kernel and a weight-only quantized linear (which computes in bfloat16),
        hand over bfloat16: the norm before q/k/v and gate/up, the activation before down, and
        o_proj's and down's output into the next fused norm, where layers defer their residual
        add into it. q/k/v come out in float32, for RoPE and the cache."""
        bfloat16 = torch.bfloat16
        for layer in self.layers:
            if not layer.defers_residual:
                continue
            attention, mlp = layer.self_attn, layer.mlp
            if isinstance(attention.qkv_proj, WeightOnlyLinear):
                layer.attn_in.out_dtype = bfloat16
            if isinstance(attention.o_proj, WeightOnlyLinear):
                attention.o_proj.bfloat16_out = True
            if isinstance(mlp, GatedMLP) and mlp.fused is not None:
                if isinstance(mlp.gate_up_proj, WeightOnlyLinear):
                    layer.mlp_in.out_dtype = bfloat16
                    mlp.gate_up_proj.bfloat16_out = True
                if isinstance(mlp.down_proj, WeightOnlyLinear):
                    mlp.out_dtype = bfloat16
                    mlp.down_proj.bfloat16_out = True
        if isinstance(self.lm_head, WeightOnlyLinear):
            self.norm.out_dtype = bfloat16

    @property
    def long_prompt_from(self) -> int | None:
        """Prompts longer than this run with other RoPE tables (LongRoPE), so other KV."""
        limits = [table.long_from for table in self.rotary.values() if table.long_from is not None]
        return min(limits, default=None)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens]
        positions: torch.Tensor,  # [num_tokens]
        kv_cache: KVCache,
        meta: StepAttention,
        logit_rows: torch.Tensor,  # [num_samples] rows of the batch to compute logits for
        prompt_lens: torch.Tensor,  # [num_tokens] prompt length of each token's sequence
    ) -> torch.Tensor:  # [num_samples, vocab_size]
        hidden = self.embed_tokens(input_ids)
        if self.embed_scale is not None:
            hidden = hidden * torch.tensor(self.embed_scale).to(hidden.dtype)
        rotations = {
            key: table.lookup(positions, prompt_lens, hidden.dtype) for key, table in self.rotary.items()
        }
        residual = None
        stacked = (
            None if self.decode_layers is None else self.decode_layers(hidden, rotations, kv_cache, meta)
        )
        if stacked is not None:
            hidden, residual = stacked
        else:
            layer_rotations = [rotations[key] for key in self.rope_keys]
            for step, rotation, key_cache, value_cache in zip(
                self.steps, layer_rotations, kv_cache.keys, kv_cache.values, strict=True
            ):
                hidden, residual = step(hidden, residual, rotation, key_cache, value_cache, meta)
        if residual is None:
            normed = self.norm(hidden[logit_rows])
        else:
            normed, _ = self.norm.add_and_norm(hidden[logit_rows], residual[logit_rows])
        logits = self.lm_head(normed)
        cap = self.config.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap


def rotary_tables(config: ModelConfig, max_positions: int) -> nn.ModuleDict:
    """One table per distinct RoPE of the model's layers, keyed as `Attention.rope_key`."""
    keys = {config.rope_key(index) for index in range(config.num_layers)}
    return nn.ModuleDict(
        {key or "default": RotaryTables(config, max_positions, key) for key in sorted(keys, key=str)}
    )
