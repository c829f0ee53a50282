"""EngineCore: scheduler + model runner + stop strings; one `step()` is one forward pass.

The worker's serving loop and the in-process `LLM` (and so the benchmark) drive the same step.
"""

import dataclasses
import logging
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from scheduler import FinishReason, Scheduler, SchedulerConfig, Sequence, TokenChunk
from tokenization import TextStream, Tokenizer
from worker.cpu_kernels import keep_freed_memory, pack_linears
from worker.kernels import PagedDecodeKernel
from worker.kv_cache import KVCache, num_blocks_for_budget
from worker.model_loader import load_model, model_dir_of
from worker.model_runner import ModelRunner
from worker.settings import EngineSettings

logger = logging.getLogger(__name__)

_CPU_KV_CACHE_BYTES = 2 << 30


@dataclass(slots=True)
class StepStats:
    """Where engine time went, for the benchmark and the periodic stats line."""

    num_steps: int = 0
    step_s: float = 0.0  # whole steps: scheduling, tensor building, forward, sampling, bookkeeping
    num_prefill_steps: int = 0  # steps that carried prompt (or recomputed) tokens
    prefill_step_s: float = 0.0
    num_tokens: int = 0  # tokens fed to the model
    num_generated: int = 0  # tokens sampled
    batch_sizes: Counter[int] = field(default_factory=Counter)  # sequences per step -> steps
    last_step_tokens: int = 0
    last_step_seqs: int = 0


class EngineCore:
    """Owns one model on one device and the scheduler feeding it."""

    def __init__(self, scheduler: Scheduler, runner: ModelRunner, tokenizer: Tokenizer):
        self.scheduler = scheduler
        self.runner = runner
        self.tokenizer = tokenizer
        self.stats = StepStats()
        self._stop_streams: dict[str, TextStream] = {}

    @classmethod
    def from_settings(cls, settings: EngineSettings) -> "EngineCore":
        device = prepare_device(settings)
        model, config, max_model_len = load_model(settings.model, device, settings.max_model_len)
        if device.type == "cpu":
            keep_freed_memory()
            pack_linears(model, settings.max_num_seqs)
        budget = settings.kv_cache_bytes or _default_kv_bytes(device, settings.gpu_memory_fraction)
        num_blocks = num_blocks_for_budget(config, settings.block_size, budget)
        pool_tokens = num_blocks * settings.block_size
        if pool_tokens < max_model_len:
            if settings.max_model_len is not None:
                raise ValueError(
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
        )
        kv_cache = KVCache(config, num_blocks, settings.block_size, device)
        logger.info(
            "engine ready: model=%s device=%s max_model_len=%d kv_blocks=%d (%.0f MiB)",
            settings.model,
            device,
            max_model_len,
            num_blocks,
            kv_cache.num_bytes / 2**20,
        )
        tokenizer = Tokenizer(model_dir_of(settings.model))
        kernel = None
        if device.type == "cpu" and settings.cpu_decode_kernel:
            kernel = PagedDecodeKernel.load()
        runner = ModelRunner(model, kv_cache, device, kernel)
        return cls(Scheduler(scheduler_config), runner, tokenizer)

    @property
    def vocab_size(self) -> int:
        return self.runner.model.config.vocab_size

    @property
    def max_model_len(self) -> int:
        return self.scheduler.config.max_model_len

    def add(self, seq: Sequence) -> None:
        self.scheduler.add(seq)
        if seq.sampling.stop:
            stream = TextStream(self.tokenizer, seq.sampling.stop)
            stream.push(seq.output_token_ids)  # a resumed sequence's text so far
            self._stop_streams[seq.request_id] = stream

    def abort(self, request_id: str, reason: FinishReason = FinishReason.CANCELLED) -> bool:
        """Stop a sequence and free its blocks now; False if it is not here."""
        self._stop_streams.pop(request_id, None)
        return self.scheduler.finish(request_id, reason) is not None

    def step(self) -> list[TokenChunk]:
        """Schedule, run the model once, sample, and return each sequence's new tokens."""
        started = time.perf_counter()
        output = self.scheduler.schedule()
        if output.is_empty:
            return []
        sampled = self.runner.execute(output)
        chunks = [self._apply_stop_strings(c) for c in self.scheduler.update(output, sampled)]
        stats = self.stats
        seconds = time.perf_counter() - started
        stats.num_steps += 1
        stats.step_s += seconds
        if not all(item.is_decode for item in output.scheduled):
            stats.num_prefill_steps += 1
            stats.prefill_step_s += seconds
        stats.num_tokens += output.num_batched_tokens
        stats.num_generated += sum(len(chunk.tokens) for chunk in chunks)
        stats.batch_sizes[len(output.scheduled)] += 1
        stats.last_step_tokens = output.num_batched_tokens
        stats.last_step_seqs = len(output.scheduled)
        return chunks

    def _apply_stop_strings(self, chunk: TokenChunk) -> TokenChunk:
        stream = self._stop_streams.get(chunk.request_id)
        if stream is None:
            return chunk
        stream.push(chunk.token_ids)
        if stream.matched_stop is not None:
            if chunk.finish_reason is None:
                self.scheduler.finish(chunk.request_id, FinishReason.STOP)
            chunk = dataclasses.replace(
                chunk, finish_reason=FinishReason.STOP, stop_string=stream.matched_stop
            )
        if chunk.finish_reason is not None:
            del self._stop_streams[chunk.request_id]
        return chunk


def prepare_device(settings: EngineSettings) -> torch.device:
    """The device to run on ("auto": CUDA when there is one), with torch's CPU threads as set."""
    if settings.num_threads:
        torch.set_num_threads(settings.num_threads)
    if settings.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(settings.device)


def _default_kv_bytes(device: torch.device, gpu_memory_fraction: float) -> int:
    if device.type != "cuda":
        return _CPU_KV_CACHE_BYTES
    free, _ = torch.cuda.mem_get_info(device)
    return int(free * gpu_memory_fraction)
