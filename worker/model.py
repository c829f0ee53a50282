"""A Llama-family decoder over packed tokens and a paged KV cache.

Follows the Hugging Face Llama implementation operation for operation (RMSNorm in float32, RoPE
tables computed the same way, SDPA attention), so greedy float32 output matches `generate`.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from worker.attention import AttentionMetadata, paged_attention
from worker.kv_cache import KVCache
from worker.model_config import ModelConfig


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 as Hugging Face does."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        variance = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.eps)).to(dtype)


class RotaryTables(nn.Module):
    """cos/sin for every position up to the context limit, looked up by position each step."""

    def __init__(self, config: ModelConfig, max_positions: int):
        super().__init__()
        hf = config.hf_config
        rope_type = (getattr(hf, "rope_parameters", None) or {}).get("rope_type", "default")
        if rope_type == "default":
            base = hf.rope_parameters["rope_theta"] if getattr(hf, "rope_parameters", None) else hf.rope_theta
            inv_freq = 1.0 / (
                base ** (torch.arange(0, config.head_dim, 2, dtype=torch.float) / config.head_dim)
            )
            scaling = 1.0
        else:
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf)
        positions = torch.arange(max_positions, dtype=torch.float)
        freqs = positions[:, None] * inv_freq[None, :]  # [max_positions, head_dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos() * scaling, persistent=False)
        self.register_buffer("sin", emb.sin() * scaling, persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate x: [num_tokens, num_heads, head_dim] at `positions`: [num_tokens]."""
        cos = self.cos[positions].unsqueeze(1)  # [num_tokens, 1, head_dim]
        sin = self.sin[positions].unsqueeze(1)
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return (x * cos) + (rotated * sin)


class DecoderLayer(nn.Module):
    """Attention and gated MLP, each with a pre-norm and a residual; q/k/v and gate/up fused."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(
        self,
        hidden: torch.Tensor,  # [num_tokens, hidden_size]
        positions: torch.Tensor,
        rotary: RotaryTables,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        qkv = self.qkv_proj(self.input_layernorm(hidden))
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = rotary(q.view(num_tokens, self.num_heads, self.head_dim), positions)
        k = rotary(k.view(num_tokens, self.num_kv_heads, self.head_dim), positions)
        attn = paged_attention(
            q,
            k.reshape(num_tokens, self.kv_size),
            v.contiguous(),
            key_cache,
            value_cache,
            meta,
            self.num_kv_heads,
        )
        hidden = hidden + self.o_proj(attn)
        gate, up = self.gate_up_proj(self.post_attention_layernorm(hidden)).chunk(2, dim=-1)
        return hidden + self.down_proj(F.silu(gate) * up)


class CausalLM(nn.Module):
    """Embedding, decoder layers, final norm and LM head; logits only for the rows asked for."""

    def __init__(self, config: ModelConfig, max_positions: int):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = RotaryTables(config, max_positions)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens]
        positions: torch.Tensor,  # [num_tokens]
        kv_cache: KVCache,
        meta: AttentionMetadata,
        logit_rows: torch.Tensor,  # [num_samples] rows of the batch to compute logits for
    ) -> torch.Tensor:  # [num_samples, vocab_size]
        hidden = self.embed_tokens(input_ids)
        for layer, key_cache, value_cache in zip(self.layers, kv_cache.keys, kv_cache.values, strict=True):
            hidden = layer(hidden, positions, self.rotary, key_cache, value_cache, meta)
        return self.lm_head(self.norm(hidden[logit_rows]))
