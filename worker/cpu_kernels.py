"""CPU speed-ups: a malloc that keeps its memory, and oneDNN-packed linear weights.

glibc returns large freed blocks to the OS and mmaps new ones, so every step's multi-megabyte
temporaries page-fault afresh; keeping freed memory makes decode steps about a third faster.
oneDNN's packed weight layout makes the small-batch matmuls of decoding about 1.6x faster than
plain MKL, and, unlike MKL's gemv path, gives each row the same result whatever the batch size.
"""

import ctypes
import ctypes.util
import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_KEEP_BYTES = 1 << 30


def keep_freed_memory() -> None:
    """Tell glibc malloc to serve large blocks from the heap and not to trim it (process-wide)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES)
        libc.mallopt(_M_TRIM_THRESHOLD, 2 * _KEEP_BYTES)
    except (OSError, AttributeError):  # not glibc
        logger.info("malloc tuning unavailable on this libc")


class PackedLinear(nn.Module):
    """nn.Linear with its weight reordered once into oneDNN's blocked layout."""

    def __init__(self, linear: nn.Linear, batch_hint: int):
        super().__init__()
        self.out_features = linear.out_features
        weight = linear.weight.detach()
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")


def pack_linears(model: nn.Module, batch_hint: int) -> int:
    """Replace every float32 nn.Linear of a CPU model by a PackedLinear; returns how many."""
    if not torch.backends.mkldnn.is_available():
        return 0
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child.weight.dtype == torch.float32:
                setattr(parent, name, PackedLinear(child, batch_hint))
                replaced += 1
    return replaced
