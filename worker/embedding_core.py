"""EmbeddingCore: the embeddings worker's engine — the batcher's batches through the encoder."""

import logging
import time
from dataclasses import dataclass

import torch

from scheduler.embedding_batcher import EmbedCall, EmbeddingBatcher, EmbeddingBatcherConfig
from worker.embedding_model import EmbeddingModel
from worker.engine_device import prepare_device, resolve_dtype
from worker.settings import WorkerSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Embedded:
    """A finished call: one vector per input, in the call's order."""

    request_id: str
    vectors: list[list[float]]
    prompt_tokens: int


@dataclass(frozen=True, slots=True)
class EmbeddingStep:
    """What one batch did: the calls it completed, over how many inputs and padded tokens."""

    finished: list[Embedded]
    num_inputs: int
    num_padded_tokens: int


@dataclass(slots=True)
class BatchStats:
    """What the encoder ran, for the periodic stats line and the benchmark."""

    num_batches: int = 0
    num_inputs: int = 0
    num_padded_tokens: int = 0  # each group's inputs x its longest, summed over batches


class EmbeddingCore:
    def __init__(self, model: EmbeddingModel, config: EmbeddingBatcherConfig):
        self.model = model
        self.batcher: EmbeddingBatcher[torch.Tensor] = EmbeddingBatcher(config)
        self.stats = BatchStats()
        self._normalize: dict[str, bool] = {}

    @classmethod
    def from_settings(cls, settings: WorkerSettings) -> "EmbeddingCore":
        device = prepare_device(settings)
        model = EmbeddingModel(settings.model, device, resolve_dtype(settings.dtype, device))
        config = EmbeddingBatcherConfig(
            max_batch_tokens=settings.embed_max_batch_tokens,
            max_batch_size=settings.embed_max_batch_size,
            max_wait_s=settings.embed_max_wait_ms / 1000,
        )
        logger.info(
            "embedder ready: model=%s device=%s dtype=%s dimension=%d pooling=%s normalize=%s max_length=%d",
            settings.model,
            device,
            model.dtype,
            model.dimension,
            model.pooling.mode,
            model.pooling.normalize,
            model.pooling.max_length,
        )
        return cls(model, config)

    def warm_up(self) -> None:
        """One batch of made-up inputs before serving (short and as long as the model takes), so
        the first call does not pay for the encoder's first forwards."""
        pad = self.model.pad_token_id
        self.model.encode([[pad] * 8, [pad] * self.model.pooling.max_length])

    def add(self, request_id: str, inputs: list[list[int]], normalize: bool | None = None) -> None:
        """Queue a call; `normalize` None follows the model's own configuration."""
        if any(len(ids) > self.model.pooling.max_length for ids in inputs):
            raise ValueError(f"an input is longer than the model's {self.model.pooling.max_length} tokens")
        self.batcher.add(request_id, inputs, time.monotonic())
        self._normalize[request_id] = self.model.pooling.normalize if normalize is None else normalize

    def abort(self, request_id: str) -> None:
        if self.batcher.cancel(request_id):
            del self._normalize[request_id]

    def wait_s(self) -> float | None:
        """How long until the next batch is due; None when idle."""
        return self.batcher.wait_s(time.monotonic())

    def step(self) -> EmbeddingStep | None:
        """Run the batch that is due; None when none is."""
        batch = self.batcher.next_batch(time.monotonic())
        if batch is None:
            return None
        vectors = [v for group in batch.groups for v in self.model.encode([i.token_ids for i in group])]
        stats = self.stats
        stats.num_batches += 1
        stats.num_inputs += len(batch.inputs)
        stats.num_padded_tokens += batch.padded_tokens
        finished = [self._finish(call) for call in self.batcher.complete(batch, vectors)]
        return EmbeddingStep(finished, len(batch.inputs), batch.padded_tokens)

    def _finish(self, call: EmbedCall[torch.Tensor]) -> Embedded:
        stacked = torch.stack(call.vectors)
        if self._normalize.pop(call.request_id):
            stacked = torch.nn.functional.normalize(stacked, p=2, dim=1)
        return Embedded(call.request_id, stacked.tolist(), call.prompt_tokens)
