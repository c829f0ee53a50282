"""Tiny random checkpoints of every decoder family we serve, saved by transformers' own classes with
the default model's SmolLM2 tokenizer beside them, so they load and serve as any real checkpoint.

The random weights are drawn wider than transformers' default (std 0.2, not 0.02) so that greedy
decoding has clear winners instead of near-ties; sliding windows (24 tokens) are shorter than the
test prompts, and the MoE families have several experts with two routed per token. The multimodal
Gemma 3 has a tiny vision tower beside the text model we serve.
"""

import shutil
import zlib
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Olmo2Config,
    OlmoeConfig,
    Phi3Config,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
    SiglipVisionConfig,
)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
WINDOW = 24
HEAD_DIM = 16

_COMMON = {
    "vocab_size": 49152,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
    "initializer_range": 0.2,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
}
# Gemma's embeddings, scaled by sqrt(hidden_size), would make a tied head repeat the last token.
_UNTIED = {"tie_word_embeddings": False}
_MOE = {"num_experts_per_tok": 2, "intermediate_size": 96}


def _longrope(rotary_dim: int) -> dict[str, object]:
    """Past 256 positions (the longest test prompts), transformers switches to the long factors."""
    return {
        "rope_type": "longrope",
        "short_factor": [1.0 + 0.05 * i for i in range(rotary_dim // 2)],
        "long_factor": [1.5 + 0.1 * i for i in range(rotary_dim // 2)],
        "original_max_position_embeddings": 256,
    }


def _llama(rope: dict[str, object] | None = None) -> Callable[[], PretrainedConfig]:
    return lambda: LlamaConfig(**_COMMON, rope_scaling=rope)


FAMILIES: dict[str, Callable[[], PretrainedConfig]] = {
    "llama": _llama(),
    "llama-rope-linear": _llama({"rope_type": "linear", "factor": 2.0}),
    "llama-rope-dynamic": _llama({"rope_type": "dynamic", "factor": 2.0}),
    "llama-rope-yarn": _llama({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}),
    "llama-rope-llama3": _llama(
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 128,
        }
    ),
    "llama-rope-longrope": _llama(_longrope(HEAD_DIM)),
    "llama-wide-heads": lambda: LlamaConfig(**_COMMON, head_dim=4 * HEAD_DIM),  # heads wider than the MLP
    "mistral": lambda: MistralConfig(**_COMMON, sliding_window=WINDOW),
    "qwen2": lambda: Qwen2Config(**_COMMON),
    "qwen3": lambda: Qwen3Config(**_COMMON, head_dim=HEAD_DIM),
    "qwen3-windowed": lambda: Qwen3Config(  # layers from max_window_layers on attend through a window
        **_COMMON, head_dim=HEAD_DIM, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1
    ),
    "phi3": lambda: Phi3Config(
        **_COMMON, sliding_window=WINDOW, partial_rotary_factor=0.75, rope_scaling=_longrope(12)
    ),
    "olmo2": lambda: Olmo2Config(**_COMMON),
    "gemma2": lambda: Gemma2Config(
        **_COMMON | _UNTIED, head_dim=HEAD_DIM, query_pre_attn_scalar=24, sliding_window=WINDOW
    ),
    "gemma3": lambda: Gemma3TextConfig(
        **_COMMON | _UNTIED | {"num_hidden_layers": 3},
        head_dim=HEAD_DIM,
        query_pre_attn_scalar=24,
        sliding_window=WINDOW,
        sliding_window_pattern=2,
        rope_scaling={"rope_type": "linear", "factor": 2.0},
    ),
    "gemma3-multimodal": lambda: Gemma3Config(
        text_config=FAMILIES["gemma3"]().to_dict(),
        vision_config=SiglipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        ).to_dict(),
        mm_tokens_per_image=4,
        initializer_range=0.2,
        **_UNTIED,
    ),
    "mixtral": lambda: MixtralConfig(**_COMMON | _MOE, num_local_experts=4),
    "mixtral-windowed": lambda: MixtralConfig(**_COMMON | _MOE, num_local_experts=4, sliding_window=WINDOW),
    "qwen3_moe": lambda: Qwen3MoeConfig(
        **_COMMON | _MOE | {"num_hidden_layers": 3},
        head_dim=HEAD_DIM,
        num_experts=6,
        moe_intermediate_size=48,
        norm_topk_prob=True,
        mlp_only_layers=[1],
    ),
    "olmoe": lambda: OlmoeConfig(**_COMMON | _MOE, num_experts=4, clip_qkv=3.0),
}


def build(family: str, folder: Path, tokenizer_from: Path, max_shard_size: str | None = None) -> Path:
    """Save the tiny random checkpoint of `family` with `tokenizer_from`'s tokenizer into `folder`,
    in shards of at most `max_shard_size` (with model.safetensors.index.json) when given."""
    torch.manual_seed(zlib.crc32(family.encode()))  # each family its own draw, the same every run
    model = AutoModelForCausalLM.from_config(FAMILIES[family](), dtype=torch.float32)
    model.save_pretrained(folder, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    for name in TOKENIZER_FILES:
        if (tokenizer_from / name).exists():
            shutil.copy(tokenizer_from / name, folder / name)
    return folder
