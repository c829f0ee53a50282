"""The Q4_1 groups a GGUF file already holds, under our module names, so that int4 decoding keeps
the file's own scales, minimums and codes instead of cutting new ones from dequantized floats.

Names go Hugging Face -> GGUF by gguf's own tensor-name map (as transformers reads the file), the
rows permuted back as transformers does per architecture (Llama's q/k), and Hugging Face -> ours
by `decoder_sources` (q/k/v and gate/up fused by rows, which groups along the input dimension
survive unchanged). A layer with any source in another format is cut from its floats instead."""

from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import MODEL_ARCH_NAMES, GGMLQuantizationType, GGUFReader, get_tensor_name_map
from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, read_field

from worker.checkpoint_weights import decoder_sources
from worker.model_config import ModelConfig
from worker.quantized_linear import GROUP_SIZE, Int4Groups

_BLOCK_BYTES = 2 + 2 + GROUP_SIZE // 2  # float16 scale, float16 minimum, 32 four-bit codes


def unpack_q4_1(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes [rows, in], scales and minimums [rows, in / 32] of a Q4_1 tensor's raw bytes [rows, bytes];
    a block's byte j holds code j in its low nibble and code j + 16 in its high one."""
    rows = blocks.shape[0]
    grouped = np.ascontiguousarray(blocks).reshape(rows, -1, _BLOCK_BYTES)
    scales = grouped[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    minimums = grouped[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    nibbles = grouped[..., 4:]
    codes = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1)
    return codes.reshape(rows, -1), scales, minimums


def q4_1_groups(path: Path, hf_config: Any, config: ModelConfig) -> dict[str, Int4Groups]:
    """Our linear layers' groups (by module name) for each layer whose sources are all Q4_1."""
    reader = GGUFReader(path)
    (architecture,) = read_field(reader, "general.architecture")
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=hf_config.to_dict())
    arch = next((key for key, name in MODEL_ARCH_NAMES.items() if name == architecture), None)
    if arch is None:
        return {}
    name_map = get_tensor_name_map(arch, config.num_layers)
    # The unfused names transformers reads most GGUF files into; a file that keeps a fused tensor
    # (Phi-3's attn_qkv) matches none of them, and that layer is cut from its floats instead.
    sources = decoder_sources((), config)
    hf_names = {
        f"{gguf_name}.weight": theirs
        for source in sources.values()
        for theirs in source.names
        if theirs.endswith(".weight") and (gguf_name := name_map.get_name(theirs.removesuffix(".weight")))
    }
    theirs_groups: dict[str, tuple[np.ndarray, ...]] = {}
    for tensor in reader.tensors:
        if tensor.tensor_type != GGMLQuantizationType.Q4_1 or tensor.name not in hf_names:
            continue
        parts = [processor.process(weights=part, name=tensor.name) for part in unpack_q4_1(tensor.data)]
        if all(part.name == tensor.name for part in parts):
            theirs_groups[hf_names[tensor.name]] = tuple(part.weights for part in parts)
    groups: dict[str, Int4Groups] = {}
    for ours, source in sources.items():
        if ours.endswith(".weight") and all(name in theirs_groups for name in source.names):
            codes, scales, minimums = (
                torch.from_numpy(np.concatenate([theirs_groups[name][part] for name in source.names]))
                for part in range(3)
            )
            groups[ours.removesuffix(".weight")] = Int4Groups(codes, scales, minimums)
    return groups
