"""ModelConfig: the numbers and switches of a Hugging Face decoder config that the engine needs."""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.families import FAMILIES, Family

SLIDING = "sliding_attention"


class CheckpointError(ValueError):
    """This checkpoint cannot be served: not a failure that a restart would mend."""


@dataclass(frozen=True, slots=True)
class MoEShape:
    """A routed feed-forward: each token runs `top_k` of `num_experts` gated MLPs."""

    num_experts: int
    top_k: int
    intermediate_size: int
    normalize: bool  # top-k weights renormalised to sum to one
    layers: frozenset[int]  # the layers whose feed-forward is routed (Qwen3-MoE keeps some dense)


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Shapes and switches of one decoder; see worker/families.py for what each family sets."""

    model_type: str
    family: Family
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    activation: str  # a transformers ACT2FN name
    attention_scale: float
    attn_softcap: float | None  # tanh soft-cap of attention scores (Gemma 2)
    final_softcap: float | None  # tanh soft-cap of the logits (Gemma 2)
    clip_qkv: float | None  # q, k and v clamped to [-clip, clip] (OLMoE)
    layer_types: tuple[str, ...]  # "full_attention" or "sliding_attention", one per layer
    window: int | None  # the sliding window, on the layers marked sliding
    moe: MoEShape | None
    eos_token_ids: tuple[int, ...]
    hf_config: Any  # the transformers config, for RoPE variants

    def kv_bytes_per_token(self, element_size: int) -> int:
        """K and V of one token over all layers, at `element_size` bytes a number."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * element_size

    def layer_window(self, index: int) -> int | None:
        """Keys a query of layer `index` sees, itself included; None when it sees the whole context."""
        return self.window if self.layer_types[index] == SLIDING else None

    @property
    def window_of_every_layer(self) -> int | None:
        """The window when every layer has it: keys behind it are never read again."""
        return self.window if all(t == SLIDING for t in self.layer_types) else None

    def rope_key(self, index: int) -> str | None:
        """The `rope_parameters` entry of layer `index`, where they differ by layer type (Gemma 3)."""
        parameters = getattr(self.hf_config, "rope_parameters", None) or {}
        layer_type = self.layer_types[index]
        return layer_type if isinstance(parameters.get(layer_type), dict) else None


def _eos_ids(model_dir: Path, hf_config: Any) -> tuple[int, ...]:
    """End-of-sequence ids from generation_config.json, else from config.json."""
    ids: Any = hf_config.eos_token_id
    generation_config = model_dir / "generation_config.json"
    if generation_config.exists():
        ids = json.loads(generation_config.read_text()).get("eos_token_id", ids)
    if ids is None:
        return ()
    return tuple(ids) if isinstance(ids, list) else (int(ids),)


def _layer_types(hf_config: Any, family: Family) -> tuple[str, ...]:
    """Which layers attend through a window: those `layer_types` marks in the families that read it
    (as transformers does), else all of them when the family honours a set `sliding_window`."""
    count = hf_config.num_hidden_layers
    if not family.sliding_window or getattr(hf_config, "sliding_window", None) is None:
        return ("full_attention",) * count
    declared = getattr(hf_config, "layer_types", None) if family.layer_types else None
    return tuple(declared) if declared else (SLIDING,) * count


def _moe_shape(hf_config: Any, family: Family) -> MoEShape | None:
    if not family.moe:
        return None
    num_experts = getattr(hf_config, "num_local_experts", None) or hf_config.num_experts
    dense = set(getattr(hf_config, "mlp_only_layers", None) or ())
    step = getattr(hf_config, "decoder_sparse_step", None) or 1
    return MoEShape(
        num_experts=num_experts,
        top_k=hf_config.num_experts_per_tok,
        intermediate_size=getattr(hf_config, "moe_intermediate_size", None) or hf_config.intermediate_size,
        normalize=family.moe_always_normalizes or bool(getattr(hf_config, "norm_topk_prob", False)),
        layers=frozenset(
            i for i in range(hf_config.num_hidden_layers) if i not in dense and (i + 1) % step == 0
        ),
    )


def model_config_from_hf(hf_config: Any, model_dir: Path) -> ModelConfig:
    """Read a transformers config; refuse architectures the engine does not implement."""
    model_type = hf_config.model_type
    family = FAMILIES.get(model_type)
    if family is None:
        raise CheckpointError(
            f"model_type {model_type!r} is not supported (supported: {', '.join(FAMILIES)})"
        )
    num_heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
    query_scalar = getattr(hf_config, "query_pre_attn_scalar", None) if family.gemma else None
    layer_types = _layer_types(hf_config, family)
    return ModelConfig(
        model_type=model_type,
        family=family,
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        intermediate_size=hf_config.intermediate_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=num_heads,
        num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
        head_dim=head_dim,
        rms_norm_eps=hf_config.rms_norm_eps,
        max_position_embeddings=hf_config.max_position_embeddings,
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        qkv_bias=family.qkv_bias or bool(getattr(hf_config, "attention_bias", False)),
        o_bias=bool(getattr(hf_config, "attention_bias", False)),
        activation=getattr(hf_config, "hidden_activation", None) or hf_config.hidden_act,
        attention_scale=(query_scalar or head_dim) ** -0.5,
        attn_softcap=getattr(hf_config, "attn_logit_softcapping", None) if family.gemma else None,
        final_softcap=getattr(hf_config, "final_logit_softcapping", None) if family.gemma else None,
        clip_qkv=getattr(hf_config, "clip_qkv", None),
        layer_types=layer_types,
        window=hf_config.sliding_window if SLIDING in layer_types else None,
        moe=_moe_shape(hf_config, family),
        eos_token_ids=_eos_ids(model_dir, hf_config),
        hf_config=hf_config,
    )
