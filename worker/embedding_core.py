"""EmbeddingCore: the embeddings worker's engine — the batcher's batches through the encoder."""

import time
from dataclasses import dataclass

import torch

from scheduler.embedding_batcher import EmbedCall, EmbeddingBatcher, EmbeddingBatcherConfig
from worker.embedding_model import EmbeddingModel


@dataclass(frozen=True, slots=True)
class Embedded:
    """A finished call: one vector per input, in the call's order."""

    request_id: str
    vectors: list[list[float]]
    prompt_tokens: int


class EmbeddingCore:
    def __init__(self, model: EmbeddingModel, config: EmbeddingBatcherConfig):
        self.model = model
        self.batcher: EmbeddingBatcher[torch.Tensor] = EmbeddingBatcher(config)
        self._normalize: dict[str, bool] = {}

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

    def step(self) -> list[Embedded]:
        """Run the batch that is due, if one is; returns the calls it completed."""
        batch = self.batcher.next_batch(time.monotonic())
        if batch is None:
            return []
        vectors = self.model.encode([item.token_ids for item in batch.inputs])
        return [self._finish(call) for call in self.batcher.complete(batch, list(vectors))]

    def _finish(self, call: EmbedCall[torch.Tensor]) -> Embedded:
        stacked = torch.stack(call.vectors)
        if self._normalize.pop(call.request_id):
            stacked = torch.nn.functional.normalize(stacked, p=2, dim=1)
        return Embedded(call.request_id, stacked.tolist(), call.prompt_tokens)
