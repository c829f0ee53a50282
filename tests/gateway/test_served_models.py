"""How a request's `model` picks a served model: each kind's default, NOT_FOUND for an unknown id,
INVALID_ARGUMENT for a model of the other kind; and the embedder's tokenization with truncation."""

import json
import shutil
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry
from transformers import AutoTokenizer

from checkpoints import ModelKind, SamplingDefaults
from gateway.errors import GatewayError
from gateway.metrics import GatewayMetrics
from gateway.served_models import ServedModel, ServedModels, checkpoint_max_context
from tokenization import Tokenizer


@pytest.fixture(scope="module")
def models(model_dir: Path, embedder_dir: Path) -> ServedModels:
    metrics = GatewayMetrics(CollectorRegistry(), 2048)

    def served(name: str, path: Path, kind: ModelKind) -> ServedModel:
        return ServedModel.of(name, path, kind, metrics.model(name), checkpoint_max_context(path, kind, None))

    return ServedModels(
        [
            served("gen", model_dir, ModelKind.GENERATE),
            served("emb", embedder_dir, ModelKind.EMBED),
            served("emb2", embedder_dir, ModelKind.EMBED),
        ]
    )


def test_empty_names_pick_each_kinds_first_model(models: ServedModels) -> None:
    assert models.resolve("", ModelKind.GENERATE).name == "gen"
    assert models.resolve("", ModelKind.EMBED).name == "emb"
    assert models.resolve("", None).name == "gen"  # Tokenize: any kind, the first model
    assert models.resolve("emb2", ModelKind.EMBED).name == "emb2"
    assert [m.name for m in models if models.is_default(m)] == ["gen", "emb"]
    assert models.resolve("emb", ModelKind.EMBED).checkpoint_max_context == 256


@pytest.mark.parametrize(
    ("name", "kind", "code", "message"),
    [
        ("nope", ModelKind.EMBED, grpc.StatusCode.NOT_FOUND, "model: 'nope' is not served here (served: "),
        ("emb", ModelKind.GENERATE, grpc.StatusCode.INVALID_ARGUMENT, "model: 'emb' is an embedding model"),
        ("gen", ModelKind.EMBED, grpc.StatusCode.INVALID_ARGUMENT, "model: 'gen' is a generation model"),
    ],
)
def test_wrong_models_are_refused_clearly(
    models: ServedModels, name: str, kind: ModelKind, code: grpc.StatusCode, message: str
) -> None:
    with pytest.raises(GatewayError) as error:
        models.resolve(name, kind)
    assert error.value.code == code and error.value.message.startswith(message)


def test_a_gateway_without_an_embedder_says_so(models: ServedModels) -> None:
    only_generation = ServedModels([next(iter(models))])
    with pytest.raises(GatewayError) as error:
        only_generation.resolve("", ModelKind.EMBED)
    assert error.value.code == grpc.StatusCode.NOT_FOUND
    assert error.value.message == "model: an embedding model is not served here"


def test_two_models_may_not_share_a_name(models: ServedModels) -> None:
    first = next(iter(models))
    with pytest.raises(ValueError, match="share a name"):
        ServedModels([first, first])


def test_embedder_tokens_match_hugging_face_with_and_without_truncation(embedder_dir: Path) -> None:
    ours = Tokenizer(embedder_dir)
    theirs = AutoTokenizer.from_pretrained(str(embedder_dir))
    texts = ["Hi", "word " * 400, "短い文 and more"]
    # The checkpoint's tokenizer.json truncates to 128 on its own; the gateway must see true lengths.
    assert [len(ids) for ids in ours.encode_many(texts)] == [len(theirs(t)["input_ids"]) for t in texts]
    assert len(ours.encode_many(texts)[1]) == 402
    truncated = ours.encode_many(texts, truncate_to=256)
    assert truncated == [theirs(t, truncation=True, max_length=256)["input_ids"] for t in texts]


def test_generation_config_none_leaves_the_api_defaults(model_dir: Path, tmp_path: Path) -> None:
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir / name, tmp_path / name)
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_p": 0.9}))
    metrics = GatewayMetrics(CollectorRegistry(), 2048)

    def served(generation_config: bool) -> ServedModel:
        return ServedModel.of("m", tmp_path, ModelKind.GENERATE, metrics.model("m"), 2048, generation_config)

    assert served(True).sampling_defaults == SamplingDefaults(temperature=0.6, top_p=0.9)
    assert served(False).sampling_defaults == SamplingDefaults()
    assert served(True).architecture == "llama"
