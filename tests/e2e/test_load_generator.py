"""`conveyor bench --address` against a live stack: the table, the JSON and a PNG that opens."""

import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image

from tests.e2e.conftest import Cluster


def test_load_generator_reports_a_table_json_and_plot(cluster: Cluster, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    rows = [
        {"prompt": "Name a colour.", "max_tokens": 6},
        {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 5},
        {"prompt_token_ids": [1, 4093, 198, 19556, 260, 1194], "max_tokens": 4},
    ] * 2
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    report, picture = tmp_path / "report.json", tmp_path / "latency.png"
    run = subprocess.run(
        [
            sys.executable, "-m", "client", "bench", "--address", cluster.address, "--workload", str(prompts),
            "--concurrency", "3", "--json", str(report), "--plot", str(picture),
        ],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "output tokens/s" in run.stdout and "time to first token s" in run.stdout
    assert "concurrency 3; 6 requests" in run.stdout and "errors: none" in run.stdout
    summary = json.loads(report.read_text())
    assert summary["completed"] == 6 and summary["errors"] == {}
    assert summary["output_tokens"] <= 2 * (6 + 5 + 4) and summary["output_tokens"] >= 2 * 4
    assert 0 < summary["ttft_s"]["p50"] <= summary["ttft_s"]["p99"]
    image = matplotlib.image.imread(picture)
    assert image.shape[0] > 100 and image.shape[1] > 100


def test_poisson_arrivals_and_errors_by_status(cluster: Cluster, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "Hi", "max_tokens": 3}, {"prompt_token_ids": [999_999], "max_tokens": 3}] * 2
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    report = tmp_path / "report.json"
    run = subprocess.run(
        [
            sys.executable, "-m", "client", "bench", "--address", cluster.address, "--workload", str(prompts),
            "--request-rate", "20", "--json", str(report),
        ],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "Poisson 20 req/s" in run.stdout and "errors: INVALID_ARGUMENT 2" in run.stdout
    assert json.loads(report.read_text())["errors"] == {"INVALID_ARGUMENT": 2}


def test_the_load_generator_drives_the_openai_front(cluster: Cluster, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    rows = [
        {"prompt_token_ids": [1, 4093, 198, 19556, 260, 1194], "max_tokens": 6},
        {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 5},
    ] * 2
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    report = tmp_path / "report.json"
    run = subprocess.run(
        [
            sys.executable, "-m", "client", "bench", "--api", "openai", "--address", cluster.http_url,
            "--model-name", "smollm2-135m-instruct", "--workload", str(prompts), "--concurrency", "4",
            "--json", str(report),
        ],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "openai, concurrency 4; 4 requests" in run.stdout and "errors: none" in run.stdout
    summary = json.loads(report.read_text())
    assert summary["completed"] == 4 and 2 * 4 <= summary["output_tokens"] <= 2 * (6 + 5)
    assert 0 < summary["ttft_s"]["p50"] <= summary["ttft_s"]["p99"]
