"""Hugging Face tensor names to the decoder's: q/k/v and gate/up fused, norms into their slots,
experts stacked. A tensor the config calls for and the checkpoint lacks, or has in another shape,
is refused by its checkpoint name."""

from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch

from worker.model import NORM_NAMES
from worker.model_config import CheckpointError, ModelConfig

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True, slots=True)
class Source:
    """The checkpoint tensors one of our tensors is built from, and how."""

    names: list[str]
    combine: Callable[[list[torch.Tensor]], torch.Tensor] = torch.cat


def decoder_state(weights: Tensors, config: ModelConfig, expected: dict[str, torch.Size]) -> Tensors:
    """Our state dict from the checkpoint's; `expected` is our parameter shapes, checked here."""
    sources = decoder_sources(weights.keys(), config)
    for source in sources.values():
        for name in source.names:
            if name not in weights:
                raise CheckpointError(f"tensor {name} is missing (model_type {config.model_type!r})")
    state: Tensors = {}
    for ours, source in sources.items():
        state[ours] = tensor = source.combine([weights[name] for name in source.names])
        if ours in expected and tensor.shape != expected[ours]:
            raise CheckpointError(
                f"tensor {' + '.join(source.names)} has shape {list(tensor.shape)} where config.json "
                f"implies {list(expected[ours])}"
            )
    return state


def decoder_sources(names: Collection[str], config: ModelConfig) -> dict[str, Source]:
    """Our tensor names, each with its checkpoint sources; `names` are the checkpoint's, which
    tell a Phi-3 checkpoint's fused q/k/v or a Mixtral's experts apart."""
    sources: dict[str, Source] = {}

    def take(
        ours: str, *theirs: str, combine: Callable[[list[torch.Tensor]], torch.Tensor] = torch.cat
    ) -> None:
        sources[ours] = Source(list(theirs), combine)

    take("embed_tokens.weight", "model.embed_tokens.weight")
    take("norm.weight", "model.norm.weight")
    if not config.tie_word_embeddings:
        take("lm_head.weight", "lm_head.weight")
    for index in range(config.num_layers):
        theirs, ours = f"model.layers.{index}.", f"layers.{index}."
        attn = theirs + "self_attn."
        fused = attn + "qkv_proj.weight" in names  # Phi-3 ships q/k/v fused
        for kind in ("weight", "bias") if config.qkv_bias else ("weight",):
            qkv = [f"{attn}qkv_proj.{kind}"] if fused else [f"{attn}{n}_proj.{kind}" for n in "qkv"]
            take(f"{ours}self_attn.qkv_proj.{kind}", *qkv)
        take(f"{ours}self_attn.o_proj.weight", attn + "o_proj.weight")
        if config.o_bias:
            take(f"{ours}self_attn.o_proj.bias", attn + "o_proj.bias")
        if config.family.qk_norm != "none":
            take(f"{ours}self_attn.q_norm.weight", attn + "q_norm.weight")
            take(f"{ours}self_attn.k_norm.weight", attn + "k_norm.weight")
        for slot, name in NORM_NAMES[config.family.norms].items():
            take(f"{ours}{slot}.weight", f"{theirs}{name}.weight")
        if config.moe is not None and index in config.moe.layers:
            _take_experts(take, names, theirs, ours + "mlp.", config.moe.num_experts)
        else:
            mlp = theirs + "mlp."
            if mlp + "gate_up_proj.weight" in names:  # Phi-3 ships gate/up fused
                take(f"{ours}mlp.gate_up_proj.weight", mlp + "gate_up_proj.weight")
            else:
                take(f"{ours}mlp.gate_up_proj.weight", mlp + "gate_proj.weight", mlp + "up_proj.weight")
            take(f"{ours}mlp.down_proj.weight", mlp + "down_proj.weight")
    return sources


def _take_experts(
    take: Callable[..., None], names: Collection[str], theirs: str, ours: str, num_experts: int
) -> None:
    """Router and experts, from Mixtral's `block_sparse_moe.experts.N.w1/w3/w2`, the
    `mlp.experts.N.gate_proj/up_proj/down_proj` of Qwen3-MoE and OLMoE, or already stacked."""
    prefix = theirs + ("block_sparse_moe." if theirs + "block_sparse_moe.gate.weight" in names else "mlp.")
    take(ours + "gate.weight", prefix + "gate.weight")
    if prefix + "experts.gate_up_proj" in names:
        take(ours + "gate_up_proj", prefix + "experts.gate_up_proj")
        take(ours + "down_proj", prefix + "experts.down_proj")
        return
    gate, up, down = (
        ("w1", "w3", "w2") if prefix.endswith("block_sparse_moe.") else ("gate_proj", "up_proj", "down_proj")
    )
    experts = [f"{prefix}experts.{e}." for e in range(num_experts)]

    def stack_pairs(tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([torch.cat(tensors[i : i + 2]) for i in range(0, len(tensors), 2)])

    take(ours + "gate_up_proj", *[f"{e}{n}.weight" for e in experts for n in (gate, up)], combine=stack_pairs)
    take(ours + "down_proj", *[f"{e}{down}.weight" for e in experts], combine=torch.stack)
