"""Where an engine runs and how it uses the device: the device and dtype, the attention backend,
the decode graph sizes and the KV cache's budget (on a GPU, measured: worker/gpu_memory.py)."""

import logging
from typing import TYPE_CHECKING

import torch

from worker.attention import AttentionBackend
from worker.cpu_attention import CpuAttention
from worker.cpu_fused_ops import CpuFusedOps
from worker.decode_layers import DecodeLayers
from worker.kernels import PagedDecodeKernel
from worker.kernels.prefill import PagedPrefillKernel
from worker.model import CausalLM
from worker.model_config import CheckpointError, ModelConfig
from worker.settings import EngineSettings

if TYPE_CHECKING:
    from worker.fused_ops import FusedOps

logger = logging.getLogger(__name__)

_CPU_KV_CACHE_BYTES = 2 << 30


def prepare_device(settings: EngineSettings) -> torch.device:
    """The device to run on ("auto": CUDA when there is one), with torch's CPU threads as set."""
    if settings.num_threads:
        torch.set_num_threads(settings.num_threads)
    if settings.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(settings.device)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`--dtype`: auto is float32 on CPU (whose matmuls are fastest and exact there), bfloat16 on a
    GPU that has it, else float16."""
    if name != "auto":
        return getattr(torch, name)
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def device_memory_in_use(device: torch.device) -> int:
    """A GPU's memory in use before this worker loads anything (others' and its CUDA context)."""
    if device.type != "cuda":
        return 0
    free, total = torch.cuda.mem_get_info(device)
    return total - free


def attention_backend(settings: EngineSettings, device: torch.device, dtype: torch.dtype) -> AttentionBackend:
    """`--attention-backend`: auto is triton on CUDA, cpu elsewhere."""
    name = settings.attention_backend
    if name == "auto":
        name = "triton" if device.type == "cuda" else "cpu"
    if name == "triton":
        if device.type != "cuda":
            raise CheckpointError("attention_backend triton runs on CUDA only: use cpu (or auto) here")
        from worker.triton_attention import TritonAttention

        return TritonAttention(settings.block_size, device)
    kernel, prefill_kernel = None, None
    if device.type == "cpu" and dtype != torch.float32:
        if settings.cpu_decode_kernel or settings.cpu_prefill_kernel:
            logger.info("the C attention kernels are float32-only: %s attention uses SDPA", settings.dtype)
    elif device.type == "cpu":
        kernel = PagedDecodeKernel.load() if settings.cpu_decode_kernel else None
        prefill_kernel = PagedPrefillKernel.load() if settings.cpu_prefill_kernel else None
    return CpuAttention(settings.block_size, device, kernel, prefill_kernel)


def fused_ops(settings: EngineSettings, attention: AttentionBackend, dtype: torch.dtype) -> "FusedOps | None":
    """The fused kernels the decoder calls: Triton's for 16-bit CUDA steps; C's on a CPU in float32
    (`--cpu-fused-ops`), with float or quantized weights."""
    if attention.name == "triton" and dtype != torch.float32:
        from worker.triton_fused_ops import TritonFusedOps

        return TritonFusedOps()
    if attention.device.type != "cpu" or dtype != torch.float32 or not settings.cpu_fused_ops:
        return None
    return CpuFusedOps.load()


def decode_layers(
    model: CausalLM, ops: "FusedOps | None", attention: AttentionBackend
) -> DecodeLayers | None:
    """Every layer of a decode step in one C call, where the model runs C's fused ops and kernel and
    its layers fit (worker/decode_layers.py: quantized weight-only linears)."""
    if (
        not isinstance(ops, CpuFusedOps)
        or not isinstance(attention, CpuAttention)
        or attention.decode_kernel is None
    ):
        return None
    return DecodeLayers.of(model, ops, attention.decode_kernel)


def decode_graph_sizes(settings: EngineSettings, model: CausalLM, attention: AttentionBackend) -> list[int]:
    """The decode batch sizes to capture as CUDA graphs; none when off or not possible."""
    if not settings.cuda_graphs or attention.name != "triton":
        return []
    from worker.cuda_graphs import DecodeGraphs, capture_sizes

    why_not = DecodeGraphs.supported(model)
    if why_not is not None:
        logger.info("CUDA graphs off: %s", why_not)
        return []
    return capture_sizes(settings.max_num_seqs)


def default_kv_cache_bytes(
    settings: EngineSettings,
    model: CausalLM,
    config: ModelConfig,
    attention: AttentionBackend,
    dtype: torch.dtype,
    max_model_len: int,
    graph_sizes: list[int],
    used_before: int,
) -> int:
    """The KV cache's bytes when not given: 2 GiB on a CPU; on a GPU, what the measured plan leaves."""
    if attention.device.type != "cuda":
        return _CPU_KV_CACHE_BYTES
    from worker.gpu_memory import plan_gpu_memory

    plan = plan_gpu_memory(
        model,
        config,
        attention,
        dtype,
        settings.gpu_memory_fraction,
        min(settings.max_num_batched_tokens, max_model_len),
        graph_sizes,
        used_before,
    )
    logger.info("%s", plan.describe())
    return plan.kv_bytes
