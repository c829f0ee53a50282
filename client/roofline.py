"""The roofline line of `conveyor bench`: the engine's useful arithmetic per second of step time,
beside what torch's GEMM reaches on the same shapes on this machine, in the same run.

Useful work is the linear layers' (every token fed through every projection, plus the LM head for
every row sampled): the FLOPs a perfect engine could not avoid. Attention, norms, RoPE, sampling and
scheduling are the overhead the ratio exposes. The reference multiplies the model's own weight
shapes, every layer's weights distinct (so, like the model's, they stream from memory), at the mean
rows per step that the engine ran, and the LM head at the mean rows it sampled.
"""

import time
from dataclasses import dataclass

import torch
from torch import nn

from worker.cpu_kernels import PackedLinear
from worker.model_config import ModelConfig


@dataclass(frozen=True, slots=True)
class StepWork:
    """One kind of step (mixed prefill, or decode only) over a run."""

    num_steps: int
    seconds: float
    num_tokens: int  # fed
    num_sampled: int  # rows through the LM head

    def useful_gflops(self, config: ModelConfig) -> float:
        flops = self.num_tokens * linear_flops_per_token(config) + self.num_sampled * lm_head_flops(config)
        return flops / self.seconds / 1e9 if self.seconds else 0.0

    @property
    def mean_rows(self) -> int:
        return max(1, round(self.num_tokens / self.num_steps)) if self.num_steps else 1

    @property
    def mean_sampled_rows(self) -> int:
        return max(1, round(self.num_sampled / self.num_steps)) if self.num_steps else 1


def _layer_shapes(config: ModelConfig) -> list[tuple[int, int]]:
    """(in, out) of one layer's projections, fused as the engine fuses them: q/k/v, o, gate/up, down."""
    hidden, head_dim = config.hidden_size, config.head_dim
    intermediate = config.moe.intermediate_size * config.moe.top_k if config.moe else config.intermediate_size
    return [
        (hidden, (config.num_heads + 2 * config.num_kv_heads) * head_dim),
        (config.num_heads * head_dim, hidden),
        (hidden, 2 * intermediate),
        (intermediate, hidden),
    ]


def linear_flops_per_token(config: ModelConfig) -> int:
    return 2 * config.num_layers * sum(a * b for a, b in _layer_shapes(config))


def lm_head_flops(config: ModelConfig) -> int:
    return 2 * config.vocab_size * config.hidden_size


def gemm_gflops(config: ModelConfig, rows: int, sampled_rows: int, repeats: int = 3) -> float:
    """torch's float32 GEMM over every layer's projections at `rows` rows and the LM head at
    `sampled_rows`: the best of `repeats` passes, through plain MKL or oneDNN's packed weights
    (which the engine uses on a CPU), whichever is faster."""
    shapes = [shape for _ in range(config.num_layers) for shape in _layer_shapes(config)]
    shapes.append((config.hidden_size, config.vocab_size))
    weights = [
        torch.empty(out_features, in_features).uniform_(-0.05, 0.05) for in_features, out_features in shapes
    ]
    counts = [rows] * (len(weights) - 1) + [sampled_rows]
    inputs = [
        torch.empty(count, w.shape[1]).uniform_(-1, 1) for count, w in zip(counts, weights, strict=True)
    ]
    flops = 2 * sum(count * w.numel() for count, w in zip(counts, weights, strict=True))
    layers: list[nn.Module] = []
    for weight in weights:
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        linear.weight.data = weight
        layers.append(linear)
    best = _best_pass(layers, inputs, repeats)
    if torch.backends.mkldnn.is_available():
        best = min(best, _best_pass([PackedLinear(layer, rows) for layer in layers], inputs, repeats))
    return flops / best / 1e9


def _best_pass(layers: list[nn.Module], inputs: list[torch.Tensor], repeats: int) -> float:
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats + 1):  # the first pass pays the allocator and thread start-up
            started = time.perf_counter()
            for layer, x in zip(layers, inputs, strict=True):
                layer(x)
            best = min(best, time.perf_counter() - started)
    return best
