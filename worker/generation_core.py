"""GenerationCore: the scheduler and the model runner; one `step()` is one forward pass.

The worker's serving loop and the in-process `LLM` (and so the benchmark) drive the same step.
"""

import logging
import time
from collections import Counter
from dataclasses import dataclass, field

from checkpoints import model_dir_of
from scheduler import FinishReason, SamplingParams, Scheduler, SchedulerConfig, Sequence, TokenChunk
from worker.cpu_kernels import keep_freed_memory, pack_linears
from worker.engine_device import (
    attention_backend,
    decode_graph_sizes,
    decode_layers,
    default_kv_cache_bytes,
    device_memory_in_use,
    fused_ops,
    prepare_device,
    resolve_dtype,
)
from worker.grammar_matchers import GrammarMatchers
from worker.kv_cache import KVCache, num_blocks_for_budget
from worker.model_config import CheckpointError
from worker.model_loader import load_model
from worker.model_runner import ModelRunner
from worker.settings import EngineSettings, Quantization

logger = logging.getLogger(__name__)

_WARM_UP_PROMPT_TOKENS = 512


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
        used_before = device_memory_in_use(device)
        model, config, max_model_len = load_model(
            settings.model, device, settings.max_model_len, dtype, settings.quantization
        )
        if device.type == "cpu":
            keep_freed_memory()
            pack_linears(model, settings.max_num_seqs)
        attention = attention_backend(settings, device, dtype)
        if (fused := fused_ops(settings, attention, dtype)) is not None:
            model.use_fused_ops(fused)
            model.decode_layers = decode_layers(model, fused, attention)
        graph_sizes = decode_graph_sizes(settings, model, attention)
        budget = settings.kv_cache_bytes or default_kv_cache_bytes(
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
            "engine ready: model=%s (%s) device=%s dtype=%s quantization=%s attention=%s decode_layers=%s "
            "max_model_len=%d kv_blocks=%d (%.0f MiB)",
            settings.model,
            config.model_type,
            device,
            str(dtype).removeprefix("torch."),
            settings.quantization,
            attention.describe(),
            "python" if model.decode_layers is None else "c",  # a decode step's layers: one C call?
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
        """A few steps on made-up tokens before serving — one prefill of up to 512 tokens and a
        batch of decodes — so that the C kernel's build, torch's lazy setup and the allocator's
        first pools are paid here, not by the first client (a whole budget of 2048 would add
        seconds to every start on a CPU). Leaves no sequence and no stats."""
        config = self.scheduler.config
        long_prompt = min(config.max_num_batched_tokens, _WARM_UP_PROMPT_TOKENS, config.max_model_len - 2)
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
