"""Cosine similarities of embedding vectors, as `conveyor embed --similarity` prints them."""

import math
from collections.abc import Sequence

_LABEL = 24  # characters of each text shown as its row's label


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    norms = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norms if norms else 0.0


def cosine_table(texts: Sequence[str], vectors: Sequence[Sequence[float]]) -> str:
    """One row per text: its label, then its cosine with every text (columns numbered as the rows)."""
    labels = [f"[{i}] {t if len(t) <= _LABEL else t[: _LABEL - 1] + '…'}" for i, t in enumerate(texts)]
    width = max(len(label) for label in labels)
    lines = [" " * width + "".join(f"{f'[{i}]':>8}" for i in range(len(texts)))]
    for label, row in zip(labels, vectors, strict=True):
        lines.append(label.ljust(width) + "".join(f"{cosine(row, other):8.4f}" for other in vectors))
    return "\n".join(lines)
