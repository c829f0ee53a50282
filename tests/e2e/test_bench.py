"""`conveyor bench` (what `make bench` runs) on a small workload: every in-process row, the
roofline line, the batching strategies and speculative decoding side by side, other engine settings
against the default (the spread of
repeated rows is tested in tests/client/test_bench_table.py)."""

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def _write(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_conveyor_bench_prints_every_row_and_compares_strategies_on_one_engine(
    model_dir: Path, tmp_path: Path, workload: list[dict[str, object]]
) -> None:
    standard = _write(tmp_path / "standard.jsonl", [{**row, "max_tokens": 6} for row in workload[:3]])
    lines = (ROOT / "bench" / "repeat-workload.jsonl").read_text().splitlines()
    repeating = _write(tmp_path / "repeat.jsonl", [{**json.loads(lines[8]), "max_tokens": 16}])
    report = tmp_path / "report.json"
    command = ["bench", "--model", str(model_dir), "--workload", str(standard), "--baseline-requests", "0"]
    command += ["--quantization", "--batching-requests", "2"]
    command += ["--speculative-workload", str(repeating), "--json", str(report)]
    command += ["--against", "cpu_fused_ops=false", "max_num_batched_tokens=64"]
    result = subprocess.run(
        [sys.executable, "-m", "client", *command],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    table = out[out.index("min-max") :]
    for row in ("conveyor (in-process)", "conveyor, JSON schema", "conveyor, ngram drafts"):
        assert row in table
    assert "1 attempt(s) of every row" in out
    assert "roofline, mixed steps (prompt tokens and decodes)" in out and "GFLOP/s; share:" in out
    for strategy in ("sequential", "static", "continuous"):
        assert f"  {strategy} " in out
    assert "speculative decoding, ngram, 4 drafts" in out and "identical with and without drafts" in out
    assert "greedy outputs identical to unquantized float32, for ngram: 3/3" in out
    assert "one stream" in out and "ngram" in out.split("one stream", 1)[1]
    label = "cpu_fused_ops=false max_num_batched_tokens=64"  # a second engine beside the default
    assert f"conveyor, {label}" in table
    ratios = out[out.index(f"{label} against the default") :].splitlines()[0]
    for figure in ("tok/s", "TTFT p50", "a step with prompt tokens", "a decode-only step"):
        assert figure in ratios
    assert f"roofline, mixed steps (prompt tokens and decodes), {label}:" in out
    assert f"greedy outputs identical to unquantized float32, for {label}: 3/3" in out
    figures = json.loads(report.read_text())
    assert len(figures["attempts"]) == 1 and len(figures["one_stream_itl_ms"]["none"]) == 1


def test_conveyor_bench_refuses_a_setting_the_engine_does_not_have_or_a_value_it_does_not_take(
    model_dir: Path,
) -> None:
    command = [sys.executable, "-m", "client", "bench", "--model", str(model_dir), "--baseline-requests", "0"]
    refused = subprocess.run(
        [*command, "--against", "no_such_setting=1"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert (
        refused.returncode != 0 and "no_such_setting" in refused.stderr and "cpu_fused_ops" in refused.stderr
    )
    refused = subprocess.run(
        [*command, "--against", "max_num_batched_tokens=lots"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode != 0 and "max_num_batched_tokens" in refused.stderr and "lots" in refused.stderr
