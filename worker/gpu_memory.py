"""How much of a GPU the KV cache gets: `--gpu-memory-fraction` of the device's memory, less what this
worker's weights, largest step's activations, decode graphs and CUDA context hold (other processes'
memory is theirs: it only caps the cache at what is free).

Activations are measured, not guessed: a forward of the step budget's worth of prompt tokens (and
one of the largest captured decode batch) runs on a scratch cache of a few blocks while torch
records its peak, as vLLM profiles before sizing its cache.
"""

from dataclasses import dataclass

import torch

from worker.attention import AttentionBackend, SequenceRows
from worker.kv_cache import KVCache
from worker.model import CausalLM
from worker.model_config import CheckpointError, ModelConfig

_GIB = 2**30


@dataclass(frozen=True, slots=True)
class GpuMemoryPlan:
    total: int  # the device's memory
    fraction: float
    held: int  # torch's allocations before the cache: the weights, and anything else alive
    weights: int
    activations: int  # peak of the largest eager step, above the weights
    graphs: int  # the largest captured decode step's peak, and every other size's logits
    other: int  # this process's memory outside torch: CUDA context, libraries' workspaces
    free: int  # what the device had free once the weights were in
    prefill_tokens: int
    graph_rows: int

    @property
    def kv_bytes(self) -> int:
        """The fraction, less this worker's other uses."""
        return int(self.total * self.fraction) - self.held - self.activations - self.graphs - self.other

    def describe(self) -> str:
        """The worker's log line: each part, so that a small cache says why."""
        return (
            f"GPU memory: {self.fraction:.2f} of {self.total / _GIB:.1f} GiB = "
            f"{self.total * self.fraction / _GIB:.2f} GiB; weights {self.weights / _GIB:.2f} GiB "
            f"(held in all {self.held / _GIB:.2f} GiB), activations "
            f"{self.activations / _GIB:.2f} GiB (a {self.prefill_tokens}-token step), decode graphs "
            f"{self.graphs / _GIB:.2f} GiB ({self.graph_rows} rows), CUDA context and others "
            f"{self.other / _GIB:.2f} GiB; the KV cache takes the remaining {self.kv_bytes / _GIB:.2f} GiB"
        )


def plan_gpu_memory(
    model: CausalLM,
    config: ModelConfig,
    attention: AttentionBackend,
    dtype: torch.dtype,
    fraction: float,
    prefill_tokens: int,
    graph_sizes: list[int],
    used_before: int,
) -> GpuMemoryPlan:
    """Measure the weights and the peaks of a full prefill step and the largest graph's decode step.
    `used_before`: the device's memory in use before this worker loaded anything."""
    device = attention.device
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    held = torch.cuda.memory_allocated(device)
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    activations = _peak_of_forward(model, config, attention, dtype, prefill_tokens, 1)
    graphs = 0
    if graph_sizes:
        largest = graph_sizes[-1]
        logits = (sum(graph_sizes) - largest) * config.vocab_size * dtype.itemsize  # each size keeps its own
        graphs = _peak_of_forward(model, config, attention, dtype, largest, largest) + logits
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    other = max(0, total - free - used_before - torch.cuda.memory_reserved(device))
    plan = GpuMemoryPlan(
        total,
        fraction,
        held,
        weights,
        activations,
        graphs,
        other,
        free,
        prefill_tokens,
        graph_sizes[-1] if graph_sizes else 0,
    )
    if plan.kv_bytes <= 0:
        raise CheckpointError(
            f"{plan.describe()}: nothing is left for the KV cache; raise gpu_memory_fraction"
        )
    if plan.kv_bytes > free:
        raise CheckpointError(
            f"{plan.describe()}, but only {free / _GIB:.2f} GiB is free (other processes hold the rest): "
            "lower gpu_memory_fraction"
        )
    return plan


def _peak_of_forward(
    model: CausalLM,
    config: ModelConfig,
    attention: AttentionBackend,
    dtype: torch.dtype,
    num_tokens: int,
    num_seqs: int,
) -> int:
    """Peak memory above what was allocated of a forward of num_seqs sequences sharing num_tokens
    prompt tokens, on a scratch cache just large enough (allocated before the peak is taken)."""
    device = attention.device
    block_size = attention.block_size
    per_seq = num_tokens // num_seqs
    blocks_per_seq = -(-per_seq // block_size)
    scratch = KVCache(config, blocks_per_seq * num_seqs, block_size, device, dtype)
    seqs = [
        SequenceRows(list(range(s * blocks_per_seq, (s + 1) * blocks_per_seq)), 0, per_seq, s * per_seq)
        for s in range(num_seqs)
    ]
    slots = [
        seq.block_ids[pos // block_size] * block_size + pos % block_size
        for seq in seqs
        for pos in range(per_seq)
    ]
    baseline = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    model(
        attention.tensor([0] * len(slots)),
        attention.tensor([pos for _ in seqs for pos in range(per_seq)]),
        scratch,
        attention.plan(seqs, slots),
        attention.tensor(list(range(len(slots)))),  # every row's logits, as prompt logprobs may ask
        attention.tensor([per_seq] * len(slots)),
    )
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - baseline
