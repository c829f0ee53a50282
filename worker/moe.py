"""MixtureOfExperts: a routed feed-forward, each expert run once per step on the tokens sent to it.

Routing follows transformers (softmax in float32, top-k, optional renormalisation). Dispatch is
sorted: the (token, expert) pairs are ordered by expert, so each expert that got tokens runs one
GEMM over exactly those rows, and experts that got none cost nothing. Contributions are summed in
ascending expert order, as transformers sums them, so float32 output matches bit for bit.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from worker.model_config import MoEShape


class MixtureOfExperts(nn.Module):
    """A router and `num_experts` gated MLPs, stored as [num_experts, ...] stacks."""

    def __init__(self, hidden_size: int, shape: MoEShape, activation: str):
        super().__init__()
        self.top_k = shape.top_k
        self.normalize = shape.normalize
        self.gate = nn.Linear(hidden_size, shape.num_experts, bias=False)
        self.gate_up_proj = nn.Parameter(
            torch.empty(shape.num_experts, 2 * shape.intermediate_size, hidden_size)
        )
        self.down_proj = nn.Parameter(torch.empty(shape.num_experts, hidden_size, shape.intermediate_size))
        self.act = ACT2FN[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [num_tokens, hidden_size]
        probs = torch.softmax(self.gate(x).float(), dim=-1)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)  # [num_tokens, top_k]
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype).view(-1)
        pairs = experts.view(-1).argsort(stable=True)  # (token, slot) pairs ordered by expert
        counts = torch.bincount(experts.view(-1), minlength=self.gate_up_proj.shape[0]).tolist()
        out = torch.zeros_like(x)
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            chosen = pairs[start : start + count]
            start += count
            tokens = chosen // self.top_k
            gate, up = F.linear(x[tokens], self.gate_up_proj[expert]).chunk(2, dim=-1)
            expert_out = F.linear(self.act(gate) * up, self.down_proj[expert]) * weights[chosen, None]
            out.index_add_(0, tokens, expert_out)
        return out
