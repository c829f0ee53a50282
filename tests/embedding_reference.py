"""What embedding parity is measured against: transformers with the default embedder's own pooling
(mean over the tokens, then L2 normalization, as its sentence-transformers files say), one text at a
time; and texts of mixed length (the first five all of different lengths) to compare on."""

from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer

TEXTS = [
    "Hi",
    "The cat sat on the mat.",
    "Retrieval next to chat: the same services call both, through one gateway and one fleet.",
    " ".join(["A long document about continuous batching, paged attention and Redis streams."] * 12),
    "短い文",
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "Padding wastes compute; sorting by length wastes little.",
    "🚀",
]


def reference_vectors(model_dir: Path, texts: list[str]) -> list[torch.Tensor]:
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModel.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    vectors = []
    for text in texts:
        encoded = tokenizer(text, return_tensors="pt", truncation=True, max_length=256)
        with torch.inference_mode():
            hidden = model(**encoded).last_hidden_state[0]
        vectors.append(torch.nn.functional.normalize(hidden.mean(dim=0), dim=0))
    return vectors
