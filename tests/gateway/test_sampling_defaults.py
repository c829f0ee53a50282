"""A checkpoint's generation_config.json sampling values, as the gateway reads them."""

import json
from pathlib import Path

from checkpoints import SamplingDefaults


def test_only_the_values_the_checkpoint_sets_are_taken(tmp_path: Path) -> None:
    config = {"temperature": 0.7, "top_p": 0.8, "top_k": -1, "do_sample": True, "eos_token_id": 2}
    (tmp_path / "generation_config.json").write_text(json.dumps(config))
    assert SamplingDefaults.of(tmp_path) == SamplingDefaults(temperature=0.7, top_p=0.8)  # top_k -1 is "off"


def test_no_generation_config_sets_nothing(tmp_path: Path) -> None:
    assert SamplingDefaults.of(tmp_path) == SamplingDefaults()
