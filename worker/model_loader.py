"""Load Hugging Face weights (a checkpoint directory of safetensors, or a GGUF file) into CausalLM."""

import logging
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig

from checkpoints import model_dir_of
from worker.model import CausalLM, RotaryTables
from worker.model_config import ModelConfig, model_config_from_hf

logger = logging.getLogger(__name__)

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_RENAMES = {
    "self_attn.o_proj.weight": "o_proj.weight",
    "mlp.down_proj.weight": "down_proj.weight",
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
}


def _read_hf_weights(path: Path) -> tuple[object, dict[str, torch.Tensor]]:
    """The transformers config and the raw Hugging Face state dict, float32 on CPU."""
    if path.suffix == ".gguf":
        from transformers import AutoModelForCausalLM

        logger.info("dequantizing GGUF %s (slow; convert once with worker.fetch_model)", path)
        hf_model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
        return hf_model.config, hf_model.state_dict()
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path}")
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        weights.update(load_file(file))
    return AutoConfig.from_pretrained(str(path)), weights


def _fuse(weights: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename Hugging Face keys to ours, fusing q/k/v and gate/up into one matrix each."""
    fused: dict[str, torch.Tensor] = {
        "embed_tokens.weight": weights["model.embed_tokens.weight"],
        "norm.weight": weights["model.norm.weight"],
    }
    if not config.tie_word_embeddings:
        fused["lm_head.weight"] = weights["lm_head.weight"]
    for index in range(config.num_layers):
        prefix = f"model.layers.{index}."
        ours = f"layers.{index}."
        attn = prefix + "self_attn."
        fused[ours + "qkv_proj.weight"] = torch.cat([weights[f"{attn}{n}_proj.weight"] for n in "qkv"])
        if config.qkv_bias:
            fused[ours + "qkv_proj.bias"] = torch.cat([weights[f"{attn}{n}_proj.bias"] for n in "qkv"])
        fused[ours + "gate_up_proj.weight"] = torch.cat(
            [weights[prefix + "mlp.gate_proj.weight"], weights[prefix + "mlp.up_proj.weight"]]
        )
        for theirs, mine in _RENAMES.items():
            fused[ours + mine] = weights[prefix + theirs]
    return {name: tensor.to(torch.float32).contiguous() for name, tensor in fused.items()}


def load_model(
    path: Path, device: torch.device, max_model_len: int | None = None
) -> tuple[CausalLM, ModelConfig, int]:
    """Build the model on `device`; returns it, its config and the context limit it was built for."""
    hf_config, weights = _read_hf_weights(path)
    config = model_config_from_hf(hf_config, model_dir_of(path))
    context = min(max_model_len or config.max_position_embeddings, config.max_position_embeddings)
    window = config.sliding_window
    if window is not None and context > window:
        raise ValueError(
            f"{path}: sliding_window {window} is shorter than the context of {context} tokens, and this "
            f"engine does not implement sliding-window attention yet (it would serve wrong tokens past "
            f"the window): serve it with --max-model-len {window} or less"
        )
    with torch.device("meta"):
        model = CausalLM(config, max_positions=1)
    model.load_state_dict(_fuse(weights, config), assign=True, strict=False)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rotary = RotaryTables(config, context)
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"checkpoint {path} lacks weights for {missing[:5]}")
    return model.to(device).eval(), config, context
