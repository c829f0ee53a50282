"""Quantized linear layers on a CPU (`--quantization`).

A decode step streams every weight once for a handful of rows, so its time is bytes read: int8
weights are a quarter of float32's, int4 an eighth (plus their scales). Prefill and large batches
are arithmetic instead, which only integer GEMMs cut: w8a8 quantizes activations too (see
`DynamicInt8Linear`). The weight-only kernels are torch's:
`_weight_int8pack_mm` (one scale per output channel) and `_weight_int4pack_mm_for_cpu` (groups of
32 input weights with a scale and a minimum each, GGUF's Q4_1). Both are vectorized for bfloat16
inputs only (in float32 they run ten to twenty times slower, measured), and take their scales in
the input's dtype: a layer's input, its scales and its output are bfloat16, it accumulates in
float32, and the model around it stays float32. Where a checkpoint already holds Q4_1 groups (a
GGUF file), those are kept as they are (see `worker/gguf_groups.py`); else they are cut from the
float weights by Q4_1's own rule.
"""

import functools
import logging
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from worker.moe import MixtureOfExperts
from worker.settings import Quantization

logger = logging.getLogger(__name__)

GROUP_SIZE = 32
_KERNEL_DTYPE = torch.bfloat16
_INT4_LEVELS = 15
_INT8_MAX = 127
_TINY = 1e-30

Linear = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True, slots=True)
class Int4Groups:
    """A weight [out, in] as 4-bit codes and, per group of 32 inputs, a scale and a minimum:
    weight = minimum + scale * code."""

    codes: torch.Tensor  # [out, in] integers 0..15
    scales: torch.Tensor  # [out, in / 32] float32 (a GGUF's float16, exactly)
    minimums: torch.Tensor  # [out, in / 32] float32

    @classmethod
    def of(cls, weight: torch.Tensor) -> "Int4Groups":
        """Q4_1's rule: each group spans its minimum to its maximum in 15 steps."""
        out_features, in_features = weight.shape
        grouped = weight.float().reshape(out_features, in_features // GROUP_SIZE, GROUP_SIZE)
        minimums = grouped.amin(-1)
        scales = (grouped.amax(-1) - minimums) / _INT4_LEVELS
        steps = torch.where(scales == 0, 1.0, scales)
        codes = ((grouped - minimums[..., None]) / steps[..., None]).round().clamp(0, _INT4_LEVELS)
        return cls(codes.reshape(out_features, in_features).to(torch.uint8), scales, minimums)


def _per_output_channel(weight: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes with one scale per output channel, rounded with the scale as it will be
    held (in `scale_dtype`)."""
    scales = (weight.float().abs().amax(1) / _INT8_MAX).to(scale_dtype)
    steps = torch.where(scales == 0, 1.0, scales.float())
    codes = (weight.float() / steps[:, None]).round().clamp(-_INT8_MAX, _INT8_MAX).to(torch.int8)
    return codes, scales


@dataclass(frozen=True, slots=True)
class KernelCall:
    """A weight-only linear's torch op and its tensors: op(x, weight, scales), or
    op(x, weight, group_size, scales) where there is a group size. A C caller
    (worker/decode_layers.py) calls the very same op by its name in torch's dispatcher."""

    op: torch._ops.OpOverload
    weight: torch.Tensor
    scales: torch.Tensor
    in_features: int
    group_size: int = 0  # 0: the op takes none

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def bound(self) -> Linear:
        """x -> x @ weight.T, in and out of bfloat16, through the op from Python."""
        op, weight, scales, group_size = self.op, self.weight, self.scales, self.group_size
        if group_size:
            return lambda x: op(x, weight, group_size, scales)
        return lambda x: op(x, weight, scales)


class WeightOnlyLinear(nn.Module, ABC):
    """A linear whose kernel takes and gives bfloat16 in a float32 model: it takes either, and gives
    float32, or bfloat16 where `bfloat16_out` says the next op reads it (`CausalLM.use_fused_ops`:
    a fused norm or activation), so no cast on either side costs a dispatch. With a bias the output
    is float32 either way (the bias is added in float32)."""

    def __init__(self, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.bfloat16_out = False

    @abstractmethod
    def kernel_call(self) -> KernelCall:
        """The layer's torch op and tensors (x -> x @ weight.T, in and out of bfloat16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _weight_only_forward(self.kernel_call().bound(), self.bias, self.bfloat16_out, x)

    def bound(self, bfloat16_out: bool) -> Linear:
        """`forward` with the layer's tensors looked up now, not at every call (a FusedLayer calls
        it once per step at one stream, where each lookup is a visible share), giving bfloat16
        where `bfloat16_out` says (and there is no bias)."""
        return functools.partial(_weight_only_forward, self.kernel_call().bound(), self.bias, bfloat16_out)


def _weight_only_forward(
    kernel: Linear, bias: torch.Tensor | None, bfloat16_out: bool, x: torch.Tensor
) -> torch.Tensor:
    y = kernel(x if x.dtype == _KERNEL_DTYPE else x.to(_KERNEL_DTYPE))
    if bias is not None:
        return y.float() + bias
    return y if bfloat16_out else y.float()


class Int8Linear(WeightOnlyLinear):
    """y = x @ (int8 weight * per-output-channel scale).T + bias."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__(bias)
        codes, scales = _per_output_channel(weight, _KERNEL_DTYPE)
        self.register_buffer("weight", codes.contiguous())
        self.register_buffer("scales", scales.contiguous())

    def kernel_call(self) -> KernelCall:
        return KernelCall(
            torch.ops.aten._weight_int8pack_mm.default, self.weight, self.scales, self.weight.shape[1]
        )


class DynamicInt8Linear(nn.Module):
    """W8A8: int8 weights (one scale per output channel) times int8 activations, each row quantized
    with its own scale as it comes, through torch's integer GEMM (`_int_mm`, exact int32 sums).
    Unlike the weight-only layers it also saves arithmetic, so prefill and large batches gain; a
    row's scale depends on that row alone, so a prompt gets the same tokens alone as in a batch."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        codes, scales = _per_output_channel(weight, torch.float32)
        self.register_buffer("weight_t", codes.T.contiguous())  # [in, out], as _int_mm takes it
        self.register_buffer("scales", scales.contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps = x.abs().amax(1, keepdim=True).clamp_(min=_TINY) / _INT8_MAX  # a zero row stays zero
        codes = (x / steps).round_().to(torch.int8)
        y = torch._int_mm(codes, self.weight_t).to(x.dtype) * (steps * self.scales)
        return y if self.bias is None else y + self.bias


class FbgemmInt8Linear(nn.Module):
    """W8A8 through fbgemm (torch's x86 dynamic quantized linear), one activation scale per row.

    At a few rows fbgemm is the fastest integer GEMM torch has here: in a micro-benchmark on the
    2-vCPU EPYC (2026-12-05), the 49152-wide LM head of the default model took 0.3-0.5 ms at one
    row against 1.9 ms for `_weight_int8pack_mm` and 1.1-1.6 for `_int_mm`. But fbgemm quantizes
    activations with one scale for the whole batch, so a row's output would depend on its
    neighbours. Each row is therefore divided by its largest magnitude and given two extra inputs,
    +1 and -1, against zero weights: every row then spans exactly [-1, 1], the batch's scale is
    every row's own, and the row's output is scaled back by its magnitude. Activations are held in
    7 bits (`reduce_range`, as torch does on x86: fbgemm's AVX2 kernels would otherwise saturate
    16-bit pair sums), a step of 1/63.5 of the row's magnitude."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        out_features, self.in_features = weight.shape
        codes, scales = _per_output_channel(weight, torch.float32)
        bounds = torch.tensor([1.0, -1.0])
        self.spanned_features = self.in_features + len(bounds)
        padded = torch.cat([codes, codes.new_zeros(out_features, len(bounds))], 1)
        with warnings.catch_warnings():  # quantized tensors are deprecated; fbgemm takes only them
            warnings.filterwarnings("ignore", "torch.quantize_per_tensor", UserWarning)
            quantized = torch._make_per_channel_quantized_tensor(
                padded, scales.double(), torch.zeros(out_features, dtype=torch.long), 0
            )
        self.packed = torch.ops.quantized.linear_prepack(quantized, None)
        self.register_buffer("bounds", bounds)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @staticmethod
    def available() -> bool:
        """Whether this torch has the fbgemm kernels (x86 builds do, so far)."""
        return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(
            torch.ops.quantized, "linear_dynamic"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        magnitudes = x.abs().amax(1, keepdim=True).clamp_(min=_TINY)  # a zero row stays zero
        spanned = x.new_empty(x.shape[0], self.spanned_features)
        torch.div(x, magnitudes, out=spanned[:, : self.in_features])
        spanned[:, self.in_features :] = self.bounds
        y = torch.ops.quantized.linear_dynamic(spanned, self.packed, True).mul_(magnitudes)
        return y if self.bias is None else y + self.bias


class Int4Linear(WeightOnlyLinear):
    """y = x @ (minimum + scale * code).T + bias, the codes packed two to a byte."""

    def __init__(self, groups: Int4Groups, bias: torch.Tensor | None):
        super().__init__(bias)
        self.out_features, self.in_features = groups.codes.shape
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(groups.codes.to(torch.int32), 1)
        # The kernel computes (code - 8) * scale + zero, so zero is the minimum plus eight steps.
        zeros = groups.minimums + 8 * groups.scales
        scales_and_zeros = torch.stack([groups.scales.T, zeros.T], -1).to(_KERNEL_DTYPE).contiguous()
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros)

    def kernel_call(self) -> KernelCall:
        return KernelCall(
            torch.ops.aten._weight_int4pack_mm_for_cpu.default,
            self.packed,
            self.scales_and_zeros,
            self.in_features,
            GROUP_SIZE,
        )


def quantize_linears(model: nn.Module, mode: Quantization, groups: dict[str, Int4Groups]) -> dict[str, int]:
    """Replace the float nn.Linear layers of a CPU model; returns how many became which kind.

    int4 takes `groups` (by module name) where the checkpoint had them, else cuts them from the
    weight; the LM head stays at 8 bits, as GGUF files keep the output projection, and quantizes
    its activations too, as llama.cpp does (int4 is the one-stream mode, and at one row fbgemm's
    integer GEMM is the fastest); any layer whose input is no multiple of 32 becomes int8. w8a8
    takes every layer. Experts, stacked parameters rather than layers, stay float32."""
    counts = {"int8": 0, "int4": 0, "w8a8": 0}
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear) or isinstance(parent, MixtureOfExperts):
                continue  # a router stays float32, as GGUF files keep it: it picks the experts
            full_name = f"{parent_name}.{name}" if parent_name else name
            weight = child.weight.detach()
            as_int4 = mode == "int4" and name != "lm_head" and weight.shape[1] % GROUP_SIZE == 0
            head_w8a8 = mode == "int4" and name == "lm_head" and FbgemmInt8Linear.available()
            kind = "int4" if as_int4 else "w8a8" if mode == "w8a8" or head_w8a8 else "int8"
            if kind == "int4":
                layer: nn.Module = Int4Linear(groups.get(full_name) or Int4Groups.of(weight), child.bias)
            elif head_w8a8:
                layer = FbgemmInt8Linear(weight, child.bias)
            elif kind == "w8a8":
                layer = DynamicInt8Linear(weight, child.bias)
            else:
                layer = Int8Linear(weight, child.bias)
            setattr(parent, name, layer)
            counts[kind] += 1
    logger.info("quantized %s linear layers: %s", mode, ", ".join(f"{n} {k}" for k, n in counts.items() if n))
    return counts
