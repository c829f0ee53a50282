"""What a checkpoint holds, read from its own files without torch: shared by the gateway (which
never loads weights), the worker and the client."""

from checkpoints.files import (
    ModelKind,
    PoolingConfig,
    SamplingDefaults,
    architecture,
    embedding_dimension,
    generation_max_context,
    model_dir_of,
    model_id,
    model_kind,
    vocab_size,
)

__all__ = [
    "ModelKind",
    "PoolingConfig",
    "SamplingDefaults",
    "architecture",
    "embedding_dimension",
    "generation_max_context",
    "model_dir_of",
    "model_id",
    "model_kind",
    "vocab_size",
]
