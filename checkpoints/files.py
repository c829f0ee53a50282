"""A checkpoint directory's own files (config.json, sentence-transformers' `modules.json`,
`1_Pooling/config.json`, `sentence_bert_config.json`): a generator or an embedder, its context,
and for an embedder how its vectors are pooled and normalized."""

import json
from dataclasses import dataclass, fields
from enum import Enum
from pathlib import Path
from typing import Any, Literal

_GENERATIVE_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
# A config without `max_position_embeddings` gets transformers' Llama default.
DEFAULT_MAX_POSITIONS = 2048


class ModelKind(Enum):
    GENERATE = "generate"
    EMBED = "embed"


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def model_dir_of(path: Path) -> Path:
    """The directory holding the tokenizer and config: the path itself, or a GGUF file's folder."""
    return path.parent if path.suffix == ".gguf" else path


def model_id(model: Path, name: str = "") -> str:
    """The id a model is served under (and its request stream named after): `name`, else the
    checkpoint folder's name, or a GGUF file's stem."""
    if name:
        return name
    return model.stem if model.suffix == ".gguf" else model.name


def model_kind(model: Path) -> ModelKind:
    """A GGUF file or a checkpoint whose architecture has a language-model head generates; any
    other Hugging Face checkpoint (an encoder: BERT, RoBERTa, ...) embeds."""
    if model.suffix == ".gguf":
        return ModelKind.GENERATE
    architectures = _json(model / "config.json").get("architectures") or []
    if any(a.endswith(_GENERATIVE_SUFFIXES) for a in architectures):
        return ModelKind.GENERATE
    return ModelKind.EMBED


def _text_config(model: Path) -> dict[str, Any]:
    """A generator's config.json, or the text model's part of a multimodal one (Gemma 3's)."""
    config = _json(model_dir_of(model) / "config.json")
    return config.get("text_config") or config


def _max_positions(config: dict[str, Any]) -> int:
    return int(config.get("max_position_embeddings", DEFAULT_MAX_POSITIONS))


def generation_max_context(model: Path, override: int | None) -> int:
    """A generator's context (prompt and completion), capped by `override` when given."""
    limit = _max_positions(_text_config(model))
    return min(limit, override) if override else limit


def vocab_size(model: Path) -> int:
    return int(_text_config(model).get("vocab_size", 0))


def embedding_dimension(model: Path) -> int:
    return int(_json(model / "config.json").get("hidden_size", 0))


@dataclass(frozen=True, slots=True)
class PoolingConfig:
    mode: Literal["mean", "cls", "max"]
    normalize: bool
    max_length: int  # inputs are at most this many tokens, special tokens included

    @classmethod
    def of(cls, model: Path) -> "PoolingConfig":
        """As sentence-transformers would run the folder; without its files: mean pooling,
        normalized, up to the model's position limit."""
        modules_path = model / "modules.json"
        modules = json.loads(modules_path.read_text()) if modules_path.exists() else None
        pooling_path = "1_Pooling"
        normalize = True
        if isinstance(modules, list):
            types = {m.get("type", "").rsplit(".", 1)[-1]: m for m in modules}
            pooling_path = types.get("Pooling", {}).get("path", pooling_path)
            normalize = "Normalize" in types
        pooling = _json(model / pooling_path / "config.json")
        mode: Literal["mean", "cls", "max"] = "mean"
        if pooling.get("pooling_mode_cls_token"):
            mode = "cls"
        elif pooling.get("pooling_mode_max_tokens"):
            mode = "max"
        limit = _max_positions(_json(model / "config.json"))
        max_length = int(_json(model / "sentence_bert_config.json").get("max_seq_length", limit))
        return cls(mode, normalize, min(max_length, limit))


def architecture(model: Path) -> str:
    """config.json's model_type (a multimodal checkpoint's text model's); "" for a GGUF file
    without one (its worker reports it)."""
    return str(_text_config(model).get("model_type", ""))


@dataclass(frozen=True, slots=True)
class SamplingDefaults:
    """The sampling values a checkpoint's generation_config.json sets (None: it does not), which a
    request that leaves them unset takes, as vLLM's `--generation-config auto` does."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None

    @classmethod
    def of(cls, model: Path) -> "SamplingDefaults":
        config = _json(model_dir_of(model) / "generation_config.json")
        names = [field.name for field in fields(cls)]
        values = {name: config[name] for name in names if config.get(name) is not None}
        if values.get("top_k", 1) <= 0:  # transformers' and vLLM's "off"
            del values["top_k"]
        return cls(**values)
