"""EmbeddingModel against transformers: texts of mixed length batched together give the vectors the
model gives each text alone with its own pooling (mean over the tokens, then L2 normalization, as
its sentence-transformers files say)."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from protos.model_kind import ModelKind, PoolingConfig, model_kind
from worker.embedding_model import EmbeddingModel

TEXTS = [
    "Hi",
    "The cat sat on the mat.",
    "Retrieval next to chat: the same services call both, through one gateway and one fleet.",
    " ".join(["A long document about continuous batching, paged attention and Redis streams."] * 12),
    "短い文",
]

pytestmark = pytest.mark.slow


def reference(path: Path, text: str) -> torch.Tensor:
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModel.from_pretrained(str(path), dtype=torch.float32).eval()
    encoded = tokenizer(text, return_tensors="pt", truncation=True, max_length=256)
    with torch.inference_mode():
        hidden = model(**encoded).last_hidden_state[0]
    return torch.nn.functional.normalize(hidden.mean(dim=0), dim=0)


def test_the_default_embedder_reads_as_a_mean_pooled_normalized_encoder(embedder_dir: Path) -> None:
    assert model_kind(embedder_dir) is ModelKind.EMBED
    assert PoolingConfig.of(embedder_dir) == PoolingConfig("mean", True, 256)


def test_batched_vectors_equal_each_text_alone(embedder_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(embedder_dir))
    inputs = [tokenizer(t, truncation=True, max_length=256)["input_ids"] for t in TEXTS]
    assert len({len(ids) for ids in inputs}) == len(TEXTS), "mixed lengths: padding is exercised"
    model = EmbeddingModel(embedder_dir, torch.device("cpu"))
    vectors = model.encode(inputs)
    assert vectors.shape == (len(TEXTS), 384)
    for text, vector in zip(TEXTS, vectors, strict=True):
        expected = reference(embedder_dir, text)
        assert torch.nn.functional.cosine_similarity(vector, expected, dim=0) > 0.9999, text
        assert vector.norm().item() == pytest.approx(1.0, abs=1e-5)
