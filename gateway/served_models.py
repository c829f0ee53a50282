"""ServedModels: the models behind one gateway — each with its kind, tokenizer, request stream and
metrics — and how a request's `model` field picks one."""

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from gateway.errors import GatewayError
from gateway.job_queue import JobQueue
from gateway.metrics import ModelMetrics
from protos import inference_pb2
from protos.model_kind import ModelKind, PoolingConfig
from tokenization import Tokenizer

KIND_TO_PROTO = {
    ModelKind.GENERATE: inference_pb2.MODEL_KIND_GENERATE,
    ModelKind.EMBED: inference_pb2.MODEL_KIND_EMBED,
}
_CALLS = {ModelKind.GENERATE: "Generate or GenerateStream", ModelKind.EMBED: "Embed"}
_NOUNS = {ModelKind.GENERATE: "a generation", ModelKind.EMBED: "an embedding"}


def checkpoint_max_context(path: Path, kind: ModelKind, override: int | None) -> int:
    """Tokens one input may hold, from the checkpoint's own files, until live workers report theirs."""
    if kind is ModelKind.EMBED:
        return PoolingConfig.of(path).max_length
    config = json.loads((path / "config.json").read_text())
    limit = int(config.get("max_position_embeddings", 2048))
    return min(limit, override) if override else limit


def embedding_dimension(path: Path) -> int:
    return int(json.loads((path / "config.json").read_text()).get("hidden_size", 0))


@dataclass(slots=True)
class ServedModel:
    name: str
    kind: ModelKind
    tokenizer: Tokenizer
    jobs: JobQueue
    metrics: ModelMetrics
    max_context: int  # the smallest among live workers, once known
    dimension: int  # an embedder's vector size; 0 for a generator
    num_workers: int = 0
    serving: bool = False  # a live worker accepts its jobs

    def info(self, is_default: bool) -> inference_pb2.ModelInfo:
        return inference_pb2.ModelInfo(
            id=self.name,
            max_context=self.max_context,
            num_workers=self.num_workers,
            is_default=is_default,
            kind=KIND_TO_PROTO[self.kind],
            dimension=self.dimension,
        )


class ServedModels:
    """By name; the first model of each kind is that kind's default."""

    def __init__(self, models: list[ServedModel]):
        self._by_name = {model.name: model for model in models}
        if len(self._by_name) != len(models):
            raise ValueError(f"two served models share a name: {[m.name for m in models]}")
        self._defaults: dict[ModelKind, ServedModel] = {}
        for model in models:
            self._defaults.setdefault(model.kind, model)
        self.first = models[0]

    def __iter__(self) -> Iterator[ServedModel]:
        return iter(self._by_name.values())

    def is_default(self, model: ServedModel) -> bool:
        return self._defaults.get(model.kind) is model

    def resolve(self, name: str, kind: ModelKind | None) -> ServedModel:
        """The model a request names (empty: the default of `kind`, or the first model when any
        kind will do); NOT_FOUND when none, INVALID_ARGUMENT when it is of the other kind."""
        if not name:
            model = self.first if kind is None else self._defaults.get(kind)
            if model is None:
                message = f"model: {_NOUNS[kind]} model is not served here"
                raise GatewayError(message, grpc.StatusCode.NOT_FOUND)
            return model
        model = self._by_name.get(name)
        if model is None:
            raise GatewayError(
                f"model: {name!r} is not served here (served: {', '.join(map(repr, self._by_name))})",
                grpc.StatusCode.NOT_FOUND,
            )
        if kind is not None and model.kind is not kind:
            raise GatewayError(
                f"model: {name!r} is {_NOUNS[model.kind]} model: call {_CALLS[model.kind]}",
                grpc.StatusCode.INVALID_ARGUMENT,
            )
        return model
