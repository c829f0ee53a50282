"""GenerationCore: the scheduler and the model runner; one `step()` is one forward pass.

The worker's serving loop and the in-process `LLM` (and so the benchmark) drive the same step.
"""

import logging
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from checkpoints import model_dir_of
from scheduler import FinishReason, SamplingParams, Scheduler, SchedulerConfig, Sequence, TokenChunk
from worker.attention import AttentionBackend
from worker.cpu_attention import CpuAttention
from worker.cpu_kernels import keep_freed_memory, pack_linears
from worker.grammar_matchers import GrammarMatchers
from worker.kernels import PagedDecodeKernel
from worker.kv_cache import KVCache, num_blocks_for_budget
from worker.model import CausalLM
from worker.model_config import CheckpointError, ModelConfig
from worker.model_loader import load_model
from worker.model_runner import ModelRunner
from worker.settings import EngineSettings, Quantization

logger = logging.getLogger(__name__)

_CPU_KV_CACHE_BYTES = 2 << 30


@dataclass(slots=True)
class StepStats:
    """Where engine time went, for the benchmark and the periodic stats line."""

    num_steps: int = 0
    step_s: float = 0.0  # whole steps: scheduling, tensor building, forward, sampling, bookkeeping
    num_prefill_steps: int = 0  # steps that carried prompt (or recomputed) tokens
    prefill_step_s: float = 0.0
    model_s: float = 0.0  # of step_s, inside the model's forward (the rest is the host's share)
    prefill_model_s: float = 0.0
    num_tokens: int = 0  # tokens fed to the model
    num_prefill_tokens: int = 0  # of them, in prefill steps
    num_sampled_rows: int = 0  # rows through the LM head to sample (a draft checked is one)
    num_prefill_sampled_rows: int = 0
    num_generated: int = 0  # tokens sampled
    batch_sizes: Counter[int] = field(default_factory=Counter)  # sequences per step -> steps


@dataclass(frozen=True, slots=True)
class GenerationStep:
    """What one step did: each sequence's new tokens, over how many tokens and sequences."""

    chunks: list[TokenChunk]
    num_tokens: int  # tokens fed to the model
    num_seqs: int


class GenerationCore:
    """Owns one model on one device and the scheduler feeding it."""

    def __init__(self, scheduler: Scheduler, runner: ModelRunner, quantization: Quantization = "none"):
        self.scheduler = scheduler
        self.runner = runner
        self.quantization = quantization  # how the model's linear weights are held
        self.stats = StepStats()

    @classmethod
    def from_settings(cls, settings: EngineSettings) -> "GenerationCore":
        device = prepare_device(settings)
        dtype = resolve_dtype(settings.dtype, device)
        used_before = _device_memory_in_use(device)
        model, config, max_model_len = load_model(
            settings.model, device, settings.max_model_len, dtype, settings.quantization
        )
        if device.type == "cpu":
            keep_freed_memory()
            pack_linears(model, settings.max_num_seqs)
        attention = attention_backend(settings, device, dtype)
        if attention.name == "triton" and dtype != torch.float32:
            from worker.fused_ops import FusedOps

            model.use_fused_ops(FusedOps())
        graph_sizes = _graph_sizes(settings, model, attention)
        budget = settings.kv_cache_bytes or _default_kv_bytes(
            settings, model, config, attention, dtype, max_model_len, graph_sizes, used_before
        )
        num_blocks = num_blocks_for_budget(config, settings.block_size, budget, dtype)
        pool_tokens = num_blocks * settings.block_size
        if pool_tokens < max_model_len:
            if settings.max_model_len is not None:
                raise CheckpointError(
                    f"a KV cache of {budget} bytes holds {pool_tokens} tokens, fewer than "
                    f"max_model_len {max_model_len}: raise kv_cache_bytes or lower max_model_len"
                )
            logger.warning("KV cache holds %d tokens: max_model_len lowered to that", pool_tokens)
            max_model_len = pool_tokens
        scheduler_config = SchedulerConfig(
            num_blocks=num_blocks,
            max_model_len=max_model_len,
            block_size=settings.block_size,
            max_num_seqs=settings.max_num_seqs,
            max_num_batched_tokens=settings.max_num_batched_tokens,
            enable_prefix_caching=settings.enable_prefix_caching,
            eos_token_ids=config.eos_token_ids,
            long_prompt_from=model.long_prompt_from,
            sliding_window=config.window_of_every_layer,
            batching=settings.batching,
            num_speculative_tokens=settings.num_speculative_tokens if settings.speculative == "ngram" else 0,
            prompt_lookup_min=settings.prompt_lookup_min,
            prompt_lookup_max=settings.prompt_lookup_max,
        )
        kv_cache = KVCache(config, num_blocks, settings.block_size, device, dtype)
        logger.info(
            "engine ready: model=%s (%s) device=%s dtype=%s quantization=%s attention=%s max_model_len=%d "
            "kv_blocks=%d (%.0f MiB)",
            settings.model,
            config.model_type,
            device,
            str(dtype).removeprefix("torch."),
            settings.quantization,
            attention.name,
            max_model_len,
            num_blocks,
            kv_cache.num_bytes / 2**20,
        )
        matchers = GrammarMatchers(model_dir_of(settings.model), config.vocab_size, config.eos_token_ids)
        runner = ModelRunner(model, kv_cache, device, attention, matchers)
        if graph_sizes:
            from worker.cuda_graphs import DecodeGraphs
            from worker.triton_attention import TritonAttention

            assert isinstance(attention, TritonAttention)
            runner.graphs = DecodeGraphs(model, kv_cache, attention, graph_sizes, max_model_len)
            runner.graphs.capture()
        return cls(Scheduler(scheduler_config), runner, settings.quantization)

    @property
    def vocab_size(self) -> int:
        return self.runner.model.config.vocab_size

    @property
    def max_model_len(self) -> int:
        return self.scheduler.config.max_model_len

    def warm_up(self) -> None:
        """A few steps on made-up tokens before serving — one prefill of a whole step's budget and
        a batch of decodes — so that the C kernel's build, torch's lazy setup and the allocator's
        first pools are paid here, not by the first client. Leaves no sequence and no stats."""
        config = self.scheduler.config
        long_prompt = min(config.max_num_batched_tokens, config.max_model_len - 2)
        greedy = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
        for index in range(min(config.max_num_seqs, 8)):
            length = long_prompt if index == 0 else 8
            self.add(
                Sequence(f"warm-up-{index}", [(index + t) % self.vocab_size for t in range(length)], greedy)
            )
        while not self.scheduler.is_idle:
            if self.step() is None:  # nothing fits (a KV cache smaller than a step): done warming
                for index in range(min(config.max_num_seqs, 8)):
                    self.abort(f"warm-up-{index}")
        self.stats = StepStats()

    def add(self, seq: Sequence) -> None:
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        """Stop every choice of a request and free their blocks now; False if none is here."""
        return self.finish(request_id, FinishReason.CANCELLED)

    def finish(self, request_id: str, reason: FinishReason, choice_index: int | None = None) -> bool:
        """End a request's sequences now (a cancel), or one choice (a stop string); False if none
        was here."""
        ended = self.scheduler.finish(request_id, reason, choice_index)
        for seq in ended:
            self._forget(request_id, seq.choice_index)
        return bool(ended)

    def _forget(self, request_id: str, choice_index: int) -> None:
        if self.runner.matchers is not None:
            self.runner.matchers.drop(request_id, choice_index)

    def step(self) -> GenerationStep | None:
        """Schedule, run the model once, sample; None when nothing was due."""
        started = time.perf_counter()
        output = self.scheduler.schedule()
        if output.is_empty:
            return None
        model_s = self.runner.model_s
        result = self.runner.execute(output)
        model_s = self.runner.model_s - model_s
        chunks = self.scheduler.update(output, result.sampled, result.prompt_logprobs)
        for chunk in chunks:
            if chunk.finish_reason is not None:
                self._forget(chunk.request_id, chunk.choice_index)
        stats = self.stats
        seconds = time.perf_counter() - started
        stats.num_steps += 1
        stats.step_s += seconds
        stats.model_s += model_s
        num_rows = sum(item.num_draft_tokens + len(item.sample_choices) for item in output.scheduled)
        if not all(item.is_decode for item in output.scheduled):
            stats.num_prefill_steps += 1
            stats.prefill_step_s += seconds
            stats.prefill_model_s += model_s
            stats.num_prefill_tokens += output.num_batched_tokens
            stats.num_prefill_sampled_rows += num_rows
        stats.num_tokens += output.num_batched_tokens
        stats.num_sampled_rows += num_rows
        stats.num_generated += sum(len(chunk.tokens) for chunk in chunks)
        stats.batch_sizes[len(output.scheduled)] += 1
        return GenerationStep(chunks, output.num_batched_tokens, len(output.scheduled))


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


def _device_memory_in_use(device: torch.device) -> int:
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
    kernel = None
    if device.type == "cpu" and settings.cpu_decode_kernel and dtype != torch.float32:
        logger.info("the C decode kernel is float32-only: %s decodes use gather + SDPA", settings.dtype)
    elif device.type == "cpu" and settings.cpu_decode_kernel:
        kernel = PagedDecodeKernel.load()
    return CpuAttention(settings.block_size, device, kernel)


def _graph_sizes(settings: EngineSettings, model: CausalLM, attention: AttentionBackend) -> list[int]:
    """The decode batch sizes to capture as CUDA graphs; none when off or not possible."""
    if not settings.cuda_graphs or attention.name != "triton":
        return []
    from worker.cuda_graphs import DecodeGraphs, capture_sizes

    why_not = DecodeGraphs.supported(model)
    if why_not is not None:
        logger.info("CUDA graphs off: %s", why_not)
        return []
    return capture_sizes(settings.max_num_seqs)


def _default_kv_bytes(
    settings: EngineSettings,
    model: CausalLM,
    config: ModelConfig,
    attention: AttentionBackend,
    dtype: torch.dtype,
    max_model_len: int,
    graph_sizes: list[int],
    used_before: int,
) -> int:
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
