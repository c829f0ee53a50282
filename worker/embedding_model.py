"""EmbeddingModel: a Hugging Face encoder and its pooling, run on batches of token ids."""

from pathlib import Path

import torch
from transformers import AutoModel

from checkpoints import PoolingConfig
from worker.model_config import CheckpointError


class EmbeddingModel:
    """Pads a batch to its longest input, runs the encoder once and pools over the real tokens only
    (mean, CLS or max, as the checkpoint's sentence-transformers config says). Normalization is
    left to the caller: calls batched together may ask for it differently."""

    def __init__(self, path: Path, device: torch.device, dtype: torch.dtype = torch.float32):
        self.pooling = PoolingConfig.of(path)
        self.device = device
        self.dtype = dtype
        try:
            self.model = AutoModel.from_pretrained(str(path), dtype=dtype).to(device).eval()
        except (ValueError, OSError) as error:  # remote code, a format transformers does not read
            raise CheckpointError(f"{path}: {error}".replace("\n", " ")) from None
        self.pad_token_id = int(self.model.config.pad_token_id or 0)  # masked out: any id would do
        self.dimension = int(self.model.config.hidden_size)
        self.vocab_size = int(self.model.config.vocab_size)
        self.architecture = str(self.model.config.model_type)

    @torch.inference_mode()
    def encode(self, inputs: list[list[int]] | list[tuple[int, ...]]) -> torch.Tensor:
        """One pooled vector per input, float32 on the CPU, in the order given."""
        longest = max(len(ids) for ids in inputs)
        ids = torch.full((len(inputs), longest), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(inputs), longest), dtype=torch.long)
        for row, tokens in enumerate(inputs):
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[row, : len(tokens)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return self._pool(hidden, mask).float().cpu()

    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.pooling.mode == "cls":
            return hidden[:, 0]
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        if self.pooling.mode == "max":
            return hidden.masked_fill(weights == 0, float("-inf")).max(dim=1).values
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
