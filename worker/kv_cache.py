"""KVCache: the physical per-layer K and V tensors, addressed by slot = block_id * block_size + offset."""

import torch

from worker.model_config import ModelConfig


def num_blocks_for_budget(
    config: ModelConfig, block_size: int, kv_cache_bytes: int, dtype: torch.dtype
) -> int:
    """How many blocks of `block_size` tokens in `dtype` fit in `kv_cache_bytes`."""
    return kv_cache_bytes // (config.kv_bytes_per_token(dtype.itemsize) * block_size)


class KVCache:
    """One K and one V tensor per layer, each [num_slots, num_kv_heads * head_dim], in the model's dtype."""

    def __init__(
        self, config: ModelConfig, num_blocks: int, block_size: int, device: torch.device, dtype: torch.dtype
    ):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dtype = dtype
        shape = (num_blocks * block_size, config.num_kv_heads * config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]

    def copy_blocks(self, copies: tuple[tuple[int, int], ...]) -> None:
        """Copy whole (source, destination) blocks in every layer: a choice's own copy of a block its
        siblings share, before it writes there."""
        device = self.keys[0].device
        offsets = torch.arange(self.block_size, device=device)
        sources, destinations = (
            (torch.tensor(blocks, device=device)[:, None] * self.block_size + offsets).view(-1)
            for blocks in zip(*copies, strict=True)
        )
        for tensor in self.keys + self.values:
            tensor.index_copy_(0, destinations, tensor.index_select(0, sources))

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)
