"""Decode steps replayed from CUDA graphs: one launch of a whole captured forward instead of a few
hundred kernel launches from Python.

Graphs are captured at start-up for a set of batch sizes (`capture_sizes`), largest first, sharing
one memory pool. A decode-only step is padded up to the next captured size (`padded_size`): padding
rows store nothing (slot -1) and see no keys (length 0), so they cost a few wasted rows and change
no real row. Prefill, drafts and anything larger run eager.
"""

import bisect
import logging
import time
from dataclasses import dataclass

import torch

from worker.attention import SequenceRows, padded_block_tables
from worker.kv_cache import KVCache
from worker.model import CausalLM
from worker.moe import MixtureOfExperts
from worker.triton_attention import TritonAttention

logger = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, then every multiple of 8 below max_num_seqs, and max_num_seqs itself."""
    small = [size for size in (1, 2, 4) if size < max_num_seqs]
    return small + list(range(8, max_num_seqs, 8)) + [max_num_seqs]


def padded_size(sizes: list[int], num_rows: int) -> int | None:
    """The smallest captured size holding num_rows; None above the largest."""
    at = bisect.bisect_left(sizes, num_rows)
    return sizes[at] if at < len(sizes) else None


@dataclass(frozen=True, slots=True)
class PaddedDecodes:
    """A decode step's inputs padded to a captured size."""

    input_ids: list[int]
    positions: list[int]
    prompt_lens: list[int]
    slot_mapping: list[int]  # -1 on padding rows: stored nowhere
    seq_lens: list[int]  # 0 on padding rows: no keys seen


def pad_decodes(
    size: int, input_ids: list[int], positions: list[int], prompt_lens: list[int], slot_mapping: list[int]
) -> PaddedDecodes:
    """Row i is decode i (a sequence of one row at position positions[i]); rows up to `size` pad."""
    pad = size - len(input_ids)
    assert pad >= 0
    return PaddedDecodes(
        input_ids + [0] * pad,
        positions + [0] * pad,
        prompt_lens + [0] * pad,
        slot_mapping + [-1] * pad,
        [position + 1 for position in positions] + [0] * pad,
    )


class DecodeGraphs:
    """Captured decode forwards over fixed input tensors; `run` copies a step in and replays."""

    def __init__(
        self,
        model: CausalLM,
        kv_cache: KVCache,
        backend: TritonAttention,
        sizes: list[int],
        max_model_len: int,
    ):
        self.model = model
        self.kv_cache = kv_cache
        self.backend = backend
        self.sizes = sizes
        device = backend.device
        largest = sizes[-1]
        max_blocks = -(-max_model_len // kv_cache.block_size)
        self.input_ids = torch.zeros(largest, dtype=torch.long, device=device)
        self.positions = torch.zeros(largest, dtype=torch.long, device=device)
        self.prompt_lens = torch.zeros(largest, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((largest,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.zeros(largest, dtype=torch.int32, device=device)
        self.query_start = torch.arange(largest + 1, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(largest, max_blocks, dtype=torch.int32, device=device)
        self.rows = torch.arange(largest, dtype=torch.long, device=device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    @staticmethod
    def supported(model: CausalLM) -> str | None:
        """Why this model's decode cannot be captured, or None."""
        if any(isinstance(module, MixtureOfExperts) for module in model.modules()):
            return "routed experts size their products on the host"
        return None

    def capture(self) -> None:
        """Capture every size, largest first (later ones fit in its pool); logs time and memory."""
        started = time.perf_counter()
        reserved = torch.cuda.memory_reserved(self.backend.device)
        pool = None
        for size in reversed(self.sizes):
            self._forward(size)  # compiles the kernels for this shape outside the capture
            torch.cuda.synchronize(self.backend.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self._forward(size)
            pool = graph.pool()
            self._graphs[size] = (graph, logits)
        logger.info(
            "CUDA graphs: decode steps of %s sequences captured in %.1f s, %.0f MiB",
            ",".join(map(str, self.sizes)),
            time.perf_counter() - started,
            (torch.cuda.memory_reserved(self.backend.device) - reserved) / 2**20,
        )

    def _forward(self, size: int) -> torch.Tensor:
        step = self.backend.step(
            self.slot_mapping[:size],
            self.query_start[: size + 1],
            self.seq_lens[:size],
            self.block_tables[:size],
            max_q_len=1,
        )
        return self.model(
            self.input_ids[:size],
            self.positions[:size],
            self.kv_cache,
            step,
            self.rows[:size],
            self.prompt_lens[:size],
        )

    def size_for(self, num_rows: int) -> int | None:
        """The captured size a decode step of num_rows replays; None: run it eager."""
        return padded_size(self.sizes, num_rows) if self._graphs else None

    def run(
        self,
        size: int,
        seqs: list[SequenceRows],
        input_ids: list[int],
        positions: list[int],
        prompt_lens: list[int],
        slot_mapping: list[int],
    ) -> torch.Tensor:  # [size, vocab_size]: row i is decode i's, rows past len(seqs) are padding
        padded = pad_decodes(size, input_ids, positions, prompt_lens, slot_mapping)
        for target, values in (
            (self.input_ids, padded.input_ids),
            (self.positions, padded.positions),
            (self.prompt_lens, padded.prompt_lens),
            (self.slot_mapping, padded.slot_mapping),
        ):
            target[:size].copy_(torch.tensor(values, dtype=torch.long), non_blocking=True)
        self.seq_lens[:size].copy_(torch.tensor(padded.seq_lens, dtype=torch.int32), non_blocking=True)
        host = torch.tensor(padded_block_tables(seqs, self.kv_cache.block_size), dtype=torch.int32)
        self.block_tables[: len(seqs), : host.shape[1]].copy_(host, non_blocking=True)
        graph, logits = self._graphs[size]
        graph.replay()
        return logits
