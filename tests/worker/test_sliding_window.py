"""Which layers attend through a window, read from each family's config as transformers reads it;
proof that the parity prompts of test_families reach past the windows (so a missing window fails);
and the blocks behind a window every layer has given back, as the KV usage gauge shows."""

import json
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry
from transformers import Gemma2Config, LlamaConfig, MistralConfig, Qwen2Config

from scheduler import SamplingParams, Sequence
from telemetry.metrics import PREFIX
from tests.tiny_checkpoints import WINDOW, build
from tests.worker.test_families import hf_greedy
from worker.llm import LLM
from worker.metrics import GenerationMetrics
from worker.model_config import SLIDING, model_config_from_hf


def test_qwen2_has_a_window_only_on_the_layers_it_marks(tmp_path: Path) -> None:
    assert model_config_from_hf(Qwen2Config(sliding_window=32), tmp_path).window is None
    config = model_config_from_hf(
        Qwen2Config(sliding_window=32, use_sliding_window=True, num_hidden_layers=4, max_window_layers=2),
        tmp_path,
    )
    assert [config.layer_window(i) for i in range(4)] == [None, None, 32, 32]


def test_gemma2_alternates_and_mistral_windows_every_layer(tmp_path: Path) -> None:
    gemma = model_config_from_hf(Gemma2Config(num_hidden_layers=4, sliding_window=8), tmp_path)
    assert gemma.layer_types == (SLIDING, "full_attention", SLIDING, "full_attention")
    mistral = model_config_from_hf(MistralConfig(num_hidden_layers=2, sliding_window=8), tmp_path)
    assert [mistral.layer_window(i) for i in range(2)] == [8, 8] and mistral.window_of_every_layer == 8
    assert gemma.window_of_every_layer is None
    assert model_config_from_hf(LlamaConfig(num_hidden_layers=2), tmp_path).window is None
    declared = MistralConfig(num_hidden_layers=2, sliding_window=8, layer_types=[SLIDING, "full_attention"])
    assert model_config_from_hf(declared, tmp_path).window_of_every_layer == 8  # Mistral ignores layer_types


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


def test_blocks_behind_the_window_are_given_back_and_the_kv_gauge_shows_it(
    model_dir: Path, tmp_path: Path, workload: list[dict[str, object]]
) -> None:
    longest = max((list(row["prompt_token_ids"]) for row in workload), key=len)  # type: ignore[call-overload]
    held = {}
    for family in ("mistral", "llama"):  # the same shapes, with and without a window
        core = LLM(model=build(family, tmp_path / family, model_dir), kv_cache_bytes=8 << 20).core
        registry = CollectorRegistry()
        metrics = GenerationMetrics(registry, family, core.scheduler)
        core.add(Sequence("long", longest, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)))
        core.step()  # the whole prompt
        peak = 0
        while not core.scheduler.is_idle:
            core.step()
            pool = core.scheduler.block_manager
            peak = max(peak, pool.num_used_blocks)
            metrics.refresh()
            usage = registry.get_sample_value(f"{PREFIX}kv_cache_usage_perc", {"model_name": family})
            assert usage == pool.num_used_blocks / pool.num_blocks
        held[family] = peak
        print(f"{family}: at most {peak} blocks held while decoding")
    assert held["mistral"] <= -(-WINDOW // 16) + 1  # the window's blocks and the one being filled
    assert held["llama"] == -(-(len(longest) + 40) // 16)
