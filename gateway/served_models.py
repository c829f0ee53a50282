"""ServedModels: the models behind one gateway — each with its kind, tokenizer and metrics — and
how a request's `model` field picks one. What the fleet says of each (workers, context) is the
fleet monitor's `FleetView`, not kept here."""

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from checkpoints import (
    ModelKind,
    PoolingConfig,
    SamplingDefaults,
    architecture,
    embedding_dimension,
    generation_max_context,
)
from gateway.errors import ErrorKind, GatewayError
from gateway.metrics import ModelMetrics
from protos import inference_pb2
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
    return generation_max_context(path, override)


@dataclass(frozen=True, slots=True)
class ServedModel:
    name: str
    kind: ModelKind
    tokenizer: Tokenizer
    metrics: Mapping[str, ModelMetrics]  # by API
    checkpoint_max_context: int  # until live workers report theirs
    dimension: int  # an embedder's vector size; 0 for a generator
    architecture: str  # config.json's model_type, until live workers report theirs
    sampling_defaults: SamplingDefaults

    @classmethod
    def of(
        cls,
        name: str,
        path: Path,
        kind: ModelKind,
        metrics: Mapping[str, ModelMetrics],
        max_context: int,
        generation_config: bool = True,
    ) -> "ServedModel":
        """`max_context` from `checkpoint_max_context`; `generation_config`: take its sampling defaults."""
        dimension = embedding_dimension(path) if kind is ModelKind.EMBED else 0
        defaults = (
            SamplingDefaults.of(path)
            if generation_config and kind is ModelKind.GENERATE
            else SamplingDefaults()
        )
        return cls(name, kind, Tokenizer(path), metrics, max_context, dimension, architecture(path), defaults)


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
        kind will do); NOT_FOUND when none, INVALID when it is of the other kind."""
        if not name:
            model = self.first if kind is None else self._defaults.get(kind)
            if model is None:
                raise GatewayError(f"model: {_NOUNS[kind]} model is not served here", ErrorKind.NOT_FOUND)
            return model
        model = self._by_name.get(name)
        if model is None:
            raise GatewayError(
                f"model: {name!r} is not served here (served: {', '.join(map(repr, self._by_name))})",
                ErrorKind.NOT_FOUND,
            )
        if kind is not None and model.kind is not kind:
            raise GatewayError(
                f"model: {name!r} is {_NOUNS[model.kind]} model: call {_CALLS[model.kind]}", ErrorKind.INVALID
            )
        return model
