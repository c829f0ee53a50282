"""Which layers attend through a window, read from each family's config as transformers reads it, and
proof that the parity prompts of test_families reach past the windows (so a missing window fails)."""

import json
from pathlib import Path

import torch
from transformers import Gemma2Config, LlamaConfig, MistralConfig, Qwen2Config

from tests.tiny_checkpoints import WINDOW, build
from tests.worker.test_families import hf_greedy
from worker.model_config import SLIDING, model_config_from_hf


def test_qwen2_has_a_window_only_on_the_layers_it_marks(tmp_path: Path) -> None:
    assert model_config_from_hf(Qwen2Config(sliding_window=32), tmp_path).sliding_window is None
    config = model_config_from_hf(
        Qwen2Config(sliding_window=32, use_sliding_window=True, num_hidden_layers=4, max_window_layers=2),
        tmp_path,
    )
    assert [config.layer_window(i) for i in range(4)] == [None, None, 32, 32]


def test_gemma2_alternates_and_mistral_windows_every_layer(tmp_path: Path) -> None:
    gemma = model_config_from_hf(Gemma2Config(num_hidden_layers=4, sliding_window=8), tmp_path)
    assert gemma.layer_types == (SLIDING, "full_attention", SLIDING, "full_attention")
    mistral = model_config_from_hf(MistralConfig(num_hidden_layers=2, sliding_window=8), tmp_path)
    assert [mistral.layer_window(i) for i in range(2)] == [8, 8]
    assert model_config_from_hf(LlamaConfig(num_hidden_layers=2), tmp_path).sliding_window is None


def test_the_parity_prompts_reach_past_the_window(
    model_dir: Path, tmp_path: Path, workload: list[dict[str, object]]
) -> None:
    path = build("mistral", tmp_path / "windowed", model_dir)
    unwindowed = tmp_path / "unwindowed"
    build("mistral", unwindowed, model_dir)
    config = json.loads((unwindowed / "config.json").read_text())
    (unwindowed / "config.json").write_text(json.dumps({**config, "sliding_window": None}))
    prompts = [list(row["prompt_token_ids"]) for row in workload[:3]]  # type: ignore[call-overload]
    assert all(len(prompt) > WINDOW for prompt in prompts)
    torch.manual_seed(0)
    assert hf_greedy(path, prompts) != hf_greedy(unwindowed, prompts)
