"""Load Hugging Face weights (a checkpoint directory of safetensors, or a GGUF file) into CausalLM.

What cannot be served is refused before the worker joins its group, with one line naming the file,
the field or the tensor: an architecture we do not implement (or one only the checkpoint's own code
implements), a quantization format we do not read, a shard the index names and the folder lacks
(all before any weight is read), a tensor missing or mis-shaped.
"""

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import AutoConfig

from checkpoints import model_dir_of
from worker.checkpoint_weights import decoder_state
from worker.families import FAMILIES
from worker.model import CausalLM, rotary_tables
from worker.model_config import CheckpointError, ModelConfig, model_config_from_hf
from worker.quantized_linear import Int4Groups, quantize_linears
from worker.settings import Quantization

logger = logging.getLogger(__name__)

_INDEX = "model.safetensors.index.json"
# Multimodal checkpoints whose text model we serve (text in, text out), and its weights' prefixes.
TEXT_OF_MULTIMODAL = {"gemma3": ("language_model.model.", "model.language_model.")}


def refusal(path: Path) -> str | None:
    """Why config.json says this checkpoint cannot be served here, or None."""
    config_path = model_dir_of(path) / "config.json"
    if path.suffix == ".gguf" and not config_path.exists():
        return None  # transformers reads the architecture from the GGUF itself
    if not config_path.exists():
        return f"{config_path} is missing"
    config: dict[str, Any] = json.loads(config_path.read_text())
    quantization = config.get("quantization_config")
    if quantization:
        method = quantization.get("quant_method", "unknown") if isinstance(quantization, dict) else "unknown"
        return (
            f"{config_path}: quantization_config.quant_method {method!r} is a weight format this engine "
            f"does not read (it loads float safetensors and GGUF)"
        )
    model_type = config.get("model_type")
    if model_type in TEXT_OF_MULTIMODAL:
        model_type = (config.get("text_config") or {}).get("model_type")
    if model_type in FAMILIES:
        if config.get("auto_map"):  # as transformers does for a type it knows: its own code is not run
            logger.info("%s: auto_map ignored: model_type %r is built in", config_path, model_type)
        return None
    if config.get("auto_map"):
        return (
            f"{config_path}: model_type {model_type!r} needs the checkpoint's own Python code (auto_map, "
            f"trust_remote_code), which this engine never runs"
        )
    supported = ", ".join([*FAMILIES, *TEXT_OF_MULTIMODAL])
    return f"{config_path}: model_type {model_type!r} is not supported (supported: {supported})"


def _read_hf_weights(path: Path) -> tuple[Any, dict[str, torch.Tensor]]:
    """The transformers config and the raw Hugging Face state dict on CPU, in the checkpoint's dtype."""
    if path.suffix == ".gguf":
        from transformers import AutoModelForCausalLM

        logger.info("dequantizing GGUF %s (slow; convert once with worker.fetch_model)", path)
        hf_model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
        return hf_model.config, hf_model.state_dict()
    files = sorted(path.glob("*.safetensors"))
    index = path / _INDEX
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        absent = [shard for shard in shards if not (path / shard).exists()]
        if absent:
            raise CheckpointError(f"{index} names shard {absent[0]}, which is not in the folder")
        files = [path / shard for shard in shards]
    if not files:
        raise CheckpointError(f"no *.safetensors in {path}")
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        weights.update(load_file(file))
    try:
        return AutoConfig.from_pretrained(str(path)), weights
    except ValueError as error:  # transformers' own check of config.json (RoPE parameters, ...)
        raise CheckpointError(f"{path}/config.json: {error}".replace("\n", " ")) from None


def _text_model(hf_config: Any, weights: dict[str, torch.Tensor]) -> tuple[Any, dict[str, torch.Tensor]]:
    """A multimodal checkpoint's text config and its language model's weights under the text
    model's own names; the vision tower and projector are left out. Others pass as they are."""
    prefixes = TEXT_OF_MULTIMODAL.get(hf_config.model_type)
    if prefixes is None:
        return hf_config, weights
    text: dict[str, torch.Tensor] = {}
    for name, tensor in weights.items():
        for prefix in prefixes:
            if name.startswith(prefix):
                text["model." + name.removeprefix(prefix)] = tensor
        if name in ("language_model.lm_head.weight", "lm_head.weight"):
            text["lm_head.weight"] = tensor
    return hf_config.text_config, text


def load_model(
    path: Path,
    device: torch.device,
    max_model_len: int | None = None,
    dtype: torch.dtype = torch.float32,
    quantization: Quantization = "none",
) -> tuple[CausalLM, ModelConfig, int]:
    """Build the model on `device` in `dtype` (RoPE tables stay float32, as transformers keeps them),
    its linear layers quantized as asked (CPU, float32 only); returns it, its config and the
    context limit it was built for."""
    if quantization != "none" and (device.type != "cpu" or dtype != torch.float32):
        raise CheckpointError(
            f"quantization {quantization!r} runs on CPU in float32 (torch's int8/int4 CPU kernels), "
            f"not on {device.type} in {str(dtype).removeprefix('torch.')}"
        )
    reason = refusal(path)
    if reason is not None:
        raise CheckpointError(reason)
    hf_config, weights = _text_model(*_read_hf_weights(path))
    config = model_config_from_hf(hf_config, model_dir_of(path))
    context = min(max_model_len or config.max_position_embeddings, config.max_position_embeddings)
    with torch.device("meta"):
        model = CausalLM(config, max_positions=1).to(dtype)
    expected = {name: p.shape for name, p in model.named_parameters(remove_duplicate=False)}
    try:
        state = decoder_state(weights, config, expected)
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from None
    model.load_state_dict({k: t.to(dtype).contiguous() for k, t in state.items()}, assign=True, strict=False)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rotary = rotary_tables(config, context)
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks weights for {missing[:5]}")
    if quantization != "none":
        groups: dict[str, Int4Groups] = {}
        if quantization == "int4" and path.suffix == ".gguf":
            from worker.gguf_groups import q4_1_groups  # gguf's readers only where there is a GGUF

            groups = q4_1_groups(path, hf_config, config)
        quantize_linears(model, quantization, groups)
    return model.to(device).eval(), config, context
