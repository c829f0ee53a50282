"""The embeddings engine against transformers: texts of mixed length, batched together and split
across steps, give the vectors the model gives each text alone with its own pooling (mean over the
tokens, then L2 normalization, as its sentence-transformers files say), whole and in order."""

import time
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from checkpoints import ModelKind, PoolingConfig, model_kind
from scheduler.embedding_batcher import EmbeddingBatcherConfig
from tests.embedding_reference import TEXTS as ALL_TEXTS
from tests.embedding_reference import reference_vectors
from worker.embedding_core import Embedded, EmbeddingCore
from worker.embedding_model import EmbeddingModel

TEXTS = ALL_TEXTS[:5]

pytestmark = pytest.mark.slow


def test_the_default_embedder_reads_as_a_mean_pooled_normalized_encoder(embedder_dir: Path) -> None:
    assert model_kind(embedder_dir) is ModelKind.EMBED
    assert PoolingConfig.of(embedder_dir) == PoolingConfig("mean", True, 256)


def embed_all(core: EmbeddingCore) -> dict[str, Embedded]:
    done: dict[str, Embedded] = {}
    while core.wait_s() is not None:
        time.sleep(core.wait_s() or 0.0)
        step = core.step()
        done.update((call.request_id, call) for call in (step.finished if step is not None else []))
    return done


def test_batched_vectors_equal_each_text_alone(embedder_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(embedder_dir))
    inputs = [tokenizer(t, truncation=True, max_length=256)["input_ids"] for t in TEXTS]
    assert len({len(ids) for ids in inputs}) == len(TEXTS), "mixed lengths: padding is exercised"
    # A small budget splits the calls across several batches; order must still come back.
    core = EmbeddingCore(
        EmbeddingModel(embedder_dir, torch.device("cpu")), EmbeddingBatcherConfig(512, 3, 0.01)
    )
    core.add("many", inputs)
    core.add("one", [inputs[1]])
    core.add("raw", [inputs[2]], normalize=False)
    done = embed_all(core)
    assert set(done) == {"many", "one", "raw"}
    many = done["many"]
    assert many.prompt_tokens == sum(len(ids) for ids in inputs)
    assert len(many.vectors) == len(TEXTS) and len(many.vectors[0]) == 384
    expected = reference_vectors(embedder_dir, TEXTS)
    for text, vector, reference in zip(TEXTS, many.vectors, expected, strict=True):
        got = torch.tensor(vector)
        assert torch.nn.functional.cosine_similarity(got, reference, dim=0) > 0.9999, text
        assert got.norm().item() == pytest.approx(1.0, abs=1e-5)
    assert done["one"].vectors[0] == pytest.approx(many.vectors[1], abs=1e-5)
    raw = torch.tensor(done["raw"].vectors[0])
    assert raw.norm().item() > 1.01, "normalize=False keeps the pooled vector as is"
    assert torch.nn.functional.cosine_similarity(raw, torch.tensor(many.vectors[2]), dim=0) > 0.9999


def test_an_input_over_the_model_limit_is_refused(embedder_dir: Path) -> None:
    core = EmbeddingCore(EmbeddingModel(embedder_dir, torch.device("cpu")), EmbeddingBatcherConfig(512, 8, 0))
    with pytest.raises(ValueError, match="256"):
        core.add("long", [[101] * 257])
    assert core.wait_s() is None


def test_bfloat16_vectors_point_where_the_float32_ones_do(embedder_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(embedder_dir))
    inputs = [tokenizer(t, truncation=True, max_length=256)["input_ids"] for t in TEXTS]
    model = EmbeddingModel(embedder_dir, torch.device("cpu"), torch.bfloat16)
    assert next(model.model.parameters()).dtype == torch.bfloat16
    vectors = torch.nn.functional.normalize(model.encode(inputs), dim=-1)
    for text, vector, reference in zip(TEXTS, vectors, reference_vectors(embedder_dir, TEXTS), strict=True):
        assert vector.dtype == torch.float32
        assert torch.nn.functional.cosine_similarity(vector, reference, dim=0) > 0.99, text
