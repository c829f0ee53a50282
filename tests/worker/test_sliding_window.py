"""A checkpoint whose sliding window is shorter than the context it would serve is refused, naming
the field and what to do, instead of serving wrong tokens past the window (tested on a tiny random
Mistral saved by transformers' own classes)."""

from pathlib import Path

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config

from worker.model_config import model_config_from_hf
from worker.model_loader import load_model


@pytest.fixture(scope="module")
def tiny_mistral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = MistralConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        sliding_window=24,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-mistral")
    MistralForCausalLM(config).save_pretrained(path)
    return path


def test_a_window_shorter_than_the_context_is_refused(tiny_mistral: Path) -> None:
    with pytest.raises(ValueError, match="sliding_window 24 is shorter than the context of 512 tokens"):
        load_model(tiny_mistral, torch.device("cpu"))


def test_the_same_checkpoint_serves_within_its_window(tiny_mistral: Path) -> None:
    _model, config, context = load_model(tiny_mistral, torch.device("cpu"), max_model_len=24)
    assert (config.sliding_window, context) == (24, 24)


def test_qwen2_has_a_window_only_when_it_uses_one(tmp_path: Path) -> None:
    assert model_config_from_hf(Qwen2Config(sliding_window=32), tmp_path).sliding_window is None
    config = Qwen2Config(sliding_window=32, use_sliding_window=True)
    assert model_config_from_hf(config, tmp_path).sliding_window == 32
