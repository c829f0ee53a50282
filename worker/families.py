"""What each decoder family changes relative to Llama: a few switches over the one decoder in model.py.

A reader sees here, in a line or two per family, everything that sets it apart; the numbers that
vary within a family (window sizes, soft-caps, expert counts) come from its config.json.
"""

from dataclasses import dataclass
from typing import Literal

QkNorm = Literal["none", "head", "projection"]
NormPlacement = Literal["pre", "post", "sandwich"]


@dataclass(frozen=True, slots=True)
class Family:
    """The switches of one `model_type`; the defaults are Llama."""

    qk_norm: QkNorm = "none"  # RMSNorm of q and k before RoPE: per head, or over the whole projection
    norms: NormPlacement = "pre"  # pre: before attention and MLP; post: after each; sandwich: both
    gemma: bool = False  # norms scale by (1 + weight), embeddings by sqrt(hidden_size), soft-capping
    norm_weight_in_float32: bool = False  # RMSNorm scales before casting back (OLMo 2; Gemma always)
    qkv_bias: bool = False  # biases on q, k and v whatever `attention_bias` says
    sliding_window: bool = False  # honours config.sliding_window
    layer_types: bool = False  # ... only on the layers config.layer_types marks, else on every layer
    moe: bool = False  # feed-forward is a routed mixture of experts
    moe_always_normalizes: bool = False  # top-k routing weights renormalised to sum to one


FAMILIES: dict[str, Family] = {
    "llama": Family(),
    "mistral": Family(sliding_window=True),
    "qwen2": Family(qkv_bias=True, sliding_window=True, layer_types=True),
    "qwen3": Family(qk_norm="head", sliding_window=True, layer_types=True),
    "phi3": Family(sliding_window=True),  # q/k/v and gate/up come fused in the checkpoint
    "olmo2": Family(qk_norm="projection", norms="post", norm_weight_in_float32=True),
    "gemma2": Family(norms="sandwich", gemma=True, sliding_window=True, layer_types=True),
    "gemma3_text": Family(
        qk_norm="head", norms="sandwich", gemma=True, sliding_window=True, layer_types=True
    ),
    "mixtral": Family(sliding_window=True, moe=True, moe_always_normalizes=True),
    "qwen3_moe": Family(qk_norm="head", sliding_window=True, moe=True),
    "olmoe": Family(qk_norm="projection", moe=True),
}
