"""ModelConfig: the few numbers of a Hugging Face Llama-family config that the engine needs."""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Shapes of a Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2)."""

    model_type: str
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
    eos_token_ids: tuple[int, ...]
    sliding_window: int | None  # tokens each position attends to, when the model limits it
    hf_config: Any  # the transformers config, for RoPE variants

    @property
    def kv_bytes_per_token(self) -> int:
        """float32 K and V of one token over all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * 4


def _eos_ids(model_dir: Path, hf_config: Any) -> tuple[int, ...]:
    """End-of-sequence ids from generation_config.json, else from config.json."""
    ids: Any = hf_config.eos_token_id
    generation_config = model_dir / "generation_config.json"
    if generation_config.exists():
        ids = json.loads(generation_config.read_text()).get("eos_token_id", ids)
    if ids is None:
        return ()
    return tuple(ids) if isinstance(ids, list) else (int(ids),)


def _sliding_window(hf_config: Any) -> int | None:
    """Mistral's `sliding_window`; Qwen2's only with `use_sliding_window`."""
    window = getattr(hf_config, "sliding_window", None)
    if window is None or not getattr(hf_config, "use_sliding_window", True):
        return None
    return int(window)


def model_config_from_hf(hf_config: Any, model_dir: Path) -> ModelConfig:
    """Read a transformers config; refuse architectures the engine does not implement."""
    model_type = hf_config.model_type
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    num_heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
    return ModelConfig(
        model_type=model_type,
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
        qkv_bias=model_type == "qwen2" or bool(getattr(hf_config, "attention_bias", False)),
        eos_token_ids=_eos_ids(model_dir, hf_config),
        sliding_window=_sliding_window(hf_config),
        hf_config=hf_config,
    )
