"""DecodeLayers: a quantized model's step of decodes through every layer in one C call.

At one stream on a CPU a FusedLayer's decode step is eight native calls (two norms, the attention,
the activation, four linears), and the Python between them (wrappers, argument conversion, fresh
tensors) was about a quarter of the step. worker/kernels/decode_layers.c makes the same calls in
the same order with the same dtypes, so the logits are bit for bit those of the FusedLayers: the
C norms, activation and attention by address, and each linear through torch's own weight-only
kernel, called by name through libtorch's C shim (the functions AOTInductor's generated code
calls: `aoti_torch_call_dispatcher` and the tensor-handle ones). It runs where every layer is a
FusedLayer whose linears are weight-only (int4, int8) and every row is a decode through the C
attention kernel; any other step, and any other model, runs the layers from Python.
"""

import ctypes
import logging
import weakref
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from worker.attention import QkvLayer, StepAttention
from worker.cpu_attention import CpuStepAttention
from worker.cpu_fused_ops import NORM_GEMMA, NORM_PLAIN
from worker.fused_layer import FusedLayer
from worker.kernels import DecodeLayer, DecodeStep, PagedDecodeKernel
from worker.kernels.c_library import function_address, load_c_library
from worker.quantized_linear import KernelCall, WeightOnlyLinear

if TYPE_CHECKING:
    from worker.cpu_fused_ops import CpuFusedOps
    from worker.kv_cache import KVCache
    from worker.model import CausalLM, Rotation

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("kernels") / "decode_layers.c"
_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_SHIM_FUNCTIONS = (
    ("call_dispatcher", "aoti_torch_call_dispatcher"),
    ("from_blob", "aoti_torch_create_tensor_from_blob"),
    ("new_handle", "aoti_torch_new_tensor_handle"),
    ("data_ptr", "aoti_torch_get_data_ptr"),
    ("delete_tensor", "aoti_torch_delete_tensor_object"),
)
_DTYPE_NAMES = {torch.uint8: "uint8", torch.int8: "int8", torch.bfloat16: "bfloat16"}  # weights, scales
_OUT_OF_MEMORY, _TORCH_FAILED = 1, 2  # decode_layers' statuses


class _TorchShim(ctypes.Structure):
    _fields_ = [(name, _P) for name, _ in _SHIM_FUNCTIONS] + [
        ("bfloat16", ctypes.c_int32),
        ("cpu", ctypes.c_int32),
    ]


class _Linear(ctypes.Structure):
    _fields_ = [("op", ctypes.c_char_p), ("weight", _P), ("scales", _P)] + [
        (name, _I64) for name in ("group_size", "in_features", "out_features")
    ]


class _Layer(ctypes.Structure):
    _fields_ = [(name, _Linear) for name in ("qkv", "o_proj", "gate_up", "down")] + [
        ("attn_norm", _P),
        ("mlp_norm", _P),
        ("attn_eps", ctypes.c_float),
        ("mlp_eps", ctypes.c_float),
        ("norm_mode", _I64),
        ("attention", ctypes.POINTER(DecodeLayer)),
        ("key_cache", _P),
        ("value_cache", _P),
        ("rotation", _I64),
    ]


class _Rotation(ctypes.Structure):
    _fields_ = [("cos", _P), ("sin", _P), ("rotary_dim", _I64), ("table_stride", _I64)]


class _Decoder(ctypes.Structure):
    _fields_ = [
        ("torch", _TorchShim),
        ("rms_norm", _P),
        ("silu_and_mul", _P),
        ("attend", _P),
        ("layers", ctypes.POINTER(_Layer)),
        ("num_layers", _I64),
        ("hidden_size", _I64),
    ]


class _TensorHandles:
    """libtorch's C shim, and handles (non-owning views) on tensors the caller keeps alive."""

    def __init__(self, library: ctypes.CDLL):
        self.library = library
        self.shim = _TorchShim(
            *(function_address(getattr(library, symbol)) for _, symbol in _SHIM_FUNCTIONS),
            library.aoti_torch_dtype_bfloat16(),
            library.aoti_torch_device_type_cpu(),
        )
        self._from_blob = library.aoti_torch_create_tensor_from_blob
        self._from_blob.restype = ctypes.c_int32
        self._from_blob.argtypes = [
            _P,
            _I64,
            _P,
            _P,
            _I64,
            ctypes.c_int32,
            ctypes.c_int32,
            ctypes.c_int32,
            _P,
        ]
        self.handles: list[int] = []

    @classmethod
    def load(cls) -> "_TensorHandles | None":
        try:
            library = ctypes.CDLL(str(Path(torch.__file__).with_name("lib") / "libtorch_cpu.so"))
            return cls(library)
        except (OSError, AttributeError) as error:
            logger.info("no torch C shim (%s): quantized decode layers run from Python", error)
            return None

    def handle(self, tensor: torch.Tensor) -> int:
        assert tensor.device.type == "cpu" and tensor.dtype in _DTYPE_NAMES
        sizes, strides = (_I64 * tensor.dim())(*tensor.shape), (_I64 * tensor.dim())(*tensor.stride())
        dtype = getattr(self.library, f"aoti_torch_dtype_{_DTYPE_NAMES[tensor.dtype]}")()
        handle = ctypes.c_void_p()
        status = self._from_blob(
            tensor.data_ptr(), tensor.dim(), sizes, strides, 0, dtype, self.shim.cpu, 0, ctypes.byref(handle)
        )
        if status != 0 or handle.value is None:
            raise RuntimeError(f"torch's C shim made no handle on a {tensor.dtype} tensor")
        self.handles.append(handle.value)
        return handle.value

    @staticmethod
    def delete(library: ctypes.CDLL, handles: list[int]) -> None:
        for handle in handles:
            library.aoti_torch_delete_tensor_object(ctypes.c_void_p(handle))


class DecodeLayers:
    """The C loop over a model's layers, for steps whose every row is a decode."""

    def __init__(
        self,
        model: "CausalLM",
        layers: list[FusedLayer],
        ops: "CpuFusedOps",
        kernel: PagedDecodeKernel,
        library: ctypes.CDLL,
        torch_handles: _TensorHandles,
    ):
        weakref.finalize(self, _TensorHandles.delete, torch_handles.library, torch_handles.handles)
        self._function = library.decode_layers
        self._function.restype = ctypes.c_int
        self._function.argtypes = [ctypes.POINTER(_Decoder), ctypes.POINTER(DecodeStep), _P, _P, _P, _P]
        self._rope_keys = list(dict.fromkeys(model.rope_keys))
        self._attention = [PagedDecodeKernel.layer(layer.heads, qkv_bf16=True) for layer in layers]
        self._layers = (_Layer * len(layers))()
        self._kept: list[object] = []  # what the structs point into
        for index, (fused, module) in enumerate(zip(layers, model.layers, strict=True)):
            attention, mlp = module.self_attn, module.mlp
            self._layers[index] = _Layer(
                self._linear(torch_handles, attention.qkv_proj),
                self._linear(torch_handles, attention.o_proj),
                self._linear(torch_handles, mlp.gate_up_proj),
                self._linear(torch_handles, mlp.down_proj),
                fused.attn_norm.weight.data_ptr(),
                fused.mlp_norm.weight.data_ptr(),
                fused.attn_norm.eps,
                fused.mlp_norm.eps,
                NORM_GEMMA if fused.attn_norm.gemma else NORM_PLAIN,
                ctypes.pointer(self._attention[index]),
                None,
                None,
                self._rope_keys.index(model.rope_keys[index]),
            )
            self._kept += [fused.attn_norm.weight, fused.mlp_norm.weight]
        self._decoder = _Decoder(
            torch_handles.shim,
            ops.rms_norm_address,
            ops.silu_and_mul_address,
            kernel.layer_function_address,
            self._layers,
            len(layers),
            model.config.hidden_size,
        )
        self._rotations = (_Rotation * len(self._rope_keys))()

    def _linear(self, handles: _TensorHandles, linear: WeightOnlyLinear) -> _Linear:
        call: KernelCall = linear.kernel_call()
        self._kept += [call.weight, call.scales]
        return _Linear(
            call.op.name().encode(),  # "aten::...", the default overload
            handles.handle(call.weight),
            handles.handle(call.scales),
            call.group_size,
            call.in_features,
            call.out_features,
        )

    @classmethod
    def of(cls, model: "CausalLM", ops: "CpuFusedOps", kernel: PagedDecodeKernel) -> "DecodeLayers | None":
        """The loop for `model`, or None where a layer does something it does not (or there is no C
        compiler or no torch shim)."""
        layers = [step for step in model.steps if isinstance(step, FusedLayer)]
        if len(layers) != len(model.steps) or not layers or not all(_fits(layer) for layer in layers):
            return None
        if not all(_weight_only_bf16(module.self_attn, module.mlp) for module in model.layers):
            return None
        library = load_c_library(_SOURCE, "quantized decode layers run from Python")
        torch_handles = _TensorHandles.load()
        if library is None or torch_handles is None:
            return None
        try:
            return cls(model, layers, ops, kernel, library, torch_handles)
        except RuntimeError as error:  # a handle torch's shim would not make
            logger.warning("%s: quantized decode layers run from Python", error)
            return None

    def __call__(
        self,
        hidden: torch.Tensor,  # [num_tokens, hidden_size] float32, the embeddings
        rotations: dict[str, "Rotation"],
        kv_cache: "KVCache",
        meta: StepAttention,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(the last layer's output, the residual stream before it), as the layers hand them to
        the final norm; None where the step is not all decodes through the C kernel."""
        if not isinstance(meta, CpuStepAttention) or meta.decode_step is None:
            return None
        assert hidden.dtype == torch.float32 and hidden.is_contiguous()
        assert hidden.shape[0] == meta.decode_step.num_seqs
        for layer, keys, values in zip(self._layers, kv_cache.keys, kv_cache.values, strict=True):
            layer.key_cache, layer.value_cache = keys.data_ptr(), values.data_ptr()  # as the layers read them
        for slot, key in zip(self._rotations, self._rope_keys, strict=True):
            cos = rotations[key].cos
            slot.cos, slot.sin = cos.data_ptr(), rotations[key].sin.data_ptr()
            slot.rotary_dim, slot.table_stride = cos.shape[1], cos.stride(0)
        out = torch.empty(hidden.shape, dtype=torch.bfloat16)
        residual = torch.empty(hidden.shape)
        status = self._function(
            self._decoder,
            meta.decode_step,
            self._rotations,
            hidden.data_ptr(),
            out.data_ptr(),
            residual.data_ptr(),
        )
        if status == _TORCH_FAILED:
            raise RuntimeError("a torch kernel failed in decode_layers (its error is logged above)")
        if status == _OUT_OF_MEMORY:
            raise MemoryError("decode_layers could not allocate its scratch space")
        assert status == 0, status
        return out, residual


def _fits(layer: FusedLayer) -> bool:
    """bfloat16 between every op, as the C loop hands it over."""
    bfloat16 = torch.bfloat16
    heads: QkvLayer = layer.heads
    return (
        layer.attn_norm_dtype == layer.mlp_norm_dtype == layer.mlp_dtype == heads.out_dtype == bfloat16
        and heads.rotary_address is not None
        and layer.attn_norm.gemma == layer.mlp_norm.gemma
    )


def _weight_only_bf16(attention: torch.nn.Module, mlp: torch.nn.Module) -> bool:
    """Every linear weight-only without a bias, giving bfloat16 (q/k/v always does: FusedLayer binds
    it so, for the attention kernel to read)."""
    linears = [attention.qkv_proj, attention.o_proj, mlp.gate_up_proj, mlp.down_proj]
    return all(
        isinstance(linear, WeightOnlyLinear)
        and linear.bias is None
        and (linear is attention.qkv_proj or linear.bfloat16_out)
        for linear in linears
    )
